"""The embedded demo pipeline's training configuration and its fresh, untrained parts
(:mod:`DeepCache.tools.demo_model.train` trains them).

Example::

    >>> SMOKE.latent_size, TrainConfig().latent_size
    (16, 8)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from .data import IMAGE_SIZE, caption_words


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
