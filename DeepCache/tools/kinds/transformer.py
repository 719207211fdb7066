"""The transformer kind: diffusion-transformer pipelines (PixArt, Sana, SD3, Flux, Wan, ...; every class DeepCache
caches, :data:`DeepCache.engine.transformer.layout.SUPPORTED_TRANSFORMERS`), loaded from a local folder or a cached hub id.

* **call**: with a text encoder in the folder, prompts go to the pipeline as for a U-Net; without one, prompt
  embeddings seeded by each prompt's text (:mod:`.embeddings`, labelled in every report);
* **count**: FLOPs of a real forward, block by block (:mod:`.dit_flops`);
* **score**: PSNR and SSIM against the uncached images (no caption classifier; CLIP with ``--clip-model``).

Example::

    >>> from DeepCache.tools.kinds.transformer import TransformerKind
    >>> TransformerKind.family, TransformerKind.denoiser_attribute
    ('transformer', 'transformer')
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .base import PipelineKind, from_pretrained
from .dit_flops import DiTFlopCache
from .embeddings import SEEDED_LABEL, batch_embeddings, random_embeddings, require_spec, spec_for

__all__ = ["TransformerKind"]


class TransformerKind(PipelineKind):
    """A pipeline with a ``transformer`` (see the module docstring)."""

    family = "transformer"
    denoiser_attribute = "transformer"

    @classmethod
    def load(cls, model: str | None, device: str | torch.device, dtype: torch.dtype | None) -> TransformerKind:
        if model is None:
            raise ValueError("the embedded demo model is a U-Net; give a transformer pipeline folder with --model.")
        kind = cls(from_pretrained("DiffusionPipeline", model, device, dtype))
        kind.check()
        return kind

    def check(self) -> None:
        """Raise ``ValueError`` if DeepCache cannot cache this transformer, or its prompts cannot be made."""
        from ...engine.families import check_supported

        try:
            check_supported(self.denoiser)
        except TypeError as exc:
            raise ValueError(str(exc)) from None
        if not self.has_text_encoder:
            require_spec(self.pipe)

    @property
    def has_text_encoder(self) -> bool:
        return getattr(self.pipe, "text_encoder", None) is not None

    def describe(self) -> dict[str, Any]:
        return {"family": self.family, "prompt_embeddings": "from the pipeline's text encoder" if self.has_text_encoder
                else SEEDED_LABEL}

    def prompt_kwargs(self, prompts: Sequence[str], negatives: Sequence[str]) -> dict[str, Any]:
        if self.has_text_encoder:
            return {"prompt": list(prompts), "negative_prompt": list(negatives) if any(negatives) else None}
        return batch_embeddings(self.pipe, require_spec(self.pipe), prompts, negatives, self.device, self.dtype)

    def guidance_kwargs(self, scale: float) -> dict[str, Any]:
        spec = spec_for(self.pipe)
        return {"guidance_scale": scale} if spec is None else {spec.guidance: scale, **dict(spec.fixed)}

    def bench_inputs(self, batch_size: int, device: str | torch.device, dtype: torch.dtype,
                     seed: int = 0) -> dict[str, Any]:
        return random_embeddings(self.pipe, require_spec(self.pipe), batch_size, device, dtype, seed)

    def flop_counter(self) -> DiTFlopCache:
        return DiTFlopCache(self)
