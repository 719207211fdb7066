"""The embedded demo model's autoencoder stages (:mod:`DeepCache.tools.demo_model.train`, stages 1 and 3): fit the
``AutoencoderKL`` on procedural shapes, set its latent scale, later sharpen its decoder with the encoder frozen.

Example::

    >>> images, captions = next(image_batches(2, stream_seed=0))
    >>> tuple(images.shape), len(captions)
    ((2, 3, 32, 32), 2)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from .data import images_to_tensor, iter_batches, make_dataset
from .optim import lr_factor

if TYPE_CHECKING:
    from .train import TrainConfig

Log = Callable[[str], None]


def image_batches(batch_size: int, stream_seed: int) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """Training batches as (images in [-1, 1], captions), from :func:`~DeepCache.tools.demo_model.data.iter_batches`."""
    for batch in iter_batches(batch_size, stream_seed):
        yield images_to_tensor(batch.images), batch.captions


def train_vae(vae: Any, config: TrainConfig, log: Log) -> dict[str, float]:
    """Fit the autoencoder; returns its final losses (mean of the last 50 steps)."""
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(config.seed + 1)
    history: list[tuple[float, float]] = []
    data = image_batches(config.vae_batch_size, stream_seed=config.seed * 10 + 1)
    for step in range(config.vae_steps):
        for group in optimizer.param_groups:
            group["lr"] = config.vae_lr * lr_factor(step, config.vae_steps, max(1, config.vae_steps // 10))
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
    data = image_batches(config.vae_batch_size, stream_seed=config.seed * 10 + 4)
    history: list[float] = []
    for step in range(config.decoder_steps):
        for group in optimizer.param_groups:
            group["lr"] = config.vae_lr / 2 * lr_factor(step, config.decoder_steps, max(1, config.decoder_steps // 20))
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
