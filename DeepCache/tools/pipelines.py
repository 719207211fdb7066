"""Devices and dtypes, and how a header names a run's model (:func:`model_name`); everything about the pipeline itself
is asked of its kind (:mod:`DeepCache.tools.kinds`), which the commands decide once at load and pass down.
``load_pipeline``, ``is_demo_pipeline``, ``demo_classifier_path``, ``default_batch_size``, ``call_batch``,
``pipeline_device`` and ``run_meta`` are the kinds' answers under their former names, for code that holds a bare
pipeline (``deepcache tune``): each decides the pipeline's kind (:func:`~DeepCache.tools.kinds.kind_of`) and asks it.

Example::

    >>> from DeepCache.tools.pipelines import is_demo_pipeline, load_pipeline
    >>> pipe = load_pipeline()            # the embedded tiny SD pipeline, no download
    >>> is_demo_pipeline(pipe), type(pipe).__name__
    (True, 'StableDiffusionPipeline')
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from .kinds import default_batch_size, kind_of, load_kind

DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16,
                                  "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}

__all__ = ["DTYPES", "call_batch", "default_batch_size", "demo_classifier_path", "is_demo_pipeline", "load_pipeline", "model_name",
           "pipeline_device", "resolve_device", "resolve_dtype", "run_meta"]


def load_pipeline(model: str | None = None, device: str | torch.device = "cpu",
                  dtype: torch.dtype | None = None) -> Any:
    """The embedded demo pipeline (``model=None``, offline) or any diffusers pipeline folder / hub id
    (:func:`DeepCache.tools.kinds.load_kind`, which knows U-Nets and transformers)."""
    return load_kind(model, device, dtype).pipe


def is_demo_pipeline(pipe: Any) -> bool:
    """Whether ``pipe`` was loaded from a folder written by ``deepcache train-demo-model`` (captions checkable)."""
    return kind_of(pipe).embedded


def demo_classifier_path(pipe: Any) -> Path | None:
    """The classifier trained beside a demo pipeline (``../demo-classifier``), if there is one."""
    return kind_of(pipe).classifier


def call_batch(pipe: Any, prompts: Sequence[str], seeds: Sequence[int], *, steps: int, guidance: float,
               negative_prompts: Sequence[str | None] | None = None, output_type: str = "np",
               height: int | None = None, width: int | None = None) -> Any:
    """One pipeline call for a batch of seeded prompts: :meth:`DeepCache.tools.kinds.PipelineKind.call`."""
    return kind_of(pipe).call(prompts, seeds, steps=steps, guidance=guidance, negative_prompts=negative_prompts,
                              output_type=output_type, height=height, width=width)


def resolve_device(name: str | None) -> torch.device:
    """``auto``/None -> CUDA when available, else CPU; ``cpu``, ``cuda``, ``cuda:N`` as given (checked)."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N.") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} requested but torch sees no CUDA device.")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` -> float16 on CUDA, float32 elsewhere; otherwise the named dtype."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose auto, float16, bfloat16 or float32.")
    return DTYPES[name]


def pipeline_device(pipe: Any) -> tuple[torch.device, torch.dtype]:
    """The device and dtype the pipeline's denoiser (U-Net or transformer) runs in."""
    kind = kind_of(pipe)
    return kind.device, kind.dtype


def run_meta(pipe: Any, steps: int, guidance: float, prompts: Sequence[str], seeds: Sequence[int],
             **more: Any) -> dict[str, Any]:
    """What a report says about the run: :meth:`DeepCache.tools.kinds.PipelineKind.run_meta`."""
    return kind_of(pipe).run_meta(steps, guidance, prompts, seeds, **more)


def model_name(meta: dict[str, Any]) -> str:
    """How a header names the model of a :func:`run_meta`.

    >>> model_name({"embedded": True, "model": "x"}), model_name({"embedded": False, "model": "./sd15"})
    ('embedded demo model (offline)', './sd15')
    >>> model_name({"embedded": True, "model": "x", "family": "transformer"})
    'embedded demo DiT (offline)'
    """
    if not meta["embedded"]:
        return meta["model"]
    return "embedded demo DiT (offline)" if meta.get("family") == "transformer" else "embedded demo model (offline)"
