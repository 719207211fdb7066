"""A generation's state and its step decisions: a pure state machine driven by events.

One :class:`Generation` is one pipeline call (or one bare-U-Net loop between resets). The plumbing
(:mod:`.unet`, :mod:`.controlnet`) drives it with events and never decides anything itself:

* :meth:`Generation.begin` -- a U-Net evaluation starts with an input of this key: full step or retrieval step?
* :meth:`Generation.peek` -- a ControlNet runs ahead of the U-Net: the same question, asked once, kept.
* :meth:`Generation.decide_adaptive` -- ``skip_mode="adaptive"``: the tentative retrieval step measured this
  change at its first divergent module: full after all?
* :meth:`Generation.end` -- the evaluation returned; :meth:`Generation.abort` -- it raised.

Mode-specific state lives in small types with ``reset()``: the cached feature (:class:`ReuseFeature`: what the
boundary module stores on a full step and hands out on a retrieval step) and the adaptive decision
(:class:`AdaptiveState`). **Feature forecasting (issue 19) plugs in at** :class:`ReuseFeature`: a type with the same
methods that also keeps the previous full step's feature (in :meth:`~ReuseFeature.store`), sets the tensor
``w*(k-a)/(a-a')`` for step ``k`` in :meth:`~ReuseFeature.prepare` (outside graphs: a tensor, so compiled graphs do
not recompile per step) and hands out ``F_a + coefficient*(F_a - F_a')`` from :meth:`~ReuseFeature.handout`;
:meth:`Generation.__init__` takes it as ``feature``. Nothing else changes: that type is
:class:`~DeepCache.engine.forecast_feature.ForecastFeature`.

Everything here is testable without a model (``tests/test_engine_state.py`` drives it with plain tensors).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .unet.layout import Action
from ..schedules.params import CacheParams
from ..schedules.schedule import adaptive_is_full_step, is_full_step
from .tensors import Spec, clone, nbytes, versions


class Mode(enum.Enum):
    """What the wrapped modules of a patch do in the evaluation in progress."""

    OFF = "off"  # no generation: every wrapped module runs untouched
    FULL = "full"
    RETRIEVE = "retrieve"


@dataclass
class ReuseFeature:
    """The cached feature of a generation, reused as is (DeepCache's rule).

    :meth:`store` runs inside the full step (possibly inside a compiled graph: tensor work and attribute stores
    only); :meth:`seal` after it, outside any graph; :meth:`handout` inside a retrieval step; :meth:`check` after it.
    """

    clone_handout: bool = False  # hand out copies (a consumer modifies the feature in place)
    value: Any = None  # the boundary output of the last full step (a clone)
    key: tuple | None = None  # (shape, dtype, device) of the sample at that full step
    versions: tuple[int, ...] | None = None
    from_graph: bool = False  # the value was produced inside a torch.compile graph

    def reset(self) -> None:
        """Hold nothing (``clone_handout`` stays: it is what the generation learnt about its consumer)."""
        self.value, self.key, self.versions, self.from_graph = None, None, None, False

    def usable(self, key: tuple | None) -> bool:
        """Whether a retrieval step with an input of ``key`` may use the feature."""
        return (
            self.value is not None
            and key is not None
            and self.key == key
            and (self.versions is None or versions(self.value) == self.versions)
        )

    def refresh(self, key: tuple | None) -> None:
        """A full step for inputs of ``key`` begins: drop the old feature before the new one is computed."""
        self.value, self.key, self.versions = None, key, None

    def prepare(self, step: int, full: bool) -> None:
        """Evaluation ``step`` begins (outside any graph). Reuse needs nothing; a forecast sets the tensors its
        :meth:`handout` reads here (the step index itself must never reach a graph: dynamo would guard on it and
        recompile every step)."""

    def store(self, out: Any) -> None:
        """The boundary module's output on a full step."""
        self.value = clone(out)
        self.from_graph = torch.compiler.is_compiling()

    def seal(self) -> None:
        """After the full step: own the feature (outside any graph) and stamp its versions."""
        if self.value is None:
            return
        if self.from_graph:
            # Under CUDA graphs (mode="reduce-overhead") a graph's outputs live in a pool that the next replay
            # overwrites: keep a copy made outside any graph.
            self.value, self.from_graph = clone(self.value), False
        self.versions = versions(self.value)
        if self.versions is None:  # untrackable (inference mode): never hand out the original
            self.clone_handout = True

    def handout(self) -> Any:
        """What the boundary module returns on a retrieval step."""
        return clone(self.value) if self.clone_handout else self.value

    def check(self) -> bool:
        """After a retrieval step: True (and the feature dropped, copies handed out from now on) if a consumer
        modified the handed-out feature in place."""
        if self.value is None or self.clone_handout:
            return False
        if self.versions is not None and versions(self.value) == self.versions:
            return False
        self.clone_handout = True
        self.value = None
        return True

    def nbytes(self) -> int:
        return 0 if self.value is None else nbytes(self.value)


@dataclass
class AdaptiveState:
    """``skip_mode="adaptive"``: a retrieval step is tentative until its first divergent module (index
    ``first_divergent``, the first that a retrieval step would not run), where the change of that module's
    input since the last full step (``reference``) decides."""

    first_divergent: int
    deciding: bool = False  # the evaluation in progress is a tentative retrieval step
    reference: Any = None
    streak: int = 0  # retrieval steps in a row so far
    signals: list[float | None] = field(default_factory=list)  # per tentative retrieval step

    def release(self) -> None:
        self.reference, self.deciding = None, False

    def reset(self) -> None:
        self.release()
        self.streak, self.signals = 0, []


@dataclass
class ControlNetState:
    """One ControlNet's state within one generation: the placeholder shapes of its skipped modules."""

    actions: tuple[Action, ...]  # per wrapped module, on a retrieval step of the generation's branch
    poison: bool = False  # NaN placeholders (DEEPCACHE_NAN_PLACEHOLDERS)
    specs: dict[int, Spec] = field(default_factory=dict)
    ran_full: bool = False  # it ran in full once in this generation (so ``specs`` can be filled)

    def reset(self) -> None:
        self.specs = {}
        self.ran_full = False


@dataclass(eq=False)
class Generation:
    """The state of one generation. It belongs to its caller (a pipeline call, or a bare-U-Net helper);
    dropping it frees everything it holds."""

    owner: Any  # the U-Net patch this generation runs on (see DeepCache.engine.unet.patch)
    params: CacheParams
    actions: tuple[Action, ...]  # per wrapped U-Net module, on a retrieval step (see DeepCache.engine.unet.layout)
    num_steps: Callable[[], int | None] = lambda: None  # U-Net evaluations in the generation, if known
    poison: bool = False  # NaN placeholders (DEEPCACHE_NAN_PLACEHOLDERS)
    feature: ReuseFeature = field(default_factory=ReuseFeature)
    adaptive: AdaptiveState | None = None
    step: int = 0  # the next evaluation's index
    steps: list[bool] = field(default_factory=list)  # True = full step, per U-Net evaluation so far
    # output specs of the skipped modules at the last full step (a new dict per full step, so a compiled
    # full step always sees an empty one: one graph, not one for the first full step and one for later ones)
    specs: dict[int, Spec] = field(default_factory=dict)
    pending: int | None = None  # a step a ControlNet already ran as a retrieval step (the U-Net must follow)
    controlnets: dict[Any, ControlNetState] = field(default_factory=dict)
    # what a family's wrappers pass between modules within one evaluation (a transformer: each middle segment's
    # inputs and residual); emptied when the evaluation ends
    scratch: dict = field(default_factory=dict)
    _total: tuple[int | None] | None = None

    def total_steps(self) -> int | None:
        if self._total is None:
            self._total = (self.num_steps(),)
        return self._total[0]

    # -- events --------------------------------------------------------------------------------
    def decide(self, k: int, key: tuple | None) -> bool:
        """Whether evaluation ``k`` must be a full step (schedule, or no usable cache). For an adaptive
        generation, False means a *tentative* retrieval step (decided by :meth:`decide_adaptive`)."""
        if self.params.needs_num_steps and self.total_steps() is None:
            raise ValueError(
                'skip_mode="non-uniform" needs the number of steps: pipelines provide it, for a bare U-Net call '
                "helper.reset_states(num_inference_steps=N) before the loop."
            )
        no_cache = not self.feature.usable(key)
        if self.adaptive is not None:
            return no_cache or self.adaptive.reference is None or adaptive_is_full_step(self.params, k, self.adaptive.streak, None)
        return no_cache or is_full_step(self.params, k, self.total_steps())

    def begin(self, key: tuple | None) -> bool:
        """A U-Net evaluation with an input of ``key`` starts: True for a full step, False for a retrieval step."""
        k = self.step
        self.step += 1
        full = self.decide(k, key)
        committed, self.pending = self.pending == k, None
        if committed and full:
            raise RuntimeError(
                "DeepCache: a ControlNet ran the shallow path for this step but the U-Net cannot reuse its cache "
                f"(its input is {key}, the cache was made for {self.feature.key}). Please report this; "
                "disable the helper for this pipeline meanwhile."
            )
        if full:
            self._refresh(key)
        elif self.adaptive is not None:
            self.adaptive.streak += 1
        if self.adaptive is not None:
            self.adaptive.deciding = not full
        self.steps.append(full)
        self.feature.prepare(k, full)
        return full

    def peek(self, key: tuple | None) -> bool:
        """Decide the *next* evaluation ahead of the U-Net (a ControlNet runs before it).

        A retrieval decision is a commitment :meth:`begin` keeps (the ControlNet then computes only the
        residuals a retrieval step consumes); a full one commits nothing, since full residuals are valid for
        either kind of step. Adaptive steps are decided inside the U-Net, after the ControlNet ran: full.
        """
        if self.pending == self.step:
            return False
        if self.adaptive is not None:
            return True
        full = self.decide(self.step, key)
        if not full:
            self.pending = self.step
        return full

    def decide_adaptive(self, signal: float | None) -> bool:
        """The tentative retrieval step in progress measured ``signal`` (None: not measurable): full after all?"""
        adaptive = self.adaptive
        assert adaptive is not None, "decide_adaptive is for adaptive generations"
        adaptive.deciding = False
        adaptive.signals.append(signal)
        full = signal is None or adaptive_is_full_step(self.params, self.step - 1, adaptive.streak - 1, signal)
        if full:
            self.steps[-1] = True
            self._refresh(self.feature.key)
            self.feature.prepare(self.step - 1, True)
        return full

    def end(self, full: bool) -> bool:
        """The evaluation returned. True if a consumer modified the handed-out feature in place (the owner
        then hands out copies to later generations too)."""
        if full:
            self.feature.seal()
            return False
        return self.feature.check()

    def abort(self) -> None:
        """The evaluation raised: drop what it may have half-written (the next evaluation is a full step)."""
        self.release()
        self.pending = None

    # -- holding -------------------------------------------------------------------------------
    def _refresh(self, key: tuple | None) -> None:
        self.feature.refresh(key)
        self.specs = {}
        if self.adaptive is not None:
            self.adaptive.streak = 0

    def release(self) -> None:
        """Free the cached feature and the placeholder shapes (the step history stays)."""
        self.feature.reset()
        self.specs = {}
        if self.adaptive is not None:
            self.adaptive.release()
        for state in self.controlnets.values():
            state.reset()

    def reset(self) -> None:
        """Start over: the next evaluation is step 0 (a full step), nothing cached."""
        self.release()
        self.step, self.steps, self.pending, self._total = 0, [], None, None
        if self.adaptive is not None:
            self.adaptive.reset()

    def cache_bytes(self) -> int:
        return self.feature.nbytes()

    def controlnet_state(self, key: Any, actions: Callable[[int], tuple[Action, ...]]) -> ControlNetState:
        """The state of the ControlNet ``key`` in this generation (``actions(branch)``: its action table)."""
        state = self.controlnets.get(key)
        if state is None:
            state = self.controlnets[key] = ControlNetState(actions(self.params.cache_branch_id), self.poison)
        return state
