"""Train the embedded tiny Flux-architecture DiT (``FluxTransformer2DModel``) on procedural shapes.

The transformer learns rectified flow in the latent space of the shipped demo model's autoencoder,
conditioned by the demo model's CLIP text encoder (both frozen, both reused as they are):

* ``x_t = (1 - t) * x0 + t * noise`` with ``t`` drawn logit-normal, target ``noise - x0``
  (``FlowMatchEulerDiscreteScheduler``'s conventions); the transformer gets ``t`` in [0, 1] exactly as
  ``FluxPipeline`` passes it (``timestep / 1000``), latents packed 2x2 by ``FluxPipeline._pack_latents``;
* text: the CLIP hidden states are ``prompt_embeds``, its pooled output ``pooled_prompt_embeds``;
  10 % of the captions are empty, so true CFG (``true_cfg_scale`` with ``negative_prompt=""``) works;
* the 64 prompts ``deepcache eval`` scores by default are held out of training.

The result is a ``FluxPipeline`` folder (``save_pretrained``) with the same CLIP model and tokenizer
as both text encoders; call it with ``height=32, width=32, max_sequence_length=16`` (:data:`~DeepCache.tools.demo_model.DIT_CALL_KWARGS`).

Example (a smoke run of a few steps, seconds on a CPU)::

    $ deepcache train-demo-dit --out /tmp/dit --smoke
    $ python tools/train_demo_dit.py --out DeepCache/assets  # the shipped weights
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..cli_common import add_out_option, add_threads_option, positive_int, register, standalone
from . import DIT_DIR, EMBEDDED_MODEL
from . import DIT_MARKER as SUMMARY
from .data import all_attributes, caption, images_to_tensor, iter_batches, make_dataset
from .optim import ema_update, lr_factor

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """Sizes and schedule of one run; the defaults produced the shipped weights."""

    seed: int = 0
    threads: int = 1
    batch_size: int = 64
    num_layers: int = 2  # dual-stream (MMDiT) blocks
    num_single_layers: int = 6
    heads: int = 4
    head_dim: int = 24
    axes_dims_rope: tuple[int, int, int] = (8, 8, 8)  # (text/index, row, column); sums to head_dim
    steps: int = 3000
    lr: float = 1e-3
    warmup_steps: int = 200
    cfg_dropout: float = 0.1
    ema_decay: float = 0.999
    held_out: int = 64  # the first N of deepcache eval's embedded prompts are never trained on
    checkpoint_every: int = 500
    log_every: int = 25
    max_minutes: float = math.inf

    def __post_init__(self) -> None:
        if sum(self.axes_dims_rope) != self.head_dim or any(d % 2 for d in self.axes_dims_rope):
            raise ValueError(f"axes_dims_rope={self.axes_dims_rope} must be even numbers summing to "
                             f"head_dim={self.head_dim}.")
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise ValueError(f"cfg_dropout must be in [0, 1), got {self.cfg_dropout}.")


SMOKE = DiTConfig(batch_size=8, num_layers=1, num_single_layers=1, heads=2, head_dim=8, axes_dims_rope=(2, 2, 4),
                  steps=3, warmup_steps=1, checkpoint_every=2, log_every=1)


def held_out_prompts(count: int) -> frozenset[str]:
    """The prompts kept out of training: the first ``count`` of ``deepcache eval``'s embedded prompts."""
    from ..prompts import embedded_prompts

    return frozenset(embedded_prompts(count)) if count else frozenset()


def build_transformer(config: DiTConfig, text_hidden: int, latent_channels: int) -> Any:
    """A fresh ``FluxTransformer2DModel`` over 2x2-packed latents, conditioned by a ``text_hidden``-wide CLIP."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(config.seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=latent_channels * 4,
        num_layers=config.num_layers,
        num_single_layers=config.num_single_layers,
        attention_head_dim=config.head_dim,
        num_attention_heads=config.heads,
        joint_attention_dim=text_hidden,
        pooled_projection_dim=text_hidden,
        guidance_embeds=False,
        axes_dims_rope=config.axes_dims_rope,
    )


@torch.no_grad()
def latent_statistics(vae: Any, seed: int) -> tuple[float, float]:
    """(mean, 1 / std) of the latent means of 512 images: Flux's ``shift_factor`` and ``scaling_factor``."""
    latents = vae.encode(images_to_tensor(make_dataset(512, seed=seed * 10 + 2).images)).latent_dist.mean
    return float(latents.mean()), float(1.0 / latents.std())


@torch.no_grad()
def encode_captions(tokenizer: Any, text_encoder: Any,
                    captions: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """caption -> (hidden states (L, D), pooled (D,)), tokenized as ``FluxPipeline`` does for both encoders."""
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    out = text_encoder(ids, output_hidden_states=False)
    return {c: (h, p) for c, h, p in zip(captions, out.last_hidden_state, out.pooler_output)}


def _batches(batch_size: int, stream_seed: int, skip: frozenset[str]) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """Fresh procedural batches without the ``skip`` captions (images in [-1, 1], captions)."""
    images: list[np.ndarray] = []
    captions: list[str] = []
    for batch in iter_batches(batch_size, stream_seed):
        keep = [i for i, c in enumerate(batch.captions) if c not in skip]
        images.extend(batch.images[keep])
        captions.extend(batch.captions[i] for i in keep)
        while len(captions) >= batch_size:
            yield images_to_tensor(np.stack(images[:batch_size])), captions[:batch_size]
            del images[:batch_size], captions[:batch_size]


def load_frozen_parts(source: Path) -> tuple[Any, Any, Any]:
    """(autoencoder, tokenizer, text encoder) of the U-Net demo pipeline in ``source``, frozen."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    vae = AutoencoderKL.from_pretrained(source / "vae", local_files_only=True).eval().requires_grad_(False)
    tokenizer = CLIPTokenizer.from_pretrained(source / "tokenizer", local_files_only=True)
    text_encoder = CLIPTextModel.from_pretrained(source / "text_encoder", local_files_only=True)
    return vae, tokenizer, text_encoder.eval().requires_grad_(False)


def train_transformer(transformer: Any, vae: Any, embeds: dict[str, tuple[torch.Tensor, torch.Tensor]],
                      config: DiTConfig, log: Log, checkpoint: Any) -> tuple[Any, dict[str, float]]:
    """Rectified-flow training; returns the EMA copy of the transformer and the loss summary."""
    from diffusers import FluxPipeline

    transformer.train()
    ema = copy.deepcopy(transformer).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=config.lr, weight_decay=1e-2)
    generator = torch.Generator().manual_seed(config.seed + 5)
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    data = _batches(config.batch_size, config.seed * 10 + 6, held_out_prompts(config.held_out))
    channels, side = vae.config.latent_channels, vae.config.sample_size // 2 ** (len(vae.config.block_out_channels) - 1)
    img_ids = FluxPipeline._prepare_latent_image_ids(config.batch_size, side // 2, side // 2, "cpu", torch.float32)
    txt_ids = torch.zeros(next(iter(embeds.values()))[0].shape[0], 3)
    losses: list[float] = []
    start = time.monotonic()
    step = 0
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = config.lr * lr_factor(step, config.steps, config.warmup_steps)
        images, captions = next(data)
        drop = (torch.rand(len(captions), generator=generator) < config.cfg_dropout).tolist()
        hidden, pooled = (torch.stack(x) for x in zip(*(embeds["" if d else c] for c, d in zip(captions, drop))))
        with torch.no_grad():
            posterior = vae.encode(images).latent_dist
            sample = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
            x0 = (sample - shift) * scale
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.sigmoid(torch.randn(len(captions), generator=generator))  # logit-normal(0, 1), as SD3
        xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
        pack = lambda x: FluxPipeline._pack_latents(x, len(captions), channels, side, side)  # noqa: E731
        pred = transformer(hidden_states=pack(xt), timestep=t, pooled_projections=pooled, encoder_hidden_states=hidden,
                           txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        loss = F.mse_loss(pred, pack(noise - x0))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        ema_update(ema, transformer, min(config.ema_decay, (1 + step) / (10 + step)))
        losses.append(loss.item())
        elapsed = time.monotonic() - start
        if step % config.log_every == 0 or step == config.steps - 1:
            recent = float(np.mean(losses[-config.log_every:]))
            log(f"dit step {step}/{config.steps} loss {recent:.4f} ({elapsed / (step + 1):.2f} s/step)")
        if (step + 1) % config.checkpoint_every == 0:
            checkpoint(ema, step + 1)
        if elapsed > config.max_minutes * 60:
            log(f"stopping at step {step + 1}: --max-minutes {config.max_minutes} reached")
            break
    return ema, {"dit_loss": float(np.mean(losses[-200:])), "dit_steps_done": step + 1,
                 "dit_loss_every_500": [float(np.mean(losses[i:i + 500])) for i in range(0, len(losses), 500)]}


def save_flux_pipeline(transformer: Any, vae: Any, tokenizer: Any, text_encoder: Any, out: Path) -> None:
    """Write a ``FluxPipeline`` folder; the CLIP model and tokenizer serve as both text encoders."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from .data import caption_words
    from .tokenizer import write_tokenizer_files

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder, tokenizer_2=tokenizer, transformer=transformer)
    pipe.save_pretrained(out, safe_serialization=True)
    for folder in ("tokenizer", "tokenizer_2"):  # the slow-tokenizer files too, as the U-Net demo model has them
        write_tokenizer_files(caption_words(), Path(out) / folder)


def train_dit(config: DiTConfig, out: Path, source: Path = EMBEDDED_MODEL) -> dict[str, object]:
    """Train into ``out/demo-flux`` from the autoencoder and text encoder of the demo pipeline in ``source``."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    torch.set_flush_denormal(True)
    try:
        return _run(config, Path(out), Path(source))
    finally:  # leave the process as we found it (tests call this in-process)
        torch.set_num_threads(previous_threads)
        torch.set_flush_denormal(False)


def _run(config: DiTConfig, out: Path, source: Path) -> dict[str, object]:
    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:7.1f}s] {message}", flush=True)

    torch.manual_seed(config.seed)
    vae, tokenizer, text_encoder = load_frozen_parts(source)
    mean, scale = latent_statistics(vae, config.seed)
    vae.register_to_config(shift_factor=mean, scaling_factor=scale)
    log(f"latents: shift_factor {mean:.4f}, scaling_factor {scale:.4f}")
    embeds = encode_captions(tokenizer, text_encoder, ["", *(caption(a) for a in all_attributes())])
    transformer = build_transformer(config, text_encoder.config.hidden_size, vae.config.latent_channels)
    size = sum(p.numel() for p in transformer.parameters())
    log(f"FluxTransformer2DModel: {config.num_layers} dual + {config.num_single_layers} single blocks, "
        f"{config.heads}x{config.head_dim} wide, {size:,} parameters")
    folder = out / DIT_DIR

    def checkpoint(model: Any, step: int) -> None:
        save_flux_pipeline(model, vae, tokenizer, text_encoder, folder)
        log(f"checkpoint at step {step} -> {folder}")

    ema, losses = train_transformer(transformer, vae, embeds, config, log, checkpoint)
    save_flux_pipeline(ema, vae, tokenizer, text_encoder, folder)
    summary: dict[str, object] = {"config": dataclasses.asdict(config), "transformer_parameters": size,
                                  "vae_shift_factor": mean, "vae_scaling_factor": scale, **losses,
                                  "wall_seconds": time.monotonic() - started}
    (folder / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    log(f"done: loss {losses['dit_loss']:.4f} after {losses['dit_steps_done']} steps -> {folder}")
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``deepcache train-demo-dit`` (shared with ``tools/train_demo_dit.py``)."""
    add_out_option(parser, required=True, help=f"folder that receives {DIT_DIR}/")
    parser.add_argument("--smoke", action="store_true", help="tiny transformer and 3 steps (a CI check, seconds)")
    parser.add_argument("--source", type=Path, default=EMBEDDED_MODEL, metavar="PATH",
                        help="U-Net demo pipeline whose autoencoder and text encoder are reused "
                        "(default: the shipped one)")
    parser.add_argument("--seed", type=int)
    add_threads_option(parser, default_help="1")
    parser.add_argument("--batch-size", type=positive_int)
    parser.add_argument("--steps", type=positive_int, help=f"training steps (default {DiTConfig.steps})")
    parser.add_argument("--lr", type=float, help=f"peak AdamW learning rate (default {DiTConfig.lr})")
    parser.add_argument("--max-minutes", type=float, help="stop training early after this wall time (not reproducible)")


def run(args: argparse.Namespace) -> int:
    """``deepcache train-demo-dit``: :func:`train_dit` with the options' config."""
    base = SMOKE if args.smoke else DiTConfig()
    names = ("seed", "threads", "batch_size", "steps", "lr", "max_minutes")
    config = dataclasses.replace(base, **{n: getattr(args, n) for n in names if getattr(args, n) is not None})
    train_dit(config, args.out, args.source)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python tools/train_demo_dit.py ...``: the same as ``deepcache train-demo-dit ...``."""
    return standalone("python tools/train_demo_dit.py", __doc__, add_arguments, run, argv, name="train-demo-dit")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    """Register ``deepcache train-demo-dit``."""
    return register(subparsers, "train-demo-dit", help="train the embedded tiny Flux DiT on procedural shapes",
                    module_doc=__doc__, add_arguments=add_arguments, run=run)
