"""The wrappers: each wrapped module's ``forward``, and the root wrapper around one whole evaluation.

A patch (:class:`Patched`: :class:`~DeepCache.engine.unet.patch.UNetPatch`, :class:`~DeepCache.engine.unet.controlnet.ControlNetPatch`)
replaces the ``forward`` of its wrapped modules with ``functools.partial(module_forward, patch, index, original)``
and the root module's ``forward`` with ``partial(evaluate, patch, original)``. :func:`evaluate` decides the
evaluation (outside any ``torch.compile`` graph), runs the original forward (compiled, if the model is), and
closes the evaluation in a ``finally``: whatever is raised, the evaluation guard is released and the mode cleared.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any, Callable

import torch
from torch import nn

from .unet.layout import ModuleKey
from .lifecycle import EvaluationGuard
from .state import Mode

Wrapper = Callable[..., Any]


class Patched:
    """What the U-Net and ControlNet patches share: the mode of the evaluation in progress (read by the module
    wrappers), its guard, the owners, and the wrapping. Subclasses decide (:meth:`_begin`) and close (:meth:`_end`)."""

    mode: Mode
    guard: EvaluationGuard
    owners: dict
    _wrapping: "Wrapping"

    @property
    def installed(self) -> bool:
        return self._wrapping.installed

    def remove(self) -> None:
        """(Install lock held.) Take the wrappers off, unless an owner came back while the removal waited."""
        if not self.owners:
            with self.guard.held():
                self._wrapping.remove()

    def _begin(self, args: tuple, kwargs: dict) -> None:
        """(Guard held, mode OFF.) Decide the evaluation of the root module called with ``args, kwargs``: set the
        mode and its state."""
        raise NotImplementedError

    def _end(self) -> None:
        """(Guard held.) The evaluation returned (its state is still set)."""

    def _abort(self) -> None:
        """(Guard held.) The evaluation raised (its state is still set)."""

    def _clear(self) -> None:
        """Back to mode OFF, no state."""
        raise NotImplementedError

    def _outside(self) -> None:
        """Before the guard is taken: bookkeeping that must not run under it (a warning, say)."""

    @torch.compiler.disable
    def _enter(self, args: tuple, kwargs: dict) -> bool:
        """Open an evaluation. False if this thread's evaluation is already open (a second wrapper of ours left
        inside a foreign one, or a hook that calls the model again): it runs within the open one, untouched."""
        self._outside()
        if not self.guard.enter():
            return False
        try:
            self._clear()
            self._begin(args, kwargs)
        except BaseException:
            self._clear()
            self.guard.leave()
            raise
        return True

    @torch.compiler.disable
    def _exit(self, ok: bool) -> None:
        """Close the evaluation :meth:`_enter` opened (``ok``: it returned), whatever happened inside."""
        try:
            if ok:
                self._end()
            else:
                self._abort()
        finally:
            self._clear()
            self.guard.leave()


@functools.partial(torch.compiler.disable, recursive=False)
def evaluate(patch: Patched, original: Callable, *args: Any, **kwargs: Any) -> Any:
    """The root module's forward: one evaluation, opened and closed around ``original`` (which dynamo compiles,
    if the model is compiled: this frame itself stays eager)."""
    if not patch.installed:  # left inside a foreign wrapper after removal: pass through
        return original(*args, **kwargs)
    if not patch._enter(args, kwargs):
        return original(*args, **kwargs)
    ok = False
    try:
        out = original(*args, **kwargs)
        ok = True
        return out
    finally:
        patch._exit(ok)


def plain(patch: Patched) -> bool:
    """Whether a wrapped module runs unchanged: no evaluation in progress, or another thread's (checked eagerly;
    a compiled graph is entered through :func:`evaluate`, so it never runs a wrapper for another thread)."""
    return patch.mode is Mode.OFF or not (torch.compiler.is_compiling() or patch.guard.mine())


class Wrapping:
    """The wrapped ``forward`` of a set of modules and of their root, restorable exactly.

    Reinstalling reuses the same module wrappers, so the graphs torch.compile made with them (it guards on their
    identity) stay valid across disable/enable. A module wrapper that someone else wrapped in turn cannot be taken
    off; it stays, passes through while the patch is off, and is taken back as it is when the patch comes back
    (never wrapped a second time). The root wrapper is made at install and held only weakly: the patch must not keep
    its U-Net alive (the registry of patches is keyed weakly by the U-Net). A root wrapper left inside a foreign one
    passes through while the patch is off and is taken back as it is, like a module wrapper (a foreign wrapper that
    cannot be referenced weakly gets a new root wrapper on top; the old one inside then passes through).
    """

    def __init__(self, module_forward: Callable[..., Any]) -> None:
        self._module_forward = module_forward  # module_forward(patch, index, original, *args, **kwargs)
        self._saved: list[tuple[weakref.ref, str, bool, Any, weakref.ref]] = []  # (module, slot, had own, previous, ours)
        self._wrappers: dict[int, tuple[nn.Module, Any, Wrapper]] = {}  # index -> (module, original, wrapper)
        self._left: dict[int, tuple] = {}  # index -> (module, what is on top, saved entry)
        self._root_entry: tuple | None = None  # the saved entry of the root wrapper while installed
        self._root_left: tuple | None = None  # (root ref, what is on top (weak), saved entry) after removal
        self._on = False

    @property
    def installed(self) -> bool:
        return self._on

    def install(self, patch: Patched, root: nn.Module, modules: list[tuple[ModuleKey, nn.Module]]) -> None:
        for index, (_, module) in enumerate(modules):
            left = self._left.pop(index, None)
            if left is not None and left[0] is module and module.__dict__.get("forward") is left[1]:
                self._saved.append(left[2])  # ours, still under the same foreign wrapper: take it back as it is
                continue
            original = module.forward
            cached = self._wrappers.get(index)
            if cached is not None and cached[0] is module and cached[1] == original:
                wrapper = cached[2]
            else:
                wrapper = _wrap(functools.partial(self._module_forward, patch, index, original), original)
                self._wrappers[index] = (module, original, wrapper)
            self._put(module, "forward", wrapper)
        slot = _slot(root)
        left, self._root_left = self._root_left, None
        if left is not None and left[0]() is root and left[2][1] == slot and _alive_on_top(root, slot, left[1], left[2]):
            self._saved.append(left[2])  # ours, still under the same foreign wrapper: take it back as it is
        else:
            original = getattr(root, slot)
            self._put(root, slot, _wrap(functools.partial(evaluate, patch, original), original))
        self._root_entry = self._saved[-1]
        self._on = True

    def _put(self, module: nn.Module, slot: str, wrapper: Wrapper) -> None:
        had_own = slot in module.__dict__
        previous = module.__dict__.get(slot)
        if getattr(previous, "__self__", None) is module:  # a bound method of the module: keep it unbound
            previous = _Rebind(previous.__func__)
        setattr(module, slot, wrapper)
        self._saved.append((weakref.ref(module), slot, had_own, previous, weakref.ref(wrapper)))

    def remove(self) -> None:
        self._on = False
        for entry in reversed(self._saved):
            module_ref, slot, had_own, previous, wrapper_ref = entry
            module, wrapper = module_ref(), wrapper_ref()
            if module is None or wrapper is None:
                continue
            current = module.__dict__.get(slot)
            if current is wrapper:
                if not had_own:
                    delattr(module, slot)
                else:
                    setattr(module, slot, previous.bind(module) if isinstance(previous, _Rebind) else previous)
            elif entry is self._root_entry:  # someone wrapped our root wrapper: it stays, passing through while off
                try:
                    self._root_left = (module_ref, weakref.ref(current), entry)
                except TypeError:  # not weakly referenceable: a later install wraps anew (the old one passes through)
                    pass
            elif slot == "forward":  # someone wrapped our module wrapper: it stays, passing through while we are off
                for index, (m, _, w) in self._wrappers.items():
                    if m is module and w is wrapper:
                        self._left[index] = (module, current, entry)
        self._saved = []
        self._root_entry = None


def _alive_on_top(root: nn.Module, slot: str, on_top: weakref.ref, entry: tuple) -> bool:
    """Whether the foreign wrapper left on top of our root wrapper is still there, with ours inside it."""
    top = on_top()
    return top is not None and root.__dict__.get(slot) is top and entry[4]() is not None


class _Rebind:
    """A bound method of a module, kept as its function (so that holding it does not hold the module)."""

    def __init__(self, func: Callable) -> None:
        self.func = func

    def bind(self, module: nn.Module) -> Any:
        return self.func.__get__(module)


def _wrap(wrapper: functools.partial, original: Any) -> Wrapper:
    return functools.update_wrapper(wrapper, original)


def _slot(root: nn.Module) -> str:
    """Where the root wrapper goes: under accelerate's hook (its ``_old_forward``, which accelerate restores as
    ``forward`` whenever it removes and re-adds its hooks, as diffusers' offloading does after every call), else
    ``forward``."""
    return "_old_forward" if hasattr(root, "_hf_hook") and "_old_forward" in root.__dict__ else "forward"
