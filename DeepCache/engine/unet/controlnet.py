"""The patch on one ControlNet: on the U-Net's retrieval steps, run only the part the U-Net consumes.

A ControlNet computes one residual per U-Net skip connection plus one for the mid block, before the U-Net runs.
On a retrieval step with branch ``b`` the U-Net consumes the residuals of skips ``0..b`` (and the mid one only at
the deepest branch, where the cached feature is the mid block's output), so the rest of the ControlNet returns
placeholders (:func:`~DeepCache.engine.unet.layout.controlnet_retrieval_action`). The step's kind is decided once, ahead of the
U-Net (:meth:`~DeepCache.engine.state.Generation.peek`), and the U-Net keeps that decision.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any, Callable

from torch import nn

from .layout import Action, controlnet_retrieval_action, retrieval_plan
from . import discovery
from ..lifecycle import DeepCacheWarning, EvaluationGuard, Lease, locked
from ..state import ControlNetState, Mode
from ..tensors import input_key, placeholder, tensor_spec
from .patch import UNetPatch
from ..wrappers import Patched, Wrapping, plain


class ControlNetPatch(Patched):
    """Wrappers on one ``ControlNetModel``, paired with one U-Net patch; removed when its last owner leaves."""

    def __init__(self, controlnet: nn.Module, unet_patch: UNetPatch) -> None:
        layout = unet_patch.layout
        down = discovery.down_counts(controlnet)
        if tuple((b.num_layers, b.has_sampler) for b in layout.down) != down:
            raise ValueError(f"its down path {down} does not mirror the U-Net's")
        if len(controlnet.controlnet_down_blocks) != layout.num_branches:
            raise ValueError(
                f"it has {len(controlnet.controlnet_down_blocks)} zero convolutions for the U-Net's "
                f"{layout.num_branches} skip connections"
            )
        self._controlnet_ref = weakref.ref(controlnet)
        self.unet_patch = unet_patch
        self.mode = Mode.OFF  # the evaluation in progress (read by the wrappers)
        self.state: ControlNetState | None = None
        self.guard = EvaluationGuard()
        self.owners: dict[weakref.ref, None] = {}
        self._keys = tuple(key for key, _ in discovery.controlnet_modules(controlnet))
        self._actions: dict[int, tuple[Action, ...]] = {}
        self._wrapping = Wrapping(_controlnet_module_forward)

    def actions_for(self, branch: int) -> tuple[Action, ...]:
        table = self._actions.get(branch)
        if table is None:
            plan = retrieval_plan(self.unet_patch.layout, branch)
            table = self._actions[branch] = tuple(controlnet_retrieval_action(plan, k) for k in self._keys)
        return table

    def install(self) -> None:
        controlnet = self._controlnet_ref()
        if controlnet is not None and not self.installed:
            self._wrapping.install(self, controlnet, discovery.controlnet_modules(controlnet))

    def _clear(self) -> None:
        self.mode, self.state = Mode.OFF, None

    def _begin(self, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs.get("sample")
        gen = self.unet_patch.current_generation()
        if gen is None:
            return
        state = gen.controlnet_state(self, self.actions_for)
        if not state.ran_full:
            # No full run of this ControlNet in this generation yet, so no placeholder shapes: run it in full
            # (full residuals are valid whatever the U-Net does) and commit nothing.
            state.ran_full, state.specs = True, {}
            self.mode, self.state = Mode.FULL, state
            return
        full = gen.peek(input_key(sample))
        if full:
            state.specs = {}
        self.mode, self.state = (Mode.FULL if full else Mode.RETRIEVE), state

    def _abort(self) -> None:
        if self.state is not None:
            self.state.reset()  # its placeholder shapes may be half-written: the next run is a full one


def _controlnet_module_forward(patch: ControlNetPatch, index: int, original: Callable, *args: Any, **kwargs: Any) -> Any:
    if plain(patch):
        return original(*args, **kwargs)
    state = patch.state
    action = state.actions[index]
    if patch.mode is Mode.FULL:
        out = original(*args, **kwargs)
        if action is Action.SKIP:
            state.specs[index] = tensor_spec(out)
        return out
    if action is Action.SKIP:
        return placeholder(state.specs[index], state.poison)
    return original(*args, **kwargs)


# Registry: one patch per ControlNet, keyed weakly by the module (the patch holds it weakly)
_PATCHES: "weakref.WeakKeyDictionary[nn.Module, ControlNetPatch]" = weakref.WeakKeyDictionary()
_SAID_FULL: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def _say_runs_in_full(controlnet: nn.Module, why: str) -> None:
    if controlnet in _SAID_FULL:
        return
    _SAID_FULL.add(controlnet)
    warnings.warn(
        f"DeepCache runs this {type(controlnet).__name__} in full on every step (correct, but without the saving "
        f"of a shallow ControlNet on retrieval steps): {why}.",
        DeepCacheWarning,
        stacklevel=3,
    )


def acquire_controlnet(lease: Lease, controlnet: nn.Module) -> bool:
    """Make ``controlnet`` run shallow on the retrieval steps of ``lease``'s U-Net. False (and a warning
    that says why, once per ControlNet) if it cannot: it then runs in full, which is always correct."""
    if type(controlnet).__name__ != "ControlNetModel":
        _say_runs_in_full(controlnet, "only diffusers' ControlNetModel can run shallow")
        return False
    unet_patch = lease.unet_patch
    why = None
    with locked():
        patch = _PATCHES.get(controlnet)
        if patch is not None and patch.unet_patch is not unet_patch:
            if patch.owners:
                why = "another enabled helper pairs it with another U-Net"
            else:
                patch._wrapping.remove()
                patch = None
        if patch is None and why is None:
            try:
                patch = ControlNetPatch(controlnet, unet_patch)
            except (ValueError, AttributeError) as exc:  # AttributeError: a diffusers rename, say
                why = f"{type(exc).__name__}: {exc}"
            else:
                _PATCHES[controlnet] = patch
                unet_patch._controlnets.add(patch)
        if why is None:
            patch.install()
            patch.owners[lease.ref] = None
            lease.controlnets.append(patch)
            return True
    _say_runs_in_full(controlnet, why)
    return False
