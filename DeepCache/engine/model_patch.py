"""What the patch on a denoiser shares across families (U-Net: :mod:`.unet`, transformer: :mod:`.transformer`).

A :class:`ModelPatch` holds its model weakly, knows its owners (leases), counts the generations running on it (so
that a removal waits until they end), finds the generation an evaluation belongs to, and closes an evaluation. What
it wraps and what each wrapped module does on a step is the family's.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
from torch import nn

from ..schedules.params import CacheParams
from .forecast_feature import ForecastFeature
from .lifecycle import EvaluationGuard, Lease, current_lease_generation, generations, locked
from .state import Generation, Mode, ReuseFeature
from .tensors import hidden_states, relative_l1
from .wrappers import Patched, Wrapping


class ModelPatch(Patched):
    """Wrappers on one denoiser, shared by every helper that caches it; removed when the last owner leaves.

    It holds the model weakly and no generation state of its own: a generation lives with the pipeline call that
    runs it (:func:`~DeepCache.engine.lifecycle.running`) or with the bare-model helper that drives it.
    """

    #: what the family calls its model in messages ("U-Net", "transformer")
    kind = "model"

    def __init__(self, model: nn.Module, module_forward: Callable[..., Any]) -> None:
        self._model_ref = weakref.ref(model)
        self.mode = Mode.OFF  # the evaluation in progress (read by the wrappers)
        self.gen: Any = None
        self.guard = EvaluationGuard()
        self.owners: dict[weakref.ref, None] = {}  # live leases, oldest first
        self._wrapping = Wrapping(module_forward)
        self._running = 0  # generations in progress (pipeline calls), across threads
        self._idle: list[Callable[[], None]] = []  # removals waiting for them to finish

    @property
    def model(self) -> nn.Module:
        model = self._model_ref()
        if model is None:
            raise RuntimeError(f"the {self.kind} of this DeepCache patch was garbage-collected")
        return model

    def wrapped_modules(self, model: nn.Module) -> list[tuple[Any, nn.Module]]:
        """(key, module) of every module the family wraps, in the order its tables are indexed."""
        raise NotImplementedError

    def new_generation(self, params: CacheParams, num_steps: Callable[[], int | None] = lambda: None) -> Any:
        raise NotImplementedError

    def controlnet_patches(self) -> list:
        return []

    # -- install / remove (install lock held) ----------------------------------------------------
    def install(self) -> None:
        if not self.installed:
            model = self.model
            self._wrapping.install(self, model, self.wrapped_modules(model))

    def when_idle(self, action: Callable[[], None]) -> None:
        """Run ``action`` now if no generation is running on this model, else when the last one ends."""
        if self._running:
            self._idle.append(action)
        else:
            action()

    def generation_started(self) -> None:
        with locked():
            self._running += 1

    def generation_ended(self) -> None:
        with locked():
            self._running -= 1
            if not self._running:
                idle, self._idle = self._idle, []
                for action in idle:
                    action()

    # -- per evaluation -------------------------------------------------------------------------
    def current_generation(self) -> Any:
        """The generation an evaluation of this model in the current context belongs to, if any."""
        for gen in reversed(generations()):
            if gen.owner is self:
                return gen
        return current_lease_generation(self.owners)

    def _clear(self) -> None:
        self.mode, self.gen = Mode.OFF, None

    def _end(self) -> None:
        if self.gen is not None and self.gen.end(self.mode is Mode.FULL):
            self.on_modified_handout()

    def on_modified_handout(self) -> None:
        """A consumer modified the handed-out feature in place (the family may hand out copies from now on)."""

    def _abort(self) -> None:
        if self.gen is not None:
            self.gen.abort()


def acquire_patch(registry: "weakref.WeakKeyDictionary[nn.Module, Any]", model: nn.Module, layout: Any,
                  make: Callable[[nn.Module], ModelPatch]) -> Lease:
    """Install (or join) the patch on ``model`` kept in ``registry`` (one per model, keyed weakly; a patch for an
    older layout with no owner left is replaced by ``make(model)``); the lease keeps it until released or dropped."""
    with locked():
        patch = registry.get(model)
        if patch is None or (patch.layout != layout and not patch.owners):
            if patch is not None:
                patch._wrapping.remove()
            patch = registry[model] = make(model)
        patch.install()
        lease = Lease(patch)
        patch.owners[lease.ref] = None
        return lease


def feature_for(params: CacheParams, clone_handout: bool) -> ReuseFeature:
    """A generation's cached feature: reused (DeepCache's rule) or forecast (``forecast="linear"``)."""
    if params.forecasts:
        return ForecastFeature(clone_handout=clone_handout, weight_at=params.weight_at)
    return ReuseFeature(clone_handout=clone_handout)


def decide_adaptive(patch: Patched, gen: Generation, args: tuple, kwargs: dict) -> bool:
    """An adaptive tentative retrieval step reached its first divergent module: full step or not (the change of
    that module's input since the last full step decides)."""
    if torch.compiler.is_compiling():
        raise RuntimeError(
            'skip_mode="adaptive" decides each step from a value read on the host, which torch.compile cannot '
            'trace: run the model eagerly, or compile with the decisions fixed in advance: '
            'set_params(skip_mode="custom", full_steps=[i for i, f in enumerate(helper.last_steps) if f]) from an '
            "eager adaptive run, or a schedule from helper.calibrate(...)."
        )
    x, ref = hidden_states(args, kwargs), gen.adaptive.reference
    signal = relative_l1(x, ref) if x is not None and ref is not None and x.shape == ref.shape else None
    full = gen.decide_adaptive(signal)
    if full:
        patch.mode = Mode.FULL
    return full
