"""The cached feature, forecast instead of reused (``forecast="linear"``, issue 19): :class:`ForecastFeature`.

It plugs in where :class:`~DeepCache.engine.state.ReuseFeature` does (the generation's ``feature``) and keeps one
more feature map: the difference ``F_a - F_a'`` of the generation's last two full steps ``a' < a``. A retrieval
step ``k`` hands out ``F_a + c*(F_a - F_a')`` with ``c = w_k*(k - a)/(a - a')`` (:func:`DeepCache.schedules.forecast.coefficient`),
one fused multiply-add; until the generation has two full steps the difference is zero (reuse, bit for bit).

Compiled graphs: ``c`` is a 0-d tensor on the feature's device, filled before each retrieval step outside any graph
(:meth:`prepare`), so the retrieval graph never sees a Python number that changes per step; the difference is
computed after the full step (:meth:`seal`, outside any graph) from copies the generation owns, so CUDA graphs'
output pools never hold it; and it is a tensor from the first full step on (zeros), so the first retrieval steps
and later ones run the same graph. The memory: the cache plus one difference map, both freed with the generation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree

from ..schedules.forecast import coefficient, extrapolate
from .state import ReuseFeature
from .tensors import nbytes


def _floating(x: Any) -> bool:
    return torch.is_tensor(x) and x.is_floating_point()


def _difference(value: Any, previous: Any) -> Any:
    """``value - previous`` leaf by leaf, written into ``previous`` (ours: a copy) where torch allows it."""

    def sub(v: Any, p: Any) -> Any:
        if not _floating(v):
            return v
        try:
            return torch.sub(v, p, out=p)
        except RuntimeError:  # an inference tensor outside inference mode, say
            return v - p

    return pytree.tree_map(sub, value, previous)


@dataclass
class ForecastFeature(ReuseFeature):
    """The cached feature of the last full step ``a``, extrapolated along the line from the full step ``a'`` before it.

    ``weight_at(k)`` is the weight of evaluation ``k`` (:meth:`DeepCache.schedules.schedule.CacheParams.weight_at`).
    """

    weight_at: Callable[[int], float] = lambda step: 1.0
    difference: Any = None  # F_a - F_a' (zeros while the generation has one full step)
    coeff: torch.Tensor | None = None  # 0-d: c of the retrieval step in progress
    history: tuple[int, ...] = ()  # the indices of the last (up to two) full steps, oldest first
    _previous: Any = None  # F_a' while full step a runs (becomes the difference in seal)
    _step: int | None = None  # the full step in progress

    def reset(self) -> None:
        super().reset()
        self.difference, self.coeff, self.history, self._previous, self._step = None, None, (), None, None

    def usable(self, key: tuple | None) -> bool:
        return self.difference is not None and super().usable(key)

    def refresh(self, key: tuple | None) -> None:
        """A full step begins: the old feature becomes the 'before' of the line (if it is for inputs like these)."""
        keep = self.value is not None and self.key == key
        self._previous = self.value if keep else None
        if not keep:
            self.history = ()
        self.difference = None
        super().refresh(key)

    def prepare(self, step: int, full: bool) -> None:
        if full:
            self._step = step
            return
        c = 0.0
        if len(self.history) == 2 and self.difference is not None:
            c = coefficient(self.weight_at(step), step, self.history[1], self.history[0])
        if self.coeff is not None:
            self.coeff.fill_(c)

    def seal(self) -> None:
        super().seal()
        previous, self._previous = self._previous, None
        if self.value is None:
            return
        step = self._step if self._step is not None else (self.history[-1] + 1 if self.history else 0)
        same = previous is not None and pytree.tree_structure(previous) == pytree.tree_structure(self.value)
        if same and self.history:
            self.difference = _difference(self.value, previous)
            self.history = (self.history[-1], step)
        else:
            self.difference = pytree.tree_map(lambda v: torch.zeros_like(v) if _floating(v) else v, self.value)
            self.history = (step,)
        first = next((t for t in pytree.tree_leaves(self.value) if _floating(t)), None)
        if first is not None and (self.coeff is None or self.coeff.device != first.device):
            self.coeff = torch.zeros((), dtype=torch.float32, device=first.device)

    def handout(self) -> Any:
        """``F_a + c*(F_a - F_a')``: a new tensor (so a consumer that modifies it in place never touches the cache)."""
        value, difference, coeff = self.value, self.difference, self.coeff
        if torch.is_tensor(value):  # the usual outputs (a tensor, a 1-tuple) without pytree's cost (~75 us per call)
            return extrapolate(value, difference, coeff)
        if type(value) is tuple:
            return tuple(extrapolate(v, d, coeff) if _floating(v) else v for v, d in zip(value, difference))
        return pytree.tree_map(lambda v, d: extrapolate(v, d, coeff) if _floating(v) else v, value, difference)

    def nbytes(self) -> int:
        return super().nbytes() + (0 if self.difference is None else nbytes(self.difference))
