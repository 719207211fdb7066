"""The patch on one diffusion transformer: per evaluation, ask the caller's generation for the step kind, and make
each block do what its :class:`~.dit_layout.Role` says (the plan: :mod:`.dit_layout`).

**Steps and CFG branches.** A pipeline calls the transformer once per step with a batched CFG (SD3, PixArt, Sana), or
once per guidance branch with the same latents (Flux true CFG, Wan, CogView4, Qwen-Image, Lumina2, which drops the
uncond call late in the run). A call's **branch** is the identity of its conditioning tensor (the first
``encoder_hidden_states*`` argument, which pipelines compute once per call, before the loop): each branch is a
:class:`~.state.Generation` of its own, with its own step counter and cache, so steps are never counted by call
parity, and a branch that stops (or starts) mid-run changes nothing for the others. A pipeline that made a new
conditioning tensor for every call would only ever run full steps (safe, never wrong); DeepCache says so once.

**A block's work.** On a full step the first block of each middle segment keeps a copy of its input streams and the
last adds ``output - input`` to the generation's residuals (a model with long skips, HunyuanDiT: the output itself,
DeepCache's U-Net rule; see :data:`~.dit_layout.LONG_SKIPS`); the last middle block stores them all as the cached
feature (reused or forecast: :class:`~.state.ReuseFeature`, :class:`~.forecast_feature.ForecastFeature`). On a
retrieval step the middle blocks pass their inputs through and each segment's last block returns the segment's
inputs plus its residual (or the cached output).
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ...schedules.params import CacheParams
from .discovery import _position, conditioning_reader, dit_layout, transformer_blocks
from .layout import Kind, Role, roles
from ..lifecycle import DeepCacheWarning, Lease
from ..model_patch import ModelPatch, acquire_patch, decide_adaptive, feature_for
from ..state import AdaptiveState, Generation, Mode
from ..tensors import hidden_states, input_key, nan_placeholders
from ..wrappers import plain

#: More CFG branches than this in one generation means the conditioning is a new tensor at every call.
_MAX_BRANCHES = 8


@dataclass(eq=False)
class BranchedGeneration:
    """One pipeline call (or bare loop) on a transformer: a :class:`~.state.Generation` per CFG branch, keyed by the
    identity of the branch's conditioning tensor (held weakly). Dropping it frees every branch's cache."""

    owner: "TransformerPatch"
    params: CacheParams
    num_steps: Callable[[], int | None] = lambda: None
    branches: list[tuple[Any, Generation]] = field(default_factory=list)  # (weakref or None, generation)
    #: the generations of the same call on the pipeline's other transformers (Wan 2.2: ``transformer_2`` takes over
    #: part-way): a branch that starts here goes on counting the steps they ran for the same conditioning
    siblings: list["BranchedGeneration"] = field(default_factory=list)
    _warned: bool = False

    def _find(self, cond: Any) -> Generation | None:
        for ref, gen in self.branches:
            if (ref is None and cond is None) or (ref is not None and ref() is cond):
                return gen
        return None

    def branch(self, cond: Any) -> Generation:
        gen = self._find(cond)
        if gen is not None:
            return gen
        gen = self.owner.branch_generation(self.params, lambda: self.num_steps())
        gen.step = sum(len(other.steps) for sib in self.siblings for other in [sib._find(cond)] if other is not None)
        self.branches.append((weakref.ref(cond) if torch.is_tensor(cond) else None, gen))
        if len(self.branches) > _MAX_BRANCHES and not self._warned:
            self._warned = True
            warnings.warn(
                f"every call of this {self.owner.kind} brings a new conditioning tensor (encoder_hidden_states), so "
                "DeepCache cannot tell the steps of one generation apart and runs them all in full. Pass the same "
                "prompt embeddings to every step (pipelines compute them once per call).",
                DeepCacheWarning, stacklevel=2)
        return gen

    @property
    def steps(self) -> list[bool]:
        """Full (True) / retrieval (False) per step of the first branch (the conditional one)."""
        return self.branches[0][1].steps if self.branches else []

    def release(self) -> None:
        for _, gen in self.branches:
            gen.release()

    def reset(self) -> None:
        self.branches = []

    def cache_bytes(self) -> int:
        return sum(gen.cache_bytes() for _, gen in self.branches)


class TransformerPatch(ModelPatch):
    """Wrappers on the blocks of one transformer (:class:`~.model_patch.ModelPatch`)."""

    kind = "transformer"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model, _block_forward)
        self.layout = dit_layout(model)
        self._roles: dict[tuple[int, int], tuple[Role, ...]] = {}
        self.text_positions: tuple[int | None, ...] = ()  # per block: the positional index of its text stream
        self.conditioning = conditioning_reader(model)  # (args, kwargs) -> the call's CFG branch key

    def roles_for(self, params: CacheParams) -> tuple[Role, ...]:
        split = self.layout.split(params.cache_branch_id, params.front_blocks, params.back_blocks)
        table = self._roles.get(split)
        if table is None:
            table = self._roles[split] = roles(self.layout, *split)
        return table

    def branch_generation(self, params: CacheParams, num_steps: Callable[[], int | None]) -> Generation:
        table = self.roles_for(params)
        first_middle = next((i for i, r in enumerate(table) if r.decides), len(table))
        return Generation(owner=self, params=params, actions=table, num_steps=num_steps, poison=nan_placeholders(),
                          feature=feature_for(params, False),
                          adaptive=AdaptiveState(first_middle) if params.adaptive else None)

    def new_generation(self, params: CacheParams, num_steps: Callable[[], int | None] = lambda: None) -> BranchedGeneration:
        self.roles_for(params)  # a bad split fails here, not in the middle of a call
        return BranchedGeneration(owner=self, params=params, num_steps=num_steps)

    def wrapped_modules(self, model: nn.Module) -> list[tuple[Any, nn.Module]]:
        blocks = transformer_blocks(model)
        self.text_positions = tuple(_position(b.forward, "encoder_hidden_states") for _, b in blocks)
        return blocks

    def _begin(self, args: tuple, kwargs: dict) -> None:
        gen = self.current_generation()
        if gen is None:
            return
        branch = gen.branch(self.conditioning(args, kwargs))
        full = branch.begin(input_key(args[0] if args else kwargs.get("hidden_states")))
        branch.scratch = {}
        if full and branch.adaptive is None and not any(role.decides for role in branch.actions):
            branch.feature.store(())  # an empty middle caches nothing: its retrieval steps run every block
        self.mode, self.gen = (Mode.FULL if full else Mode.RETRIEVE), branch

    def _clear(self) -> None:
        if self.gen is not None:
            self.gen.scratch = {}  # the segments' inputs and residuals of the evaluation that ends
        super()._clear()


def _streams(args: tuple, kwargs: dict, text_position: int | None) -> tuple[Any, Any]:
    """(image stream, text stream or None) of a block call."""
    image = args[0] if args else kwargs.get("hidden_states")
    if "encoder_hidden_states" in kwargs:
        return image, kwargs["encoder_hidden_states"]
    if text_position is not None and len(args) > text_position:
        return image, args[text_position]
    return image, None


def _parse(out: Any, returns: str) -> tuple[Any, Any]:
    """(image, text) of a block's output."""
    if torch.is_tensor(out):
        return out, None
    if returns == "eh":
        return out[1], out[0]
    if returns == "he":
        return out[0], out[1]
    return out[0], None


def _pack(returns: str, image: Any, text: Any) -> Any:
    """A block's output from its streams, in the block's return order."""
    return (text, image) if returns == "eh" else (image, text) if returns == "he" else image


def _minus(out: Any, inp: Any) -> Any:
    if out is None or inp is None:
        return None
    if out.shape != inp.shape:
        raise RuntimeError(
            f"DeepCache: a stream of this transformer changes shape inside the cached middle ({tuple(inp.shape)} -> "
            f"{tuple(out.shape)}), so its residual cannot be cached: choose another cache_branch_id / front_blocks.")
    return out - inp


def _plus(inp: Any, residual: Any) -> Any:
    return None if inp is None or residual is None else inp + residual


def _block_forward(patch: TransformerPatch, index: int, original: Callable, *args: Any, **kwargs: Any) -> Any:
    if plain(patch):
        return original(*args, **kwargs)
    gen = patch.gen
    role = gen.actions[index]
    if role.kind is Kind.RUN:
        return original(*args, **kwargs)
    mode = patch.mode
    adaptive = gen.adaptive
    if role.decides and adaptive is not None:
        if mode is Mode.RETRIEVE and adaptive.deciding and decide_adaptive(patch, gen, args, kwargs):
            mode = Mode.FULL
        if mode is Mode.FULL:
            x = hidden_states(args, kwargs)
            adaptive.reference = x.detach().clone() if x is not None else None
    s, kind, work = role.segment, role.kind, gen.scratch
    image, text = _streams(args, kwargs, patch.text_positions[index])
    if mode is Mode.FULL:
        if kind is Kind.FIRST or kind is Kind.ONLY:  # a copy: a block may modify its inputs in place
            work[s] = (image.clone(), None if text is None else text.clone())
        out = original(*args, **kwargs)
        if kind is Kind.LAST or kind is Kind.ONLY:
            inp = work.get(s)
            if inp is None:  # the model skipped the segment's first block (SD3 skip_layers): no residual
                work["incomplete"] = True
            else:
                o_image, o_text = _parse(out, role.returns)
                if role.absolute:  # long skips: the middle's output itself (DeepCache's U-Net rule)
                    work["residual", s] = (o_image, o_text)
                else:
                    work["residual", s] = (_minus(o_image, inp[0]), _minus(o_text, inp[1]))
            if role.final and "incomplete" not in work:
                gen.feature.store(tuple(x for i in range(s + 1) for x in work["residual", i]))
        return out
    if kind is Kind.FIRST:
        work[s] = (image, text)
    if kind is Kind.FIRST or kind is Kind.INNER:
        return _pack(role.returns, image, text)
    if kind is Kind.LAST:
        image, text = work.get(s, (image, text))
    value = work.get("handout")
    if value is None:
        value = work["handout"] = gen.feature.handout()
    if role.absolute:
        return _pack(role.returns, value[2 * s], value[2 * s + 1])
    return _pack(role.returns, _plus(image, value[2 * s]), _plus(text, value[2 * s + 1]))


# Registry: one patch per transformer, keyed weakly by the module (the patch holds it weakly)
_PATCHES: "weakref.WeakKeyDictionary[nn.Module, TransformerPatch]" = weakref.WeakKeyDictionary()


def acquire_transformer(model: nn.Module) -> Lease:
    """Install (or join) the patch on ``model``; the returned lease keeps it until released or dropped."""
    return acquire_patch(_PATCHES, model, dit_layout(model), TransformerPatch)
