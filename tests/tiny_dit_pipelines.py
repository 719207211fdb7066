"""Tiny offline DiT pipelines (random weights, tiny VAE, no text encoder: prompt embeddings passed in).

`TINY_DIT_PIPELINES[name]()` returns `(pipe, call_kwargs)`; `pipe(**call_kwargs)` runs 4-6 steps with a seeded
generator and output_type="latent". Every call_kwargs holds fresh embedding tensors, but the pipeline is free to
re-create them (batched CFG concatenates; see the call patterns in tests/test_tiny_dit_pipelines.py).
"""

from __future__ import annotations

from typing import Callable

import diffusers
import torch
from diffusers import AutoencoderDC, AutoencoderKL, AutoencoderKLQwenImage, AutoencoderKLWan, DDIMScheduler
from diffusers import FlowMatchEulerDiscreteScheduler as FlowMatch


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _kl_vae(latent_channels: int) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=0.0, scaling_factor=1.5035).eval()


def _pipe(cls_name: str, **components):
    pipe = getattr(diffusers, cls_name)(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _dit(cls_name: str, seed: int = 0, **config):
    torch.manual_seed(seed)
    return getattr(diffusers, cls_name)(**config).eval()


def flux():
    """True CFG: true_cfg_scale > 1 with negative embeds -> a cond call, then an uncond call, per step."""
    transformer = _dit("FluxTransformer2DModel", patch_size=1, in_channels=4, num_layers=2, num_single_layers=2,
                       attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                       axes_dims_rope=[4, 4, 8])
    pipe = _pipe("FluxPipeline", scheduler=FlowMatch(), vae=_kl_vae(1), text_encoder=None, tokenizer=None,
                 text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    return pipe, dict(prompt_embeds=_randn(1, 7, 32, seed=1), pooled_prompt_embeds=_randn(1, 32, seed=2),
                      negative_prompt_embeds=_randn(1, 7, 32, seed=3),
                      negative_pooled_prompt_embeds=_randn(1, 32, seed=4), true_cfg_scale=2.0, height=8, width=8,
                      num_inference_steps=4, generator=_gen(), output_type="latent")


def sd3():
    """Batched CFG: one call per step on the concatenated [uncond, cond] batch."""
    transformer = _dit("SD3Transformer2DModel", sample_size=8, patch_size=1, in_channels=4, num_layers=4,
                       attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                       pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16)
    pipe = _pipe("StableDiffusion3Pipeline", transformer=transformer, scheduler=FlowMatch(), vae=_kl_vae(4),
                 text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                 tokenizer_3=None)
    return pipe, dict(prompt_embeds=_randn(1, 7, 32, seed=1), pooled_prompt_embeds=_randn(1, 16, seed=2),
                      negative_prompt_embeds=_randn(1, 7, 32, seed=3),
                      negative_pooled_prompt_embeds=_randn(1, 16, seed=4), guidance_scale=5.0, height=8, width=8,
                      num_inference_steps=4, generator=_gen(), output_type="latent")


def pixart_sigma():
    transformer = _dit("PixArtTransformer2DModel", sample_size=8, num_layers=4, patch_size=2, attention_head_dim=4,
                       num_attention_heads=2, caption_channels=16, in_channels=4, cross_attention_dim=8,
                       out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
                       num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False,
                       norm_eps=1e-6)
    pipe = _pipe("PixArtSigmaPipeline", tokenizer=None, text_encoder=None, vae=_kl_vae(4), transformer=transformer,
                 scheduler=DDIMScheduler())
    return pipe, dict(prompt_embeds=_randn(1, 7, 16, seed=1), prompt_attention_mask=torch.ones(1, 7),
                      negative_prompt=None, negative_prompt_embeds=_randn(1, 7, 16, seed=3),
                      negative_prompt_attention_mask=torch.ones(1, 7), guidance_scale=4.5, height=8, width=8, use_resolution_binning=False, num_inference_steps=4,
                      generator=_gen(), output_type="latent")


def sana():
    transformer = _dit("SanaTransformer2DModel", patch_size=1, in_channels=4, out_channels=4, num_layers=4,
                       attention_head_dim=4, num_attention_heads=2, num_cross_attention_heads=2,
                       cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8, sample_size=8)
    torch.manual_seed(0)
    vae = AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2,
                        encoder_block_types=("ResBlock", "EfficientViTBlock"),
                        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
                        decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)),
                        decoder_qkv_multiscales=((), (5,)), encoder_layers_per_block=(1, 1),
                        decoder_layers_per_block=[1, 1], downsample_block_type="conv",
                        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
                        scaling_factor=0.41407).eval()
    pipe = _pipe("SanaPipeline", tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                 scheduler=FlowMatch(shift=7.0))
    return pipe, dict(prompt_embeds=_randn(1, 7, 8, seed=1), prompt_attention_mask=torch.ones(1, 7),
                      negative_prompt_embeds=_randn(1, 7, 8, seed=3), negative_prompt_attention_mask=torch.ones(1, 7),
                      negative_prompt=None, guidance_scale=4.5, height=32, width=32,
                      use_resolution_binning=False, num_inference_steps=4,
                      generator=_gen(), output_type="latent")


def _wan_transformer(seed: int):
    return _dit("WanTransformer3DModel", seed=seed, patch_size=(1, 2, 2), num_attention_heads=2,
                attention_head_dim=12, in_channels=16, out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32,
                num_layers=4, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


def _wan(transformer_2=None, boundary_ratio=None):
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    pipe = _pipe("WanPipeline", tokenizer=None, text_encoder=None, vae=vae, scheduler=FlowMatch(shift=7.0),
                 transformer=_wan_transformer(0), transformer_2=transformer_2, boundary_ratio=boundary_ratio)
    return pipe, dict(prompt_embeds=_randn(1, 7, 32, seed=1), negative_prompt_embeds=_randn(1, 7, 32, seed=3),
                      guidance_scale=5.0, height=16, width=16, num_frames=5, num_inference_steps=4, generator=_gen(),
                      output_type="latent")


def wan():
    """Wan 2.1 text-to-video: CFG as separate cond and uncond calls."""
    return _wan()


def wan22():
    """Wan 2.2: transformer (high noise, t >= boundary) then transformer_2 (low noise), each with separate CFG."""
    pipe, kwargs = _wan(transformer_2=_wan_transformer(1), boundary_ratio=0.875)
    return pipe, dict(kwargs, guidance_scale_2=3.0)


def cogview4():
    transformer = _dit("CogView4Transformer2DModel", patch_size=2, in_channels=4, num_layers=4, attention_head_dim=4,
                       num_attention_heads=4, out_channels=4, text_embed_dim=32, time_embed_dim=8, condition_dim=4)
    scheduler = FlowMatch(base_shift=0.25, max_shift=0.75, base_image_seq_len=256, use_dynamic_shifting=True,
                          time_shift_type="linear")
    pipe = _pipe("CogView4Pipeline", tokenizer=None, text_encoder=None, vae=_kl_vae(4), transformer=transformer,
                 scheduler=scheduler)
    return pipe, dict(prompt_embeds=_randn(1, 7, 32, seed=1), negative_prompt_embeds=_randn(1, 7, 32, seed=3),
                      guidance_scale=5.0, height=16, width=16, num_inference_steps=4, generator=_gen(),
                      output_type="latent")


def qwenimage():
    transformer = _dit("QwenImageTransformer2DModel", patch_size=2, in_channels=16, out_channels=4, num_layers=4,
                       attention_head_dim=16, num_attention_heads=3, joint_attention_dim=16, guidance_embeds=False,
                       axes_dims_rope=(8, 4, 4))
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * 4,
                                 latents_std=[1.0] * 4).eval()
    pipe = _pipe("QwenImagePipeline", scheduler=FlowMatch(), vae=vae, text_encoder=None, tokenizer=None,
                 transformer=transformer)
    return pipe, dict(prompt_embeds=_randn(1, 7, 16, seed=1), prompt_embeds_mask=torch.ones(1, 7, dtype=torch.long),
                      negative_prompt_embeds=_randn(1, 7, 16, seed=3),
                      negative_prompt_embeds_mask=torch.ones(1, 7, dtype=torch.long), true_cfg_scale=4.0, height=32,
                      width=32, num_inference_steps=4, generator=_gen(), output_type="latent")


def lumina2():
    """CFG as separate calls; cfg_trunc_ratio=0.5 drops the uncond call for the later half of the steps."""
    transformer = _dit("Lumina2Transformer2DModel", sample_size=4, patch_size=2, in_channels=4, hidden_size=24,
                       num_layers=4, num_refiner_layers=2, num_attention_heads=3, num_kv_heads=1, multiple_of=16,
                       ffn_dim_multiplier=None, norm_eps=1e-5, scaling_factor=1.0, axes_dim_rope=[4, 2, 2],
                       cap_feat_dim=8)
    pipe = _pipe("Lumina2Pipeline", transformer=transformer, scheduler=FlowMatch(), vae=_kl_vae(4), text_encoder=None,
                 tokenizer=None)
    return pipe, dict(prompt_embeds=_randn(1, 7, 8, seed=1), prompt_attention_mask=torch.ones(1, 7, dtype=torch.long),
                      negative_prompt_embeds=_randn(1, 7, 8, seed=3), negative_prompt_attention_mask=torch.ones(1, 7, dtype=torch.long),
                      guidance_scale=4.0, cfg_trunc_ratio=0.5, height=32, width=32, num_inference_steps=4,
                      generator=_gen(), output_type="latent")


TINY_DIT_PIPELINES: dict[str, Callable[[], tuple]] = {
    "FluxPipeline": flux,
    "StableDiffusion3Pipeline": sd3,
    "PixArtSigmaPipeline": pixart_sigma,
    "SanaPipeline": sana,
    "WanPipeline": wan,
    "WanPipeline2.2": wan22,
    "CogView4Pipeline": cogview4,
    "QwenImagePipeline": qwenimage,
    "Lumina2Pipeline": lumina2,
}


def output_of(result) -> torch.Tensor:
    """The pipeline's output tensor (images or frames)."""
    for key in ("images", "frames"):
        if hasattr(result, key):
            value = getattr(result, key)
            return value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    return result[0]
