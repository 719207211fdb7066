"""Module plumbing: wire the pure retrieval plan (:mod:`DeepCache.layout`) into live diffusers modules.

What is *decided* here, and nothing more:

* **full or retrieval, per U-Net evaluation**, in a forward pre-hook on the U-Net (outside any
  ``torch.compile`` graph): the schedule (:func:`~DeepCache.schedule.is_full_step`) says so, unless the
  generation has no usable cache (none yet, another input shape/dtype/device, or modified in place);
* **which generation an evaluation belongs to**: the innermost generation of this U-Net opened in the
  caller's context (:func:`running`, a ``contextvars`` variable set by the pipeline call), else the
  generation of an enabled bare-U-Net helper, else none (the U-Net runs untouched);
* **when the patch comes off**: once no live owner (:class:`Lease`) is left and no generation is running.

What each wrapped module does on a retrieval step comes from :func:`~DeepCache.layout.retrieval_action`
(U-Net) and :func:`~DeepCache.layout.controlnet_retrieval_action` (ControlNet). The wrappers read the
evaluation in progress (mode and generation) from plain attributes of the patch, which dynamo guards on
cheaply. So that concurrent generations never see each other's evaluation, the evaluations of a patched
module are serialized: the pre-hook takes the patch's lock and the post-hook (or, after an interrupt, the
end of the generation) lets it go. Generations interleave freely between evaluations.

On a retrieval step a skipped module returns a placeholder of the shape it had at the last full step
(uninitialised, or NaN under ``DEEPCACHE_NAN_PLACEHOLDERS=1``: its value must never reach the output), and
the module whose output enters the up layer that consumes skip ``b`` returns the cached feature.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import functools
import math
import os
import sys
import threading
import warnings
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .layout import (
    Action,
    ModuleKey,
    Site,
    UNetLayout,
    controlnet_retrieval_action,
    retrieval_action,
    retrieval_plan,
)
from .schedule import CacheParams, adaptive_is_full_step, is_full_step

# U-Net classes whose forward follows the skip-connection model of DeepCache.layout and that the
# test-suite covers. Others get a clear error instead of a silent no-op.
SUPPORTED_UNETS = (
    "UNet2DConditionModel",  # SD 1.x/2.x, SDXL (+ img2img, inpaint, refiner, ControlNet, T2I-Adapter, IP-Adapter)
    "UNet2DModel",  # DDPM / DDIM / LDM pipelines
    "UNetSpatioTemporalConditionModel",  # Stable Video Diffusion
    "UNetMotionModel",  # AnimateDiff
    "UNet3DConditionModel",  # text-to-video (TextToVideoSDPipeline, VideoToVideoSDPipeline)
)

# Blocks that do not follow the skip-connection model: skip-sample blocks thread a second running
# sample through the up path (a skipped up block would corrupt it); k-diffusion up blocks consume one
# skip connection per block instead of one per layer.
_UNSUPPORTED_BLOCKS = ("KDownBlock2D", "KCrossAttnDownBlock2D", "KUpBlock2D", "KCrossAttnUpBlock2D")

# The modules of one layer, in the order a block applies them (a block has a subset of these lists):
# UNet2DConditionModel resnet -> attention; UNetMotionModel resnet -> attention -> motion module;
# UNet3DConditionModel resnet -> temporal conv -> attention -> temporal attention.
_LAYER_LISTS = ("resnets", "temp_convs", "attentions", "temp_attentions", "motion_modules")


def unwrap_unet(module: Any) -> Any:
    """The U-Net inside a ``torch.compile`` wrapper (``OptimizedModule``), or ``module`` itself."""
    return getattr(module, "_orig_mod", module)


def check_supported_unet(unet: Any) -> None:
    """Raise ``TypeError`` naming the supported classes if ``unet`` cannot be cached."""
    names = {cls.__name__ for cls in type(unet).__mro__}
    if not isinstance(unet, nn.Module) or not names.intersection(SUPPORTED_UNETS):
        raise TypeError(
            f"DeepCache cannot cache a {type(unet).__name__}: supported U-Nets are {', '.join(SUPPORTED_UNETS)} "
            "(pass a diffusers pipeline whose `unet` is one of them, or the U-Net itself)."
        )
    for kind in ("down_blocks", "up_blocks"):
        for i, block in enumerate(getattr(unet, kind, None) or ()):
            name = type(block).__name__
            if hasattr(block, "skip_conv") or name in _UNSUPPORTED_BLOCKS or not hasattr(block, "resnets"):
                raise TypeError(
                    f"DeepCache cannot cache this {type(unet).__name__}: {kind}[{i}] is a {name}, whose skip connections "
                    "do not follow the layout DeepCache caches (one skip per layer, consumed one per up layer). "
                    "Skip-sample blocks (Skip*/AttnSkip*) and k-diffusion blocks (K*) are not supported."
                )


def _sampler(block: nn.Module, name: str) -> nn.Module | None:
    samplers = getattr(block, name, None)
    return samplers[0] if samplers is not None and len(samplers) > 0 else None


def layer_modules(block: nn.Module, index: int) -> list[nn.Module]:
    """The modules that make up layer ``index`` of a down/up block, in the order the block runs them."""
    modules = []
    for name in _LAYER_LISTS:
        seq = getattr(block, name, None)
        if isinstance(seq, nn.ModuleList) and index < len(seq) and seq[index] is not None:
            modules.append(seq[index])
    return modules


def unet_layout(unet: nn.Module) -> UNetLayout:
    """Read the skip-connection layout of a (supported) U-Net."""
    check_supported_unet(unet)
    down = [(len(block.resnets), _sampler(block, "downsamplers") is not None) for block in unet.down_blocks]
    up = [(len(block.resnets), _sampler(block, "upsamplers") is not None) for block in unet.up_blocks]
    return UNetLayout.from_counts(down, up, has_mid=getattr(unet, "mid_block", None) is not None)


# ----------------------------------------------------------------------------------------------
# Which modules are wrapped, under which key


def _down_path(net: nn.Module) -> Iterator[tuple[ModuleKey, nn.Module]]:
    for i, block in enumerate(net.down_blocks):
        yield ModuleKey(Site.DOWN_BLOCK, i), block
        for j in range(len(block.resnets)):
            modules = layer_modules(block, j)
            for m, module in enumerate(modules):
                yield ModuleKey(Site.DOWN_LAYER, i, j, m, len(modules)), module
        sampler = _sampler(block, "downsamplers")
        if sampler is not None:
            yield ModuleKey(Site.DOWN_SAMPLER, i), sampler


def unet_modules(unet: nn.Module) -> list[tuple[ModuleKey, nn.Module]]:
    """The U-Net modules DeepCache wraps: down blocks with their layers and samplers, the mid block, up blocks
    with their layers (up samplers run inside their block)."""
    modules = list(_down_path(unet))
    modules.append((ModuleKey(Site.MID), unet.mid_block))
    for u, block in enumerate(unet.up_blocks):
        modules.append((ModuleKey(Site.UP_BLOCK, u), block))
        for j in range(len(block.resnets)):
            layer = layer_modules(block, j)
            modules += [(ModuleKey(Site.UP_LAYER, u, j, m, len(layer)), module) for m, module in enumerate(layer)]
    return modules


def controlnet_modules(controlnet: nn.Module) -> list[tuple[ModuleKey, nn.Module]]:
    """The ControlNet modules DeepCache wraps: its down path, mid block and zero convolutions."""
    modules = list(_down_path(controlnet))
    modules.append((ModuleKey(Site.MID), controlnet.mid_block))
    modules += [(ModuleKey(Site.CONTROL_SKIP, s), conv) for s, conv in enumerate(controlnet.controlnet_down_blocks)]
    modules.append((ModuleKey(Site.CONTROL_MID), controlnet.controlnet_mid_block))
    return modules


# ----------------------------------------------------------------------------------------------
# Placeholders and cached values

#: Set to 1 to fill placeholders with NaN: a placeholder that some computation consumes then poisons the
#: output, so tests catch it (the test-suite runs with it on). Read when a generation starts.
NAN_PLACEHOLDERS_ENV = "DEEPCACHE_NAN_PLACEHOLDERS"


def nan_placeholders() -> bool:
    """Whether ``DEEPCACHE_NAN_PLACEHOLDERS`` asks for NaN-filled placeholders (debugging aid)."""
    return os.environ.get(NAN_PLACEHOLDERS_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


Spec = tuple[pytree.TreeSpec, list]


def _tensor_spec(out: Any) -> Spec:
    leaves, spec = pytree.tree_flatten(out)
    return spec, [(tuple(x.shape), x.dtype, x.device) if torch.is_tensor(x) else (None, x, None) for x in leaves]


def _placeholder(spec: Spec, poison: bool) -> Any:
    treespec, leaves = spec
    values = []
    for shape, dtype, device in leaves:
        if shape is None:
            values.append(dtype)
        elif poison and dtype.is_floating_point:
            values.append(torch.full(shape, math.nan, dtype=dtype, device=device))
        else:
            values.append(torch.empty(shape, dtype=dtype, device=device))
    return pytree.tree_unflatten(values, treespec)


def _versions(tree: Any) -> tuple[int, ...] | None:
    try:
        return tuple(t._version for t in pytree.tree_leaves(tree) if torch.is_tensor(t))
    except RuntimeError:  # inference tensors (torch.inference_mode) have no version counter
        return None


def _clone(tree: Any) -> Any:
    return pytree.tree_map(lambda x: x.clone() if torch.is_tensor(x) else x, tree)


def _input_key(sample: Any) -> tuple | None:
    return (tuple(sample.shape), sample.dtype, sample.device) if torch.is_tensor(sample) else None


# ----------------------------------------------------------------------------------------------
# Per-generation state


class Mode(enum.Enum):
    OFF = "off"  # no generation: every wrapped module runs untouched
    FULL = "full"
    RETRIEVE = "retrieve"


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


@dataclass
class Generation:
    """The state of one generation (one pipeline call, or one bare-U-Net loop between resets).

    It belongs to its caller: a pipeline call opens it with :func:`running`, and only evaluations in that
    context see it. Dropping it frees everything it holds.
    """

    patch: "UNetPatch"
    params: CacheParams
    actions: tuple[Action, ...]  # per wrapped U-Net module, on a retrieval step (see DeepCache.layout)
    num_steps: Callable[[], int | None] = lambda: None  # U-Net evaluations in the generation, if known
    clone_handout: bool = False  # hand out copies of the cache (its consumer modifies it in place)
    poison: bool = False  # NaN placeholders (DEEPCACHE_NAN_PLACEHOLDERS)
    step: int = 0  # the next evaluation's index
    steps: list[bool] = field(default_factory=list)  # True = full step, per U-Net evaluation so far
    cache: Any = None  # the boundary output of the last full step (a clone)
    cache_key: tuple | None = None  # (shape, dtype, device) of the sample at that full step
    cache_versions: tuple[int, ...] | None = None
    cache_from_graph: bool = False  # the cache was produced inside a torch.compile graph
    # output specs of the skipped modules at the last full step (a new dict per full step, so a compiled
    # full step always sees an empty one: one graph, not one for the first full step and one for later ones)
    specs: dict[int, Spec] = field(default_factory=dict)
    pending: int | None = None  # a step a ControlNet already ran as a retrieval step (the U-Net must follow)
    controlnets: dict["ControlNetPatch", ControlNetState] = field(default_factory=dict)
    # skip_mode="adaptive": the evaluation in progress is a tentative retrieval step, decided at the first
    # module (index ``first_divergent``) that a retrieval step would not run, from how far that module's input
    # moved since the last full step (``reference``)
    adaptive: bool = False
    first_divergent: int = -1
    deciding: bool = False
    reference: Any = None
    streak: int = 0  # retrieval steps in a row so far
    signals: list[float | None] = field(default_factory=list)  # per tentative retrieval step
    _total: tuple[int | None] | None = None

    def total_steps(self) -> int | None:
        if self._total is None:
            self._total = (self.num_steps(),)
        return self._total[0]

    def release(self) -> None:
        """Free the cached feature and the placeholder shapes (the step history stays)."""
        self.cache = None
        self.cache_key = None
        self.cache_versions = None
        self.cache_from_graph = False
        self.specs = {}
        self.reference = None
        self.deciding = False
        for state in self.controlnets.values():
            state.reset()

    def reset(self) -> None:
        """Start over: the next evaluation is step 0 (a full step), nothing cached."""
        self.release()
        self.step = 0
        self.steps = []
        self.pending = None
        self.streak = 0
        self.signals = []
        self._total = None

    def refresh(self, key: tuple | None) -> None:
        """This evaluation is a full step: drop the old feature (before the new one is computed)."""
        self.cache = None
        self.cache_key = key
        self.cache_versions = None
        self.specs = {}
        self.streak = 0

    def cache_bytes(self) -> int:
        if self.cache is None:
            return 0
        return sum(t.numel() * t.element_size() for t in pytree.tree_leaves(self.cache) if torch.is_tensor(t))

    def controlnet_state(self, patch: "ControlNetPatch") -> ControlNetState:
        state = self.controlnets.get(patch)
        if state is None:
            state = self.controlnets[patch] = ControlNetState(patch.actions_for(self.params.cache_branch_id), self.poison)
        return state


# the generations opened by pipeline calls in this context (thread / task), innermost last
_GENERATIONS: contextvars.ContextVar[tuple[Generation, ...]] = contextvars.ContextVar(
    "deepcache_generations", default=()
)


@contextlib.contextmanager
def running(gen: Generation) -> Iterator[Generation]:
    """Make ``gen`` the generation of its U-Net for the evaluations run in this context, then free it."""
    patch = gen.patch
    patch.generation_started()
    token = _GENERATIONS.set(_GENERATIONS.get() + (gen,))
    try:
        yield gen
    finally:
        _GENERATIONS.reset(token)
        for cn in patch.controlnet_patches():
            cn.evaluations.recover()
        patch.evaluations.recover()  # an evaluation interrupted by a BaseException (KeyboardInterrupt)
        gen.release()
        patch.generation_ended()


class _Evaluations:
    """One evaluation of a patched module at a time, across threads (what keeps the patch's mode attributes,
    which compiled graphs guard on, consistent with the evaluation that reads them).

    ``enter`` in the pre-hook, ``leave`` in the post-hook. A ``BaseException`` inside the module skips the
    post-hook: the same thread's next ``enter`` (or :meth:`recover`, at the end of its generation) takes over.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: int | None = None

    def enter(self) -> None:
        me = threading.get_ident()
        if self._owner != me:
            self._lock.acquire()
            self._owner = me

    def leave(self) -> None:
        if self._owner == threading.get_ident():
            self._owner = None
            self._lock.release()

    recover = leave

    def mine(self) -> bool:
        """Whether the evaluation in progress is this thread's. Another thread's evaluation can reach a wrapped
        module without its pre-hook (it entered the module before the patch was installed): it must run plain."""
        return self._owner == threading.get_ident()

    @contextlib.contextmanager
    def closing(self) -> Iterator[None]:
        """Hold the lock while the hooks come off, so they never come off inside another thread's evaluation (its
        post-hook would not run and the lock would stay held); released afterwards even if this thread's own
        evaluation held it (an uncached one, in which a garbage-collected helper let go: its post-hook is gone)."""
        if not self.mine():
            self._lock.acquire()
            self._owner = threading.get_ident()
        try:
            yield
        finally:
            self.leave()


# ----------------------------------------------------------------------------------------------
# Installing wrappers and hooks

Wrapper = Callable[..., Any]


class _Wrapping:
    """The wrapped ``forward`` of a set of modules and the pre/post hooks on their root, restorable exactly."""

    def __init__(self, forward: Callable[..., Any]) -> None:
        self._forward = forward  # forward(patch, index, original, *args, **kwargs)
        self._saved: list[tuple[nn.Module, bool, Any, Wrapper]] = []
        self._handles: list[Any] = []
        # index -> (module, original forward, wrapper): reinstalling reuses the same wrapper objects, so the
        # graphs torch.compile made with them (it guards on their identity) stay valid across disable/enable
        self._wrappers: dict[int, tuple[nn.Module, Any, Wrapper]] = {}

    @property
    def installed(self) -> bool:
        return bool(self._handles)

    def install(self, patch: Any, root: nn.Module, modules: list[tuple[ModuleKey, nn.Module]]) -> None:
        for index, (_, module) in enumerate(modules):
            had_own = "forward" in module.__dict__
            previous = module.__dict__.get("forward")
            original = module.forward
            cached = self._wrappers.get(index)
            if cached is not None and cached[0] is module and cached[1] == original:
                wrapper = cached[2]
            else:
                wrapper = functools.update_wrapper(functools.partial(self._forward, patch, index, original), original)
                self._wrappers[index] = (module, original, wrapper)
            module.forward = wrapper
            self._saved.append((module, had_own, previous, wrapper))
        self._handles = [
            root.register_forward_pre_hook(patch._pre_hook, with_kwargs=True),
            root.register_forward_hook(patch._post_hook, with_kwargs=True, always_call=True),
        ]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for module, had_own, previous, wrapper in reversed(self._saved):
            if module.__dict__.get("forward") is wrapper:
                if had_own:
                    module.forward = previous
                else:
                    del module.forward
            # else: someone wrapped our wrapper; with the patch gone it passes straight through.
        self._saved = []


# ----------------------------------------------------------------------------------------------
# Ownership: leases held by enabled helpers, released explicitly or when the helper is collected

# One lock for installing and removing patches. Weakref callbacks (a helper collected while enabled) never
# wait for it: they queue their release, and whoever holds the lock runs the queue before letting go.
_LOCK = threading.Lock()
_QUEUE: deque[Callable[[], None]] = deque()


def _drain() -> None:
    while _QUEUE:
        if not _LOCK.acquire(blocking=False):
            return  # the holder drains when it lets go
        try:
            while _QUEUE:
                _QUEUE.popleft()()
        finally:
            _LOCK.release()


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    with _LOCK:
        yield
    _drain()


class Lease:
    """An enabled helper's hold on a U-Net patch (and on the ControlNet patches of its pipeline).

    The helper keeps it; the patches keep only weak references. :meth:`release` lets go; so does dropping
    the lease (a helper garbage-collected while enabled), so a dead helper never keeps a U-Net patched.
    """

    def __init__(self, unet_patch: "UNetPatch") -> None:
        self.unet_patch = unet_patch
        self.controlnets: list[ControlNetPatch] = []
        self.bare: Generation | None = None  # the running generation of a bare-U-Net helper
        self.released = False
        self.ref = weakref.ref(self, _lease_collected(unet_patch))

    def release(self) -> None:
        with _locked():
            if not self.released:
                self.released = True
                _let_go(self.ref, self.unet_patch, self.controlnets)
                self.bare = None


def _lease_collected(unet_patch: "UNetPatch") -> Callable[[weakref.ref], None]:
    patch_ref = weakref.ref(unet_patch)

    def collected(ref: weakref.ref) -> None:
        def release() -> None:
            patch = patch_ref()
            if patch is not None:
                _let_go(ref, patch, [cn for cn in patch.controlnet_patches() if ref in cn.owners])

        _QUEUE.append(release)
        _drain()

    return collected


def _let_go(ref: weakref.ref, unet_patch: "UNetPatch", controlnets: list["ControlNetPatch"]) -> None:
    """(Lock held.) Remove one owner; patches that lose their last owner come off."""
    for cn in controlnets:
        cn.owners.pop(ref, None)
        if not cn.owners:
            unet_patch.when_idle(cn.remove)
    unet_patch.owners.pop(ref, None)
    if not unet_patch.owners:
        unet_patch.when_idle(unet_patch.remove)


# ----------------------------------------------------------------------------------------------
# The patch on one U-Net


class DeepCacheWarning(UserWarning):
    """DeepCache runs a module uncached, or in full, where the user may expect caching."""


class _Hooked:
    """What the U-Net and ControlNet patches share: wrapped modules, owners, and the hook pair around one
    evaluation at a time (``_begin`` decides it from the caller's generation, ``_end`` closes it)."""

    _wrapping: _Wrapping
    owners: dict[weakref.ref, None]
    evaluations: _Evaluations
    mode: Mode

    @property
    def installed(self) -> bool:
        return self._wrapping.installed

    def remove(self) -> None:
        if not self.owners:  # an owner may have come back while the removal waited
            with self.evaluations.closing():
                self._wrapping.remove()

    def _begin(self, sample: Any) -> None:
        raise NotImplementedError

    def _end(self) -> None:
        """Close the evaluation (its state is still set)."""

    def _clear(self) -> None:
        raise NotImplementedError

    @torch.compiler.disable
    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.evaluations.enter()
        try:
            self._clear()
            self._begin(args[0] if args else kwargs.get("sample"))
        except BaseException:
            self._clear()
            self.evaluations.leave()
            raise

    @torch.compiler.disable
    def _post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        try:
            self._end()
        finally:
            self._clear()
            self.evaluations.leave()


class UNetPatch(_Hooked):
    """Hooks on one U-Net, shared by every helper that caches it; removed when the last owner leaves.

    It holds the U-Net weakly and no generation state of its own: a generation lives with the pipeline call
    that runs it (:func:`running`) or with the bare-U-Net helper that drives it.
    """

    def __init__(self, unet: nn.Module) -> None:
        self._unet_ref = weakref.ref(unet)
        self.layout = unet_layout(unet)
        self.mode = Mode.OFF  # the evaluation in progress (read by the wrappers)
        self.gen: Generation | None = None
        self.evaluations = _Evaluations()
        self.owners: dict[weakref.ref, None] = {}  # live leases, oldest first
        self.clone_handout = False  # set once a consumer was seen modifying the cached feature in place
        self._wrapping = _Wrapping(_unet_module_forward)
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
        return Generation(
            patch=self,
            params=params,
            actions=actions,
            num_steps=num_steps,
            clone_handout=self.consumer_modifies_in_place(branch),
            poison=nan_placeholders(),
            adaptive=params.adaptive,
            first_divergent=next(i for i, a in enumerate(actions) if a is not Action.RUN),
        )

    # -- install / remove (lock held) -------------------------------------------------------------
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
        with _locked():
            self._running += 1

    def generation_ended(self) -> None:
        with _locked():
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
        for gen in reversed(_GENERATIONS.get()):
            if gen.patch is self:
                return gen
        for ref in reversed(list(self.owners)):
            lease = ref()
            if lease is not None and lease.bare is not None:
                return lease.bare
        return None

    def _decide(self, gen: Generation, k: int, key: tuple | None) -> bool:
        """Whether evaluation ``k`` of ``gen`` must be a full step (schedule, or no usable cache).

        For an adaptive generation, False means a *tentative* retrieval step (decided in the U-Net).
        """
        if gen.params.needs_num_steps and gen.total_steps() is None:
            raise ValueError(
                'skip_mode="non-uniform" needs the number of steps: pipelines provide it, for a bare U-Net call '
                "helper.reset_states(num_inference_steps=N) before the loop."
            )
        no_cache = (
            gen.cache is None
            or key is None
            or gen.cache_key != key
            or (gen.cache_versions is not None and _versions(gen.cache) != gen.cache_versions)
        )
        if gen.adaptive:
            return no_cache or gen.reference is None or adaptive_is_full_step(gen.params, k, gen.streak, None)
        return no_cache or is_full_step(gen.params, k, gen.total_steps())

    def peek(self, gen: Generation, sample: Any) -> bool:
        """Decide ``gen``'s *next* evaluation ahead of the U-Net (a ControlNet runs before it).

        A retrieval decision is a commitment the U-Net's pre-hook keeps (the ControlNet then computes only
        the residuals a retrieval step consumes); a full one commits nothing, since full residuals are valid
        for either kind of step.
        """
        if gen.pending == gen.step:
            return False
        if gen.adaptive:
            return True  # decided inside the U-Net, after the ControlNet ran: full residuals are always valid
        full = self._decide(gen, gen.step, _input_key(sample))
        if not full:
            gen.pending = gen.step
        return full

    def _clear(self) -> None:
        self.mode, self.gen = Mode.OFF, None

    def _begin(self, sample: Any) -> None:
        gen = self.current_generation()
        if gen is None:
            if self.owners:
                self._warn_if_a_pipeline_runs_uncached()
            return None
        key = _input_key(sample)
        k = gen.step
        gen.step += 1
        full = self._decide(gen, k, key)
        committed, gen.pending = gen.pending == k, None
        if committed and full:
            raise RuntimeError(
                "DeepCache: a ControlNet ran the shallow path for this step but the U-Net cannot reuse its cache "
                f"(its input is {key}, the cache was made for {gen.cache_key}). Please report this; "
                "disable the helper for this pipeline meanwhile."
            )
        if full:
            gen.refresh(key)
        else:
            gen.streak += 1
        gen.deciding = gen.adaptive and not full
        gen.steps.append(full)
        self.mode, self.gen = (Mode.FULL if full else Mode.RETRIEVE), gen
        return None

    def _end(self) -> None:
        gen, mode = self.gen, self.mode
        if gen is None:
            return None
        if mode is Mode.FULL and gen.cache is not None:
            if gen.cache_from_graph:
                # A compiled graph produced the cache. Under CUDA graphs (mode="reduce-overhead") its outputs
                # live in a pool that the next replay overwrites: keep a copy made outside any graph.
                gen.cache = _clone(gen.cache)
                gen.cache_from_graph = False
            gen.cache_versions = _versions(gen.cache)
            if gen.cache_versions is None:  # untrackable (inference mode): never hand out the original
                gen.clone_handout = True
        if mode is Mode.RETRIEVE and gen.cache is not None and not gen.clone_handout:
            if gen.cache_versions is None or _versions(gen.cache) != gen.cache_versions:
                # An unexpected consumer modified the cached feature in place: refresh the cache at the next
                # step and hand out copies from now on (this U-Net remembers it for later generations).
                self.clone_handout = True
                gen.clone_handout = True
                gen.cache = None
        return None

    def _warn_if_a_pipeline_runs_uncached(self) -> None:
        pipeline = _calling_pipeline(self.unet)
        if pipeline is None or pipeline in self._warned:
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


def _calling_pipeline(unet: nn.Module, max_depth: int = 64) -> Any | None:
    """The pipeline object whose method is running ``unet`` in this thread (found on the call stack), if any."""
    frame = sys._getframe(1)
    for _ in range(max_depth):
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if callable(candidate) and not isinstance(candidate, (nn.Module, UNetPatch)):
            if unwrap_unet(getattr(candidate, "unet", None)) is unet:
                return candidate
        frame = frame.f_back
    return None


def _hidden_states(args: tuple, kwargs: dict) -> torch.Tensor | None:
    x = args[0] if args else kwargs.get("hidden_states")
    return x if torch.is_tensor(x) else None


def relative_l1(x: torch.Tensor, reference: torch.Tensor) -> float:
    """``mean|x - reference| / mean|reference|``: one reduction and one host read."""
    x, reference = x.float(), reference.float()
    return float((x - reference).abs().mean() / reference.abs().mean().clamp_min(1e-12))


def _decide_in_the_unet(patch: UNetPatch, gen: Generation, args: tuple, kwargs: dict) -> bool:
    """An adaptive tentative retrieval step reached its first divergent module: full step or not."""
    gen.deciding = False
    if torch.compiler.is_compiling():
        raise RuntimeError(
            'skip_mode="adaptive" decides each step from a value read on the host, which torch.compile cannot '
            'trace: run the U-Net eagerly, or compile with the decisions fixed in advance: '
            'set_params(skip_mode="custom", full_steps=[i for i, f in enumerate(helper.last_steps) if f]) from an '
            "eager adaptive run, or a schedule from helper.calibrate(...)."
        )
    x = _hidden_states(args, kwargs)
    ref = gen.reference
    signal = relative_l1(x, ref) if x is not None and ref is not None and x.shape == ref.shape else None
    gen.signals.append(signal)
    full = signal is None or adaptive_is_full_step(gen.params, gen.step - 1, gen.streak - 1, signal)
    if full:
        patch.mode = Mode.FULL
        gen.steps[-1] = True
        gen.refresh(gen.cache_key)
    return full


def _plain(patch: _Hooked) -> bool:
    """Whether a wrapped module runs unchanged: no evaluation in progress, or another thread's (checked eagerly;
    a compiled graph is entered through the hooks, so it never runs a wrapper for another thread)."""
    return patch.mode is Mode.OFF or not (torch.compiler.is_compiling() or patch.evaluations.mine())


def _unet_module_forward(patch: UNetPatch, index: int, original: Callable, *args: Any, **kwargs: Any) -> Any:
    if _plain(patch):
        return original(*args, **kwargs)
    mode = patch.mode
    gen = patch.gen
    action = gen.actions[index]
    if mode is Mode.RETRIEVE and action is not Action.RUN and gen.deciding:
        if _decide_in_the_unet(patch, gen, args, kwargs):
            mode = Mode.FULL
    if mode is Mode.FULL:
        if gen.adaptive and index == gen.first_divergent:
            x = _hidden_states(args, kwargs)
            gen.reference = x.detach().clone() if x is not None else None
        out = original(*args, **kwargs)
        if action is Action.SKIP:
            gen.specs[index] = _tensor_spec(out)
        elif action is Action.BOUNDARY:
            # Only tensor work and attribute stores here (a compiled graph replays them); the version
            # bookkeeping runs in the post-hook, outside any graph.
            gen.cache = _clone(out)
            gen.cache_from_graph = torch.compiler.is_compiling()
        return out
    if action is Action.RUN:
        return original(*args, **kwargs)
    if action is Action.SKIP:
        return _placeholder(gen.specs[index], gen.poison)
    return _clone(gen.cache) if gen.clone_handout else gen.cache


# ----------------------------------------------------------------------------------------------
# The patch on one ControlNet


class ControlNetPatch(_Hooked):
    """Runs only the part of a ``ControlNetModel`` that the U-Net's retrieval steps consume.

    A ControlNet computes one residual per U-Net skip connection plus one for the mid block, before the U-Net
    runs. On a retrieval step with branch ``b`` the U-Net consumes the residuals of skips ``0..b`` (and the
    mid one only at the deepest branch, where the cached feature is the mid block's output), so the rest of
    the ControlNet returns placeholders. The step's kind is decided once, ahead of the U-Net
    (:meth:`UNetPatch.peek`), and the U-Net keeps that decision.
    """

    def __init__(self, controlnet: nn.Module, unet_patch: UNetPatch) -> None:
        layout = unet_patch.layout
        down = tuple((len(block.resnets), _sampler(block, "downsamplers") is not None) for block in controlnet.down_blocks)
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
        self.evaluations = _Evaluations()
        self.owners: dict[weakref.ref, None] = {}
        self._modules_keys = tuple(key for key, _ in controlnet_modules(controlnet))
        self._actions: dict[int, tuple[Action, ...]] = {}
        self._wrapping = _Wrapping(_controlnet_module_forward)

    def actions_for(self, branch: int) -> tuple[Action, ...]:
        table = self._actions.get(branch)
        if table is None:
            plan = retrieval_plan(self.unet_patch.layout, branch)
            table = self._actions[branch] = tuple(controlnet_retrieval_action(plan, k) for k in self._modules_keys)
        return table

    def install(self) -> None:
        controlnet = self._controlnet_ref()
        if controlnet is not None and not self.installed:
            self._wrapping.install(self, controlnet, controlnet_modules(controlnet))

    def _clear(self) -> None:
        self.mode, self.state = Mode.OFF, None

    def _begin(self, sample: Any) -> None:
        gen = self.unet_patch.current_generation()
        if gen is None:
            return None
        state = gen.controlnet_state(self)
        if not state.ran_full:
            # No full run of this ControlNet in this generation yet, so no placeholder shapes: run it in full
            # (full residuals are valid whatever the U-Net does) and commit nothing.
            state.ran_full, state.specs = True, {}
            self.mode, self.state = Mode.FULL, state
            return None
        full = self.unet_patch.peek(gen, sample)
        if full:
            state.specs = {}
        self.mode, self.state = (Mode.FULL if full else Mode.RETRIEVE), state
        return None


def _controlnet_module_forward(patch: ControlNetPatch, index: int, original: Callable, *args: Any, **kwargs: Any) -> Any:
    if _plain(patch):
        return original(*args, **kwargs)
    mode = patch.mode
    state = patch.state
    action = state.actions[index]
    if mode is Mode.FULL:
        out = original(*args, **kwargs)
        if action is Action.SKIP:
            state.specs[index] = _tensor_spec(out)
        return out
    if action is Action.SKIP:
        return _placeholder(state.specs[index], state.poison)
    return original(*args, **kwargs)


# ----------------------------------------------------------------------------------------------
# Registry: one patch per U-Net and per ControlNet, keyed weakly by the module (the patch holds it weakly)

_PATCHES: "weakref.WeakKeyDictionary[nn.Module, UNetPatch]" = weakref.WeakKeyDictionary()
_CONTROLNET_PATCHES: "weakref.WeakKeyDictionary[nn.Module, ControlNetPatch]" = weakref.WeakKeyDictionary()


def acquire(unet: nn.Module) -> Lease:
    """Install (or join) the patch on ``unet``; the returned lease keeps it until released or dropped."""
    layout = unet_layout(unet)
    with _locked():
        patch = _PATCHES.get(unet)
        if patch is None or (patch.layout != layout and not patch.owners):
            if patch is not None:
                patch._wrapping.remove()
            patch = _PATCHES[unet] = UNetPatch(unet)
        patch.install()
        lease = Lease(patch)
        patch.owners[lease.ref] = None
        return lease


def controlnets_of(pipeline: Any) -> list[nn.Module]:
    """The ControlNet modules of a pipeline (the nets inside a ``MultiControlNetModel`` too)."""
    controlnet = getattr(pipeline, "controlnet", None)
    nets = getattr(controlnet, "nets", None)
    candidates = list(nets) if nets is not None else [controlnet]
    return [unwrap_unet(c) for c in candidates if isinstance(unwrap_unet(c), nn.Module)]


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
    with _locked():
        patch = _CONTROLNET_PATCHES.get(controlnet)
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
                _CONTROLNET_PATCHES[controlnet] = patch
                unet_patch._controlnets.add(patch)
        if why is None:
            patch.install()
            patch.owners[lease.ref] = None
            lease.controlnets.append(patch)
            return True
    _say_runs_in_full(controlnet, why)
    return False


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


def boundary_module(unet: nn.Module, branch: int) -> nn.Module:
    """The module whose output is the cached feature for ``branch`` (what calibration measures)."""
    plan = retrieval_plan(unet_layout(unet), branch)
    return next(module for key, module in unet_modules(unet) if retrieval_action(plan, key) is Action.BOUNDARY)
