"""The engine: wire the pure retrieval plan (:mod:`DeepCache.engine.unet.layout`) and schedules (:mod:`DeepCache.schedules.schedule`)
into live diffusers modules. One room per concern:

* :mod:`.discovery` -- which modules of a U-Net / ControlNet are wrapped, supported classes, the layout;
* :mod:`.state` -- a generation's state and step decisions, a pure state machine driven by events
  (mode-specific state in small types: :class:`~.state.ReuseFeature`, where feature forecasting plugs in,
  and :class:`~.state.AdaptiveState`);
* :mod:`.forecast_feature` -- :class:`~.forecast_feature.ForecastFeature`, the cached feature extrapolated from the
  last two full steps (``forecast="linear"``);
* :mod:`.lifecycle` -- leases, the install lock, the evaluation guard, running generations;
* :mod:`.wrappers` -- the module wrappers and the root wrapper around one evaluation;
* :mod:`.model_patch` -- what a patch on a denoiser shares across families;
* :mod:`.unet`, :mod:`.controlnet` -- the U-Net family's patches; :mod:`.transformer` (plan: :mod:`.dit_layout`,
  reading a model: :mod:`.dit_discovery`) -- the transformer family's;
* :mod:`.families` -- the one place that tells the families apart (supported classes, layouts, parameters, leases);
* :mod:`.tensors` -- placeholders, version stamps, copies.

**Which generation an evaluation belongs to**: the innermost generation of this U-Net opened in the caller's
context (:func:`~.lifecycle.running`, a ``contextvars`` variable set by the pipeline call), else the generation of
an enabled bare-U-Net helper, else none (the wrapped modules run untouched).

**The lifecycle rule: no exception wedges it.** Whatever is raised anywhere inside an evaluation (``Exception``,
``KeyboardInterrupt``, ``SystemExit``, ``GeneratorExit``), in a cached or uncached call, a pipeline or a bare U-Net,
the U-Net or a ControlNet, a full or a retrieval step, the main thread or a worker:

1. the evaluation guard is released and the mode cleared by the ``finally`` of the root wrapper
   (:func:`~.wrappers.evaluate`), never by a forward hook (torch skips ``always_call`` hooks on ``BaseException``);
2. the generation drops what the evaluation may have half-written (:meth:`~.state.Generation.abort`), and a
   pipeline call's generation is freed by the ``finally`` of :func:`~.lifecycle.running`;
3. so the next call completes and equals a fresh run, ``enable()``/``disable()`` from any thread return, and after
   the last ``disable()`` no wrapper and no hook is left (``tests/test_lifecycle.py`` checks it as a matrix).

The locks and shared variables, what each protects and who may wait for whom: ``docs/design.md``.
"""

from .unet.controlnet import ControlNetPatch, acquire_controlnet
from .families import acquire, acquire_all, check_params, check_supported, denoiser_of, extra_denoisers, layout_of, conditioning_reader_of
from .unet.discovery import (
    SUPPORTED_UNETS,
    boundary_module,
    check_supported_unet,
    controlnet_modules,
    controlnets_of,
    layer_modules,
    unet_layout,
    unet_modules,
    unwrap_unet,
)
from .lifecycle import DeepCacheWarning, Lease, running, running_call
from .state import Generation, Mode
from .tensors import NAN_PLACEHOLDERS_ENV, relative_l1
from .transformer.discovery import is_transformer
from .transformer.patch import TransformerPatch
from .unet.patch import UNetPatch, warn_view_with_other_unet

__all__ = [
    "NAN_PLACEHOLDERS_ENV",
    "SUPPORTED_UNETS",
    "ControlNetPatch",
    "DeepCacheWarning",
    "Generation",
    "Lease",
    "Mode",
    "UNetPatch",
    "TransformerPatch",
    "acquire",
    "acquire_all",
    "acquire_controlnet",
    "check_params",
    "check_supported",
    "conditioning_reader_of",
    "denoiser_of",
    "extra_denoisers",
    "is_transformer",
    "layout_of",
    "boundary_module",
    "check_supported_unet",
    "controlnet_modules",
    "controlnets_of",
    "layer_modules",
    "relative_l1",
    "running",
    "running_call",
    "unet_layout",
    "unet_modules",
    "unwrap_unet",
    "warn_view_with_other_unet",
]
