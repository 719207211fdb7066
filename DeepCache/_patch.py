"""Module plumbing: wire a :class:`~DeepCache.layout.RetrievalPlan` into a live diffusers U-Net.

Nothing here decides *what* runs (that is :mod:`DeepCache.layout` and :mod:`DeepCache.schedule`);
this module only

* wraps the ``forward`` of the U-Net's path modules (down blocks and their layers/downsamplers,
  the mid block, up blocks and their layers) on the instance, restorable exactly;
* adds a forward pre-hook and hook on the U-Net that pick full vs retrieval for each evaluation
  (module hooks survive accelerate's offload hooks, which rewrite ``unet.forward``);
* keeps the per-generation state: step counter, the one cached feature, placeholder shapes.

On a retrieval step a skipped module returns an uninitialised placeholder of the shape it had at
the last full step (its value never reaches the output), and the module whose output enters the
up layer that consumes skip ``b`` returns the cached feature.
"""

from __future__ import annotations

import enum
import functools
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .layout import Boundary, RetrievalPlan, UNetLayout, retrieval_plan
from .schedule import CacheParams, is_full_step

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


class Mode(enum.Enum):
    OFF = "off"  # no active generation: every module runs untouched
    FULL = "full"
    RETRIEVE = "retrieve"


class Action(enum.Enum):
    RUN = "run"
    SKIP = "skip"
    BOUNDARY = "boundary"


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


def _down_actions(plan: RetrievalPlan, layout: UNetLayout, down_blocks: Iterable[nn.Module]) -> dict[tuple, Action]:
    actions: dict[tuple, Action] = {}
    for i, block in enumerate(down_blocks):
        runs = plan.down_block_runs[i]
        actions[("down_block", i)] = Action.RUN if runs else Action.SKIP
        for j in range(layout.down[i].num_layers):
            skip_layer = runs and not plan.down_layer_runs[i][j]
            for m in range(len(layer_modules(block, j))):
                actions[("down_layer", i, j, m)] = Action.SKIP if skip_layer else Action.RUN
        if layout.down[i].has_sampler:
            actions[("down_sampler", i)] = Action.SKIP if runs and not plan.down_sampler_runs[i] else Action.RUN
    return actions


def plan_actions(plan: RetrievalPlan, layout: UNetLayout, unet: nn.Module) -> dict[tuple, Action]:
    """Map every wrapped-module key to what it does on a retrieval step of ``plan``."""
    actions = _down_actions(plan, layout, unet.down_blocks)
    b = plan.boundary
    actions[("mid",)] = Action.BOUNDARY if b.kind == "mid" else Action.SKIP
    for u, block in enumerate(unet.up_blocks):
        runs = plan.up_block_runs[u]
        if b == Boundary("up_block", u):
            actions[("up_block", u)] = Action.BOUNDARY
        else:
            actions[("up_block", u)] = Action.RUN if runs else Action.SKIP
        for j in range(layout.up[u].num_layers):
            modules = layer_modules(block, j)
            skip_layer = runs and not plan.up_layer_runs[u][j]
            for m in range(len(modules)):
                if skip_layer and b == Boundary("up_layer", u, j) and m == len(modules) - 1:
                    actions[("up_layer", u, j, m)] = Action.BOUNDARY
                else:
                    actions[("up_layer", u, j, m)] = Action.SKIP if skip_layer else Action.RUN
    return actions


def controlnet_actions(plan: RetrievalPlan, layout: UNetLayout, controlnet: nn.Module) -> dict[tuple, Action]:
    """What a ControlNet does on a retrieval step: only the residuals for skips ``0..b`` are consumed."""
    actions = _down_actions(plan, layout, controlnet.down_blocks)
    actions[("mid",)] = Action.SKIP
    actions[("zero_conv_mid",)] = Action.SKIP
    for skip in range(layout.num_branches):
        actions[("zero_conv", skip)] = Action.RUN if skip <= plan.branch else Action.SKIP
    return actions


def _controlnet_modules(controlnet: nn.Module) -> Iterator[tuple[tuple, nn.Module]]:
    yield from _down_path_modules(controlnet)
    yield ("mid",), controlnet.mid_block
    for skip, conv in enumerate(controlnet.controlnet_down_blocks):
        yield ("zero_conv", skip), conv
    yield ("zero_conv_mid",), controlnet.controlnet_mid_block


def _down_path_modules(unet: nn.Module) -> Iterator[tuple[tuple, nn.Module]]:
    for i, block in enumerate(unet.down_blocks):
        yield ("down_block", i), block
        for j in range(len(block.resnets)):
            for m, module in enumerate(layer_modules(block, j)):
                yield ("down_layer", i, j, m), module
        sampler = _sampler(block, "downsamplers")
        if sampler is not None:
            yield ("down_sampler", i), sampler


def _path_modules(unet: nn.Module) -> Iterator[tuple[tuple, nn.Module]]:
    yield from _down_path_modules(unet)
    yield ("mid",), unet.mid_block
    for u, block in enumerate(unet.up_blocks):
        yield ("up_block", u), block
        for j in range(len(block.resnets)):
            for m, module in enumerate(layer_modules(block, j)):
                yield ("up_layer", u, j, m), module


def _install(
    owner: Any, root: nn.Module, modules: Iterable[tuple[tuple, nn.Module]], reuse: dict | None = None
) -> tuple[list[tuple[nn.Module, bool, Any, Callable]], list[Any]]:
    """Wrap each module's ``forward`` (restorably) and hook ``root`` with ``owner``'s pre/post hooks.

    With ``reuse`` (key -> (module, original forward, wrapper)), a wrapper made earlier for the same module
    and forward is installed again instead of a new one: torch.compile guards on the wrapper's identity.
    """
    saved = []
    for key, module in modules:
        had_own = "forward" in module.__dict__
        previous = module.__dict__.get("forward")
        original = module.forward
        cached = reuse.get(key) if reuse is not None else None
        if cached is not None and cached[0] is module and cached[1] == original:
            wrapper = cached[2]
        else:
            wrapper = functools.update_wrapper(functools.partial(_wrapped_forward, owner, key, original), original)
            if reuse is not None:
                reuse[key] = (module, original, wrapper)
        module.forward = wrapper
        saved.append((module, had_own, previous, wrapper))
    handles = [
        root.register_forward_pre_hook(owner._pre_hook, with_kwargs=True),
        root.register_forward_hook(owner._post_hook, with_kwargs=True, always_call=True),
    ]
    return saved, handles


def _uninstall(saved: list[tuple[nn.Module, bool, Any, Callable]], handles: list[Any]) -> None:
    """Undo :func:`_install`: remove the hooks and give every module its own ``forward`` back."""
    for handle in handles:
        handle.remove()
    handles.clear()
    for module, had_own, previous, wrapper in reversed(saved):
        if module.__dict__.get("forward") is wrapper:
            if had_own:
                module.forward = previous
            else:
                del module.forward
        # else: someone wrapped our wrapper; with the patch gone it passes straight through.
    saved.clear()


# ----------------------------------------------------------------------------------------------
# Per-generation state


@dataclass
class Generation:
    """State of one generation (one pipeline call, or one bare-U-Net loop between resets)."""

    params: CacheParams
    actions: dict[tuple, Action]
    num_steps: Callable[[], int | None] = lambda: None
    step: int = 0
    steps: list[bool] = field(default_factory=list)  # True = full step, per U-Net evaluation
    cache: Any = None  # the boundary output of the last full step (a clone)
    cache_key: tuple | None = None  # (shape, dtype, device) of the sample at that full step
    cache_versions: tuple[int, ...] | None = None
    clone_handout: bool = False  # hand out copies of the cache (its consumer modifies it in place)
    # output specs of the skipped modules at the last full step (a new dict per full step, so a compiled
    # full step always sees an empty one: one graph, not one for the first full step and one for later ones)
    specs: dict[tuple, tuple[pytree.TreeSpec, list]] = field(default_factory=dict)
    cache_from_graph: bool = False  # the cache was produced inside a torch.compile graph
    pending: int | None = None  # a step a ControlNet already ran as a retrieval step (the U-Net must follow)
    _num_steps_value: int | None = None
    _num_steps_read: bool = False

    def total_steps(self) -> int | None:
        if not self._num_steps_read:
            self._num_steps_value = self.num_steps()
            self._num_steps_read = True
        return self._num_steps_value

    def release(self) -> None:
        self.cache = None
        self.cache_key = None
        self.cache_versions = None
        self.specs.clear()

    def cache_bytes(self) -> int:
        if self.cache is None:
            return 0
        return sum(t.numel() * t.element_size() for t in pytree.tree_leaves(self.cache) if torch.is_tensor(t))


def _tensor_spec(out: Any) -> tuple[pytree.TreeSpec, list]:
    leaves, spec = pytree.tree_flatten(out)
    return spec, [(tuple(x.shape), x.dtype, x.device) if torch.is_tensor(x) else (None, x, None) for x in leaves]


def _placeholder(spec: tuple[pytree.TreeSpec, list]) -> Any:
    treespec, leaves = spec
    values = [
        torch.empty(shape, dtype=dtype, device=device) if shape is not None else dtype
        for shape, dtype, device in leaves
    ]
    return pytree.tree_unflatten(values, treespec)


def _versions(tree: Any) -> tuple[int, ...] | None:
    try:
        return tuple(t._version for t in pytree.tree_leaves(tree) if torch.is_tensor(t))
    except RuntimeError:  # inference tensors (torch.inference_mode) have no version counter
        return None


def _clone(tree: Any) -> Any:
    return pytree.tree_map(lambda x: x.clone() if torch.is_tensor(x) else x, tree)


# ----------------------------------------------------------------------------------------------
# The patch on one U-Net


class UNetPatch:
    """Hooks on one U-Net, shared by every helper that caches it; removed when the last one leaves."""

    def __init__(self, unet: nn.Module) -> None:
        self._unet_ref = weakref.ref(unet)  # weak: a dormant patch (see release) must not keep the U-Net alive
        self.layout = unet_layout(unet)
        self.owners: set[int] = set()
        self.stack: list[Generation] = []  # active generations, innermost last
        self.mode = Mode.OFF
        self.gen: Generation | None = None  # the generation of the evaluation in progress
        self.clone_handout = False  # set once a consumer was seen modifying the cached feature in place
        self._saved: list[tuple[nn.Module, bool, Any, Callable]] = []
        self._handles: list[Any] = []
        self._actions_by_branch: dict[int, dict[tuple, Action]] = {}
        # key -> (module, original forward, wrapper): reinstalling reuses the same wrapper objects, so the
        # graphs torch.compile made with them (it guards on their identity) stay valid across disable/enable
        self._wrappers: dict[tuple, tuple[nn.Module, Callable, Callable]] = {}

    @property
    def unet(self) -> nn.Module:
        unet = self._unet_ref()
        if unet is None:
            raise RuntimeError("the U-Net of this DeepCache patch was garbage-collected")
        return unet

    # -- plan -------------------------------------------------------------------------------
    def actions_for(self, branch: int) -> dict[tuple, Action]:
        if branch not in self._actions_by_branch:
            plan = retrieval_plan(self.layout, branch)
            self._actions_by_branch[branch] = plan_actions(plan, self.layout, self.unet)
        return self._actions_by_branch[branch]

    def consumer_modifies_in_place(self, branch: int) -> bool:
        """Whether the block that consumes the cached feature scales it in place (FreeU does)."""
        if self.clone_handout:
            return True
        boundary = retrieval_plan(self.layout, branch).boundary
        index = {"mid": 0, "up_block": boundary.block + 1, "up_layer": boundary.block}[boundary.kind]
        block = self.unet.up_blocks[index]
        return all(getattr(block, name, None) for name in ("s1", "s2", "b1", "b2"))

    # -- install / remove ---------------------------------------------------------------------
    def install(self) -> None:
        self._saved, self._handles = _install(self, self.unet, _path_modules(self.unet), self._wrappers)

    def remove(self) -> None:
        _uninstall(self._saved, self._handles)
        self.stack.clear()
        self.mode = Mode.OFF
        self.gen = None

    # -- per evaluation -------------------------------------------------------------------------
    def _decide(self, gen: Generation, k: int, key: tuple | None) -> bool:
        """Whether evaluation ``k`` of ``gen`` must be a full step (schedule, or no usable cache)."""
        if gen.params.needs_num_steps and gen.total_steps() is None:
            raise ValueError(
                'skip_mode="non-uniform" needs the number of steps: pipelines provide it, for a bare U-Net call '
                "helper.reset_states(num_inference_steps=N) before the loop."
            )
        return (
            is_full_step(gen.params, k, gen.total_steps())
            or gen.cache is None
            or key is None
            or gen.cache_key != key
            or (gen.cache_versions is not None and _versions(gen.cache) != gen.cache_versions)
        )

    def peek(self, sample: Any) -> bool | None:
        """Decide the *next* evaluation ahead of the U-Net (a ControlNet runs before it).

        Returns None outside a generation. A retrieval decision is a commitment the U-Net's pre-hook keeps
        (the ControlNet then computes only the shallow residuals); a full one commits nothing, since full
        residuals are valid for either kind of step.
        """
        gen = self.stack[-1] if self.stack else None
        if gen is None:
            return None
        if gen.pending == gen.step:
            return False
        key = (tuple(sample.shape), sample.dtype, sample.device) if torch.is_tensor(sample) else None
        full = self._decide(gen, gen.step, key)
        if not full:
            gen.pending = gen.step
        return full

    @torch.compiler.disable
    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        gen = self.stack[-1] if self.stack else None
        self.gen = gen
        if gen is None:
            self.mode = Mode.OFF
            return None
        sample = args[0] if args else kwargs.get("sample")
        key = (tuple(sample.shape), sample.dtype, sample.device) if torch.is_tensor(sample) else None
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
            gen.cache = None  # free the old feature before computing the new one
            gen.cache_key = key
            gen.cache_versions = None
            gen.specs = {}
        gen.steps.append(full)
        self.mode = Mode.FULL if full else Mode.RETRIEVE
        return None

    @torch.compiler.disable
    def _post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        gen, mode = self.gen, self.mode
        self.mode = Mode.OFF
        self.gen = None
        if gen is not None and mode is Mode.FULL and gen.cache is not None:
            if gen.cache_from_graph:
                # A compiled graph produced the cache. Under CUDA graphs (mode="reduce-overhead") its outputs
                # live in a pool that the next replay overwrites: keep a copy made outside any graph.
                gen.cache = _clone(gen.cache)
                gen.cache_from_graph = False
            gen.cache_versions = _versions(gen.cache)
            if gen.cache_versions is None:  # untrackable (inference mode): never hand out the original
                gen.clone_handout = True
        if gen is not None and mode is Mode.RETRIEVE and gen.cache is not None and not gen.clone_handout:
            if gen.cache_versions is None or _versions(gen.cache) != gen.cache_versions:
                # An unexpected consumer modified the cached feature in place: refresh the cache at the next
                # step and hand out copies from now on (this U-Net remembers it for later generations).
                self.clone_handout = True
                gen.clone_handout = True
                gen.cache = None
        return None


@dataclass
class _ControlNetState:
    """What a ControlNet's wrappers read during one of its evaluations (no cache: it never has a boundary)."""

    actions: dict[tuple, Action]
    specs: dict[tuple, tuple[pytree.TreeSpec, list]] = field(default_factory=dict)
    generation: Generation | None = None  # the U-Net generation whose full step recorded ``specs``


class ControlNetPatch:
    """Runs only the shallow part of a ``ControlNetModel`` on the U-Net's retrieval steps.

    A ControlNet computes one residual per U-Net skip connection plus one for the mid block, before the U-Net
    runs. On a retrieval step with branch ``b`` the U-Net consumes only the residuals of skips ``0..b``, so the
    ControlNet's deeper down layers, its mid block and their zero convolutions return placeholders. The step's
    kind is decided once, ahead of the U-Net (:meth:`UNetPatch.peek`), and the U-Net keeps that decision.
    """

    def __init__(self, controlnet: nn.Module, unet_patch: UNetPatch) -> None:
        self.controlnet = controlnet
        self.unet_patch = unet_patch
        down = [(len(block.resnets), _sampler(block, "downsamplers") is not None) for block in controlnet.down_blocks]
        if (
            tuple((b.num_layers, b.has_sampler) for b in unet_patch.layout.down) != tuple(down)
            or len(controlnet.controlnet_down_blocks) != unet_patch.layout.num_branches
        ):
            raise ValueError("the ControlNet's down path does not mirror the U-Net's")
        self.mode = Mode.OFF
        self.gen: _ControlNetState | None = None
        self._states: dict[int, _ControlNetState] = {}
        self._saved: list[tuple[nn.Module, bool, Any, Callable]] = []
        self._handles: list[Any] = []

    def _state(self, branch: int) -> _ControlNetState:
        if branch not in self._states:
            plan = retrieval_plan(self.unet_patch.layout, branch)
            self._states[branch] = _ControlNetState(controlnet_actions(plan, self.unet_patch.layout, self.controlnet))
        return self._states[branch]

    def install(self) -> None:
        self._saved, self._handles = _install(self, self.controlnet, _controlnet_modules(self.controlnet))

    def remove(self) -> None:
        _uninstall(self._saved, self._handles)
        self.mode = Mode.OFF
        self.gen = None

    @torch.compiler.disable
    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.mode, self.gen = Mode.OFF, None
        unet_patch = self.unet_patch
        generation = unet_patch.stack[-1] if unet_patch.stack else None
        if generation is None:
            return None
        state = self._state(generation.params.cache_branch_id)
        if state.generation is not generation:
            # No full run of this ControlNet in this generation yet, so no placeholder shapes: run it in full
            # (full residuals are valid whatever the U-Net does) and commit nothing.
            state.generation, state.specs = generation, {}
            self.mode, self.gen = Mode.FULL, state
            return None
        full = unet_patch.peek(args[0] if args else kwargs.get("sample"))
        if full is None:
            return None
        if full:
            state.specs = {}
        self.mode, self.gen = (Mode.FULL if full else Mode.RETRIEVE), state
        return None

    @torch.compiler.disable
    def _post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self.mode, self.gen = Mode.OFF, None
        return None


def _wrapped_forward(patch: UNetPatch, key: tuple, original: Callable, *args: Any, **kwargs: Any) -> Any:
    mode = patch.mode
    if mode is Mode.OFF:
        return original(*args, **kwargs)
    gen = patch.gen
    action = gen.actions.get(key, Action.RUN)
    if mode is Mode.FULL:
        out = original(*args, **kwargs)
        if action is Action.SKIP:
            gen.specs[key] = _tensor_spec(out)
        elif action is Action.BOUNDARY:
            # Only tensor work and attribute stores here (a compiled graph replays them); the version
            # bookkeeping runs in the post-hook, outside any graph.
            gen.cache = _clone(out)
            gen.cache_from_graph = torch.compiler.is_compiling()
        return out
    if action is Action.RUN:
        return original(*args, **kwargs)
    if action is Action.SKIP:
        return _placeholder(gen.specs[key])
    return _clone(gen.cache) if gen.clone_handout else gen.cache


# ----------------------------------------------------------------------------------------------
# Registry: one patch per U-Net, shared by helpers

_PATCHES: "weakref.WeakKeyDictionary[nn.Module, UNetPatch]" = weakref.WeakKeyDictionary()
# Removed patches, kept (weakly, per U-Net) so that enabling again reuses their wrappers and compiled graphs.
_DORMANT: "weakref.WeakKeyDictionary[nn.Module, UNetPatch]" = weakref.WeakKeyDictionary()


def acquire(unet: nn.Module, owner: object) -> UNetPatch:
    """Install (or join) the patch on ``unet`` for ``owner``."""
    patch = _PATCHES.get(unet)
    if patch is None:
        patch = _DORMANT.pop(unet, None)
        if patch is None or patch.layout != unet_layout(unet):
            patch = UNetPatch(unet)
        patch.install()
        _PATCHES[unet] = patch
    patch.owners.add(id(owner))
    return patch


def release(unet: nn.Module, owner: object) -> None:
    """Leave the patch on ``unet``; the last owner to leave removes it."""
    patch = _PATCHES.get(unet)
    if patch is None:
        return
    patch.owners.discard(id(owner))
    if not patch.owners:
        patch.remove()
        del _PATCHES[unet]
        _DORMANT[unet] = patch


def patch_of(unet: nn.Module) -> UNetPatch | None:
    return _PATCHES.get(unet)


_CONTROLNET_PATCHES: "weakref.WeakKeyDictionary[nn.Module, ControlNetPatch]" = weakref.WeakKeyDictionary()


def controlnets_of(pipeline: Any) -> list[nn.Module]:
    """The plain ``ControlNetModel``s of a pipeline (inside a ``MultiControlNetModel`` too)."""
    controlnet = getattr(pipeline, "controlnet", None)
    nets = getattr(controlnet, "nets", None)
    candidates = list(nets) if nets is not None else [controlnet]
    return [
        _patch_target for _patch_target in (unwrap_unet(c) for c in candidates if c is not None)
        if type(_patch_target).__name__ == "ControlNetModel"
    ]


def acquire_controlnet(controlnet: nn.Module, unet_patch: UNetPatch) -> bool:
    """Make ``controlnet`` run shallow on ``unet_patch``'s retrieval steps. False if it cannot."""
    patch = _CONTROLNET_PATCHES.get(controlnet)
    if patch is not None:
        return patch.unet_patch is unet_patch
    try:
        patch = ControlNetPatch(controlnet, unet_patch)
    except (ValueError, AttributeError):
        return False  # a ControlNet that does not mirror the U-Net: it runs in full, which is always correct
    patch.install()
    _CONTROLNET_PATCHES[controlnet] = patch
    return True


def release_controlnet(controlnet: nn.Module) -> None:
    patch = _CONTROLNET_PATCHES.pop(controlnet, None)
    if patch is not None:
        patch.remove()
