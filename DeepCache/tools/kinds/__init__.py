"""The one place that knows what kind of pipeline a command holds: how to load it, call it, count it and score it.

A **kind** wraps one loaded diffusers pipeline and answers every question the commands (``bench``, ``eval``,
``demo``, ``generate``, ``tune``) ask about it; nothing else in the tools looks at ``pipe.unet`` or
``pipe.transformer`` or at the demo model's marker file. Two kinds share the interface of :class:`PipelineKind`:

* :class:`~.unet.UNetKind` (:mod:`.unet`): SD/SDXL U-Net pipelines, and the embedded demo model (a U-Net whose
  captions the shipped classifier can check);
* :class:`~.transformer.TransformerKind` (:mod:`.transformer`): diffusion-transformer pipelines (PixArt, Sana, SD3,
  Flux, ...). A folder without a text encoder gets prompt embeddings seeded by each prompt's text
  (:mod:`.embeddings`), labelled as such in every report.

**Decided once, passed down.** :func:`load_kind` decides the kind where the pipeline is loaded (``--model``: by the
folder, before loading it) and the commands hand that kind on; the modules below them (``quality``, ``runs``,
``scoring``, ``report``) take it and never ask again. :func:`kind_of` is the door for code that holds a bare
pipeline (``deepcache tune``, library callers of ``evaluate(pipe, ...)``): it decides the kind of a loaded pipeline,
and returns a kind as it is.

A new family is one more module here with one more class: :func:`kind_of` and :func:`load_kind` pick it.

Example::

    >>> from DeepCache.tools.kinds import load_kind
    >>> kind = load_kind()                 # the embedded demo model, offline
    >>> kind.family, kind.embedded, kind.default_batch_size
    ('unet', True, 16)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..demo_model import EMBEDDED_DIT, EMBEDDED_DIT_NAME
from .base import PipelineKind
from .transformer import TransformerKind
from .unet import UNetKind

__all__ = ["KINDS", "PipelineKind", "TransformerKind", "UNetKind", "default_batch_size", "denoiser_name", "kind_of",
           "load_kind", "resolve_model"]

#: Every kind, in the order :func:`kind_of` asks them (the first that claims a pipeline or folder wins).
KINDS: tuple[type[PipelineKind], ...] = (TransformerKind, UNetKind)


def kind_of(pipe: Any) -> PipelineKind:
    """The kind of a loaded pipeline (a kind is returned as is): the door for code that holds a bare pipeline."""
    if isinstance(pipe, PipelineKind):
        return pipe
    for cls in KINDS:
        if cls.claims(pipe):
            return cls(pipe)
    raise ValueError(f"the tools run U-Net and transformer pipelines; a {type(pipe).__name__} has neither a `unet` "
                     "nor a `transformer`.")


def denoiser_name(family: str | None) -> str:
    """How reports name a kind's denoiser (:attr:`PipelineKind.family`; ``None``: a U-Net, as reports written before
    transformers, whose meta has no family).

    >>> denoiser_name("unet"), denoiser_name("transformer"), denoiser_name(None)
    ('U-Net', 'transformer', 'U-Net')
    """
    return "transformer" if family == TransformerKind.family else "U-Net"


def resolve_model(model: str | Path | None) -> str | Path | None:
    """``--model`` as the loaders take it: ``"embedded-dit"`` is the shipped DiT's folder (unless a folder of that name
    exists here); anything else as given (``None``: the embedded U-Net).

    >>> resolve_model("embedded-dit") == EMBEDDED_DIT, resolve_model("./sd15"), resolve_model(None)
    (True, './sd15', None)
    """
    if model is not None and str(model) == EMBEDDED_DIT_NAME and not Path(model).exists():
        return EMBEDDED_DIT
    return model


def _folder_kind(model: str | Path | None) -> type[PipelineKind]:
    """The kind that claims a resolved ``model`` folder (:func:`resolve_model`); the U-Net kind otherwise."""
    if model is not None:
        for cls in KINDS:
            if cls.claims_folder(Path(model).expanduser()):
                return cls
    return UNetKind


def load_kind(model: str | None = None, device: str | torch.device = "cpu",
              dtype: torch.dtype | None = None) -> PipelineKind:
    """Load ``model`` (``None``: the embedded demo model, offline; ``"embedded-dit"``: the shipped tiny Flux DiT,
    offline; else a local folder or a cached hub id) as its kind.

    A local folder is read with ``local_files_only``; ``dtype`` (default: the weights' own) is passed as
    ``torch_dtype``. The progress bar of generation is switched off.
    """
    model = resolve_model(model)
    return _folder_kind(model).load(model, device, dtype)


def default_batch_size(model: Any) -> int:
    """Images per pipeline call when the user does not say, for a pipeline, a kind, a folder or ``None`` (the embedded
    demo model): 16 for the tiny demo model, which batches well; 1 for anything else, which may not fit 16 at once.

    >>> default_batch_size(None), default_batch_size("./my-sd-pipeline")
    (16, 1)
    """
    if model is None or isinstance(model, (str, Path)):
        model = resolve_model(model)
        return _folder_kind(model).folder_batch_size(model)
    return kind_of(model).default_batch_size
