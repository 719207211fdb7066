"""The interface every pipeline kind shares (:class:`PipelineKind`), and what all kinds do the same way.

A kind is decided once, where the pipeline is loaded (:func:`DeepCache.tools.kinds.load_kind`), and the commands pass
it down: what it is (:attr:`~PipelineKind.source`, :attr:`~PipelineKind.embedded`, :attr:`~PipelineKind.classifier`,
:attr:`~PipelineKind.default_batch_size`) is settled when it is made, so nothing further down asks again.

Four groups of questions, one object:

* **load**: :meth:`~PipelineKind.claims` / :meth:`~PipelineKind.claims_folder` (is this mine?), :meth:`~PipelineKind.load`,
  :meth:`~PipelineKind.folder_batch_size`;
* **call**: :meth:`~PipelineKind.call` (seeded prompts in, images out: the one way ``eval``, ``demo``, ``tune`` and
  ``generate`` call a pipeline; :meth:`~PipelineKind.call_kwargs`, its keywords),
  :meth:`~PipelineKind.prompt_kwargs`, :meth:`~PipelineKind.guidance_kwargs`, :meth:`~PipelineKind.bench_inputs`
  (``bench``'s random prompt embeddings);
* **count**: :meth:`~PipelineKind.flop_counter` (FLOPs per step, full and retrieval, the VAE decode's, and the
  FLOP-ideal speedup);
* **score and report**: :attr:`~PipelineKind.embedded` (captions checkable), :attr:`~PipelineKind.classifier`,
  :meth:`~PipelineKind.run_meta` (what a report says about the run), :meth:`~PipelineKind.describe` (what it adds
  about the prompts), :attr:`~PipelineKind.denoiser`, :attr:`~PipelineKind.device`, :attr:`~PipelineKind.dtype`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch

__all__ = ["PipelineKind", "from_pretrained"]


def from_pretrained(cls_or_name: Any, model: str | Path, device: str | torch.device,
                    dtype: torch.dtype | None) -> Any:
    """``from_pretrained`` of a local folder (``local_files_only``) or a cached hub id, on ``device``, no progress bar."""
    if isinstance(cls_or_name, str):
        import diffusers

        cls_or_name = getattr(diffusers, cls_or_name)
    kwargs: dict[str, Any] = {} if dtype is None else {"torch_dtype": dtype}
    local = Path(model).expanduser()
    pipe = cls_or_name.from_pretrained(str(local) if local.exists() else model, local_files_only=local.exists(),
                                       **kwargs)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class PipelineKind(ABC):
    """One loaded pipeline and everything the commands need to know about it (see the module docstring)."""

    #: ``"unet"`` or ``"transformer"``.
    family: ClassVar[str]
    #: The pipeline attribute that holds the denoiser DeepCache caches.
    denoiser_attribute: ClassVar[str]

    #: Whether the pipeline is a demo model whose captions the shipped classifier can check.
    embedded: bool = False
    #: The attribute classifier that scores this pipeline's images against their prompts, if any.
    classifier: Path | None = None
    #: Images per pipeline call when the user does not say.
    default_batch_size: int = 1

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        #: The folder or hub id the pipeline was loaded from (``""`` if built in memory).
        self.source: str = str(getattr(getattr(pipe, "config", None), "_name_or_path", "") or "")

    # -- load ----------------------------------------------------------------------------------------
    @classmethod
    def claims(cls, pipe: Any) -> bool:
        """Whether a loaded pipeline is of this kind."""
        return getattr(pipe, cls.denoiser_attribute, None) is not None

    @classmethod
    def claims_folder(cls, folder: Path) -> bool:
        """Whether a pipeline folder (read before loading it) is of this kind."""
        return (folder / cls.denoiser_attribute).is_dir()

    @classmethod
    @abstractmethod
    def load(cls, model: str | None, device: str | torch.device, dtype: torch.dtype | None) -> PipelineKind:
        """Load ``model`` (see :func:`DeepCache.tools.kinds.load_kind`)."""

    @classmethod
    def folder_batch_size(cls, model: str | Path | None) -> int:
        """Images per call when the user does not say, from the folder alone (before loading)."""
        return 1

    # -- what it is ----------------------------------------------------------------------------------
    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser_attribute)

    @denoiser.setter
    def denoiser(self, module: torch.nn.Module) -> None:  # bench swaps in the compiled denoiser
        setattr(self.pipe, self.denoiser_attribute, module)

    @property
    def device(self) -> torch.device:
        return torch.device(str(getattr(self.pipe, "device", "cpu")))

    @property
    def dtype(self) -> torch.dtype:
        return self.denoiser.dtype

    def describe(self) -> dict[str, Any]:
        """What a report adds about this kind (nothing for a U-Net, so U-Net reports stay as they were)."""
        return {}

    def run_meta(self, steps: int, guidance: float, prompts: Sequence[str], seeds: Sequence[int],
                 **more: Any) -> dict[str, Any]:
        """What a report says about the run (model, steps, scheduler, prompts, seeds, threads, device, dtype), and
        ``more``; a transformer also its family and where its prompt embeddings came from (:meth:`describe`)."""
        return {
            "model": self.source,
            "embedded": self.embedded,
            **self.describe(),
            "steps": steps,
            "guidance": guidance,
            "scheduler": type(self.pipe.scheduler).__name__,
            "prompts": list(prompts),
            "seeds": list(seeds),
            **more,
            "torch_threads": torch.get_num_threads(),
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
        }

    def attention_processors(self) -> list[str]:
        """The class names of the denoiser's attention processors (for the report's environment)."""
        return sorted({type(p).__name__ for p in getattr(self.denoiser, "attn_processors", {}).values()})

    # -- call ----------------------------------------------------------------------------------------
    @abstractmethod
    def prompt_kwargs(self, prompts: Sequence[str], negatives: Sequence[str]) -> dict[str, Any]:
        """The pipeline keywords that carry the prompts (``negatives``: one per prompt, ``""`` for none)."""

    def guidance_kwargs(self, scale: float) -> dict[str, Any]:
        """The pipeline keywords that carry the classifier-free guidance scale."""
        return {"guidance_scale": scale}

    def call_defaults(self) -> dict[str, Any]:
        """Pipeline keywords every call of this model needs (a tiny demo model's size); the caller's win."""
        return {}

    def call_kwargs(self, prompts: Sequence[str], seeds: Sequence[int], *, steps: int, guidance: float,
                    negative_prompts: Sequence[str | None] | None = None, output_type: str = "np",
                    height: int | None = None, width: int | None = None) -> dict[str, Any]:
        """The keywords of :meth:`call`'s one pipeline call (``pipe(**kwargs)``): what ``tune``'s calibration records.

        Each prompt's noise comes from its own CPU ``torch.Generator`` seeded with its seed, so an image does not
        depend on the device, or on which other prompts share its batch. ``negative_prompts``: one per prompt
        (``None`` or ``""``: none). ``height``/``width``: ``None`` is the model's.
        """
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds; pass one seed per prompt.")
        negatives = [n or "" for n in negative_prompts] if negative_prompts is not None else [""] * len(prompts)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(negatives)} negative prompts; pass one per prompt.")
        size = {k: v for k, v in (("height", height), ("width", width)) if v is not None}
        return {**self.prompt_kwargs(prompts, negatives),
                "generator": [torch.Generator().manual_seed(int(s)) for s in seeds], "num_inference_steps": steps,
                **self.guidance_kwargs(guidance), "output_type": output_type, **{**self.call_defaults(), **size}}

    def call(self, prompts: Sequence[str], seeds: Sequence[int], *, steps: int, guidance: float,
             negative_prompts: Sequence[str | None] | None = None, output_type: str = "np",
             height: int | None = None, width: int | None = None) -> Any:
        """One pipeline call for a batch of prompts (:meth:`call_kwargs`); returns its ``images``."""
        return self.pipe(**self.call_kwargs(prompts, seeds, steps=steps, guidance=guidance,
                                            negative_prompts=negative_prompts, output_type=output_type, height=height,
                                            width=width)).images

    @abstractmethod
    def bench_inputs(self, batch_size: int, device: str | torch.device, dtype: torch.dtype,
                     seed: int = 0) -> dict[str, torch.Tensor]:
        """``bench``'s prompt inputs: random embeddings of the right shape (text encoding is not timed)."""

    # -- count ---------------------------------------------------------------------------------------
    @abstractmethod
    def flop_counter(self) -> Any:
        """FLOP counts per shape: an object with ``step_costs(...)`` (one step's full and retrieval FLOPs and the VAE
        decode's), ``for_pattern(...)`` (a generation's, and its FLOP-ideal speedups) and ``latent_size(h, w)``
        (:class:`DeepCache.tools.flops.FlopCache` and :class:`~.dit_flops.DiTFlopCache`)."""
