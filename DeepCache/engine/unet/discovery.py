"""Which modules of a U-Net or ControlNet DeepCache wraps, and which U-Nets it supports.

Pure reading of a model's structure: nothing here changes a module. :func:`unet_layout` turns a U-Net into the
:class:`~DeepCache.engine.unet.layout.UNetLayout` the retrieval plan is computed on; :func:`unet_modules` and
:func:`controlnet_modules` list the wrapped modules under their :class:`~DeepCache.engine.unet.layout.ModuleKey`, in the
order the tables of actions (:func:`~DeepCache.engine.unet.layout.retrieval_action`) are indexed.
"""

from __future__ import annotations

from typing import Any, Iterator

from torch import nn

from .layout import Action, ModuleKey, Site, UNetLayout, retrieval_action, retrieval_plan

# U-Net classes whose forward follows the skip-connection model of DeepCache.engine.unet.layout and that the
# test-suite covers. Others get a clear error instead of a silent no-op.
SUPPORTED_UNETS = (
    "UNet2DConditionModel",  # SD 1.x/2.x, SDXL (+ img2img, inpaint, refiner, ControlNet, T2I-Adapter, IP-Adapter)
    "UNet2DModel",  # DDPM / DDIM / LDM pipelines
    "UNetSpatioTemporalConditionModel",  # Stable Video Diffusion
    "UNetMotionModel",  # AnimateDiff
    "UNet3DConditionModel",  # text-to-video (TextToVideoSDPipeline, VideoToVideoSDPipeline)
)

# Blocks that do not follow the skip-connection model: skip-sample blocks thread a second running
# sample through the up path (a skipped up block would corrupt it); k-diffusion up blocks consume one
# skip connection per block instead of one per layer.
_UNSUPPORTED_BLOCKS = ("KDownBlock2D", "KCrossAttnDownBlock2D", "KUpBlock2D", "KCrossAttnUpBlock2D")

# The modules of one layer, in the order a block applies them (a block has a subset of these lists):
# UNet2DConditionModel resnet -> attention; UNetMotionModel resnet -> attention -> motion module;
# UNet3DConditionModel resnet -> temporal conv -> attention -> temporal attention.
_LAYER_LISTS = ("resnets", "temp_convs", "attentions", "temp_attentions", "motion_modules")


def unwrap_unet(module: Any) -> Any:
    """The U-Net inside a ``torch.compile`` wrapper (``OptimizedModule``), or ``module`` itself."""
    return getattr(module, "_orig_mod", module)


def check_supported_unet(unet: Any) -> None:
    """Raise ``TypeError`` naming the supported classes if ``unet`` cannot be cached."""
    names = {cls.__name__ for cls in type(unet).__mro__}
    if not isinstance(unet, nn.Module) or not names.intersection(SUPPORTED_UNETS):
        raise TypeError(
            f"DeepCache cannot cache a {type(unet).__name__}: supported U-Nets are {', '.join(SUPPORTED_UNETS)} "
            "(pass a diffusers pipeline whose `unet` is one of them, or the U-Net itself)."
        )
    for kind in ("down_blocks", "up_blocks"):
        for i, block in enumerate(getattr(unet, kind, None) or ()):
            name = type(block).__name__
            if hasattr(block, "skip_conv") or name in _UNSUPPORTED_BLOCKS or not hasattr(block, "resnets"):
                raise TypeError(
                    f"DeepCache cannot cache this {type(unet).__name__}: {kind}[{i}] is a {name}, whose skip connections "
                    "do not follow the layout DeepCache caches (one skip per layer, consumed one per up layer). "
                    "Skip-sample blocks (Skip*/AttnSkip*) and k-diffusion blocks (K*) are not supported."
                )


def sampler(block: nn.Module, name: str) -> nn.Module | None:
    """The first of a block's ``downsamplers``/``upsamplers``, if it has one."""
    samplers = getattr(block, name, None)
    return samplers[0] if samplers is not None and len(samplers) > 0 else None


def layer_modules(block: nn.Module, index: int) -> list[nn.Module]:
    """The modules that make up layer ``index`` of a down/up block, in the order the block runs them."""
    modules = []
    for name in _LAYER_LISTS:
        seq = getattr(block, name, None)
        if isinstance(seq, nn.ModuleList) and index < len(seq) and seq[index] is not None:
            modules.append(seq[index])
    return modules


def down_counts(net: nn.Module) -> tuple[tuple[int, bool], ...]:
    """(layers, has a downsampler) per down block of a U-Net or ControlNet."""
    return tuple((len(block.resnets), sampler(block, "downsamplers") is not None) for block in net.down_blocks)


def unet_layout(unet: nn.Module) -> UNetLayout:
    """Read the skip-connection layout of a (supported) U-Net."""
    check_supported_unet(unet)
    up = [(len(block.resnets), sampler(block, "upsamplers") is not None) for block in unet.up_blocks]
    return UNetLayout.from_counts(list(down_counts(unet)), up, has_mid=getattr(unet, "mid_block", None) is not None)


def _down_path(net: nn.Module) -> Iterator[tuple[ModuleKey, nn.Module]]:
    for i, block in enumerate(net.down_blocks):
        yield ModuleKey(Site.DOWN_BLOCK, i), block
        for j in range(len(block.resnets)):
            modules = layer_modules(block, j)
            for m, module in enumerate(modules):
                yield ModuleKey(Site.DOWN_LAYER, i, j, m, len(modules)), module
        down = sampler(block, "downsamplers")
        if down is not None:
            yield ModuleKey(Site.DOWN_SAMPLER, i), down


def unet_modules(unet: nn.Module) -> list[tuple[ModuleKey, nn.Module]]:
    """The U-Net modules DeepCache wraps: down blocks with their layers and samplers, the mid block, up blocks
    with their layers (up samplers run inside their block)."""
    modules = list(_down_path(unet))
    modules.append((ModuleKey(Site.MID), unet.mid_block))
    for u, block in enumerate(unet.up_blocks):
        modules.append((ModuleKey(Site.UP_BLOCK, u), block))
        for j in range(len(block.resnets)):
            layer = layer_modules(block, j)
            modules += [(ModuleKey(Site.UP_LAYER, u, j, m, len(layer)), module) for m, module in enumerate(layer)]
    return modules


def controlnet_modules(controlnet: nn.Module) -> list[tuple[ModuleKey, nn.Module]]:
    """The ControlNet modules DeepCache wraps: its down path, mid block and zero convolutions."""
    modules = list(_down_path(controlnet))
    modules.append((ModuleKey(Site.MID), controlnet.mid_block))
    modules += [(ModuleKey(Site.CONTROL_SKIP, s), conv) for s, conv in enumerate(controlnet.controlnet_down_blocks)]
    modules.append((ModuleKey(Site.CONTROL_MID), controlnet.controlnet_mid_block))
    return modules


def controlnets_of(pipeline: Any) -> list[nn.Module]:
    """The ControlNet modules of a pipeline (the nets inside a ``MultiControlNetModel`` too)."""
    controlnet = getattr(pipeline, "controlnet", None)
    nets = getattr(controlnet, "nets", None)
    candidates = list(nets) if nets is not None else [controlnet]
    return [unwrap_unet(c) for c in candidates if isinstance(unwrap_unet(c), nn.Module)]


def boundary_module(unet: nn.Module, branch: int) -> nn.Module:
    """The module whose output is the cached feature for ``branch`` (what calibration measures)."""
    plan = retrieval_plan(unet_layout(unet), branch)
    return next(module for key, module in unet_modules(unet) if retrieval_action(plan, key) is Action.BOUNDARY)
