"""The patch on one U-Net: per evaluation, ask the caller's generation (:mod:`.state`) for the step kind, and make
each wrapped module do what :func:`~DeepCache.engine.unet.layout.retrieval_action` says for it.

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

from .layout import Action, ModuleKey, retrieval_action, retrieval_plan
from ...schedules.params import CacheParams
from .discovery import unet_layout, unet_modules, unwrap_unet
from ..lifecycle import DeepCacheWarning, Lease, caller_self
from ..model_patch import ModelPatch, acquire_patch, decide_adaptive, feature_for
from ..state import AdaptiveState, Generation, Mode
from ..tensors import hidden_states, input_key, nan_placeholders, placeholder, tensor_spec
from ..wrappers import plain

if TYPE_CHECKING:
    from .controlnet import ControlNetPatch

# Files whose frames sit between a pipeline and the U-Net's forward (torch's module call, accelerate's hooks, us).
_MACHINERY = tuple(os.path.dirname(os.path.abspath(m.__file__)) for m in (torch,)) + (
    functools.__file__,
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),  # the whole engine (wrappers, model_patch, ...)
)
try:  # accelerate's offload hooks wrap forward too
    import accelerate as _accelerate

    _MACHINERY += (os.path.dirname(os.path.abspath(_accelerate.__file__)),)
except ImportError:  # pragma: no cover - accelerate is optional
    pass


class UNetPatch(ModelPatch):
    """Wrappers on one U-Net (:class:`~.model_patch.ModelPatch`): the layout's module table, the ControlNets that
    follow it, and the warning for a pipeline that runs it uncached."""

    kind = "U-Net"

    def __init__(self, unet: nn.Module) -> None:
        super().__init__(unet, _unet_module_forward)
        self.layout = unet_layout(unet)
        self.clone_handout = False  # set once a consumer was seen modifying the cached feature in place
        self._keys: tuple[ModuleKey, ...] = ()
        self._actions: dict[int, tuple[Action, ...]] = {}
        self._controlnets: "weakref.WeakSet[ControlNetPatch]" = weakref.WeakSet()
        self._warned: "weakref.WeakSet[Any]" = weakref.WeakSet()  # pipelines told that they run uncached

    @property
    def unet(self) -> nn.Module:
        return self.model

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
            feature=feature_for(params, self.consumer_modifies_in_place(branch)),
            adaptive=AdaptiveState(first_divergent) if params.adaptive else None,
        )

    # -- install (install lock held) ---------------------------------------------------------------
    def wrapped_modules(self, unet: nn.Module) -> list[tuple[ModuleKey, nn.Module]]:
        modules = unet_modules(unet)
        keys = tuple(key for key, _ in modules)
        if keys != self._keys:  # same keys: keep the tables (compiled graphs guard on them)
            self._keys, self._actions = keys, {}
        return modules

    def controlnet_patches(self) -> list["ControlNetPatch"]:
        return list(self._controlnets)

    # -- per evaluation -------------------------------------------------------------------------
    def _outside(self) -> None:
        if self.owners and self.current_generation() is None:
            self._warn_if_a_pipeline_runs_uncached()

    def _begin(self, args: tuple, kwargs: dict) -> None:
        gen = self.current_generation()
        if gen is not None:
            full = gen.begin(input_key(args[0] if args else kwargs.get("sample")))
            self.mode, self.gen = (Mode.FULL if full else Mode.RETRIEVE), gen

    def on_modified_handout(self) -> None:
        self.clone_handout = True  # later generations hand out copies from the start

    def _warn_if_a_pipeline_runs_uncached(self) -> None:
        pipeline = caller_self(_MACHINERY)
        if not callable(pipeline) or isinstance(pipeline, nn.Module) or pipeline in self._warned:
            return
        if unwrap_unet(getattr(pipeline, "unet", None)) is not self._model_ref():
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


def _unet_module_forward(patch: UNetPatch, index: int, original: Callable, *args: Any, **kwargs: Any) -> Any:
    if plain(patch):
        return original(*args, **kwargs)
    mode = patch.mode
    gen = patch.gen
    action = gen.actions[index]
    adaptive = gen.adaptive
    if mode is Mode.RETRIEVE and action is not Action.RUN and adaptive is not None and adaptive.deciding:
        if decide_adaptive(patch, gen, args, kwargs):
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


# Registry: one patch per U-Net, keyed weakly by the module (the patch holds it weakly)
_PATCHES: "weakref.WeakKeyDictionary[nn.Module, UNetPatch]" = weakref.WeakKeyDictionary()


def acquire(unet: nn.Module) -> Lease:
    """Install (or join) the patch on ``unet``; the returned lease keeps it until released or dropped."""
    return acquire_patch(_PATCHES, unet, unet_layout(unet), UNetPatch)


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
