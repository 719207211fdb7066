"""The drop-in helper: ``DeepCacheSDHelper(pipe=pipe)``, ``set_params(...)``, ``enable()``, ``disable()``
(linking it to a pipeline: :mod:`DeepCache.attach`; its ``calibrate()``: :mod:`DeepCache.helper_calibrate`).

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
import threading
from typing import Any, Iterator, Sequence

from torch import nn

from . import attach, engine
from .helper_calibrate import CalibrateMixin
from .engine.transformer.layout import DiTLayout
from .engine.unet.layout import UNetLayout
from .schedules.params import CacheParams

__all__ = ["DeepCacheSDHelper"]


class DeepCacheSDHelper(CalibrateMixin):
    """Cache a diffusers U-Net's deep features between denoising steps.

    Works on a diffusers pipeline whose ``unet`` is supported (``UNet2DConditionModel``: SD 1.x/2.x, SDXL
    and their variants; ``UNet2DModel``: DDPM/DDIM/LDM; ``UNetSpatioTemporalConditionModel``: SVD;
    ``UNetMotionModel``: AnimateDiff; ``UNet3DConditionModel``: text-to-video) or on a bare U-Net. Every
    ``pipe(...)`` call is one generation: the step counter and the cache start fresh, belong to that call
    (concurrent calls from other threads have their own), and are released when the call returns (or
    raises). For a bare U-Net driven by your own loop, call :meth:`reset_states` before each generation.

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

    Serving: any number of requests may run at once on pipelines that share one U-Net (``copy.copy(pipe)``
    views cache with the helper of ``pipe``; ``XPipeline.from_pipe(pipe)`` views need their own helper).
    ``torch.compile`` works as is, before or after :meth:`enable`: ``pipe.unet = torch.compile(pipe.unet,
    mode="reduce-overhead", fullgraph=True)`` gives two graphs per shape and branch (full step, retrieval
    step) and no recompilation across steps, calls, or disable/enable (see ``docs/compile.md``).
    """

    def __init__(self, pipe: Any = None) -> None:
        self.pipe = pipe
        self._params = CacheParams()
        self._lock = threading.RLock()
        self._lease: engine.Lease | None = None  # held while enabled
        self._pipeline: Any | None = None  # the pipeline we patched (None for a bare U-Net)
        self._unet: nn.Module | None = None  # the U-Net we patched
        self._restore: attach.Restore | None = None  # the pipeline's link and class before enable()
        self._bare_num_steps: int | None = None
        self._last_steps: tuple[bool, ...] = ()
        self._enabled_by_context: list[bool] = []
        if pipe is not None:
            attach.resolve(pipe)  # fail early with a clear message

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
        threshold: float | None = None,
        forecast: str | None = None,
        forecast_weight: float = 1.0,
        forecast_weights: Sequence[float] | None = None,
        front_blocks: int | None = None,
        back_blocks: int | None = None,
    ) -> None:
        """Set the caching parameters; while enabled they take effect on the next generation.

        Args:
            cache_interval: U-Net evaluations between cache refreshes (>= 1).
            cache_branch_id: skip branch whose deeper layers are reused (0..num_branches-1).
            skip_mode: ``"uniform"``, ``"non-uniform"`` (paper's Eq. 7, uses ``center``/``pow``),
                ``"custom"`` (``full_steps``, e.g. from :meth:`calibrate`) or ``"adaptive"`` (``threshold``;
                ``cache_interval`` is then the cap: at most ``cache_interval - 1`` retrieval steps in a row).
            center, pow: the non-uniform schedule's densest step and exponent (> 1).
            full_steps: with ``skip_mode="custom"``, the evaluations that are full steps.
            start_step, end_step: caching only in ``[start_step, end_step)``; other steps are full.
            threshold: with ``skip_mode="adaptive"``, the relative L1 change of the branch's skip feature
                since the last full step at which a step becomes full (0 = all full). The decision is made
                once per U-Net evaluation for the whole batch (the mean over all prompts of the batch).
            forecast: ``None`` (retrieval steps reuse the cached feature) or ``"linear"``: step ``k`` after full
                steps ``a' < a`` hands out ``F_a + w*(k-a)*(F_a - F_a')/(a - a')`` (reuse until the generation
                has two full steps); one more feature map per generation. See :mod:`DeepCache.schedules.forecast`.
            forecast_weight: the weight ``w`` of ``"linear"`` (>= 0; 0 = reuse, 1 = the straight line).
            forecast_weights: ``w`` per U-Net evaluation (e.g. from ``calibrate(K, forecast=True)``); evaluations
                past its end use ``forecast_weight``.
            front_blocks, back_blocks: transformers only (keyword, both or neither): a retrieval step runs the first
                ``front_blocks`` and the last ``back_blocks`` blocks (``cache_branch_id=b`` is ``b`` and ``b``).

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
            threshold=threshold,
            forecast=forecast,
            forecast_weight=forecast_weight,
            forecast_weights=forecast_weights,  # type: ignore[arg-type] # CacheParams makes it a tuple
            front_blocks=front_blocks,
            back_blocks=back_blocks,
        )
        self._apply(params)

    def _apply(self, params: CacheParams) -> None:
        with self._lock:
            target = self._unet if self._unet is not None else self.pipe
            if target is not None:
                engine.check_params(attach.resolve(target)[1], params)
            self._params = params
            lease = self._lease
            if lease is not None and lease.bare is not None:  # a bare U-Net: the next evaluation starts afresh
                self.reset_states(self._bare_num_steps)

    @property
    def params(self) -> CacheParams:
        """The current parameters (a frozen dataclass); assign a :class:`CacheParams` to set them all."""
        return self._params

    @params.setter
    def params(self, params: CacheParams) -> None:
        if not isinstance(params, CacheParams):
            raise TypeError(f"params must be a CacheParams (e.g. CacheParams.from_json(text)), got {type(params).__name__}.")
        self._apply(params)

    def num_branches(self) -> int:
        """How many ``cache_branch_id`` values the helper's U-Net accepts."""
        return self.layout().num_branches

    def layout(self) -> UNetLayout | DiTLayout:
        """The skip-connection layout of the helper's U-Net, or the block stack of its transformer."""
        _, model = attach.resolve(self._unet if self._unet is not None else self.pipe)
        return engine.layout_of(model)

    # -- enable / disable ------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self._lease is not None

    def enable(self, pipe: Any = None) -> None:
        """Start caching. Calling it again while enabled does nothing (or switches to a new ``pipe``)."""
        with self._lock:
            if pipe is not None and pipe is not self.pipe:
                self.disable()
                self.pipe = pipe
            if self._lease is not None:
                return
            pipeline, unet = attach.resolve(self.pipe)
            engine.check_params(unet, self._params)
            if pipeline is not None:
                other = attach.linked_helper(pipeline)
                # a copy.copy view carries the helper of the pipeline it copies: its own helper may take over
                if other is not None and other is not self and other.enabled and other._pipeline is pipeline:
                    raise RuntimeError(
                        "this pipeline already has an enabled DeepCacheSDHelper; call disable() on it first "
                        "(or use set_params on that helper)."
                    )
            lease = engine.acquire_all(unet, engine.extra_denoisers(pipeline) if pipeline is not None else ())
            if pipeline is not None:
                _acquire_controlnets(lease, pipeline)
                self._restore = attach.link(pipeline, self)
            else:
                lease.bare = self._bare_generation(lease.unet_patch)
            self._lease, self._pipeline, self._unet = lease, pipeline, unet

    def disable(self) -> None:
        """Stop caching and restore the pipeline and U-Net exactly. Does nothing if not enabled."""
        with self._lock:
            lease, pipeline = self._lease, self._pipeline
            if lease is None:
                return
            if lease.bare is not None:
                self._last_steps = tuple(lease.bare.steps)
            if pipeline is not None and self._restore is not None:
                attach.unlink(pipeline, self, self._restore)
            lease.release()
            self._lease = self._pipeline = self._unet = self._restore = None

    def __enter__(self) -> "DeepCacheSDHelper":
        with self._lock:
            self._enabled_by_context.append(not self.enabled)
            self.enable()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            if self._enabled_by_context.pop():
                self.disable()

    # -- generations -------------------------------------------------------------------------
    def reset_states(self, num_inference_steps: int | None = None) -> None:
        """Start a new generation: the next U-Net evaluation is step 0 (a full step), the cache is dropped.

        Pipelines do this automatically at every call. For a bare U-Net in your own loop, call it before
        each generation; ``num_inference_steps`` (U-Net evaluations per generation) is needed only by
        ``skip_mode="non-uniform"``. A bare U-Net's generation belongs to the helper, not to a thread:
        drive it from one thread at a time (use pipelines to serve concurrent requests).
        """
        with self._lock:
            self._bare_num_steps = num_inference_steps
            lease = self._lease
            if lease is None or lease.bare is None:
                return
            bare = lease.bare
            self._last_steps = tuple(bare.steps)
            if bare.params is self._params:
                bare.num_steps = lambda: num_inference_steps
                bare.reset()
            else:  # new parameters: a generation built for them
                lease.bare = self._bare_generation(lease.unet_patch)

    @property
    def last_steps(self) -> tuple[bool, ...]:
        """Full (True) / retrieval (False) for each U-Net evaluation of the latest generation.

        With concurrent pipeline calls on one helper, the latest generation is the one that ended last.
        """
        lease = self._lease
        if lease is not None and lease.bare is not None and lease.bare.steps:
            return tuple(lease.bare.steps)
        return self._last_steps

    def cache_bytes(self) -> int:
        """Bytes held by a bare U-Net's cache right now (0 between pipeline calls: the cache is freed after each)."""
        lease = self._lease
        return lease.bare.cache_bytes() if lease is not None and lease.bare is not None else 0

    def _bare_generation(self, patch: engine.UNetPatch) -> engine.Generation:
        num_steps = self._bare_num_steps
        return patch.new_generation(self._params, lambda: num_steps)

    def _follow_swapped_unet(self, unet: nn.Module) -> engine.Lease:
        """The user set ``pipe.unet`` to another U-Net while enabled: move the patch to it."""
        with self._lock:
            lease = self._lease
            if lease is None or self._unet is unet:
                return lease
            engine.check_supported(unet)
            engine.check_params(unet, self._params)
            new = engine.acquire(unet)
            _acquire_controlnets(new, self._pipeline)
            new.extras, lease.extras = lease.extras, []  # the pipeline's other transformers stay cached
            lease.release()
            self._lease, self._unet = new, unet
            return new

    @contextlib.contextmanager
    def _generation(self, pipeline: Any) -> Iterator[engine.Generation | None]:
        """One call of ``pipeline`` (ours, or a copy.copy view of it): a fresh generation, freed afterwards."""
        unet = engine.denoiser_of(pipeline)
        with self._lock:  # one consistent snapshot: disable() in another thread changes these together
            lease, ours, own_pipeline, params = self._lease, self._unet, self._pipeline, self._params
        if lease is not None and unet is not ours:
            if pipeline is own_pipeline:
                lease = self._follow_swapped_unet(unet)
            else:  # a view whose U-Net is not ours: the patch cannot see its calls
                engine.warn_view_with_other_unet(pipeline)
                lease = None
        if lease is None:
            yield None
            return
        steps = lambda: attach.pipeline_steps(pipeline)  # noqa: E731
        gens: list = []
        try:
            with engine.running_call(lease, params, steps) as gens:  # Wan 2.2: one per transformer, one step count
                yield gens[0]
        finally:
            self._last_steps = tuple(step for g in gens for step in g.steps)


def _acquire_controlnets(lease: engine.Lease, pipeline: Any) -> None:
    """A U-Net's ControlNets follow its steps; a transformer's ControlNet runs in full (its residuals for the middle
    blocks are replaced by the cached middle residual, which holds them from the last full step)."""
    if isinstance(lease.unet_patch, engine.UNetPatch):
        for controlnet in engine.controlnets_of(pipeline):
            engine.acquire_controlnet(lease, controlnet)
