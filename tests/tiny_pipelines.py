"""Tiny random components for every supported pipeline family (CPU, offline: built from configs only).

Sizes: latents 16x16 (images 32x32, the tiny VAE downsamples by 2), 2 layers per block everywhere so
that the original DeepCache rule (block = id // 3, layer = id % 3) is an applicable reference.
"""

from __future__ import annotations

import torch
from diffusers import (
    AnimateDiffPipeline,
    AutoencoderKLTemporalDecoder,
    ControlNetModel,
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    EulerDiscreteScheduler,
    LDMPipeline,
    MotionAdapter,
    StableDiffusionAdapterPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableVideoDiffusionPipeline,
    T2IAdapter,
    TextToVideoSDPipeline,
    UNet2DModel,
    UNet3DConditionModel,
    UNetSpatioTemporalConditionModel,
    VideoToVideoSDPipeline,
    VQModel,
)

from .tiny import (
    POOLED_DIM,
    TEXT_DIM,
    tiny_sd_pipe,
    tiny_sd_unet,
    tiny_sdxl_unet,
    tiny_vae,
)

IMAGE = 32  # pixel size of every tiny pipeline's images


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _ddim() -> DDIMScheduler:
    return DDIMScheduler(steps_offset=1, clip_sample=False)


def image(seed: int = 2, channels: int = 3, size: int = IMAGE, batch: int = 1) -> torch.Tensor:
    """A random image in [0, 1] (what image processors accept as a tensor)."""
    return torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def mask(size: int = IMAGE) -> torch.Tensor:
    """An inpainting mask: the right half is repainted."""
    m = torch.zeros(1, 1, size, size)
    m[..., size // 2 :] = 1.0
    return m


# -- Stable Diffusion 1.x/2.x family -------------------------------------------------------------------


def sd_img2img_pipe() -> StableDiffusionImg2ImgPipeline:
    return _quiet(StableDiffusionImg2ImgPipeline.from_pipe(tiny_sd_pipe()))


def sd_inpaint_pipe(channels: int = 9) -> StableDiffusionInpaintPipeline:
    """``channels=9``: a dedicated inpainting U-Net (latents + mask + masked image); 4: a text-to-image U-Net."""
    return _quiet(StableDiffusionInpaintPipeline.from_pipe(tiny_sd_pipe(unet=tiny_sd_unet(in_channels=channels))))


def tiny_controlnet(unet=None, seed: int = 3) -> ControlNetModel:
    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(
        unet if unet is not None else tiny_sd_unet(), conditioning_embedding_out_channels=(4, 8), load_weights_from_unet=False
    )
    # from_unet zero-initialises the residual projections (a ControlNet that adds nothing): randomise them
    with torch.no_grad():
        for module in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            module.weight.normal_(0, 0.3)
    return controlnet.eval()


def sd_controlnet_pipe(num_controlnets: int = 1) -> StableDiffusionControlNetPipeline:
    base = tiny_sd_pipe()
    nets = [tiny_controlnet(seed=3 + i) for i in range(num_controlnets)]
    return _quiet(
        StableDiffusionControlNetPipeline(
            vae=base.vae,
            text_encoder=None,
            tokenizer=None,
            unet=base.unet,
            controlnet=nets[0] if num_controlnets == 1 else nets,
            scheduler=base.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    )


def tiny_t2i_adapter(seed: int = 4) -> T2IAdapter:
    torch.manual_seed(seed)
    return T2IAdapter(in_channels=3, channels=[8, 8, 16, 16], num_res_blocks=1, downscale_factor=2).eval()


def sd_adapter_pipe() -> StableDiffusionAdapterPipeline:
    base = tiny_sd_pipe()
    return _quiet(
        StableDiffusionAdapterPipeline(
            vae=base.vae,
            text_encoder=None,
            tokenizer=None,
            unet=base.unet,
            adapter=tiny_t2i_adapter(),
            scheduler=base.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    )


# -- SDXL family ------------------------------------------------------------------------------------------


def tiny_refiner_unet(seed: int = 5):
    """An SDXL refiner-like U-Net: aesthetic-score time ids (5 numbers instead of 6)."""
    return tiny_sdxl_unet(seed=seed, projection_class_embeddings_input_dim=POOLED_DIM + 5 * 4)


def _sdxl_parts(unet=None) -> dict:
    return dict(
        vae=tiny_vae(),
        text_encoder=None,
        text_encoder_2=None,
        tokenizer=None,
        tokenizer_2=None,
        unet=unet if unet is not None else tiny_sdxl_unet(),
        scheduler=_ddim(),
    )


def sdxl_img2img_pipe(unet=None, refiner: bool = False) -> StableDiffusionXLImg2ImgPipeline:
    return _quiet(StableDiffusionXLImg2ImgPipeline(**_sdxl_parts(unet), requires_aesthetics_score=refiner))


def sdxl_inpaint_pipe(channels: int = 4) -> StableDiffusionXLInpaintPipeline:
    return _quiet(StableDiffusionXLInpaintPipeline(**_sdxl_parts(tiny_sdxl_unet(in_channels=channels))))


def sdxl_controlnet_pipe() -> StableDiffusionXLControlNetPipeline:
    parts = _sdxl_parts()
    return _quiet(StableDiffusionXLControlNetPipeline(**parts, controlnet=tiny_controlnet(parts["unet"])))


# -- IP-Adapter and LoRA (adapter layers built from config, never from the hub) ---------------------------


IMAGE_EMBED_DIM = 8


def load_tiny_ip_adapter(unet, seed: int = 6) -> None:
    """Load a random IP-Adapter (an "image_proj" and per cross-attention "to_k_ip"/"to_v_ip") into ``unet``."""
    g = torch.Generator().manual_seed(seed)
    cross, tokens = unet.config.cross_attention_dim, 4  # diffusers' loader fixes 4 image tokens
    image_proj = {
        "proj.weight": torch.randn(tokens * cross, IMAGE_EMBED_DIM, generator=g) * 0.3,
        "proj.bias": torch.randn(tokens * cross, generator=g) * 0.3,
        "norm.weight": torch.ones(cross),
        "norm.bias": torch.zeros(cross),
    }
    ip_layers = {}
    key_id = 1  # the loader numbers cross-attention processors 1, 3, 5, ... in attn_processors order
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        hidden = _hidden_size(unet, name)
        for kind in ("to_k_ip", "to_v_ip"):
            ip_layers[f"{key_id}.{kind}.weight"] = torch.randn(hidden, cross, generator=g) * 0.3
        key_id += 2
    unet._load_ip_adapter_weights([{"image_proj": image_proj, "ip_adapter": ip_layers}], low_cpu_mem_usage=False)


def _hidden_size(unet, name: str) -> int:
    channels = unet.config.block_out_channels
    if name.startswith("mid_block"):
        return channels[-1]
    if name.startswith("up_blocks"):
        return list(reversed(channels))[int(name.split(".")[1])]
    return channels[int(name.split(".")[1])]


def add_tiny_lora(unet, seed: int = 7, rank: int = 2) -> None:
    """A random (non-zero) PEFT LoRA on every attention projection of ``unet``."""
    from peft import LoraConfig

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    unet.add_adapter(config)


# -- Stable Video Diffusion -------------------------------------------------------------------------------


def tiny_svd_unet(seed: int = 0) -> UNetSpatioTemporalConditionModel:
    torch.manual_seed(seed)
    return UNetSpatioTemporalConditionModel(
        sample_size=8,
        in_channels=8,
        out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        block_out_channels=(32, 64),  # its resnets hard-code 32 norm groups
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=3 * 4,
        layers_per_block=2,
        cross_attention_dim=IMAGE_EMBED_DIM,
        num_attention_heads=(2, 4),
        num_frames=2,
    ).eval()


def svd_pipe() -> StableVideoDiffusionPipeline:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    torch.manual_seed(8)
    vae = AutoencoderKLTemporalDecoder(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        block_out_channels=(32, 32),
        layers_per_block=1,
        latent_channels=4,
    ).eval()
    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=8,
            projection_dim=IMAGE_EMBED_DIM,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=16,
            image_size=IMAGE,
            patch_size=8,
        )
    ).eval()
    extractor = CLIPImageProcessorPil(crop_size=IMAGE, size={"shortest_edge": IMAGE})
    return _quiet(
        StableVideoDiffusionPipeline(
            vae=vae, image_encoder=encoder, unet=tiny_svd_unet(), scheduler=EulerDiscreteScheduler(), feature_extractor=extractor
        )
    )


# -- UNet2DModel (the paper's DDPM experiments) ----------------------------------------------------------


def tiny_unet2d(seed: int = 0, **overrides: object) -> UNet2DModel:
    torch.manual_seed(seed)
    config = dict(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        layers_per_block=2,
        block_out_channels=(8, 16, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=4,
        norm_num_groups=4,
    )
    config.update(overrides)
    return UNet2DModel(**config).eval()


def ddpm_pipe() -> DDPMPipeline:
    return _quiet(DDPMPipeline(unet=tiny_unet2d(), scheduler=DDPMScheduler(num_train_timesteps=1000)))


def ddim_pipe() -> DDIMPipeline:
    return _quiet(DDIMPipeline(unet=tiny_unet2d(), scheduler=_ddim()))


def ldm_pipe() -> LDMPipeline:
    torch.manual_seed(9)
    vqvae = VQModel(
        in_channels=3,
        out_channels=3,
        latent_channels=3,
        block_out_channels=(8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        num_vq_embeddings=16,
    ).eval()
    return _quiet(LDMPipeline(vqvae=vqvae, unet=tiny_unet2d(), scheduler=_ddim()))


# -- AnimateDiff (UNetMotionModel) ------------------------------------------------------------------------


def animatediff_pipe() -> AnimateDiffPipeline:
    base = tiny_sd_pipe()
    torch.manual_seed(10)
    adapter = MotionAdapter(
        block_out_channels=(8, 8, 16, 16),
        motion_layers_per_block=2,
        motion_norm_num_groups=4,
        motion_num_attention_heads=2,
        motion_max_seq_length=8,
    ).eval()
    return _quiet(
        AnimateDiffPipeline(
            vae=base.vae, text_encoder=None, tokenizer=None, unet=base.unet, motion_adapter=adapter, scheduler=base.scheduler
        )
    )


# -- Text-to-video (UNet3DConditionModel) -----------------------------------------------------------------


def tiny_unet3d(seed: int = 0) -> UNet3DConditionModel:
    torch.manual_seed(seed)
    return UNet3DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=2,
        norm_num_groups=4,
    ).eval()


def text_to_video_pipe() -> TextToVideoSDPipeline:
    base = tiny_sd_pipe()
    return _quiet(
        TextToVideoSDPipeline(vae=base.vae, text_encoder=None, tokenizer=None, unet=tiny_unet3d(), scheduler=base.scheduler)
    )


def video_to_video_pipe() -> VideoToVideoSDPipeline:
    return _quiet(VideoToVideoSDPipeline.from_pipe(text_to_video_pipe()))
