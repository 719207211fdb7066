"""Load the pipeline ``deepcache eval``/``demo``/``generate`` run (the embedded demo model, offline, or any local or
hub one), and call it on a batch of seeded prompts the one way they all do (:func:`call_batch`).

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

__all__ = ["call_batch", "default_batch_size", "demo_classifier_path", "is_demo_pipeline", "load_pipeline"]


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
