"""Optimisation helpers shared by the demo models' trainers (the U-Net pipeline and the Flux DiT).

    >>> [round(lr_factor(s, total=10, warmup=2), 3) for s in (0, 1, 2, 10)]
    [0.5, 1.0, 1.0, 0.1]
"""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 10 % at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """One exponential-moving-average step of ``ema``'s weights toward ``model``'s (in place)."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - decay)
