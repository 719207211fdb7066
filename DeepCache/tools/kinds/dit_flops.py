"""FLOPs of a diffusion transformer per step, full and retrieval, for ``bench``'s FLOP-ideal column (and ``tune``).

Like the U-Net's count (:mod:`DeepCache.tools.flops`), with torch's own counter (:class:`FlopCounterMode`: matrix
multiplies and attention; elementwise ops and norms not counted; FLOPs = 2 × MACs), but on a **real forward**: one
uncached 1-step pipeline call with ``bench``'s random embeddings, counted per module
(:func:`~DeepCache.tools.flops.count_flops_by_module`). From it:

* ``full`` = everything the transformer did in the step, **every CFG branch included** (a batched CFG is one call on
  2× the batch; Flux true CFG, Wan, CogView4 call twice: both calls are in the step);
* ``retrieval`` = ``full`` minus the blocks a retrieval step skips: the middle of the split ``(front, back)``
  (:meth:`DeepCache.engine.transformer.layout.DiTLayout.split`; ``cache_branch_id=b`` is ``(b, b)``), block ``i`` of the
  stack being ``<Transformer class>.<list name>.<index>`` in the counter;
* the VAE decode, done once per generation: the rest of the same call (no text encoder runs).

A step costs the same at every step of one shape, except where a pipeline changes its calls mid-run (Lumina2 drops
the uncond call after ``cfg_trunc_ratio``; Wan 2.2 switches transformers): there the first step's count is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..flops import PatternFlops, StepFlops, count_flops_by_module, pattern_flops

__all__ = ["DiTFlopCache", "DiTStepCounts"]


@dataclass(frozen=True)
class DiTStepCounts:
    """One counted step at one shape: the transformer's FLOPs, each stack block's FLOPs, the VAE decode's."""

    transformer: int
    blocks: tuple[int, ...]
    vae_decode: int

    def step(self, front: int, back: int) -> StepFlops:
        """Full and retrieval FLOPs for the split ``(front, back)``."""
        middle = sum(self.blocks[front:len(self.blocks) - back])
        return StepFlops(full=self.transformer, retrieval=self.transformer - middle)


class DiTFlopCache:
    """FLOP counts per (images, height, width, guidance) of one transformer pipeline (a kind), counted once each."""

    def __init__(self, kind: Any) -> None:
        from ...engine.families import layout_of

        self.kind = kind
        self.layout = layout_of(kind.denoiser)
        self._counts: dict[tuple[int, int, int, float], DiTStepCounts] = {}

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        """A transformer's counts are keyed by the image size itself (the pipeline makes the latents)."""
        return height, width

    def counts(self, images: int, height: int, width: int, guidance_scale: float) -> DiTStepCounts:
        key = (images, height, width, float(guidance_scale))
        if key not in self._counts:
            self._counts[key] = self._count(*key)
        return self._counts[key]

    def _count(self, images: int, height: int, width: int, guidance_scale: float) -> DiTStepCounts:
        kind, pipe = self.kind, self.kind.pipe
        inputs = kind.bench_inputs(images, kind.device, kind.dtype, seed=0)
        counts = count_flops_by_module(lambda: pipe(
            **inputs, **kind.guidance_kwargs(guidance_scale), height=height, width=width, num_inference_steps=1,
            generator=torch.Generator().manual_seed(0), output_type="np"))
        top = type(kind.denoiser).__name__
        blocks = tuple(counts.get(f"{top}.{b.name}.{i}", 0) for b in self.layout.lists for i in range(b.count))
        # the rest of the call is the VAE decode (the embeddings are given: no text encoder runs)
        return DiTStepCounts(counts.get(top, 0), blocks, counts.get("Global", 0) - counts.get(top, 0))

    def step(self, images: int, height: int, width: int, branch: int, guidance_scale: float,
             front: int | None = None, back: int | None = None) -> StepFlops:
        """Full and retrieval FLOPs of one step at ``cache_branch_id=branch`` (or the split ``front``/``back``)."""
        split = self.layout.split(branch, front, back)
        return self.counts(images, height, width, guidance_scale).step(*split)

    def step_costs(self, *, images: int, latent: tuple[int, int], branch: int, guidance_scale: float,
                   front: int | None = None, back: int | None = None) -> tuple[StepFlops, int]:
        """As :meth:`DeepCache.tools.flops.FlopCache.step_costs` (``latent``: here the image size), the split
        ``front``/``back`` (``front_blocks``/``back_blocks``) honoured: the retrieval step skips its middle."""
        counted = self.counts(images, *latent, guidance_scale)
        return counted.step(*self.layout.split(branch, front, back)), counted.vae_decode

    def for_pattern(self, pattern: Sequence[bool], *, images: int, latent: tuple[int, int], branch: int,
                    guidance_scale: float, uniform_interval: int | None = None, front: int | None = None,
                    back: int | None = None) -> PatternFlops:
        """As :meth:`DeepCache.tools.flops.FlopCache.for_pattern` (``latent``: here the image size; ``front``/``back``:
        an asymmetric split)."""
        step, vae = self.step_costs(images=images, latent=latent, branch=branch, guidance_scale=guidance_scale,
                                    front=front, back=back)
        return pattern_flops(pattern, step, vae, uniform_interval)
