"""Train the embedded tiny Stable Diffusion pipeline (and its classifier) on procedural shapes.

Stages, all seeded:

1. ``AutoencoderKL``: reconstruction (MSE) plus a small KL term on 32x32 images, then frozen;
   its ``scaling_factor`` is set so that scaled latents have unit standard deviation.
2. ``UNet2DConditionModel`` and ``CLIPTextModel`` jointly: epsilon prediction under SD's
   ``scaled_linear`` DDPM noise schedule, 10 % empty captions (classifier-free guidance),
   EMA of the weights, which are what gets saved.
3. The autoencoder's decoder alone (encoder frozen, so the latent space is unchanged).
4. The attribute classifier used by ``deepcache eval`` (see :mod:`DeepCache.tools.demo_model.classifier`).

The pipeline is written with ``save_pretrained`` (a normal ``StableDiffusionPipeline`` folder),
checkpointed every ``--checkpoint-every`` steps so a partial run is still usable.

Example (a smoke run of a few steps, seconds on a CPU)::

    $ deepcache train-demo-model --out /tmp/demo --smoke
    $ python tools/train_demo_model.py --out DeepCache/assets  # the shipped weights
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
from . import CLASSIFIER_DIR, MARKER, PIPELINE_DIR
from .data import IMAGE_SIZE, caption_words, images_to_tensor, iter_batches, make_dataset


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Sizes and schedule of one training run; the defaults produced the shipped weights."""

    seed: int = 0
    threads: int = 1
    batch_size: int = 64
    # Autoencoder: len(vae_channels) levels -> latent side IMAGE_SIZE / 2**(levels-1).
    vae_channels: tuple[int, ...] = (16, 32, 64)
    vae_batch_size: int = 32
    vae_steps: int = 600
    vae_lr: float = 2e-3
    kl_weight: float = 1e-4
    decoder_steps: int = 1500
    # Denoiser and text encoder.
    unet_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 2
    norm_groups: int = 8
    text_hidden: int = 64
    text_layers: int = 2
    max_length: int = 16
    unet_steps: int = 5000
    unet_lr: float = 5e-4
    warmup_steps: int = 200
    cfg_dropout: float = 0.1
    ema_decay: float = 0.999
    # Classifier.
    classifier_steps: int = 400
    # Housekeeping.
    checkpoint_every: int = 500
    log_every: int = 25
    max_minutes: float = math.inf

    def __post_init__(self) -> None:
        if len(self.unet_channels) < 3:
            raise ValueError(
                f"unet_channels={self.unet_channels} has fewer than 3 levels; DeepCache's branches need >= 3."
            )
        if IMAGE_SIZE % 2 ** (len(self.vae_channels) - 1):
            raise ValueError(f"vae_channels={self.vae_channels} downsamples {IMAGE_SIZE}px too far.")
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise ValueError(f"cfg_dropout must be in [0, 1), got {self.cfg_dropout}.")

    @property
    def latent_size(self) -> int:
        return IMAGE_SIZE // 2 ** (len(self.vae_channels) - 1)


SMOKE = TrainConfig(
    batch_size=8,
    vae_batch_size=8,
    vae_channels=(8, 16),
    vae_steps=3,
    unet_channels=(8, 16, 16),
    norm_groups=4,
    text_hidden=16,
    text_layers=1,
    unet_steps=3,
    warmup_steps=1,
    classifier_steps=3,
    decoder_steps=3,
    checkpoint_every=2,
    log_every=1,
)


@dataclasses.dataclass
class Components:
    """The pipeline's parts during training (diffusers/transformers models, typed loosely)."""

    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    train_scheduler: Any
    scheduler: Any


def build_components(config: TrainConfig) -> Components:
    """Fresh (untrained) tokenizer, text encoder, autoencoder, U-Net and schedulers."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DDPMScheduler,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from .tokenizer import BOS, EOS, build_tokenizer

    torch.manual_seed(config.seed)
    tokenizer = build_tokenizer(caption_words(), max_length=config.max_length)
    vocab = tokenizer.get_vocab()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=config.text_hidden,
            intermediate_size=config.text_hidden * 2,
            num_hidden_layers=config.text_layers,
            num_attention_heads=4,
            max_position_embeddings=config.max_length,
            bos_token_id=vocab[BOS],
            eos_token_id=vocab[EOS],
            pad_token_id=vocab[EOS],
        )
    )
    levels = len(config.vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=config.vae_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=min(16, config.vae_channels[0]),
        sample_size=IMAGE_SIZE,
        mid_block_add_attention=False,
    )
    n = len(config.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=config.latent_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        block_out_channels=config.unet_channels,
        layers_per_block=config.layers_per_block,
        cross_attention_dim=config.text_hidden,
        attention_head_dim=4,
        norm_num_groups=config.norm_groups,
    )
    betas = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
    train_scheduler = DDPMScheduler(**betas, clip_sample=False)
    scheduler = DDIMScheduler(**betas, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return Components(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        unet=unet,
        train_scheduler=train_scheduler,
        scheduler=scheduler,
    )


def _batches(batch_size: int, stream_seed: int) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """Training batches as (images in [-1, 1], captions), from :func:`~DeepCache.tools.demo_model.data.iter_batches`."""
    for batch in iter_batches(batch_size, stream_seed):
        yield images_to_tensor(batch.images), batch.captions


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then cosine decay to 10 %."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


Log = Callable[[str], None]


def train_vae(vae: Any, config: TrainConfig, log: Log) -> dict[str, float]:
    """Fit the autoencoder; returns its final losses (mean of the last 50 steps)."""
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(config.seed + 1)
    history: list[tuple[float, float]] = []
    data = _batches(config.vae_batch_size, stream_seed=config.seed * 10 + 1)
    for step in range(config.vae_steps):
        for group in optimizer.param_groups:
            group["lr"] = config.vae_lr * _lr_factor(step, config.vae_steps, max(1, config.vae_steps // 10))
        images, _ = next(data)
        posterior = vae.encode(images).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        recon = vae.decode(latents).sample
        mse = F.mse_loss(recon, images)
        kl = 0.5 * (posterior.mean**2 + posterior.var - 1.0 - posterior.logvar).mean()
        loss = mse + config.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append((mse.item(), kl.item()))
        if step % config.log_every == 0 or step == config.vae_steps - 1:
            log(f"vae step {step}/{config.vae_steps} mse {mse.item():.5f} kl {kl.item():.3f}")
    vae.eval().requires_grad_(False)
    tail = history[-50:]
    return {"vae_mse": float(np.mean([h[0] for h in tail])), "vae_kl": float(np.mean([h[1] for h in tail]))}


def finetune_decoder(vae: Any, config: TrainConfig, log: Log) -> dict[str, float]:
    """Train only the decoder (and ``post_quant_conv``) with the encoder frozen.

    The latent space does not move, so this can run after (or beside) the U-Net stage; it sharpens
    the decoded shapes, which the short joint autoencoder stage leaves blurry.
    """
    decoder_params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())  # type: ignore[union-attr]
    vae.requires_grad_(False)
    for param in decoder_params:
        param.requires_grad_(True)
    vae.decoder.train()  # type: ignore[union-attr]
    optimizer = torch.optim.AdamW(decoder_params, lr=config.vae_lr / 2, weight_decay=0.0)
    generator = torch.Generator().manual_seed(config.seed + 3)
    data = _batches(config.vae_batch_size, stream_seed=config.seed * 10 + 4)
    history: list[float] = []
    for step in range(config.decoder_steps):
        for group in optimizer.param_groups:
            group["lr"] = config.vae_lr / 2 * _lr_factor(step, config.decoder_steps, max(1, config.decoder_steps // 20))
        images, _ = next(data)
        with torch.no_grad():
            posterior = vae.encode(images).latent_dist  # type: ignore[operator]
            latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        mse = F.mse_loss(vae.decode(latents).sample, images)  # type: ignore[operator]
        optimizer.zero_grad(set_to_none=True)
        mse.backward()
        optimizer.step()
        history.append(mse.item())
        if step % config.log_every == 0 or step == config.decoder_steps - 1:
            log(f"decoder step {step}/{config.decoder_steps} mse {mse.item():.5f}")
    vae.eval().requires_grad_(False)
    return {"decoder_mse": float(np.mean(history[-50:]))}


@torch.no_grad()
def latent_scaling_factor(vae: Any, config: TrainConfig) -> float:
    """1 / std of the autoencoder's latent means on 512 fresh images (SD's 0.18215 plays this role)."""
    images = images_to_tensor(make_dataset(512, seed=config.seed * 10 + 2).images)
    return float(1.0 / vae.encode(images).latent_dist.mean.std())


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1.0 - decay)


def train_denoiser(
    components: Components,
    config: TrainConfig,
    log: Log,
    checkpoint: Callable[[torch.nn.Module, torch.nn.Module, int], None],
) -> tuple[torch.nn.Module, torch.nn.Module, dict[str, float]]:
    """Train U-Net and text encoder jointly; returns their EMA copies and the final loss."""
    unet, text_encoder, vae = components.unet, components.text_encoder, components.vae
    tokenizer, noise_scheduler = components.tokenizer, components.train_scheduler
    unet.train()
    text_encoder.train()
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.unet_lr, weight_decay=1e-2)
    generator = torch.Generator().manual_seed(config.seed + 2)
    alphas = noise_scheduler.alphas_cumprod  # type: ignore[attr-defined]
    scale = vae.config.scaling_factor  # type: ignore[attr-defined]
    data = _batches(config.batch_size, stream_seed=config.seed * 10 + 3)
    losses: list[float] = []
    start = time.monotonic()
    step = 0
    for step in range(config.unet_steps):
        for group in optimizer.param_groups:
            group["lr"] = config.unet_lr * _lr_factor(step, config.unet_steps, config.warmup_steps)
        images, captions = next(data)
        drop = torch.rand(len(captions), generator=generator) < config.cfg_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        ids = tokenizer(
            captions, padding="max_length", max_length=config.max_length, truncation=True, return_tensors="pt"
        ).input_ids  # type: ignore[operator]
        with torch.no_grad():
            posterior = vae.encode(images).latent_dist  # type: ignore[attr-defined]
            latents = (posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)) * scale
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, len(alphas), (len(captions),), generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        states = text_encoder(ids)[0]
        pred = unet(noisy, t, encoder_hidden_states=states).sample
        loss = F.mse_loss(pred, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        _ema_update(ema_unet, unet, decay)
        _ema_update(ema_text, text_encoder, decay)
        losses.append(loss.item())
        elapsed = time.monotonic() - start
        if step % config.log_every == 0 or step == config.unet_steps - 1:
            recent = float(np.mean(losses[-config.log_every :]))
            log(f"unet step {step}/{config.unet_steps} loss {recent:.4f} ({elapsed / (step + 1):.2f} s/step)")
        if (step + 1) % config.checkpoint_every == 0:
            checkpoint(ema_unet, ema_text, step + 1)
        if elapsed > config.max_minutes * 60:
            log(f"stopping at step {step + 1}: --max-minutes {config.max_minutes} reached")
            break
    return ema_unet, ema_text, {"unet_loss": float(np.mean(losses[-200:])), "unet_steps_done": step + 1}


def save_pipeline(components: Components, unet: torch.nn.Module, text_encoder: torch.nn.Module, out: Path) -> None:
    """Write a ``StableDiffusionPipeline`` folder (no safety checker) with ``save_pretrained``."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=components.vae,
        text_encoder=text_encoder,
        tokenizer=components.tokenizer,
        unet=unet,
        scheduler=components.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)  # type: ignore[attr-defined]
    # Also the slow-tokenizer files, so transformers 4.x (which reads these) loads it too.
    from .tokenizer import write_tokenizer_files

    write_tokenizer_files(caption_words(), Path(out) / "tokenizer")


STAGES: tuple[str, ...] = ("vae", "unet", "decoder", "classifier")


def train(config: TrainConfig, out: Path, stages: tuple[str, ...] = STAGES) -> dict[str, object]:
    """Train the requested stages into ``out/demo-model`` and ``out/demo-classifier``; returns a summary.

    Stages ``unet`` and ``decoder`` without ``vae`` (and ``decoder`` without ``unet``) continue from the
    pipeline already in ``out/demo-model``.
    """
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    torch.set_flush_denormal(True)
    try:
        return _run_stages(config, Path(out), stages)
    finally:  # leave the process as we found it (tests call this in-process)
        torch.set_num_threads(previous_threads)
        torch.set_flush_denormal(False)


def _run_stages(config: TrainConfig, out: Path, stages: tuple[str, ...]) -> dict[str, object]:
    torch.manual_seed(config.seed)
    out = Path(out)
    pipeline_dir = out / PIPELINE_DIR
    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:7.1f}s] {message}", flush=True)

    summary: dict[str, object] = {"config": dataclasses.asdict(config)}
    if "vae" in stages or "unet" in stages:
        components = build_components(config)
        vae = components.vae
        if "vae" in stages:
            summary.update(train_vae(vae, config, log))
            vae.register_to_config(scaling_factor=latent_scaling_factor(vae, config))  # type: ignore[attr-defined]
            summary["vae_scaling_factor"] = vae.config.scaling_factor  # type: ignore[attr-defined]
            log(f"latent scaling factor {vae.config.scaling_factor:.4f}")  # type: ignore[attr-defined]
            # Saved now: a later `--stages unet` (or this run's unet stage) reads it from here.
            vae.save_pretrained(pipeline_dir / "vae", safe_serialization=True)  # type: ignore[attr-defined]
        else:
            from diffusers import AutoencoderKL

            components.vae = AutoencoderKL.from_pretrained(pipeline_dir / "vae")
        summary["vae_seconds"] = time.monotonic() - started

        def checkpoint(unet: torch.nn.Module, text: torch.nn.Module, step: int) -> None:
            save_pipeline(components, unet, text, pipeline_dir)
            log(f"checkpoint at step {step} -> {pipeline_dir}")

        if "unet" in stages:
            unet, text, losses = train_denoiser(components, config, log, checkpoint)
            summary.update(losses)
            save_pipeline(components, unet, text, pipeline_dir)
        summary["diffusion_seconds"] = time.monotonic() - started
    if "decoder" in stages:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir, local_files_only=True)
        summary.update(finetune_decoder(pipe.vae, config, log))
        pipe.vae.save_pretrained(pipeline_dir / "vae", safe_serialization=True)
        summary["decoder_seconds"] = time.monotonic() - started
    if "classifier" in stages:
        from .classifier import train_classifier

        summary.update(
            train_classifier(
                out / CLASSIFIER_DIR,
                steps=config.classifier_steps,
                seed=config.seed,
                log=log,
                batch_size=config.batch_size * 2,
            )
        )
    summary["wall_seconds"] = time.monotonic() - started
    out.mkdir(parents=True, exist_ok=True)
    summary_json = json.dumps(summary, indent=2, default=str) + "\n"
    (out / "training-summary.json").write_text(summary_json)
    if (pipeline_dir / "model_index.json").is_file():  # marks a whole pipeline as a demo pipeline for `deepcache eval`
        (pipeline_dir / MARKER).write_text(summary_json)
    log(f"done: {json.dumps({k: v for k, v in summary.items() if k != 'config'}, default=str)}")
    return summary


def _config_from_args(args: argparse.Namespace) -> TrainConfig:
    base = SMOKE if args.smoke else TrainConfig()
    overrides = {
        name: getattr(args, name)
        for name in (
            "seed",
            "threads",
            "vae_steps",
            "unet_steps",
            "decoder_steps",
            "classifier_steps",
            "max_minutes",
            "batch_size",
        )
        if getattr(args, name) is not None
    }
    return dataclasses.replace(base, **overrides)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``deepcache train-demo-model`` (shared with ``tools/train_demo_model.py``)."""
    add_out_option(parser, required=True, help="folder that receives demo-model/ and demo-classifier/")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and 3 steps per stage (a CI check, seconds)")
    parser.add_argument(
        "--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)} (run in that order)"
    )
    parser.add_argument("--seed", type=int)
    add_threads_option(parser, default_help="1")
    parser.add_argument("--batch-size", type=positive_int)
    for stage in ("vae", "unet", "decoder", "classifier"):
        parser.add_argument(f"--{stage}-steps", type=positive_int)
    parser.add_argument(
        "--max-minutes", type=float, help="stop the U-Net stage early after this wall time (not reproducible)"
    )


def parse_stages(text: str) -> tuple[str, ...]:
    """``"vae,unet"`` -> ``("vae", "unet")``; a name outside :data:`STAGES` raises ``ValueError``."""
    stages = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = sorted(set(stages) - set(STAGES))
    if unknown or not stages:
        raise ValueError(f"unknown --stages {unknown or text!r}; choose from {', '.join(STAGES)}.")
    return stages


def run(args: argparse.Namespace) -> int:
    """``deepcache train-demo-model``: :func:`train` with the options' config, folder and stages."""
    train(_config_from_args(args), args.out, parse_stages(args.stages))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python tools/train_demo_model.py ...``: the same as ``deepcache train-demo-model ...`` (errors included)."""
    return standalone("python tools/train_demo_model.py", __doc__, add_arguments, run, argv, name="train-demo-model")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    """Register ``deepcache train-demo-model``."""
    return register(subparsers, "train-demo-model", help="train the embedded tiny SD pipeline on procedural shapes",
                    module_doc=__doc__, add_arguments=add_arguments, run=run)
