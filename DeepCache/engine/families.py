"""The denoiser families DeepCache caches, and the one place that tells them apart.

A U-Net (:mod:`.unet`: skip connections, :mod:`DeepCache.engine.unet.layout`) or a diffusion transformer (:mod:`.transformer`:
a block stack, :mod:`.dit_layout`). Everything above the engine (the helper, calibration) asks here, never checks
a class itself.
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from .unet.layout import UNetLayout, retrieval_plan
from ..schedules.params import CacheParams
from .unet.discovery import SUPPORTED_UNETS, check_supported_unet, unet_layout, unwrap_unet
from .transformer.layout import SUPPORTED_TRANSFORMERS, DiTLayout
from .lifecycle import Lease
from .transformer.discovery import check_supported_transformer, conditioning_reader, dit_layout, is_transformer
from .transformer.patch import acquire_transformer
from .unet.patch import acquire as acquire_unet

#: The attributes of a pipeline that hold its denoiser, in the order they are looked for.
DENOISER_ATTRIBUTES = ("unet", "transformer")


def check_supported(model: Any) -> None:
    """Raise ``TypeError`` naming the supported classes if ``model`` (a bare U-Net or transformer) cannot be cached."""
    if is_transformer(model):
        check_supported_transformer(model)
    elif isinstance(model, nn.Module) and not any(c.__name__ in SUPPORTED_UNETS for c in type(model).__mro__):
        raise TypeError(
            f"DeepCache cannot cache a {type(model).__name__}: supported U-Nets are {', '.join(SUPPORTED_UNETS)}; "
            f"supported transformers are {', '.join(SUPPORTED_TRANSFORMERS)} (pass a diffusers pipeline whose `unet` or "
            "`transformer` is one of them, or the model itself)."
        )
    else:
        check_supported_unet(model)


def denoiser_of(pipeline: Any) -> Any:
    """The pipeline's U-Net or transformer (unwrapped from ``torch.compile``), or None."""
    for name in DENOISER_ATTRIBUTES:
        model = getattr(pipeline, name, None)
        if model is not None:
            return unwrap_unet(model)
    return None


def extra_denoisers(pipeline: Any) -> list[nn.Module]:
    """The pipeline's other transformers that take over part-way through a call (Wan 2.2's ``transformer_2``)."""
    model = unwrap_unet(getattr(pipeline, "transformer_2", None))
    if model is None:
        return []
    check_supported(model)
    return [model]


def layout_of(model: nn.Module) -> UNetLayout | DiTLayout:
    """The U-Net's skip-connection layout or the transformer's block stack."""
    return dit_layout(model) if is_transformer(model) else unet_layout(model)


def check_params(model: nn.Module, params: CacheParams) -> None:
    """Raise ``ValueError`` (naming the valid values) if ``params`` do not fit ``model``."""
    layout = layout_of(model)
    if isinstance(layout, DiTLayout):
        layout.split(params.cache_branch_id, params.front_blocks, params.back_blocks)
        return
    if params.front_blocks is not None:
        raise ValueError("front_blocks / back_blocks split a transformer's blocks; for a U-Net use cache_branch_id "
                         f"(0..{layout.num_branches - 1}), and leave front_blocks and back_blocks unset.")
    retrieval_plan(layout, params.cache_branch_id)


def conditioning_reader_of(model: nn.Module) -> Any:
    """For a transformer, ``read(args, kwargs)`` -> a call's conditioning tensor (its CFG branch's key); None for a
    U-Net (one branch)."""
    return conditioning_reader(model) if is_transformer(model) else None


def acquire(model: nn.Module) -> Lease:
    """Install (or join) the patch of ``model``'s family; the lease keeps it until released or dropped."""
    return acquire_transformer(model) if is_transformer(model) else acquire_unet(model)


def acquire_all(model: nn.Module, extras: Sequence[nn.Module] = ()) -> Lease:
    """:func:`acquire` ``model`` and the pipeline's other denoisers ``extras`` (:func:`extra_denoisers`), held as the
    lease's :attr:`~.lifecycle.Lease.extras` and released with it."""
    lease = acquire(model)
    try:
        for extra in extras:
            lease.extras.append(acquire(extra))
    except BaseException:
        lease.release()
        raise
    return lease
