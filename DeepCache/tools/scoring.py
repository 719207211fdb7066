"""Score generated images against the original pipeline's images of the same prompts: the one scorer of the tools.

:class:`Scorer` holds the models that score (each ``None`` where it is not available) and turns one batch of images
into :class:`ImageScores`, per-image numbers:

* fidelity: PSNR and SSIM (:mod:`DeepCache.tools.metrics`), always; LPIPS only where the ``lpips`` package and its
  backbone weights are already on disk;
* embedded demo model: the shipped attribute classifier's predictions and features (task accuracy, Fréchet
  distance);
* other models: CLIP score where CLIP weights are available locally.

Models are loaded once (:meth:`Scorer.load`); features are extracted here, the metrics themselves are pure
functions in :mod:`DeepCache.tools.metrics`.

Example::

    >>> import numpy as np
    >>> a = np.zeros((2, 8, 8, 3)); b = a.copy(); b[1] += 0.1
    >>> scores = Scorer().score(a, b, ["x", "y"])  # PSNR and SSIM only
    >>> scores.psnr.round(1).tolist(), scores.means()["psnr"]
    ([inf, 20.0], inf)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import metrics

__all__ = ["ImageScores", "Scorer", "classify", "clip_model", "clip_scores", "lpips_model", "prompt_labels",
           "reference_images", "to_classifier_input"]


@dataclasses.dataclass
class ImageScores:
    """Per-image measurements of one setting against the original's images, in the order the images were scored.

    ``predicted`` (N, attributes) and ``features`` (N, D) come from the demo model's classifier; ``lpips`` and
    ``clip`` from their models; each is ``None`` where its model is not available.
    """

    psnr: np.ndarray
    ssim: np.ndarray
    lpips: np.ndarray | None = None
    predicted: np.ndarray | None = None
    features: np.ndarray | None = None
    clip: np.ndarray | None = None

    @classmethod
    def concatenate(cls, parts: Sequence[ImageScores]) -> ImageScores:
        """The parts one after the other (prompt order when the parts are in order)."""
        fields = {}
        for field in dataclasses.fields(cls):
            values = [getattr(part, field.name) for part in parts]
            fields[field.name] = None if any(v is None for v in values) else np.concatenate(values)
        return cls(**fields)

    def reordered(self, order: np.ndarray) -> ImageScores:
        """The same scores with image ``k`` taken from position ``order[k]``."""
        return ImageScores(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[order]
                              for f in dataclasses.fields(self)})

    def means(self) -> dict[str, float | None]:
        """Mean PSNR, SSIM, LPIPS and CLIP score over the images (``None`` where not measured)."""
        return {name: None if getattr(self, name) is None else float(np.mean(getattr(self, name)))
                for name in ("psnr", "ssim", "lpips", "clip")}


@dataclasses.dataclass
class Scorer:
    """The models that score images, each ``None`` where it is not available (``Scorer()``: PSNR and SSIM only)."""

    classifier: torch.nn.Module | None = None
    lpips_net: Any | None = None
    clip: tuple[Any, Any] | None = None

    @classmethod
    def load(cls, classifier_path: Path | None = None, clip_name: str | None = None) -> Scorer:
        """Every model that can score here: the demo classifier at ``classifier_path`` (a demo pipeline's kind knows
        it: :attr:`DeepCache.tools.kinds.PipelineKind.classifier`), LPIPS if its weights are local, CLIP from
        ``clip_name`` if given and local."""
        from .demo_model.classifier import load_classifier

        return cls(load_classifier(classifier_path) if classifier_path is not None else None, lpips_model(),
                   clip_model(clip_name) if clip_name else None)

    def score(self, images: np.ndarray, reference: np.ndarray, prompts: Sequence[str]) -> ImageScores:
        """Per-image scores of ``images`` against ``reference``, the original pipeline's images of the same prompts."""
        scores = ImageScores(metrics.psnr(images, reference), metrics.ssim(images, reference))
        if self.lpips_net is not None:
            with torch.no_grad():
                a, b = (to_classifier_input(x, size=x.shape[1]) for x in (images, reference))
                scores.lpips = self.lpips_net(a, b).reshape(len(images)).numpy().astype(np.float64)
        if self.classifier is not None:
            scores.predicted, scores.features = classify(self.classifier, images)
        if self.clip is not None:
            scores.clip = clip_scores(self.clip, images, prompts)
        return scores


# -- features --------------------------------------------------------------------------------
def to_classifier_input(images: np.ndarray, size: int = 32) -> torch.Tensor:
    """float (N, H, W, 3) in [0, 1] -> (N, 3, size, size) in [-1, 1] (area-resized if needed)."""
    tensor = torch.from_numpy(np.ascontiguousarray(images)).float().permute(0, 3, 1, 2) * 2.0 - 1.0
    if tensor.shape[-1] != size or tensor.shape[-2] != size:
        tensor = torch.nn.functional.interpolate(tensor, size=(size, size), mode="area")
    return tensor


def classify(classifier: torch.nn.Module, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Predicted class indices (N, attributes) in ``ATTRIBUTE_CLASSES`` order and features (N, D)."""
    from .demo_model.data import ATTRIBUTE_CLASSES

    with torch.no_grad():
        logits, feats = classifier(to_classifier_input(images))
    predicted = np.stack([logits[name].argmax(1).numpy() for name in ATTRIBUTE_CLASSES], axis=1)
    return predicted, feats.numpy().astype(np.float64)


def prompt_labels(prompts: Sequence[str]) -> np.ndarray:
    """Target class indices (N, attributes) parsed from embedded-model captions."""
    from .demo_model.data import ATTRIBUTE_CLASSES, parse_caption

    rows = [parse_caption(p).labels() for p in prompts]
    return np.array([[row[name] for name in ATTRIBUTE_CLASSES] for row in rows], dtype=np.int64)


def reference_images(prompts: Sequence[str], seed: int = 12345) -> np.ndarray:
    """Real procedural renders of the prompts, float (N, 32, 32, 3) in [0, 1] (the Fréchet reference)."""
    from .demo_model.data import parse_caption, render

    rng = np.random.default_rng(seed)
    return np.stack([render(parse_caption(p), rng) for p in prompts]).astype(np.float64) / 255.0


def lpips_model() -> Any | None:
    """An LPIPS network if the ``lpips`` package and its backbone weights are already local, else ``None``."""
    import importlib.util

    if importlib.util.find_spec("lpips") is None or importlib.util.find_spec("torchvision") is None:
        return None
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    if not any(checkpoints.glob("alexnet-*.pth")):
        return None
    import lpips  # type: ignore[import-not-found]

    return lpips.LPIPS(net="alex", verbose=False).eval()


def clip_model(name: str) -> tuple[Any, Any] | None:
    """(CLIPModel, CLIPProcessor) from local files only, or ``None`` when the weights are not on disk."""
    from transformers import CLIPModel, CLIPProcessor

    try:
        return CLIPModel.from_pretrained(name, local_files_only=True).eval(), CLIPProcessor.from_pretrained(
            name, local_files_only=True
        )
    except (OSError, ValueError):
        return None


def clip_scores(model: tuple[Any, Any], images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
    """CLIP score per image/prompt pair (features extracted here, scored by :func:`metrics.cosine_score`)."""
    clip, processor = model
    pixels = [np.round(img * 255).astype(np.uint8) for img in images]
    inputs = processor(text=list(prompts), images=pixels, return_tensors="pt", padding=True, truncation=True)
    with torch.no_grad():
        image_embeds = _embeds(clip.get_image_features(pixel_values=inputs["pixel_values"]))
        text_embeds = _embeds(
            clip.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        )
    return metrics.cosine_score(image_embeds.numpy(), text_embeds.numpy())


def _embeds(output: Any) -> torch.Tensor:
    """transformers 4.x returns the projected embeddings; 5.x an output whose ``pooler_output`` holds them."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output
