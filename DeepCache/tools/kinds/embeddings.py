"""Prompt embeddings for transformer pipelines whose folder has no text encoder (tiny test folders, or a folder saved
without its large T5/Gemma encoder), and the pipeline keywords that carry them.

**What the tools do with such a folder.** ``bench`` passes random embeddings of the right shape, seeded by ``--seed``,
exactly as it does for U-Nets (text encoding is never timed). ``eval``, ``demo``, ``tune`` and ``generate`` pass
embeddings **seeded by each prompt's text** (CRC-32 of its UTF-8 bytes): the same prompt always gets the same
embedding, whatever its batch or process, and different prompts differ. They measure speed and fidelity to the
uncached pipeline (PSNR, SSIM), never prompt following; every report labels them (:data:`SEEDED_LABEL`).
A pipeline class not listed in :data:`EMBEDDING_SPECS` needs its text encoder (a ``ValueError`` says so).

Example::

    >>> import torch
    >>> a = prompt_embedding("a red circle", tokens=4, width=8)
    >>> torch.equal(a, prompt_embedding("a red circle", tokens=4, width=8)), a.shape
    (True, torch.Size([4, 8]))
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Sequence

import torch

__all__ = ["EMBEDDING_SPECS", "EMBEDDING_TOKENS", "SEEDED_LABEL", "EmbeddingSpec", "batch_embeddings", "prompt_embedding",
           "random_embeddings", "require_spec", "spec_for"]

#: Tokens of every made-up prompt embedding.
EMBEDDING_TOKENS = 77

#: What a report says about prompts turned into seeded embeddings.
SEEDED_LABEL = ("random, seeded by each prompt's text (the folder has no text encoder): speed and fidelity to the "
                "uncached pipeline only, not prompt following")


@dataclass(frozen=True)
class EmbeddingSpec:
    """How one pipeline class takes prompt embeddings: the transformer config key of their width, of the pooled
    embedding's width (SD3, Flux), whether attention masks go with them, the keyword of the CFG scale, and fixed
    keywords (``use_resolution_binning=False``: the size asked is the size made)."""

    width: str
    pooled: str | None = None
    masks: bool = False
    guidance: str = "guidance_scale"
    fixed: tuple[tuple[str, Any], ...] = ()


_NO_BINNING = (("use_resolution_binning", False),)
EMBEDDING_SPECS: dict[str, EmbeddingSpec] = {
    "PixArtAlphaPipeline": EmbeddingSpec("caption_channels", masks=True, fixed=_NO_BINNING),
    "PixArtSigmaPipeline": EmbeddingSpec("caption_channels", masks=True, fixed=_NO_BINNING),
    "SanaPipeline": EmbeddingSpec("caption_channels", masks=True, fixed=_NO_BINNING),
    "StableDiffusion3Pipeline": EmbeddingSpec("joint_attention_dim", "pooled_projection_dim"),
    "FluxPipeline": EmbeddingSpec("joint_attention_dim", "pooled_projection_dim", guidance="true_cfg_scale"),
}


def spec_for(pipe: Any) -> EmbeddingSpec | None:
    """The spec of ``pipe``'s class (``None``: not listed)."""
    return EMBEDDING_SPECS.get(type(pipe).__name__)


def require_spec(pipe: Any) -> EmbeddingSpec:
    spec = spec_for(pipe)
    if spec is None:
        raise ValueError(f"a {type(pipe).__name__} folder without a text encoder: the tools make prompt embeddings "
                         f"for {', '.join(EMBEDDING_SPECS)} only; use a folder with its text encoder.")
    return spec


def prompt_embedding(text: str, *, tokens: int, width: int) -> torch.Tensor:
    """A (tokens, width) embedding seeded by ``text`` (CRC-32 of its UTF-8 bytes)."""
    return torch.randn(tokens, width, generator=torch.Generator().manual_seed(zlib.crc32(text.encode("utf-8"))))


def _pooled(text: str, width: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(zlib.crc32(("pooled:" + text).encode("utf-8")))
    return torch.randn(width, generator=gen)


def batch_embeddings(pipe: Any, spec: EmbeddingSpec, prompts: Sequence[str], negatives: Sequence[str],
                     device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The pipeline keywords for a batch: prompt and negative embeddings (pooled ones, masks) seeded by the texts."""
    config = pipe.transformer.config
    width = int(config[spec.width])
    out: dict[str, Any] = {"negative_prompt": None}  # PixArt and Sana default to "", which clashes with embeddings
    for prefix, texts in (("", prompts), ("negative_", negatives)):
        stack = torch.stack([prompt_embedding(t, tokens=EMBEDDING_TOKENS, width=width) for t in texts])
        out[f"{prefix}prompt_embeds"] = stack.to(device=device, dtype=dtype)
        if spec.pooled is not None:
            pooled = torch.stack([_pooled(t, int(config[spec.pooled])) for t in texts])
            out[f"{prefix}pooled_prompt_embeds"] = pooled.to(device=device, dtype=dtype)
        if spec.masks:
            out[f"{prefix}prompt_attention_mask"] = torch.ones(len(texts), EMBEDDING_TOKENS, device=device)
    return out


def random_embeddings(pipe: Any, spec: EmbeddingSpec, batch_size: int, device: str | torch.device,
                      dtype: torch.dtype, seed: int) -> dict[str, Any]:
    """``bench``'s inputs: random embeddings of the right shape from one generator seeded with ``seed``."""
    config = pipe.transformer.config
    gen = torch.Generator("cpu").manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    out: dict[str, Any] = {"negative_prompt": None}
    for prefix in ("", "negative_"):
        out[f"{prefix}prompt_embeds"] = rand(batch_size, EMBEDDING_TOKENS, int(config[spec.width]))
        if spec.pooled is not None:
            out[f"{prefix}pooled_prompt_embeds"] = rand(batch_size, int(config[spec.pooled]))
        if spec.masks:
            out[f"{prefix}prompt_attention_mask"] = torch.ones(batch_size, EMBEDDING_TOKENS, device=device)
    return out
