"""Attribute classifier for the procedural shapes: checks that a generated image followed its prompt.

A small CNN with one linear head per attribute (shape, colour, background, position, size). Its
penultimate activations (``FEATURE_DIM`` numbers per image) are the feature space of the Fréchet
distance reported by ``deepcache eval``. It is trained on the same procedural data as the demo
pipeline, with mild blur, noise and colour jitter so that it judges generated images fairly.

Stored as ``model.safetensors`` plus ``config.json`` (class names, sizes, held-out accuracy).

Example::

    >>> import torch
    >>> from DeepCache.tools.demo_model.classifier import ShapeClassifier
    >>> model = ShapeClassifier()
    >>> logits, feats = model(torch.zeros(2, 3, 32, 32))
    >>> sorted(logits), tuple(feats.shape)
    (['background', 'colour', 'position', 'shape', 'size'], (2, 32))
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import ATTRIBUTE_CLASSES, images_to_tensor, make_dataset

FEATURE_DIM = 32
_CONFIG = "config.json"
_WEIGHTS = "model.safetensors"


class ShapeClassifier(nn.Module):
    """CNN over (N, 3, 32, 32) images in [-1, 1] -> (logits per attribute, (N, FEATURE_DIM) features)."""

    def __init__(self, channels: tuple[int, int, int] = (32, 64, 64), feature_dim: int = FEATURE_DIM) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = 3
        for index, width in enumerate(channels):
            layers += [nn.Conv2d(previous, width, 3, padding=1), nn.GroupNorm(8, width), nn.SiLU()]
            if index < len(channels) - 1:
                layers.append(nn.AvgPool2d(2))
            previous = width
        self.body = nn.Sequential(*layers)
        # Keep coarse spatial layout (positions matter), then project to the feature vector.
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.project = nn.Sequential(nn.Flatten(), nn.Linear(previous * 16, feature_dim), nn.SiLU())
        self.heads = nn.ModuleDict(
            {name: nn.Linear(feature_dim, len(classes)) for name, classes in ATTRIBUTE_CLASSES.items()}
        )
        self.channels = channels
        self.feature_dim = feature_dim

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate activations, (N, feature_dim)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (N, 3, H, W) in [-1, 1], got {tuple(images.shape)}.")
        return self.project(self.pool(self.body(images)))

    def forward(self, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        feats = self.features(images)
        return {name: head(feats) for name, head in self.heads.items()}, feats


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random blur, additive noise and per-image brightness/colour shifts (images in [-1, 1])."""
    n = images.shape[0]
    kernel = torch.tensor([0.25, 0.5, 0.25])
    kernel2d = (kernel[:, None] * kernel[None, :]).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel2d, groups=3)
    use_blur = (torch.rand(n, 1, 1, 1, generator=generator) < 0.5).float()
    out = use_blur * blurred + (1 - use_blur) * images
    out = out + 0.1 * (torch.rand(n, 3, 1, 1, generator=generator) - 0.5)
    out = out + 0.05 * torch.rand(n, 1, 1, 1, generator=generator) * torch.randn(out.shape, generator=generator)
    return out.clamp(-1.0, 1.0)


def train_classifier(
    out: Path,
    steps: int = 1500,
    seed: int = 0,
    batch_size: int = 128,
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """Train on fresh procedural batches, save to ``out``; returns held-out accuracy per attribute."""
    torch.manual_seed(seed)
    model = ShapeClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed + 7)
    start = time.monotonic()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = 2e-3 * 0.5 * (1 + np.cos(np.pi * step / max(1, steps)))
        batch = make_dataset(batch_size, seed=seed * 1_000_003 + 500_000 + step)
        logits, _ = model(augment(images_to_tensor(batch.images), generator))
        loss = torch.stack(
            [F.cross_entropy(logits[name], torch.from_numpy(batch.labels[name])) for name in ATTRIBUTE_CLASSES]
        ).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"classifier step {step}/{steps} loss {float(loss.detach()):.4f}")
    model.eval()
    held_out = make_dataset(2000, seed=seed * 1_000_003 + 999_999)
    with torch.no_grad():
        logits, _ = model(images_to_tensor(held_out.images))
    accuracy = {
        f"classifier_acc_{name}": float((logits[name].argmax(1).numpy() == held_out.labels[name]).mean())
        for name in ATTRIBUTE_CLASSES
    }
    save_classifier(
        model, out, extra={**accuracy, "train_steps": steps, "seed": seed, "train_seconds": time.monotonic() - start}
    )
    log(f"classifier held-out accuracy {accuracy}")
    return accuracy


def save_classifier(model: ShapeClassifier, out: Path, extra: dict[str, float] | None = None) -> None:
    """Write ``config.json`` and ``model.safetensors`` into ``out``."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "channels": list(model.channels),
        "feature_dim": model.feature_dim,
        "classes": {name: list(classes) for name, classes in ATTRIBUTE_CLASSES.items()},
        **(extra or {}),
    }
    (out / _CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / _WEIGHTS))


def load_classifier(path: str | Path) -> ShapeClassifier:
    """Load a classifier saved by :func:`save_classifier` (eval mode, no gradients)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / _CONFIG).is_file() or not (path / _WEIGHTS).is_file():
        raise FileNotFoundError(
            f"{path} lacks {_CONFIG} or {_WEIGHTS}; train one with `deepcache train-demo-model --stages classifier --out DIR`."
        )
    config = json.loads((path / _CONFIG).read_text())
    expected = {name: list(classes) for name, classes in ATTRIBUTE_CLASSES.items()}
    if config["classes"] != expected:
        raise ValueError(
            f"{path} was trained for classes {config['classes']}, but this version uses {expected}; retrain it."
        )
    model = ShapeClassifier(tuple(config["channels"]), config["feature_dim"])  # type: ignore[arg-type]
    model.load_state_dict(load_file(str(path / _WEIGHTS)))
    return model.eval().requires_grad_(False)
