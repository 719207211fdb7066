"""The drop-in helper: ``DeepCacheSDHelper(pipe=pipe)``, ``set_params(...)``, ``enable()``, ``disable()``.

Example (tiny random U-Net, runs offline)::

    >>> import torch
    >>> from diffusers import UNet2DConditionModel
    >>> from DeepCache import DeepCacheSDHelper
    >>> unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=2, norm_num_groups=4,
    ...     cross_attention_dim=8, attention_head_dim=2, sample_size=8,
    ...     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    ...     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()
    >>> helper = DeepCacheSDHelper(pipe=unet)
    >>> helper.set_params(cache_interval=3, cache_branch_id=0)
    >>> x, text = torch.randn(1, 4, 8, 8), torch.randn(1, 3, 8)
    >>> with helper, torch.no_grad():
    ...     helper.reset_states()          # a bare U-Net: start each generation explicitly
    ...     for t in (999, 666, 333, 0):
    ...         x = unet(x, t, encoder_hidden_states=text).sample
    >>> helper.last_steps                  # True = full step, False = retrieval step
    (True, False, False, True)
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Iterator, Sequence

from torch import nn

from . import _patch
from .layout import UNetLayout, retrieval_plan
from .schedule import CacheParams

__all__ = ["DeepCacheSDHelper"]

# pipeline object -> the helper enabled on it (a pipeline takes one helper at a time)
_PIPE_HELPERS: "weakref.WeakKeyDictionary[Any, DeepCacheSDHelper]" = weakref.WeakKeyDictionary()
# original pipeline class -> its per-instance subclass whose __call__ opens a generation
_CALL_SUBCLASSES: dict[type, type] = {}


def _generation_subclass(cls: type) -> type:
    """A subclass of ``cls`` (same name) whose ``__call__`` runs inside the helper's generation."""
    sub = _CALL_SUBCLASSES.get(cls)
    if sub is not None:
        return sub

    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        helper = _PIPE_HELPERS.get(self)
        if helper is None or not helper.enabled:
            return super(sub, self).__call__(*args, **kwargs)
        with helper._generation():
            return super(sub, self).__call__(*args, **kwargs)

    __call__.__doc__ = getattr(cls.__call__, "__doc__", None)
    sub = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__, "__doc__": cls.__doc__})
    sub.__qualname__ = cls.__qualname__
    sub._deepcache_original_class = cls  # type: ignore[attr-defined]
    _CALL_SUBCLASSES[cls] = sub
    return sub


def _resolve(target: Any) -> tuple[Any | None, nn.Module]:
    """Split what the user passed into (pipeline or None, U-Net). Raises a clear error otherwise."""
    if target is None:
        raise ValueError("no pipeline given: use DeepCacheSDHelper(pipe=pipe), or enable(pipe=pipe).")
    if isinstance(target, nn.Module):
        unet = _patch.unwrap_unet(target)
        _patch.check_supported_unet(unet)
        return None, unet
    unet = getattr(target, "unet", None)
    if unet is None:
        has = [name for name in ("transformer", "prior", "decoder") if getattr(target, name, None) is not None]
        detail = f" (it has a `{has[0]}` instead)" if has else ""
        raise TypeError(
            f"{type(target).__name__} has no `unet`{detail}: DeepCache caches U-Net features and needs a diffusers "
            f"pipeline with a U-Net, or the U-Net itself; supported U-Nets: {', '.join(_patch.SUPPORTED_UNETS)}."
        )
    unet = _patch.unwrap_unet(unet)
    _patch.check_supported_unet(unet)
    if not callable(target):
        raise TypeError(f"{type(target).__name__} is not callable; pass a diffusers pipeline or a U-Net.")
    return target, unet


class DeepCacheSDHelper:
    """Cache a diffusers U-Net's deep features between denoising steps.

    Works on a diffusers pipeline whose ``unet`` is supported (``UNet2DConditionModel``: SD 1.x/2.x, SDXL
    and their variants; ``UNet2DModel``: DDPM/DDIM/LDM; ``UNetSpatioTemporalConditionModel``: SVD;
    ``UNetMotionModel``: AnimateDiff; ``UNet3DConditionModel``: text-to-video) or on a bare U-Net. Every ``pipe(...)`` call is one generation: the step counter and the cache start fresh
    and the cache is released when the call returns (or raises). For a bare U-Net driven by your own
    loop, call :meth:`reset_states` before each generation.

    Important args (:meth:`set_params`):
        cache_interval: evaluations between full steps (1 = no caching; 3 is ~2.3x faster on SD).
        cache_branch_id: skip connection whose deeper layers are cached (0 = shallowest, fastest;
            the paper's Stable Diffusion results use 1).

    Example::

        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=3, cache_branch_id=0)
        helper.enable()
        image = pipe("a photo of an astronaut on a moon").images[0]
        helper.disable()

    ``torch.compile`` works as is, before or after :meth:`enable`: ``pipe.unet = torch.compile(pipe.unet,
    mode="reduce-overhead", fullgraph=True)`` gives two graphs per shape and branch (full step, retrieval
    step) and no recompilation across steps, calls, or disable/enable (see ``docs/compile.md``).
    """

    def __init__(self, pipe: Any = None) -> None:
        self.pipe = pipe
        self._params = CacheParams()
        self._enabled = False
        self._pipeline: Any | None = None  # the pipeline we patched (None for a bare U-Net)
        self._unet: nn.Module | None = None  # the U-Net we patched
        self._controlnets: list[nn.Module] = []  # ControlNets that run shallow on retrieval steps
        self._bare: _patch.Generation | None = None  # the running generation of a bare U-Net
        self._bare_num_steps: int | None = None
        self._last_steps: tuple[bool, ...] = ()
        self._enabled_by_context: list[bool] = []
        if pipe is not None:
            _resolve(pipe)  # fail early with a clear message

    # -- parameters ------------------------------------------------------------------------
    def set_params(
        self,
        cache_interval: int = 1,
        cache_branch_id: int = 0,
        skip_mode: str = "uniform",
        *,
        center: int = 15,
        pow: float = 1.4,
        full_steps: Sequence[int] | None = None,
        start_step: int = 0,
        end_step: int | None = None,
    ) -> None:
        """Set the caching parameters; while enabled they take effect on the next generation.

        Args:
            cache_interval: U-Net evaluations between cache refreshes (>= 1).
            cache_branch_id: skip branch whose deeper layers are reused (0..num_branches-1).
            skip_mode: ``"uniform"``, ``"non-uniform"`` (paper's Eq. 7, uses ``center``/``pow``) or
                ``"custom"`` (``full_steps``).
            center, pow: the non-uniform schedule's densest step and exponent (> 1).
            full_steps: with ``skip_mode="custom"``, the evaluations that are full steps.
            start_step, end_step: caching only in ``[start_step, end_step)``; other steps are full.

        Raises:
            ValueError: a parameter is invalid (the message says the valid range), including a branch id
                out of range for the helper's U-Net.
        """
        params = CacheParams(
            cache_interval=cache_interval,
            cache_branch_id=cache_branch_id,
            skip_mode=skip_mode,
            center=center,
            pow=pow,
            full_steps=tuple(full_steps) if full_steps is not None else None,
            start_step=start_step,
            end_step=end_step,
        )
        target = self._unet if self._unet is not None else (self.pipe if self.pipe is not None else None)
        if target is not None:
            _, unet = _resolve(target) if self._unet is None else (None, self._unet)
            retrieval_plan(_patch.unet_layout(unet), params.cache_branch_id)
        self._params = params
        if self._enabled and self._bare is not None:  # a bare U-Net: the next evaluation starts afresh
            self.reset_states(self._bare_num_steps)

    @property
    def params(self) -> CacheParams:
        """The current parameters (a frozen dataclass)."""
        return self._params

    def num_branches(self) -> int:
        """How many ``cache_branch_id`` values the helper's U-Net accepts."""
        return self.layout().num_branches

    def layout(self) -> UNetLayout:
        """The skip-connection layout of the helper's U-Net."""
        _, unet = _resolve(self._unet if self._unet is not None else self.pipe)
        return _patch.unet_layout(unet)

    # -- enable / disable ------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self._enabled

    def enable(self, pipe: Any = None) -> None:
        """Start caching. Calling it again while enabled does nothing (or switches to a new ``pipe``)."""
        if pipe is not None and pipe is not self.pipe:
            if self._enabled:
                self.disable()
            self.pipe = pipe
        if self._enabled:
            return
        pipeline, unet = _resolve(self.pipe)
        retrieval_plan(_patch.unet_layout(unet), self._params.cache_branch_id)
        if pipeline is not None:
            other = _PIPE_HELPERS.get(pipeline)
            if other is not None and other is not self and other.enabled:
                raise RuntimeError(
                    "this pipeline already has an enabled DeepCacheSDHelper; call disable() on it first "
                    "(or use set_params on that helper)."
                )
        patch = _patch.acquire(unet, self)
        self._unet = unet
        self._pipeline = pipeline
        if pipeline is not None:
            self._controlnets = [cn for cn in _patch.controlnets_of(pipeline) if _patch.acquire_controlnet(cn, patch)]
            _PIPE_HELPERS[pipeline] = self
            if not hasattr(type(pipeline), "_deepcache_original_class"):
                pipeline.__class__ = _generation_subclass(type(pipeline))
        else:
            self._bare = self._new_generation(patch, self._bare_num_steps)
            patch.stack.insert(0, self._bare)
        self._enabled = True

    def disable(self) -> None:
        """Stop caching and restore the pipeline and U-Net exactly. Does nothing if not enabled."""
        if not self._enabled:
            return
        pipeline, unet = self._pipeline, self._unet
        if self._bare is not None:
            patch = _patch.patch_of(unet)
            if patch is not None and self._bare in patch.stack:
                patch.stack.remove(self._bare)
            self._last_steps = tuple(self._bare.steps)
            self._bare.release()
            self._bare = None
            self._last_steps = tuple(self._last_steps)
        for controlnet in self._controlnets:
            _patch.release_controlnet(controlnet)
        self._controlnets = []
        if pipeline is not None:
            if _PIPE_HELPERS.get(pipeline) is self:
                del _PIPE_HELPERS[pipeline]
            original = getattr(type(pipeline), "_deepcache_original_class", None)
            if original is not None and type(pipeline) is _CALL_SUBCLASSES.get(original):
                pipeline.__class__ = original
        _patch.release(unet, self)
        self._pipeline = None
        self._unet = None
        self._enabled = False

    def __enter__(self) -> "DeepCacheSDHelper":
        self._enabled_by_context.append(not self._enabled)
        self.enable()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._enabled_by_context.pop():
            self.disable()

    # -- generations -------------------------------------------------------------------------
    def reset_states(self, num_inference_steps: int | None = None) -> None:
        """Start a new generation: the next U-Net evaluation is step 0 (a full step), the cache is dropped.

        Pipelines do this automatically at every call. For a bare U-Net in your own loop, call it before
        each generation; ``num_inference_steps`` (U-Net evaluations per generation) is needed only by
        ``skip_mode="non-uniform"``.
        """
        self._bare_num_steps = num_inference_steps
        if not self._enabled or self._bare is None:
            return
        patch = _patch.patch_of(self._unet)
        old = self._bare
        self._last_steps = tuple(old.steps)
        old.release()
        self._bare = self._new_generation(patch, num_inference_steps)
        patch.stack[patch.stack.index(old)] = self._bare

    @property
    def last_steps(self) -> tuple[bool, ...]:
        """Full (True) / retrieval (False) for each U-Net evaluation of the latest generation."""
        if self._bare is not None and self._bare.steps:
            return tuple(self._bare.steps)
        return self._last_steps

    def cache_bytes(self) -> int:
        """Bytes held by the cache right now (0 between pipeline calls: the cache is freed after each)."""
        return self._bare.cache_bytes() if self._bare is not None else 0

    def _new_generation(self, patch: _patch.UNetPatch, num_steps: int | None = None) -> _patch.Generation:
        pipeline = self._pipeline

        def total() -> int | None:
            if num_steps is not None:
                return num_steps
            if pipeline is None:
                return None
            value = getattr(pipeline, "_num_timesteps", None)
            if isinstance(value, int) and value > 0:
                return value
            timesteps = getattr(getattr(pipeline, "scheduler", None), "timesteps", None)
            return len(timesteps) if timesteps is not None else None

        branch = self._params.cache_branch_id
        return _patch.Generation(
            params=self._params,
            actions=patch.actions_for(branch),
            num_steps=total,
            clone_handout=patch.consumer_modifies_in_place(branch),
        )

    @contextlib.contextmanager
    def _generation(self) -> Iterator[_patch.Generation]:
        """One pipeline call: a fresh generation on top of the U-Net's stack, released afterwards."""
        pipeline = self._pipeline
        current = _patch.unwrap_unet(getattr(pipeline, "unet", None))
        if current is not self._unet:  # the user swapped pipe.unet while enabled: follow it
            _patch.check_supported_unet(current)
            retrieval_plan(_patch.unet_layout(current), self._params.cache_branch_id)
            _patch.release(self._unet, self)
            self._unet = current
            _patch.acquire(current, self)
        patch = _patch.patch_of(self._unet)
        gen = self._new_generation(patch)
        patch.stack.append(gen)
        try:
            yield gen
        finally:
            if gen in patch.stack:
                patch.stack.remove(gen)
            self._last_steps = tuple(gen.steps)
            gen.release()
