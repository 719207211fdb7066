"""Count U-Net and VAE FLOPs, and the ideal DeepCache speedup they imply (for ``deepcache bench`` and ``tune``;
transformers: :mod:`DeepCache.tools.kinds.dit_flops`, with :func:`count_flops_by_module` from here).

FLOPs are counted with :class:`torch.utils.flop_counter.FlopCounterMode` (matrix multiplies,
convolutions and attention; elementwise ops, norms and softmax are not counted). On CUDA, the
flash / memory-efficient SDPA kernels are counted by torch itself; on the CPU, torch dispatches
``aten._scaled_dot_product_flash_attention_for_cpu``, which torch does not count, so this module
adds the same formula for it (``2·B·H·Lq·Lk·(E + Ev)``). On the ``meta`` device SDPA decomposes into
two counted ``bmm`` calls with the same total. Full-size models are counted on the ``meta`` device:
the count needs only shapes, so it takes well under a second and no memory.

The ideal speedup of a schedule with ``n_full`` full and ``n_retr`` retrieval steps, whose steps
cost ``F`` and ``R`` FLOPs, is ``(n·F + V) / (n_full·F + n_retr·R + V)`` with ``V`` the VAE
decode (``V = 0`` for the U-Net loop alone); for a uniform interval ``N`` and many steps this tends
to ``N / (1 + (N−1)·f)`` with ``f = R / F``.

Example::

    >>> ideal_speedup_uniform(3, 0.0), round(ideal_speedup_uniform(5, 0.25), 3)
    (3.0, 2.5)
    >>> ideal_speedup_pattern((True, False, False), full_flops=100, retrieval_flops=10)
    2.5
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

_aten = torch.ops.aten


def _sdpa_flops(query_shape: Sequence[int], key_shape: Sequence[int], value_shape: Sequence[int],
                *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """FLOPs of ``softmax(Q·Kᵀ)·V``: two batched matmuls (query heads may be a multiple of KV heads)."""
    b, h, lq, e = (int(x) for x in query_shape)
    lk = int(key_shape[-2])
    ev = int(value_shape[-1])
    return 2 * b * h * lq * lk * e + 2 * b * h * lq * lk * ev


def _custom_mapping() -> dict[Any, Callable[..., int]]:
    mapping: dict[Any, Callable[..., int]] = {}
    for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_fused_attention_overrideable"):
        try:
            op = getattr(_aten, name)
        except (AttributeError, RuntimeError):  # not in this torch build
            continue
        mapping[op] = _sdpa_flops
    return mapping


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs (multiply and add counted separately) of running ``fn()`` under ``torch.no_grad()``.

    >>> lin = torch.nn.Linear(8, 16, bias=False)
    >>> count_flops(lambda: lin(torch.zeros(4, 8)))  # 2 * 4 * 8 * 16
    1024
    """
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_custom_mapping()) as counter:
        fn()
    return int(counter.get_total_flops())


def count_flops_by_module(fn: Callable[[], Any]) -> dict[str, int]:
    """FLOPs of running ``fn()`` per module, keyed ``Class.child.grandchild`` (a top module by its class name; each
    count includes its children's; ``Global`` is the total), as :class:`FlopCounterMode` tracks them.

    >>> seq = torch.nn.Sequential(torch.nn.Linear(8, 16, bias=False), torch.nn.Linear(16, 2, bias=False))
    >>> counts = count_flops_by_module(lambda: seq(torch.zeros(1, 8)))
    >>> counts["Sequential.0"], counts["Sequential.1"], counts["Sequential"]
    (256, 64, 320)
    """
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_custom_mapping()) as counter:
        fn()
    return {name: int(sum(ops.values())) for name, ops in counter.get_flop_counts().items()}


def ideal_speedup_uniform(interval: int, flop_ratio: float) -> float:
    """``N / (1 + (N−1)·f)``: the FLOP-ideal speedup of interval ``N`` over many steps.

    >>> ideal_speedup_uniform(1, 0.3)
    1.0
    """
    if interval < 1:
        raise ValueError(f"interval must be >= 1, got {interval}.")
    if not 0.0 <= flop_ratio <= 1.0 or math.isnan(flop_ratio):
        raise ValueError(f"flop_ratio must be in [0, 1], got {flop_ratio}.")
    return interval / (1.0 + (interval - 1) * flop_ratio)


def ideal_speedup_pattern(pattern: Sequence[bool], full_flops: float, retrieval_flops: float,
                          fixed_flops: float = 0.0) -> float:
    """The FLOP-ideal speedup of a full (True) / retrieval (False) step pattern over all-full steps.

    ``fixed_flops`` is work done once per generation by both (the VAE decode).

    >>> ideal_speedup_pattern((True,) * 4, 100, 7)
    1.0
    """
    if not pattern:
        raise ValueError("pattern is empty.")
    if full_flops <= 0 or retrieval_flops < 0 or fixed_flops < 0:
        raise ValueError("FLOP counts must be non-negative and full_flops positive.")
    n_full = sum(1 for p in pattern if p)
    n_retr = len(pattern) - n_full
    return (len(pattern) * full_flops + fixed_flops) / (n_full * full_flops + n_retr * retrieval_flops + fixed_flops)


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one full and one retrieval U-Net evaluation at one input shape."""

    full: int
    retrieval: int

    @property
    def ratio(self) -> float:
        """``f = retrieval / full``."""
        return self.retrieval / self.full


def unet_inputs(unet_config: Any, *, batch: int, latent_height: int, latent_width: int,
                device: str | torch.device, dtype: torch.dtype = torch.float32,
                tokens: int = 77) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Positional and keyword arguments for one U-Net evaluation (``batch`` = U-Net batch, 2× with CFG)."""
    cfg = dict(unet_config)
    kw: dict[str, Any] = {"device": device, "dtype": dtype}
    sample = torch.zeros(batch, int(cfg["in_channels"]), latent_height, latent_width, **kw)
    text = torch.zeros(batch, tokens, int(cfg["cross_attention_dim"]), **kw)
    kwargs: dict[str, Any] = {"encoder_hidden_states": text, "return_dict": False}
    pooled = pooled_text_dim(cfg)
    if pooled is not None:
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.zeros(batch, pooled, **kw),
            "time_ids": torch.zeros(batch, 6, **kw),
        }
    return (sample, 500), kwargs


def count_unet_step_flops(unet: torch.nn.Module, *, batch: int, latent_height: int, latent_width: int,
                          cache_branch_id: int) -> StepFlops:
    """Count one full and one retrieval step of ``unet`` under DeepCache at ``cache_branch_id``.

    Pass a U-Net built on the ``meta`` device (:func:`build_meta_unet`)
    to count full-size models instantly. The helper is enabled on the bare U-Net with an interval
    larger than two steps, so the first evaluation is full and the second a retrieval.
    """
    from DeepCache import DeepCacheSDHelper

    param = next(unet.parameters())
    args, kwargs = unet_inputs(unet.config, batch=batch, latent_height=latent_height, latent_width=latent_width,
                               device=param.device, dtype=param.dtype)
    helper = DeepCacheSDHelper(pipe=unet)
    helper.set_params(cache_interval=1000, cache_branch_id=cache_branch_id)
    helper.enable()
    try:
        helper.reset_states()
        full = count_flops(lambda: unet(*args, **kwargs))
        retrieval = count_flops(lambda: unet(*args, **kwargs))
        steps = tuple(helper.last_steps)
    finally:
        helper.disable()
    if steps[:2] != (True, False):
        raise RuntimeError(f"expected a full then a retrieval step from the helper, got last_steps={steps!r}.")
    return StepFlops(full=full, retrieval=retrieval)


def count_vae_decode_flops(vae: Any, *, batch: int, latent_height: int, latent_width: int) -> int:
    """FLOPs of ``vae.decode`` on ``batch`` latents (the pipelines decode the whole batch at once)."""
    param = next(vae.parameters())
    z = torch.zeros(batch, int(vae.config.latent_channels), latent_height, latent_width,
                    device=param.device, dtype=param.dtype)
    return count_flops(lambda: vae.decode(z))


@dataclass(frozen=True)
class PatternFlops:
    """FLOP counts of a generation with one step pattern at one shape, and the ideal speedups they imply."""

    full_step: int
    retrieval_step: int | None  # None for the original pipeline
    ratio: float | None
    vae_decode: int
    ideal: float  # end to end: the pattern's U-Net steps + VAE decode
    ideal_unet: float  # the U-Net loop alone
    ideal_uniform: float | None  # N / (1 + (N-1) f): uniform schedules only


def pattern_flops(pattern: Sequence[bool], step: StepFlops, vae: int,
                  uniform_interval: int | None = None) -> PatternFlops:
    """The counts and FLOP-ideal speedups of a generation with step ``pattern`` (all True: the original), whose steps
    cost ``step`` and whose VAE decode costs ``vae``; ``uniform_interval`` also gives N / (1 + (N-1) f)."""
    if all(pattern):
        return PatternFlops(step.full, None, None, vae, 1.0, 1.0, 1.0)
    uniform = ideal_speedup_uniform(uniform_interval, step.ratio) if uniform_interval is not None else None
    return PatternFlops(step.full, step.retrieval, step.ratio, vae,
                        ideal_speedup_pattern(pattern, step.full, step.retrieval, vae),
                        ideal_speedup_pattern(pattern, step.full, step.retrieval), uniform)


class FlopCache:
    """FLOP counts per shape on meta-device copies of a U-Net and VAE (shapes only, no compute).

    Counts are taken at batch 1 and scaled: every counted op of the U-Net and the VAE decoder is
    per sample, so FLOPs are exactly linear in the batch (``tests/test_bench.py`` checks this).
    """

    def __init__(self, unet_config: Any, vae_config: Any) -> None:
        self.unet_config, self.vae_config = dict(unet_config), dict(vae_config)
        self.unet = build_meta_unet(unet_config)
        self.vae = build_meta_vae(vae_config)
        self._steps: dict[tuple[int, int, int], StepFlops] = {}  # (latent h, latent w, branch) at batch 1
        self._vae: dict[tuple[int, int], int] = {}  # (latent h, latent w) at batch 1

    def step(self, unet_batch: int, lh: int, lw: int, branch: int) -> StepFlops:
        key = (lh, lw, branch)
        if key not in self._steps:
            self._steps[key] = count_unet_step_flops(self.unet, batch=1, latent_height=lh,
                                                     latent_width=lw, cache_branch_id=branch)
        one = self._steps[key]
        return StepFlops(full=one.full * unet_batch, retrieval=one.retrieval * unet_batch)

    def vae_decode(self, batch: int, lh: int, lw: int) -> int:
        key = (lh, lw)
        if key not in self._vae:
            self._vae[key] = count_vae_decode_flops(self.vae, batch=1, latent_height=lh, latent_width=lw)
        return self._vae[key] * batch

    def step_costs(self, *, images: int, latent: tuple[int, int], branch: int, guidance_scale: float,
                   front: int | None = None, back: int | None = None) -> tuple[StepFlops, int]:
        """One step's full and retrieval FLOPs for ``images`` images at latent size ``latent``, caching at ``branch``,
        and their VAE decode's FLOPs. ``front``/``back`` split a transformer's blocks: a U-Net has none (``None``)."""
        if front is not None or back is not None:
            raise ValueError("front_blocks / back_blocks split a transformer's blocks; a U-Net caches at "
                             "cache_branch_id only: leave them unset.")
        step = self.step(unet_batch(self.unet_config, images, guidance_scale), *latent, branch)
        return step, self.vae_decode(images, *latent)

    def for_pattern(self, pattern: Sequence[bool], *, images: int, latent: tuple[int, int], branch: int,
                    guidance_scale: float, uniform_interval: int | None = None, front: int | None = None,
                    back: int | None = None) -> PatternFlops:
        """The counts and FLOP-ideal speedups of ``images`` images generated with step ``pattern`` (all True: the
        original) at latent size ``latent``, caching at ``branch``; ``uniform_interval`` also gives N / (1 + (N-1) f)."""
        step, vae = self.step_costs(images=images, latent=latent, branch=branch, guidance_scale=guidance_scale,
                                    front=front, back=back)
        return pattern_flops(pattern, step, vae, uniform_interval)

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        """The latent (height, width) of an image of this size."""
        scale = vae_scale_factor(self.vae_config)
        return height // scale, width // scale


# -- shape rules ---------------------------------------------------------------------------------------
def pooled_text_dim(unet_config: Any) -> int | None:
    """SDXL: the width of the pooled text embedding the U-Net's added condition takes (None for SD 1.x/2.x).

    The added condition is the pooled embedding and 6 time ids of ``addition_time_embed_dim`` each.

    >>> pooled_text_dim({"addition_embed_type": "text_time", "projection_class_embeddings_input_dim": 2816,
    ...                  "addition_time_embed_dim": 256}), pooled_text_dim({})
    (1280, None)
    """
    cfg = dict(unet_config)
    if cfg.get("addition_embed_type") != "text_time":
        return None
    return int(cfg["projection_class_embeddings_input_dim"]) - 6 * int(cfg["addition_time_embed_dim"])


def unet_batch(unet_config: Any, batch_size: int, guidance_scale: float) -> int:
    """The U-Net's batch for ``batch_size`` images: doubled by classifier-free guidance (``guidance_scale > 1``),
    except for guidance-distilled U-Nets (``time_cond_proj_dim`` set), which take the scale as an input.

    >>> unet_batch({}, 4, 7.5), unet_batch({}, 4, 1.0), unet_batch({"time_cond_proj_dim": 256}, 4, 7.5)
    (8, 4, 4)
    """
    uses_cfg = guidance_scale > 1 and dict(unet_config).get("time_cond_proj_dim") is None
    return 2 * batch_size if uses_cfg else batch_size


def vae_scale_factor(vae_config: Any) -> int:
    """How much smaller than the image the latent is (8 for SD's VAE): 2 ** (levels - 1), as diffusers computes it.

    >>> vae_scale_factor({"block_out_channels": [128, 256, 512, 512]})
    8
    """
    return 2 ** (len(dict(vae_config)["block_out_channels"]) - 1)


def build_meta_unet(unet_config: Any) -> torch.nn.Module:
    """A U-Net with the same config on the ``meta`` device (no memory, no compute): for FLOP counts."""
    import diffusers

    with torch.device("meta"):
        return diffusers.UNet2DConditionModel.from_config(dict(unet_config)).eval()


def build_meta_vae(vae_config: Any) -> torch.nn.Module:
    """An ``AutoencoderKL`` with the same config on the ``meta`` device: for FLOP counts."""
    import diffusers

    with torch.device("meta"):
        return diffusers.AutoencoderKL.from_config(dict(vae_config)).eval()
