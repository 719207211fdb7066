"""The U-Net kind: SD/SDXL pipelines, and the embedded demo model (a tiny SD pipeline whose captions its shipped
classifier checks: task accuracy and the Fréchet distance in ``eval``). What the tools have always done, in one room.

Example::

    >>> from DeepCache.tools.kinds.unet import UNetKind
    >>> kind = UNetKind.load(None, "cpu", None)
    >>> kind.embedded, kind.classifier.name, kind.default_batch_size
    (True, 'demo-classifier', 16)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from ..demo_model import CLASSIFIER_DIR, EMBEDDED_MODEL, is_demo_pipeline_dir
from ..flops import FlopCache, pooled_text_dim
from .base import PipelineKind, from_pretrained

__all__ = ["PROMPT_TOKENS", "UNetKind"]

#: Prompt length the SD text encoders produce (77 CLIP tokens): the length of ``bench``'s random embeddings.
PROMPT_TOKENS = 77


class UNetKind(PipelineKind):
    """A pipeline with a ``unet`` (see the module docstring)."""

    family = "unet"
    denoiser_attribute = "unet"

    def __init__(self, pipe: Any, *, embedded: bool | None = None) -> None:
        """``embedded``: whether ``pipe`` is a demo model (``None``: its folder says, by the marker file that
        ``deepcache train-demo-model`` writes); its classifier is the one trained beside it (``../demo-classifier``)."""
        super().__init__(pipe)
        folder = Path(self.source) if self.source else None
        self.embedded = folder is not None and is_demo_pipeline_dir(folder) if embedded is None else embedded
        self.default_batch_size = 16 if self.embedded else 1
        classifier = folder.parent / CLASSIFIER_DIR if self.embedded and folder is not None else None
        self.classifier = classifier if classifier is not None and classifier.is_dir() else None

    @classmethod
    def load(cls, model: str | None, device: str | torch.device, dtype: torch.dtype | None) -> UNetKind:
        """``None``: the embedded demo pipeline (offline); else any diffusers pipeline folder or cached hub id."""
        if model is None:
            if not (EMBEDDED_MODEL / "model_index.json").is_file():
                raise FileNotFoundError(
                    f"the embedded demo model is missing from {EMBEDDED_MODEL}; reinstall DeepCache, or rebuild it "
                    "with `deepcache train-demo-model --out DeepCache/assets`.")
            return cls(from_pretrained("StableDiffusionPipeline", EMBEDDED_MODEL, device, dtype), embedded=True)
        return cls(from_pretrained("DiffusionPipeline", model, device, dtype))

    @classmethod
    def folder_batch_size(cls, model: str | Path | None) -> int:
        return 16 if model is None or is_demo_pipeline_dir(Path(model).expanduser()) else 1

    # -- call and count ------------------------------------------------------------------------------
    def prompt_kwargs(self, prompts: Sequence[str], negatives: Sequence[str]) -> dict[str, Any]:
        return {"prompt": list(prompts), "negative_prompt": list(negatives) if any(negatives) else None}

    def bench_inputs(self, batch_size: int, device: str | torch.device, dtype: torch.dtype,
                     seed: int = 0) -> dict[str, torch.Tensor]:
        """Random prompt embeddings (and pooled ones for SDXL) of the shape the text encoders produce."""
        gen = torch.Generator("cpu").manual_seed(seed)

        def rand(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

        shape = (batch_size, PROMPT_TOKENS, int(self.denoiser.config.cross_attention_dim))
        inputs = {"prompt_embeds": rand(*shape), "negative_prompt_embeds": rand(*shape)}
        pooled = pooled_text_dim(self.denoiser.config)
        if pooled is not None:
            inputs["pooled_prompt_embeds"] = rand(batch_size, pooled)
            inputs["negative_pooled_prompt_embeds"] = rand(batch_size, pooled)
        return inputs

    def flop_counter(self) -> FlopCache:
        """Counts on meta-device copies of the U-Net and VAE (:class:`DeepCache.tools.flops.FlopCache`)."""
        return FlopCache(self.denoiser.config, self.pipe.vae.config)
