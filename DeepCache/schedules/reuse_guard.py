"""The guard of ``helper.calibrate(K)``: the dynamic programme's full steps are checked in closed loop against the
evenly spread schedule of the same ``K`` and kept unless that one is clearly better.

The DP (:func:`~DeepCache.schedules.schedule.optimal_full_steps`) minimises the replay's *one-step* error (each
retrieval step with the recorded inputs). In a real run a step's error reaches the next steps, and with few full
steps the DP's choice can lose to plain even spacing: on the embedded demo model (25 DDIM steps, guidance 4,
branch 0, an untouched prompt set) calibrated reuse was 1.6 dB below the uniform schedule at K = 5 and 3.9 dB at
K = 4 on held-out prompts, and on the tiny Flux DiT 2.8-4.4 dB (docs/schedules.md, docs/dit.md).

The rule (:func:`decide`), on the per-sample reuse errors of the calibration batch (the replay of
:func:`~DeepCache.schedules.forecast_calibration.forecast_errors`, for ``calibrate(K)`` without its forecasts):

1. The evenly spread schedule (:func:`~DeepCache.schedules.schedule.even_full_steps`: step 0 and the steps the
   engine forces full, Wan 2.2's switch to ``transformer_2``, exactly as in the DP). If it equals the DP's steps,
   or needs a gap the replay did not measure (``calibrate(K, max_gap=...)``), the DP's steps are kept and nothing
   runs.
2. Choose on evidence that did not fit it: the ``S`` samples (prompts x images per prompt) are split into folds as
   for the forecast (:func:`~DeepCache.schedules.forecast_refine.kfold`: 4 interleaved folds for ``S >= 4``, leave
   one out for 2-3); for each fold the DP is solved on the other folds' samples (no model run) and run once through
   the pipeline with the same noise (:func:`~DeepCache.schedules.closed_loop.closed_loop_sample_errors`: one run per
   distinct schedule scores every sample), as is the evenly spread schedule (fitted on nothing); gain = 10 x (DP of
   the other folds - even) error on the fold's samples (dB, log10 MSE of the decoded image: its PSNR gain; final
   latents where the pipeline cannot decode, :func:`~DeepCache.schedules.closed_loop.scored_call`). One sample:
   that sample itself.
3. The gains go to the held-out rule of the forecast (:func:`~DeepCache.schedules.forecast_refine.held_out_verdict`,
   one rule in one place): the evenly spread steps replace the DP's only if they win on a clear majority of the
   held-out samples (one-sided sign test, p <= 0.15: 6 of 8, 5 of 6, all of 4; a fold whose DP gives the evenly
   spread steps is a tie, which counts against them) and their mean gain exceeds twice its standard error (gains
   capped at 3 dB for that test, losses in full); with 1-3 samples only if they gain at least 3 dB on every sample.
   Otherwise the DP's steps on all samples.

Why k-fold and not the DP's own steps on the same samples: the DP's steps fit these samples, and on the demo
model's fourth prompt set they beat even spacing there by 3 dB on average at K = 5 in closed loop (2 of 8 samples
for even spacing) while losing 1.6 dB on other prompts: that comparison would almost never switch. The reuse errors
per sample come from the replay the forecast uses (its reuse errors alone, the same evaluations as
:func:`~DeepCache.schedules.calibration.reuse_errors`), so the folds cost no model run; the closed loop costs one
run for the evenly spread steps and one per distinct DP of the folds (2-5; none when the two schedules agree), and
``calibrate(K, forecast=True)`` shares them with its ladder (whose folds run the same DPs).

Example (what ``calibrate(K)`` does)::

    with recorded(pipe, pipe.unet, call) as (rec, final, rewind):
        measured = forecast_errors(pipe.unet, rec, 0, max_span=0, samples=final.shape[0])
        got = guard(pipe, pipe.unet, measured, 5, final, rewind, call)
    got.params.full_steps, got.option, got.reason
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from .closed_loop import memoized_scores, recorded
from .forecast_calibration import ForecastErrors, forecast_errors
from .forecast_refine import Verdict, fold_splits, held_out_verdict
from .params import CacheParams
from .schedule import even_full_steps, forced_full_steps

logger = logging.getLogger(__name__)

#: :attr:`Guard.option` when the DP's steps are kept, and when the evenly spread ones replace them.
DP, EVEN = "DP", "evenly spread"


@dataclass
class Guard:
    """What :func:`guard` decided: the reuse schedule (``params``), which steps won (``option``: :data:`DP` or
    :data:`EVEN`) and why (``reason``), both candidates' steps, the per-sample gains of the evenly spread steps over
    the DP's (dB, each held-out sample against the DP fitted without it; None when nothing ran), their verdict, and the
    closed-loop runs it needed (0, or the evenly spread and the distinct DP schedules of the folds)."""

    params: CacheParams
    option: str
    reason: str
    dp_steps: tuple[int, ...]
    even_steps: tuple[int, ...] | None
    gains: np.ndarray | None = None
    verdict: Verdict | None = None
    runs: int = 0

    @property
    def switched(self) -> bool:
        """Whether the evenly spread steps replaced the DP's."""
        return self.option == EVEN


def measurable(errors: Sequence[Sequence[float]], steps: Sequence[int]) -> bool:
    """Whether every retrieval step of ``steps`` reuses a full step the replay measured it against (finite error).

    >>> inf = math.inf
    >>> measurable([[0, 1, inf], [inf, 0, 1], [inf, inf, 0]], (0, 1)), measurable([[0, 1, inf]] * 3, (0,))
    (True, False)
    """
    full = sorted(steps)
    return all(math.isfinite(errors[max(a for a in full if a <= k)][k]) for k in range(len(errors)) if k not in full)


def decide(measured: ForecastErrors, num_full: int, score: Callable[[CacheParams], np.ndarray]) -> Guard:
    """The rule (module docstring) on ``measured`` (per-sample reuse errors); ``score(params)`` runs a schedule in
    closed loop: the error of each sample (log10 MSE of its decoded image; lower is better). Pure given ``score``."""
    dp = measured.reuse_params(num_full)
    even_steps = even_full_steps(measured.num_steps, num_full, forced_full_steps(measured.reuse))
    if even_steps == dp.full_steps:
        return Guard(dp, DP, "DP steps: the evenly spread steps themselves", dp.full_steps, even_steps)
    if not measurable(measured.reuse, even_steps):
        return Guard(dp, DP, "DP steps: the evenly spread steps need a gap the replay did not measure (max_gap)",
                     dp.full_steps, even_steps)
    even = dataclasses.replace(dp, full_steps=even_steps)
    gains = np.full(measured.samples, np.nan)
    ran = {even}
    for train, held in fold_splits(measured.samples):
        fold = measured.subset(train).reuse_params(num_full)
        ran.add(fold)
        gains[held] = 10.0 * (score(fold)[held] - score(even)[held])
    verdict = held_out_verdict(gains, what="held-out samples", keep="DP steps")
    reason = verdict.reason.replace("accepted:", "evenly spread steps:", 1)
    return Guard(even if verdict.accept else dp, EVEN if verdict.accept else DP, reason, dp.full_steps, even_steps,
                 gains, verdict, len(ran))


def guard(pipeline: Any, unet: nn.Module, measured: ForecastErrors, num_full: int, reference: torch.Tensor,
          rewind: Callable[[], None], call_kwargs: dict, cache: dict | None = None) -> Guard:
    """The guarded reuse schedule of ``num_full`` full steps (:func:`decide`): the closed-loop runs repeat
    ``pipeline(**call_kwargs)`` with the same noise (``rewind``), scored against ``reference`` (the uncached decoded
    images, or final latents: :func:`~DeepCache.schedules.closed_loop.recorded`); ``cache`` (parameters ->
    per-sample scores) keeps them for later choices on the same call. Logs its decision (``logging``, logger
    ``DeepCache.schedules.reuse_guard``, level INFO)."""
    got = decide(measured, num_full, memoized_scores(pipeline, unet, reference, rewind, call_kwargs, cache))
    logger.info("calibrate(%d): %s steps %s (DP %s, evenly spread %s): %s", num_full, got.option,
                got.params.full_steps, got.dp_steps, got.even_steps, got.reason)
    return got


def calibrate_reuse(pipeline: Any, unet: nn.Module, branch: int, num_full: int, max_gap: int | None = None,
                    **call_kwargs: Any) -> Guard:
    """``helper.calibrate(K)``: record the call uncached, measure each sample's reuse errors at ``branch`` (every
    gap up to ``max_gap``; no forecast), solve the DP and :func:`guard` it."""
    with recorded(pipeline, unet, call_kwargs) as (rec, reference, rewind):
        measured = forecast_errors(unet, rec, branch, candidates=(0.0,), max_span=0, samples=reference.shape[0],
                                   reuse_gap=max_gap)
        return guard(pipeline, unet, measured, num_full, reference, rewind, call_kwargs)
