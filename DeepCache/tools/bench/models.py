"""Build full-size (or tiny) Stable Diffusion pipelines with random weights for benchmarking.

The component configs of SD 1.5, SD 2.1 (768-v) and SDXL base 1.0 ship in ``DeepCache/configs``.
Random weights time exactly like trained ones (the same kernels run on the same shapes), so no
download is needed. No tokenizer or text encoder is built: the benchmark feeds random prompt
embeddings of the right shape, so text encoding is excluded from what is timed.

Example::

    >>> import torch
    >>> from DeepCache.tools.bench.models import build_pipeline, make_inputs
    >>> built = build_pipeline("sd15", device="cpu", dtype=torch.float32, tiny=True)
    >>> inputs = make_inputs(built, batch_size=1, device="cpu", dtype=torch.float32)
    >>> sorted(inputs)
    ['negative_prompt_embeds', 'prompt_embeds']
"""

from __future__ import annotations

import contextlib
import copy
import json
from dataclasses import dataclass
from importlib import resources
from typing import Any, Iterator

import torch

from ..flops import pooled_text_dim, unet_batch, vae_scale_factor  # noqa: F401  (the shape rules, shared)
from ..kinds import PipelineKind, kind_of
from ..kinds.unet import PROMPT_TOKENS  # noqa: F401  (where it lives now)

BUILTIN_MODELS: tuple[str, ...] = ("sd15", "sd21", "sdxl")

#: ``--scheduler`` names and the diffusers scheduler class each one selects.
SCHEDULERS: dict[str, str] = {
    "default": "",  # the scheduler named in the model's own config
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
}


def load_config(name: str) -> dict[str, Any]:
    """The component configs (``unet``, ``vae``, ...) of a built-in model, as a fresh dict.

    >>> load_config("sd21")["unet"]["cross_attention_dim"]
    1024
    """
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {name!r}; choose one of {', '.join(BUILTIN_MODELS)} or pass a local path.")
    text = resources.files(__package__).joinpath("configs", f"{name}.json").read_text(encoding="utf-8")
    return json.loads(text)


def tiny_config(config: dict[str, Any]) -> dict[str, Any]:
    """A tiny config of the same structure: same block types, 2 layers per block, tiny channels.

    The U-Net keeps its down/up block types (so the same skip connections and cache branches
    exist), 2 layers per block, and SDXL's deeper transformer stacks are capped at 2 layers.
    The VAE keeps 4 blocks (latents are 8x smaller than images) with 1 layer each. The input
    dict is not modified.

    >>> tiny = tiny_config(load_config("sdxl"))
    >>> tiny["unet"]["block_out_channels"], tiny["unet"]["transformer_layers_per_block"]
    ([32, 64, 64], [1, 2, 2])
    """
    cfg = copy.deepcopy(config)
    unet = cfg["unet"]
    n = len(unet["down_block_types"])
    unet["block_out_channels"] = [32, 64, 64, 64][:n]
    unet["layers_per_block"] = 2
    unet["norm_num_groups"] = 8
    unet["attention_head_dim"] = [2] * n if isinstance(unet.get("attention_head_dim"), list) else 2
    unet["cross_attention_dim"] = 32
    unet["sample_size"] = 8
    if isinstance(unet.get("transformer_layers_per_block"), list):
        unet["transformer_layers_per_block"] = [min(int(x), 2) for x in unet["transformer_layers_per_block"]]
    if unet.get("addition_embed_type") == "text_time":
        unet["addition_time_embed_dim"] = 8
        unet["projection_class_embeddings_input_dim"] = 6 * 8 + 32  # 6 time ids + pooled text embedding
    vae = cfg["vae"]
    vae["block_out_channels"] = [8, 8, 16, 16][: len(vae["block_out_channels"])]
    vae["layers_per_block"] = 1
    vae["norm_num_groups"] = 4
    vae["sample_size"] = 64
    for key in ("text_encoder", "text_encoder_2"):
        cfg.pop(key, None)
    return cfg


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@dataclass
class BuiltPipeline:
    """A pipeline ready to benchmark, with what the benchmark needs to know about it."""

    pipe: Any
    name: str
    source: str  # "builtin config" or the path / hub id it was loaded from
    weights: str  # "random" or "pretrained"
    is_sdxl: bool
    cross_attention_dim: int | None  # U-Nets only
    pooled_dim: int | None  # SDXL: width of the pooled text embedding
    #: The pipeline's kind (:mod:`DeepCache.tools.kinds`), decided once when it is built: its inputs, call keywords,
    #: denoiser and FLOP counter.
    kind: PipelineKind


def _scheduler(name: str, scheduler_config: dict[str, Any] | Any) -> Any:
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}.")
    cfg = dict(scheduler_config)
    cls_name = SCHEDULERS[name] or cfg.get("_class_name")
    if not cls_name:
        raise ValueError("the model config names no scheduler; pass --scheduler ddim (or another one).")
    if cls_name == "DDIMScheduler":
        cfg.setdefault("clip_sample", False)  # what the SD checkpoints use (DDIM's own default is True)
    return getattr(diffusers, cls_name).from_config(cfg)


def _describe(kind: PipelineKind, name: str, source: str, weights: str) -> BuiltPipeline:
    pipe = kind.pipe
    if kind.family != "unet":
        return BuiltPipeline(pipe, name, source, weights, False, None, None, kind)
    pooled = pooled_text_dim(pipe.unet.config)
    return BuiltPipeline(pipe, name, source, weights, pooled is not None, int(pipe.unet.config.cross_attention_dim),
                         pooled, kind)


def build_pipeline(
    model: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    scheduler: str = "default",
    tiny: bool = False,
) -> BuiltPipeline:
    """Build a built-in model (``sd15``, ``sd21``, ``sdxl``) with random weights, or load ``model``.

    Built-in models are constructed directly on ``device`` (fast on a GPU) from the shipped
    configs, without text encoders or tokenizers. Any other ``model`` is passed to
    ``DiffusionPipeline.from_pretrained`` (a local folder, or a hub id already in your cache);
    ``tiny`` applies only to built-in models.
    """
    import diffusers

    if model in BUILTIN_MODELS:
        cfg = load_config(model)
        if tiny:
            cfg = tiny_config(cfg)
        with torch.device(device), _default_dtype(dtype):  # built in place: no fp32 copy, no cast
            unet = diffusers.UNet2DConditionModel.from_config(cfg["unet"]).eval()
            vae = diffusers.AutoencoderKL.from_config(cfg["vae"]).eval()
        sched = _scheduler(scheduler, cfg["scheduler"])
        pipe: Any
        if unet.config.addition_embed_type == "text_time":
            pipe = diffusers.StableDiffusionXLPipeline(
                vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
                unet=unet, scheduler=sched,
            )
        else:
            pipe = diffusers.StableDiffusionPipeline(
                vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=sched,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            )
        name = f"{model}-tiny" if tiny else model
        built = _describe(kind_of(pipe), name, "builtin config", "random")
    else:
        if tiny:
            raise ValueError("--tiny applies only to the built-in models " + ", ".join(BUILTIN_MODELS) + ".")
        try:
            pipe = diffusers.DiffusionPipeline.from_pretrained(model, torch_dtype=dtype)
        except Exception as exc:  # noqa: BLE001 - re-raised with a clearer message
            raise ValueError(
                f"could not load model {model!r}: {exc}. Use one of {', '.join(BUILTIN_MODELS)} "
                "or a local diffusers pipeline folder."
            ) from exc
        if getattr(pipe, "vae", None) is None or not any(getattr(pipe, a, None) is not None
                                                         for a in ("unet", "transformer")):
            raise ValueError(f"{model!r} is not a U-Net or transformer pipeline with a VAE ({type(pipe).__name__}).")
        kind = kind_of(pipe)  # decided once, here
        if kind.family == "transformer":
            kind.check()
        if scheduler != "default":
            pipe.scheduler = _scheduler(scheduler, pipe.scheduler.config)
        if getattr(pipe, "safety_checker", None) is not None:
            pipe.safety_checker = None
        pipe.to(device)
        built = _describe(kind, model, model, "pretrained")
    pipe.set_progress_bar_config(disable=True)
    return built


def make_inputs(
    built: BuiltPipeline, *, batch_size: int, device: str | torch.device, dtype: torch.dtype, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random prompt embeddings (and pooled ones for SDXL, SD3, Flux; masks for PixArt, Sana) of the shape the text
    encoders produce: :meth:`DeepCache.tools.kinds.PipelineKind.bench_inputs`."""
    return built.kind.bench_inputs(batch_size, device, dtype, seed)
