"""``deepcache tune``'s rows: FLOP-ideal speedups (and the bounds that prune), and one row per candidate.

A judged candidate's row has its measured speedup (the original's median seconds over its own), the FLOP-ideal
one from the step patterns it ran, PSNR and SSIM on the judging prompts and how many timings it got; a pruned
slot's row has only its bound (``ideal_speedup``) and ``status`` ``pruned``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ..flops import FlopCache, ideal_speedup_pattern, unet_batch
from ..runs import SettingRun
from ..settings import BASELINE
from .choice import beats_bound

__all__ = ["Flops", "baseline_row", "judged_row", "pruned_row", "refresh_speedups"]


class Flops:
    """FLOP-ideal end-to-end speedups (U-Net steps and the VAE decode), per branch; ``None`` where the U-Net or
    VAE is not SD-like."""

    def __init__(self, pipe: Any, guidance: float) -> None:
        self.counter: FlopCache | None = None
        try:
            self.counter = FlopCache(pipe.unet.config, pipe.vae.config)
        except (AttributeError, TypeError, ValueError, KeyError, RuntimeError):  # not an SD-like U-Net and VAE
            return
        size = pipe.unet.config.sample_size
        self.latent = (size, size) if isinstance(size, int) else tuple(size)
        self.unet_batch = unet_batch(pipe.unet.config, 1, guidance)

    def of_patterns(self, branch: int, patterns: Sequence[Sequence[bool]], images: Sequence[int]) -> float | None:
        """Original FLOPs over the FLOPs of these step patterns, each weighted by its images."""
        if self.counter is None or not patterns:
            return None
        step = self.counter.step(self.unet_batch, *self.latent, branch)
        vae = self.counter.vae_decode(1, *self.latent)
        per_image = [f for p, n in zip(patterns, images) for _ in range(n) for f in p]
        return ideal_speedup_pattern(per_image, step.full, step.retrieval, vae * sum(images))

    def of_full_steps(self, branch: int, full: int, evaluations: int) -> float | None:
        """The speedup of any pattern with ``full`` full steps of ``evaluations`` (only the count matters)."""
        return self.of_patterns(branch, [(True,) * full + (False,) * (evaluations - full)], [1])


def baseline_row(run: SettingRun, evaluations: int) -> dict[str, Any]:
    return {
        "kind": "original", "interval": 1, "budget": evaluations, "branch": None, "setting": BASELINE.label,
        "params": None, "full_steps": float(evaluations), "seconds": run.median_seconds,
        "seconds_all": run.seconds, "timings": len(run.seconds), "speedup": 1.0, "ideal_speedup": 1.0,
        "beats_bound": False, "psnr": math.inf, "ssim": 1.0, "meets": None, "pareto": None, "status": "timed",
    }


def judged_row(kind: str, interval: int | None, budget: int, run: SettingRun, steps: int, flops: Flops) -> dict[str, Any]:
    means = run.scores.means() if run.scores is not None else {"psnr": math.nan, "ssim": math.nan}
    branch = run.setting.cache_branch_id
    return {
        "kind": kind, "interval": interval, "budget": budget, "branch": branch, "setting": run.setting.label,
        "params": run.setting.for_steps(steps).helper_kwargs(), "full_steps": run.full_steps,
        "seconds": None, "seconds_all": run.seconds, "timings": None, "speedup": None,
        "ideal_speedup": flops.of_patterns(branch, run.patterns, run.batch_sizes),
        "beats_bound": False, "psnr": means["psnr"], "ssim": means["ssim"], "meets": None, "pareto": False,
        "status": "judged",
    }


def pruned_row(kind: str, interval: int | None, budget: int, branch: int, bound: float | None,
               setting: str | None) -> dict[str, Any]:
    return {
        "kind": kind, "interval": interval, "budget": budget, "branch": branch, "setting": setting, "params": None,
        "full_steps": None, "seconds": None, "seconds_all": [], "timings": 0, "speedup": None,
        "ideal_speedup": bound, "beats_bound": False, "psnr": None, "ssim": None, "meets": None, "pareto": None,
        "status": "pruned",
    }


def refresh_speedups(rows: Sequence[dict[str, Any]], runs: Sequence[SettingRun], baseline: SettingRun) -> None:
    """Each judged row's seconds, timings, speedup and noise flag from its run (``runs[k]`` for ``rows[k]``)."""
    for row, run in zip(rows, runs):
        row["seconds"], row["seconds_all"], row["timings"] = run.median_seconds, run.seconds, len(run.seconds)
        row["speedup"] = baseline.median_seconds / run.median_seconds
        row["beats_bound"] = beats_bound(row)
