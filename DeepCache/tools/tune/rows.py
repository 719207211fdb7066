"""``deepcache tune``'s rows: FLOP-ideal speedups (and the bounds that prune), and one row per candidate.

A judged candidate's row has its measured speedup (the original's median seconds over its own), the FLOP-ideal
one from the step patterns it ran, PSNR and SSIM on the judging prompts and how many timings it got; a pruned
slot's row has only its bound (``ideal_speedup``) and ``status`` ``pruned``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ..flops import ideal_speedup_pattern
from ..kinds import kind_of
from ..runs import SettingRun
from ..settings import BASELINE
from .choice import beats_bound

__all__ = ["Flops", "baseline_row", "judged_row", "pruned_row", "refresh_speedups"]


class Flops:
    """FLOP-ideal end-to-end speedups (the denoiser's steps and the VAE decode) per branch, at the image size
    ``size`` tune generates, counted by the pipeline's kind (:meth:`DeepCache.tools.kinds.PipelineKind.flop_counter`:
    a U-Net on the meta device, a transformer block by block on a real forward); ``None`` where a U-Net or its VAE is
    not SD-like."""

    def __init__(self, pipe: Any, guidance: float, size: tuple[int, int]) -> None:
        self.counter: Any = None
        self.guidance = guidance
        try:
            self.counter = kind_of(pipe).flop_counter()
        except (AttributeError, TypeError, ValueError, KeyError, RuntimeError):  # not an SD-like U-Net and VAE
            return
        self.latent = self.counter.latent_size(*size)

    def of_patterns(self, branch: int, patterns: Sequence[Sequence[bool]], images: Sequence[int], *,
                    front: int | None = None, back: int | None = None) -> float | None:
        """Original FLOPs over the FLOPs of these step patterns, each weighted by its images, caching at ``branch``
        (or the split ``front``/``back`` of a transformer's blocks)."""
        if self.counter is None or not patterns:
            return None
        step, vae = self.counter.step_costs(images=1, latent=self.latent, branch=branch, guidance_scale=self.guidance,
                                            front=front, back=back)
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
        "ideal_speedup": flops.of_patterns(branch, run.patterns, run.batch_sizes, front=run.setting.front_blocks,
                                           back=run.setting.back_blocks),
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
