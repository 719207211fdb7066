"""Load the pipeline ``deepcache eval``/``demo``/``tune``/``generate`` run (the embedded demo model, offline, or any
local or hub one), call it on a batch of seeded prompts the one way they all do (:func:`call_batch`), and say what ran
(:func:`run_meta`).

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

from .demo_model import CLASSIFIER_DIR, EMBEDDED_MODEL, is_demo_pipeline_dir

DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16,
                                  "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}

__all__ = ["DTYPES", "call_batch", "default_batch_size", "demo_classifier_path", "is_demo_pipeline", "load_pipeline", "model_name",
           "pipeline_device", "resolve_device", "resolve_dtype", "run_meta"]


def load_pipeline(model: str | None = None, device: str | torch.device = "cpu",
                  dtype: torch.dtype | None = None) -> Any:
    """The embedded demo pipeline (``model=None``, offline) or any diffusers pipeline folder / hub id.

    A local folder is read with ``local_files_only``; ``dtype`` (default: the weights' own) is passed
    as ``torch_dtype``. The progress bar of generation is switched off.
    """
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    kwargs: dict[str, Any] = {} if dtype is None else {"torch_dtype": dtype}
    if model is None:
        if not (EMBEDDED_MODEL / "model_index.json").is_file():
            raise FileNotFoundError(
                f"the embedded demo model is missing from {EMBEDDED_MODEL}; reinstall DeepCache, or rebuild it with "
                "`deepcache train-demo-model --out DeepCache/assets`."
            )
        pipe = StableDiffusionPipeline.from_pretrained(EMBEDDED_MODEL, local_files_only=True, **kwargs)
    else:
        local = Path(model).expanduser()
        pipe = DiffusionPipeline.from_pretrained(str(local) if local.exists() else model,
                                                 local_files_only=local.exists(), **kwargs)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _folder(pipe: Any) -> Path | None:
    path = getattr(getattr(pipe, "config", None), "_name_or_path", None)
    return Path(str(path)) if path else None


def is_demo_pipeline(pipe: Any) -> bool:
    """Whether ``pipe`` was loaded from a folder written by ``deepcache train-demo-model`` (captions checkable)."""
    folder = _folder(pipe)
    return folder is not None and is_demo_pipeline_dir(folder)


def demo_classifier_path(pipe: Any) -> Path | None:
    """The classifier trained beside a demo pipeline (``../demo-classifier``), if there is one."""
    folder = _folder(pipe)
    if folder is None or not is_demo_pipeline_dir(folder):
        return None
    path = folder.parent / CLASSIFIER_DIR
    return path if path.is_dir() else None


def default_batch_size(model: Any) -> int:
    """Images per pipeline call when the user does not say: 16 for the tiny demo model (a pipeline loaded from it, its
    folder, or ``None`` for the embedded one), which batches well; 1 for anything else, which may not fit 16 at once.

    >>> default_batch_size(None), default_batch_size("./my-sd-pipeline")
    (16, 1)
    """
    if model is None:
        return 16
    if isinstance(model, (str, Path)):
        return 16 if is_demo_pipeline_dir(Path(model).expanduser()) else 1
    return 16 if is_demo_pipeline(model) else 1


def call_batch(pipe: Any, prompts: Sequence[str], seeds: Sequence[int], *, steps: int, guidance: float,
               negative_prompts: Sequence[str | None] | None = None, output_type: str = "np",
               height: int | None = None, width: int | None = None) -> Any:
    """One pipeline call for a batch of prompts; returns its ``images``.

    Each prompt's noise comes from its own CPU ``torch.Generator`` seeded with its seed, so an image does not depend
    on the device, or on which other prompts share its batch. ``negative_prompts``: one per prompt (``None`` or
    ``""``: none; diffusers' own default negative prompt is ``""``). ``height``/``width``: ``None`` is the model's.
    """
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds; pass one seed per prompt.")
    negatives = [n or "" for n in negative_prompts] if negative_prompts is not None else [""] * len(prompts)
    if len(negatives) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(negatives)} negative prompts; pass one per prompt.")
    size = {k: v for k, v in (("height", height), ("width", width)) if v is not None}
    return pipe(list(prompts), negative_prompt=negatives if any(negatives) else None,
                generator=[torch.Generator().manual_seed(int(s)) for s in seeds], num_inference_steps=steps,
                guidance_scale=guidance, output_type=output_type, **size).images


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
    """The device and dtype the pipeline's U-Net runs in."""
    return torch.device(str(getattr(pipe, "device", "cpu"))), pipe.unet.dtype


def run_meta(pipe: Any, steps: int, guidance: float, prompts: Sequence[str], seeds: Sequence[int],
             **more: Any) -> dict[str, Any]:
    """What a report says about the run (model, steps, scheduler, prompts, seeds, threads, device, dtype), and ``more``."""
    device, dtype = pipeline_device(pipe)
    return {
        "model": str(getattr(pipe.config, "_name_or_path", "")),
        "embedded": is_demo_pipeline(pipe),
        "steps": steps,
        "guidance": guidance,
        "scheduler": type(pipe.scheduler).__name__,
        "prompts": list(prompts),
        "seeds": list(seeds),
        **more,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
    }


def model_name(meta: dict[str, Any]) -> str:
    """How a header names the model of a :func:`run_meta`.

    >>> model_name({"embedded": True, "model": "x"}), model_name({"embedded": False, "model": "./sd15"})
    ('embedded demo model (offline)', './sd15')
    """
    return "embedded demo model (offline)" if meta["embedded"] else meta["model"]
