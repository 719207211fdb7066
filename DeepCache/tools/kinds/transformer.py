"""The transformer kind: diffusion-transformer pipelines (PixArt, Sana, SD3, Flux, Wan, ...; every class DeepCache
caches, :data:`DeepCache.engine.transformer.layout.SUPPORTED_TRANSFORMERS`), loaded from a local folder or a cached hub id.

* **call**: with a text encoder in the folder, prompts go to the pipeline as for a U-Net; without one, prompt
  embeddings seeded by each prompt's text (:mod:`.embeddings`, labelled in every report);
* **count**: FLOPs of a real forward, block by block (:mod:`.dit_flops`);
* **score**: PSNR and SSIM against the uncached images; CLIP with ``--clip-model``. The shipped tiny Flux DiT
  (``--model embedded-dit``, written by ``deepcache train-demo-dit``) is an *embedded* model like the demo U-Net: its
  captions are checked by the shipped classifier (task accuracy, Fréchet distance), it is called at its own size;
* **guidance**: a pipeline that takes ``true_cfg_scale`` and whose transformer has no guidance embedding (Flux
  without distilled guidance, Qwen-Image) gets true CFG: ``--guidance`` is ``true_cfg_scale``, with an empty
  negative prompt where none is given (two transformer calls per step); otherwise ``guidance_scale``.

Example::

    >>> from DeepCache.tools.kinds.transformer import TransformerKind
    >>> TransformerKind.family, TransformerKind.denoiser_attribute
    ('transformer', 'transformer')
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Sequence

import torch

from ..demo_model import CLASSIFIER_DIR, DIT_CALL_KWARGS, is_demo_dit_dir
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

    @classmethod
    def folder_batch_size(cls, model: str | Path | None) -> int:
        return 16 if model is not None and is_demo_dit_dir(Path(model).expanduser()) else 1

    @property
    def has_text_encoder(self) -> bool:
        return getattr(self.pipe, "text_encoder", None) is not None

    # -- the demo DiT --------------------------------------------------------------------------------
    def __init__(self, pipe: Any) -> None:
        """A folder written by ``deepcache train-demo-dit`` is *embedded* (captions checkable, 16 images per call);
        its classifier is the demo one beside it (``../demo-classifier``)."""
        super().__init__(pipe)
        self.embedded = bool(self.source) and is_demo_dit_dir(self.source)
        self.default_batch_size = 16 if self.embedded else 1
        classifier = Path(self.source).parent / CLASSIFIER_DIR if self.embedded else None
        self.classifier = classifier if classifier is not None and classifier.is_dir() else None

    def call_defaults(self) -> dict[str, Any]:
        return dict(DIT_CALL_KWARGS) if self.embedded else {}

    @property
    def guidance_keyword(self) -> str:
        """The pipeline keyword ``--guidance`` sets: the seeded-embeddings table's, else ``true_cfg_scale`` for true
        CFG (see the module docstring), else ``guidance_scale``."""
        spec = spec_for(self.pipe)
        if spec is not None:
            return spec.guidance
        takes_true_cfg = "true_cfg_scale" in inspect.signature(type(self.pipe).__call__).parameters
        guidance_embedded = getattr(self.denoiser.config, "guidance_embeds", False)
        return "true_cfg_scale" if takes_true_cfg and not guidance_embedded else "guidance_scale"

    @property
    def true_cfg(self) -> bool:
        """Whether ``--guidance`` is true CFG: separate conditional and unconditional transformer calls."""
        return self.guidance_keyword == "true_cfg_scale"

    def describe(self) -> dict[str, Any]:
        described = {"family": self.family, "prompt_embeddings": "from the pipeline's text encoder"
                     if self.has_text_encoder else SEEDED_LABEL}
        if self.true_cfg:
            described["guidance_mode"] = "true CFG (true_cfg_scale; empty negative prompt unless given)"
        return described

    def prompt_kwargs(self, prompts: Sequence[str], negatives: Sequence[str]) -> dict[str, Any]:
        if self.has_text_encoder:
            given = any(negatives) or self.true_cfg  # true CFG needs a negative prompt, "" if none
            return {"prompt": list(prompts), "negative_prompt": list(negatives) if given else None}
        return batch_embeddings(self.pipe, require_spec(self.pipe), prompts, negatives, self.device, self.dtype)

    def guidance_kwargs(self, scale: float) -> dict[str, Any]:
        spec = spec_for(self.pipe)
        return {self.guidance_keyword: scale, **(dict(spec.fixed) if spec is not None else {})}

    def bench_inputs(self, batch_size: int, device: str | torch.device, dtype: torch.dtype,
                     seed: int = 0) -> dict[str, Any]:
        return random_embeddings(self.pipe, require_spec(self.pipe), batch_size, device, dtype, seed)

    def flop_counter(self) -> DiTFlopCache:
        return DiTFlopCache(self)
