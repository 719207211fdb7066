"""The patch on one U-Net: per evaluation, ask the caller's generation (:mod:`.state`) for the step kind, and make
each wrapped module do what :func:`~DeepCache.layout.retrieval_action` says for it.

On a retrieval step a skipped module returns a placeholder of the shape it had at the last full step
(uninitialised, or NaN under ``DEEPCACHE_NAN_PLACEHOLDERS=1``: its value must never reach the output), and the
boundary module (whose output enters the up layer that consumes skip ``b``) returns the generation's
:meth:`~DeepCache.engine.state.ReuseFeature.handout`; on a full step it passes its output to
:meth:`~DeepCache.engine.state.ReuseFeature.store`.
"""

from __future__ import annotations

import functools
import os
import warnings
import weakref
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from ..layout import Action, ModuleKey, retrieval_action, retrieval_plan
from ..params import CacheParams
from .discovery import unet_layout, unet_modules, unwrap_unet
from .lifecycle import DeepCacheWarning, EvaluationGuard, Lease, caller_self, current_lease_generation, generations, locked
from .forecast_feature import ForecastFeature
from .state import AdaptiveState, Generation, Mode, ReuseFeature
from .tensors import hidden_states, input_key, nan_placeholders, placeholder, relative_l1, tensor_spec
from .wrappers import Patched, Wrapping, plain

if TYPE_CHECKING:
    from .controlnet import ControlNetPatch

# Files whose frames sit between a pipeline and the U-Net's forward (torch's module call, accelerate's hooks, us).
_MACHINERY = tuple(os.path.dirname(os.path.abspath(m.__file__)) for m in (torch,)) + (
    functools.__file__,
    os.path.dirname(os.path.abspath(__file__)),
)
try:  # accelerate's offload hooks wrap forward too
    import accelerate as _accelerate

    _MACHINERY += (os.path.dirname(os.path.abspath(_accelerate.__file__)),)
except ImportError:  # pragma: no cover - accelerate is optional
    pass


class UNetPatch(Patched):
    """Wrappers on one U-Net, shared by every helper that caches it; removed when the last owner leaves.

    It holds the U-Net weakly and no generation state of its own: a generation lives with the pipeline call that
    runs it (:func:`~DeepCache.engine.lifecycle.running`) or with the bare-U-Net helper that drives it.
    """

    def __init__(self, unet: nn.Module) -> None:
        self._unet_ref = weakref.ref(unet)
        self.layout = unet_layout(unet)
        self.mode = Mode.OFF  # the evaluation in progress (read by the wrappers)
        self.gen: Generation | None = None
        self.guard = EvaluationGuard()
        self.owners: dict[weakref.ref, None] = {}  # live leases, oldest first
        self.clone_handout = False  # set once a consumer was seen modifying the cached feature in place
        self._wrapping = Wrapping(_unet_module_forward)
        self._keys: tuple[ModuleKey, ...] = ()
        self._actions: dict[int, tuple[Action, ...]] = {}
        self._controlnets: "weakref.WeakSet[ControlNetPatch]" = weakref.WeakSet()
        self._running = 0  # generations in progress (pipeline calls), across threads
        self._idle: list[Callable[[], None]] = []  # removals waiting for them to finish
        self._warned: "weakref.WeakSet[Any]" = weakref.WeakSet()  # pipelines told that they run uncached

    @property
    def unet(self) -> nn.Module:
        unet = self._unet_ref()
        if unet is None:
            raise RuntimeError("the U-Net of this DeepCache patch was garbage-collected")
        return unet

    # -- plan -------------------------------------------------------------------------------
    def actions_for(self, branch: int) -> tuple[Action, ...]:
        table = self._actions.get(branch)
        if table is None:
            plan = retrieval_plan(self.layout, branch)
            table = self._actions[branch] = tuple(retrieval_action(plan, key) for key in self._keys)
        return table

    def consumer_modifies_in_place(self, branch: int) -> bool:
        """Whether the block that consumes the cached feature scales it in place (FreeU does)."""
        if self.clone_handout:
            return True
        boundary = retrieval_plan(self.layout, branch).boundary
        index = {"mid": 0, "up_block": boundary.block + 1, "up_layer": boundary.block}[boundary.kind]
        block = self.unet.up_blocks[index]
        return all(getattr(block, name, None) for name in ("s1", "s2", "b1", "b2"))

    def new_generation(self, params: CacheParams, num_steps: Callable[[], int | None] = lambda: None) -> Generation:
        branch = params.cache_branch_id
        actions = self.actions_for(branch)
        first_divergent = next(i for i, a in enumerate(actions) if a is not Action.RUN)
        return Generation(
            owner=self,
            params=params,
            actions=actions,
            num_steps=num_steps,
            poison=nan_placeholders(),
            feature=_feature(params, self.consumer_modifies_in_place(branch)),
            adaptive=AdaptiveState(first_divergent) if params.adaptive else None,
        )

    # -- install / remove (install lock held) ----------------------------------------------------
    def install(self) -> None:
        if self.installed:
            return
        unet = self.unet
        modules = unet_modules(unet)
        keys = tuple(key for key, _ in modules)
        if keys != self._keys:  # same keys: keep the tables (compiled graphs guard on them)
            self._keys, self._actions = keys, {}
        self._wrapping.install(self, unet, modules)

    def when_idle(self, action: Callable[[], None]) -> None:
        """Run ``action`` now if no generation is running on this U-Net, else when the last one ends."""
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

    def controlnet_patches(self) -> list["ControlNetPatch"]:
        return list(self._controlnets)

    # -- per evaluation -------------------------------------------------------------------------
    def current_generation(self) -> Generation | None:
        """The generation an evaluation of this U-Net in the current context belongs to, if any."""
        for gen in reversed(generations()):
            if gen.owner is self:
                return gen
        return current_lease_generation(self.owners)

    def _clear(self) -> None:
        self.mode, self.gen = Mode.OFF, None

    def _outside(self) -> None:
        if self.owners and self.current_generation() is None:
            self._warn_if_a_pipeline_runs_uncached()

    def _begin(self, sample: Any) -> None:
        gen = self.current_generation()
        if gen is not None:
            full = gen.begin(input_key(sample))
            self.mode, self.gen = (Mode.FULL if full else Mode.RETRIEVE), gen

    def _end(self) -> None:
        if self.gen is not None and self.gen.end(self.mode is Mode.FULL):
            self.clone_handout = True  # later generations hand out copies from the start

    def _abort(self) -> None:
        if self.gen is not None:
            self.gen.abort()

    def _warn_if_a_pipeline_runs_uncached(self) -> None:
        pipeline = caller_self(_MACHINERY)
        if not callable(pipeline) or isinstance(pipeline, nn.Module) or pipeline in self._warned:
            return
        if unwrap_unet(getattr(pipeline, "unet", None)) is not self._unet_ref():
            return
        self._warned.add(pipeline)
        name = type(pipeline).__name__
        warnings.warn(
            f"this {name} runs a U-Net that DeepCache caches for another pipeline, but no DeepCacheSDHelper is enabled "
            f"on it, so it runs uncached (views made with {name}.from_pipe(...) do not inherit the helper; copy.copy "
            "views do). To cache it: DeepCacheSDHelper(pipe=this_pipeline).enable(). If uncached is intended, ignore "
            "this warning (it is said once per pipeline).",
            DeepCacheWarning,
            stacklevel=2,
        )


def _decide_adaptive(patch: UNetPatch, gen: Generation, args: tuple, kwargs: dict) -> bool:
    """An adaptive tentative retrieval step reached its first divergent module: full step or not."""
    if torch.compiler.is_compiling():
        raise RuntimeError(
            'skip_mode="adaptive" decides each step from a value read on the host, which torch.compile cannot '
            'trace: run the U-Net eagerly, or compile with the decisions fixed in advance: '
            'set_params(skip_mode="custom", full_steps=[i for i, f in enumerate(helper.last_steps) if f]) from an '
            "eager adaptive run, or a schedule from helper.calibrate(...)."
        )
    x, ref = hidden_states(args, kwargs), gen.adaptive.reference
    signal = relative_l1(x, ref) if x is not None and ref is not None and x.shape == ref.shape else None
    full = gen.decide_adaptive(signal)
    if full:
        patch.mode = Mode.FULL
    return full


def _unet_module_forward(patch: UNetPatch, index: int, original: Callable, *args: Any, **kwargs: Any) -> Any:
    if plain(patch):
        return original(*args, **kwargs)
    mode = patch.mode
    gen = patch.gen
    action = gen.actions[index]
    adaptive = gen.adaptive
    if mode is Mode.RETRIEVE and action is not Action.RUN and adaptive is not None and adaptive.deciding:
        if _decide_adaptive(patch, gen, args, kwargs):
            mode = Mode.FULL
    if mode is Mode.FULL:
        if adaptive is not None and index == adaptive.first_divergent:
            x = hidden_states(args, kwargs)
            adaptive.reference = x.detach().clone() if x is not None else None
        out = original(*args, **kwargs)
        if action is Action.SKIP:
            gen.specs[index] = tensor_spec(out)
        elif action is Action.BOUNDARY:
            gen.feature.store(out)
        return out
    if action is Action.RUN:
        return original(*args, **kwargs)
    if action is Action.SKIP:
        return placeholder(gen.specs[index], gen.poison)
    return gen.feature.handout()


def _feature(params: CacheParams, clone_handout: bool) -> ReuseFeature:
    """The generation's cached feature: reused (DeepCache's rule) or forecast (``forecast="linear"``)."""
    if params.forecasts:
        return ForecastFeature(clone_handout=clone_handout, weight_at=params.weight_at)
    return ReuseFeature(clone_handout=clone_handout)


# Registry: one patch per U-Net, keyed weakly by the module (the patch holds it weakly)
_PATCHES: "weakref.WeakKeyDictionary[nn.Module, UNetPatch]" = weakref.WeakKeyDictionary()


def acquire(unet: nn.Module) -> Lease:
    """Install (or join) the patch on ``unet``; the returned lease keeps it until released or dropped."""
    layout = unet_layout(unet)
    with locked():
        patch = _PATCHES.get(unet)
        if patch is None or (patch.layout != layout and not patch.owners):
            if patch is not None:
                patch._wrapping.remove()
            patch = _PATCHES[unet] = UNetPatch(unet)
        patch.install()
        lease = Lease(patch)
        patch.owners[lease.ref] = None
        return lease


_SAID_OTHER_UNET: "weakref.WeakSet[Any]" = weakref.WeakSet()


def warn_view_with_other_unet(pipeline: Any) -> None:
    """A copy of an enabled pipeline was given another U-Net: it runs uncached; say so once."""
    if pipeline in _SAID_OTHER_UNET:
        return
    _SAID_OTHER_UNET.add(pipeline)
    warnings.warn(
        f"this {type(pipeline).__name__} is a copy of a pipeline with an enabled DeepCacheSDHelper but runs another "
        "U-Net, so it runs uncached. To cache it: DeepCacheSDHelper(pipe=this_pipeline).enable().",
        DeepCacheWarning,
        stacklevel=4,
    )
