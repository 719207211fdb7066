"""Tiny seeded diffusion transformers (DiTs) for CPU tests: one builder per diffusers class, plus the checked
facts about their block lists (`BLOCK_FACTS`, verified by tests/test_tiny_dits.py against diffusers 0.42.1).

`TINY_DITS[name]()` returns `(model, inputs)`: `model` in eval mode, `inputs(step)` the forward kwargs of one
denoising evaluation at `step` (batch 2). Latents are random but seeded per step and the timestep differs per
step; every conditioning tensor is created once and the SAME objects are returned at every step (engines may
identify CFG branches by the identity of `encoder_hidden_states`). Image and text token counts differ in every
fixture, so a block's outputs can be told apart by shape.
"""

from __future__ import annotations

from typing import Callable

import diffusers
import torch
from torch import nn

from .dit_facts import BLOCK_FACTS  # noqa: F401  (re-exported)

B = 2  # batch of every fixture
TXT = 7  # text tokens of every fixture (a count no image stream has)


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _fixture(
    cls_name: str,
    config: dict,
    cond: dict,
    latent_shape: tuple,
    t_scale: float = 1000.0,
    latent_key: str = "hidden_states",
    t_key: str = "timestep",
    seed: int = 0,
) -> tuple[nn.Module, Callable[[int], dict]]:
    torch.manual_seed(seed)
    model = getattr(diffusers, cls_name)(**config).eval()

    def inputs(step: int) -> dict:
        t = t_scale * max(0.02, 1.0 - 0.07 * step)
        return {
            **cond,
            latent_key: _randn(*latent_shape, seed=1000 + step),
            t_key: torch.full((B,), t),
        }

    return model, inputs


def sd3():
    config = dict(sample_size=8, patch_size=1, in_channels=4, num_layers=4, attention_head_dim=8,
                  num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                  pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16, dual_attention_layers=(),
                  qk_norm=None)
    cond = dict(encoder_hidden_states=_randn(B, TXT, 32, seed=1), pooled_projections=_randn(B, 16, seed=2))
    return _fixture("SD3Transformer2DModel", config, cond, (B, 4, 8, 8))


def flux():
    config = dict(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
    cond = dict(encoder_hidden_states=_randn(B, TXT, 32, seed=1), pooled_projections=_randn(B, 32, seed=2),
                img_ids=_randn(16, 3, seed=3), txt_ids=_randn(TXT, 3, seed=4))
    return _fixture("FluxTransformer2DModel", config, cond, (B, 16, 4), t_scale=1.0)


def flux2():
    config = dict(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
                  num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=256,
                  axes_dims_rope=[4, 4, 4, 4])
    img_ids = torch.cartesian_prod(torch.arange(1), torch.arange(4), torch.arange(4), torch.arange(1))
    txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(TXT))
    cond = dict(encoder_hidden_states=_randn(B, TXT, 32, seed=1), img_ids=img_ids.expand(B, -1, -1),
                txt_ids=txt_ids.expand(B, -1, -1), guidance=torch.full((B,), 3.5))
    return _fixture("Flux2Transformer2DModel", config, cond, (B, 16, 4), t_scale=1.0)


def pixart():
    config = dict(sample_size=8, num_layers=4, patch_size=2, attention_head_dim=2, num_attention_heads=2,
                  in_channels=4, cross_attention_dim=8, out_channels=8, attention_bias=True,
                  activation_fn="gelu-approximate", num_embeds_ada_norm=8, norm_type="ada_norm_single",
                  norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False,
                  caption_channels=None)
    cond = dict(encoder_hidden_states=_randn(B, TXT, 8, seed=1),
                added_cond_kwargs={"aspect_ratio": None, "resolution": None})
    return _fixture("PixArtTransformer2DModel", config, cond, (B, 4, 8, 8))


def sana():
    config = dict(patch_size=1, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=4,
                  num_attention_heads=2, num_cross_attention_heads=2, cross_attention_head_dim=4,
                  cross_attention_dim=8, caption_channels=8, sample_size=8)
    cond = dict(encoder_hidden_states=_randn(B, TXT, 8, seed=1))
    return _fixture("SanaTransformer2DModel", config, cond, (B, 4, 8, 8))


def hunyuan_dit():
    # 6 layers: layers 0, 1 push a skip, layers 4, 5 pop one (2, 3 neither)
    config = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=6, attention_head_dim=8,
                  num_attention_heads=2, cross_attention_dim=8, cross_attention_dim_t5=8, pooled_projection_dim=4,
                  hidden_size=16, text_len=4, text_len_t5=4, activation_fn="gelu-approximate")
    cond = dict(encoder_hidden_states=_randn(B, 4, 8, seed=1), text_embedding_mask=torch.ones(B, 4),
                encoder_hidden_states_t5=_randn(B, 4, 8, seed=2), text_embedding_mask_t5=torch.ones(B, 4),
                image_meta_size=torch.tensor([[1024.0, 1024, 16, 16, 0, 0]] * B), style=torch.zeros(B, dtype=int),
                image_rotary_emb=(torch.ones(1, 8), torch.zeros(1, 8)))
    return _fixture("HunyuanDiT2DModel", config, cond, (B, 4, 8, 8))


def auraflow():
    config = dict(sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=2, num_single_dit_layers=2,
                  attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                  out_channels=4, pos_embed_max_size=64)
    cond = dict(encoder_hidden_states=_randn(B, TXT, 32, seed=1))
    return _fixture("AuraFlowTransformer2DModel", config, cond, (B, 4, 8, 8))


def lumina2():
    config = dict(sample_size=8, patch_size=2, in_channels=4, hidden_size=24, num_layers=4, num_refiner_layers=2,
                  num_attention_heads=3, num_kv_heads=1, multiple_of=2, ffn_dim_multiplier=None, norm_eps=1e-5,
                  scaling_factor=1.0, axes_dim_rope=(4, 2, 2), axes_lens=(128, 128, 128), cap_feat_dim=32)
    cond = dict(encoder_hidden_states=_randn(B, TXT, 32, seed=1),
                encoder_attention_mask=torch.ones(B, TXT, dtype=torch.bool))
    return _fixture("Lumina2Transformer2DModel", config, cond, (B, 4, 8, 8), t_scale=1.0)


def cogview4():
    config = dict(patch_size=2, in_channels=4, num_layers=4, attention_head_dim=4, num_attention_heads=4,
                  out_channels=4, text_embed_dim=8, time_embed_dim=8, condition_dim=4)
    size = torch.tensor([[64, 64]] * B)
    cond = dict(encoder_hidden_states=_randn(B, TXT, 8, seed=1), original_size=size, target_size=size.clone(),
                crop_coords=torch.zeros(B, 2, dtype=torch.long))
    return _fixture("CogView4Transformer2DModel", config, cond, (B, 4, 8, 8))


def qwenimage():
    config = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=4, attention_head_dim=16,
                  num_attention_heads=4, joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4))
    cond = dict(encoder_hidden_states=_randn(B, TXT, 16, seed=1),
                encoder_hidden_states_mask=torch.ones(B, TXT, dtype=torch.long), img_shapes=[(1, 4, 4)] * B)
    return _fixture("QwenImageTransformer2DModel", config, cond, (B, 16, 16), t_scale=1.0)


def wan():
    config = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
                  text_dim=16, freq_dim=256, ffn_dim=32, num_layers=4, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    cond = dict(encoder_hidden_states=_randn(B, TXT, 16, seed=1))
    return _fixture("WanTransformer3DModel", config, cond, (B, 4, 2, 8, 8))


def hunyuan_video():
    config = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=2,
                  num_single_layers=2, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
                  text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4), image_condition_type=None)
    cond = dict(encoder_hidden_states=_randn(B, TXT, 16, seed=1), pooled_projections=_randn(B, 8, seed=2),
                encoder_attention_mask=torch.ones(B, TXT), guidance=torch.full((B,), 6000.0))
    return _fixture("HunyuanVideoTransformer3DModel", config, cond, (B, 4, 1, 8, 8))


def ltx():
    config = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                  num_layers=4, qk_norm="rms_norm_across_heads", caption_channels=16)
    cond = dict(encoder_hidden_states=_randn(B, TXT, 16, seed=1),
                encoder_attention_mask=torch.ones(B, TXT, dtype=torch.bool), num_frames=2, height=4, width=4)
    return _fixture("LTXVideoTransformer3DModel", config, cond, (B, 2 * 4 * 4, 4))


def cogvideox():
    config = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
                  text_embed_dim=8, num_layers=4, sample_width=8, sample_height=8, sample_frames=8, patch_size=2,
                  patch_size_t=None, temporal_compression_ratio=4, max_text_seq_length=8)
    cond = dict(encoder_hidden_states=_randn(B, 8, 8, seed=1))  # must be max_text_seq_length long
    return _fixture("CogVideoXTransformer3DModel", config, cond, (B, 1, 4, 8, 8))


def mochi():
    config = dict(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=4, pooled_projection_dim=16,
                  in_channels=4, out_channels=None, qk_norm="rms_norm", text_embed_dim=16, time_embed_dim=4,
                  activation_fn="swiglu", max_sequence_length=16)
    cond = dict(encoder_hidden_states=_randn(B, TXT, 16, seed=1),
                encoder_attention_mask=torch.ones(B, TXT, dtype=torch.bool))
    return _fixture("MochiTransformer3DModel", config, cond, (B, 4, 2, 8, 8))


def chroma():
    config = dict(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
                  num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=[4, 4, 8], approximator_num_channels=8,
                  approximator_hidden_dim=16, approximator_layers=1)
    cond = dict(encoder_hidden_states=_randn(B, TXT, 32, seed=1), img_ids=_randn(16, 3, seed=3),
                txt_ids=_randn(TXT, 3, seed=4))
    return _fixture("ChromaTransformer2DModel", config, cond, (B, 16, 4), t_scale=1.0)


def hidream():
    # one Llama layer per block: llama_layers needs num_layers + num_single_layers entries
    config = dict(patch_size=2, in_channels=4, out_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=8,
                  num_attention_heads=4, caption_channels=[8, 4], text_emb_dim=8, num_routed_experts=2,
                  num_activated_experts=2, axes_dims_rope=(4, 2, 2), max_resolution=(32, 32),
                  llama_layers=(0, 1, 2, 3), force_inference_output=True)
    cond = dict(encoder_hidden_states_t5=_randn(B, TXT, 8, seed=1),
                encoder_hidden_states_llama3=_randn(4, B, TXT, 4, seed=2), pooled_embeds=_randn(B, 8, seed=3))
    return _fixture("HiDreamImageTransformer2DModel", config, cond, (B, 4, 8, 8), t_key="timesteps")


def allegro():
    config = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=4,
                  cross_attention_dim=16, sample_width=8, sample_height=8, sample_frames=8, caption_channels=8)
    cond = dict(encoder_hidden_states=_randn(B, TXT, 8, seed=1))
    return _fixture("AllegroTransformer3DModel", config, cond, (B, 4, 2, 8, 8))


TINY_DITS: dict[str, Callable[[], tuple[nn.Module, Callable[[int], dict]]]] = {
    "SD3Transformer2DModel": sd3,
    "FluxTransformer2DModel": flux,
    "Flux2Transformer2DModel": flux2,
    "PixArtTransformer2DModel": pixart,
    "SanaTransformer2DModel": sana,
    "HunyuanDiT2DModel": hunyuan_dit,
    "AuraFlowTransformer2DModel": auraflow,
    "Lumina2Transformer2DModel": lumina2,
    "CogView4Transformer2DModel": cogview4,
    "QwenImageTransformer2DModel": qwenimage,
    "WanTransformer3DModel": wan,
    "HunyuanVideoTransformer3DModel": hunyuan_video,
    "LTXVideoTransformer3DModel": ltx,
    "CogVideoXTransformer3DModel": cogvideox,
    "MochiTransformer3DModel": mochi,
    "ChromaTransformer2DModel": chroma,
    "HiDreamImageTransformer2DModel": hidream,
    "AllegroTransformer3DModel": allegro,
}


def sample_of(output) -> torch.Tensor:
    """The denoiser's output tensor, whatever the class returns (tensor, tuple or a diffusers output)."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "sample"):
        return output.sample
    return output[0]
