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
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..cli_common import add_out_option, add_threads_option, positive_int, register, standalone
from . import CLASSIFIER_DIR, MARKER, PIPELINE_DIR
from .data import caption_words
from .components import SMOKE, Components, TrainConfig, build_components
from .optim import ema_update, lr_factor
from .vae_stages import Log, finetune_decoder, image_batches, latent_scaling_factor, train_vae


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
    data = image_batches(config.batch_size, stream_seed=config.seed * 10 + 3)
    losses: list[float] = []
    start = time.monotonic()
    step = 0
    for step in range(config.unet_steps):
        for group in optimizer.param_groups:
            group["lr"] = config.unet_lr * lr_factor(step, config.unet_steps, config.warmup_steps)
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
        ema_update(ema_unet, unet, decay)
        ema_update(ema_text, text_encoder, decay)
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
