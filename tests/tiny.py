"""Tiny random diffusers components for CPU tests (no downloads: everything is built from configs)."""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)

TEXT_DIM = 8
TEXT_LEN = 5
POOLED_DIM = 8


def tiny_sd_unet(seed: int = 0, **overrides: object) -> UNet2DConditionModel:
    """SD 1.x/2.x layout: 4 levels, 2 layers per block, 3 cross-attention down blocks (12 branches)."""
    torch.manual_seed(seed)
    config = dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    config.update(overrides)
    return UNet2DConditionModel(**config).eval()


def tiny_sdxl_unet(seed: int = 0, **overrides: object) -> UNet2DConditionModel:
    """SDXL layout: 3 levels, no attention at the top level, 2 transformer layers deeper (9 branches)."""
    torch.manual_seed(seed)
    config = dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(8, 16, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 2),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=2,
        norm_num_groups=4,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=POOLED_DIM + 6 * 4,
        use_linear_projection=True,
    )
    config.update(overrides)
    return UNet2DConditionModel(**config).eval()


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        sample_size=32,
    ).eval()


def tiny_sd_pipe(unet: UNet2DConditionModel | None = None, scheduler: object | None = None) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=None,
        tokenizer=None,
        unet=unet if unet is not None else tiny_sd_unet(),
        scheduler=scheduler if scheduler is not None else DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipe(unet: UNet2DConditionModel | None = None, scheduler: object | None = None) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(),
        text_encoder=None,
        text_encoder_2=None,
        tokenizer=None,
        tokenizer_2=None,
        unet=unet if unet is not None else tiny_sdxl_unet(),
        scheduler=scheduler if scheduler is not None else DDIMScheduler(steps_offset=1, clip_sample=False),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompt_kwargs(batch: int = 1, seed: int = 1, sdxl: bool = False) -> dict:
    """Random text conditioning in place of a tokenizer and text encoder."""
    g = torch.Generator().manual_seed(seed)
    kwargs = dict(
        prompt_embeds=torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=g),
        negative_prompt_embeds=torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=g),
    )
    if sdxl:
        kwargs["pooled_prompt_embeds"] = torch.randn(batch, POOLED_DIM, generator=g)
        kwargs["negative_pooled_prompt_embeds"] = torch.randn(batch, POOLED_DIM, generator=g)
    return kwargs


def run(pipe, steps: int = 10, batch: int = 1, seed: int = 0, sdxl: bool | None = None, **extra: object) -> torch.Tensor:
    """One pipeline call returning latents (deterministic for a given seed)."""
    if sdxl is None:
        sdxl = isinstance(pipe, StableDiffusionXLPipeline)
    kwargs = dict(
        num_inference_steps=steps,
        guidance_scale=5.0,
        output_type="latent",
        generator=torch.Generator().manual_seed(seed),
        **prompt_kwargs(batch, sdxl=sdxl),
    )
    kwargs.update(extra)
    return pipe(**kwargs).images


def unet_inputs(unet: UNet2DConditionModel, batch: int = 2, seed: int = 1) -> tuple[torch.Tensor, dict]:
    """A latent and conditioning kwargs for a bare U-Net call."""
    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    latents = torch.randn(batch, unet.config.in_channels, size, size, generator=g)
    kwargs: dict = {"encoder_hidden_states": torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=g)}
    if unet.config.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, POOLED_DIM, generator=g),
            "time_ids": torch.randn(batch, 6, generator=g),
        }
    return latents, kwargs


@torch.no_grad()
def unet_loop(unet, steps: int = 6, batch: int = 2, seed: int = 1, scheduler=None) -> torch.Tensor:
    """A plain DDIM denoising loop on a bare U-Net (what users with custom loops write)."""
    scheduler = scheduler if scheduler is not None else DDIMScheduler(steps_offset=1, clip_sample=False)
    scheduler.set_timesteps(steps)
    latents, kwargs = unet_inputs(unet, batch, seed)
    for t in scheduler.timesteps:
        eps = unet(latents, t, **kwargs).sample
        latents = scheduler.step(eps, t, latents).prev_sample
    return latents


def untouched(*modules: torch.nn.Module) -> bool:
    """No instance ``forward`` and no forward hook on any of their modules (nothing of DeepCache is left)."""
    return all(
        "forward" not in m.__dict__ and not m._forward_pre_hooks and not m._forward_hooks
        for module in modules
        for m in module.modules()
    )
