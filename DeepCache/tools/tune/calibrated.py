"""``deepcache tune``'s calibrated candidates: what one branch's calibration run gives every budget.

Per branch, the calibration prompts run once uncached (recorded); that recording is replayed once and solved for
every budget K:

* ``calibrated``: the reuse errors (gaps up to ``reuse_gap``), then the exact programme for each K: the full steps
  :meth:`DeepCacheSDHelper.calibrate` picks;
* ``forecast``: the forecast errors (:func:`DeepCache.forecast_calibration.forecast_errors`: forecasts at most
  :data:`FORECAST_MAX_GAP` evaluations past their full step, from full steps at most :data:`FORECAST_MAX_SPAN` apart;
  farther steps reuse), then for each K the calibrated forecast under each coefficient cap, run once through the
  pipeline on the calibration prompts (the same noise) and the one closest to the uncached final latents kept:
  the closed-loop choice of ``helper.calibrate(K, forecast=True)`` (:func:`DeepCache.forecast_calibration.choose`:
  each cap's forecast steps and the calibrated reuse steps with weights fitted for them), less its reuse option
  (calibrated reuse is a candidate of its own, judged on the evaluation prompts), then refined in closed loop like
  the calibration's (:func:`DeepCache.forecast_refine.refine`: one weight per segment of at least
  ``REFINE_MIN_LENGTH`` retrieval steps). No candidate for a K where no forecast weight is left nonzero. It costs
  up to 6 pipeline calls on the calibration prompts per K, plus up to 14 per long segment (5 or more retrieval
  steps in a row: at 25 steps, about K <= 5).

Both kinds share one recording; ``calibrated`` alone measures exactly as before (the same recording and errors).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ... import calibration
from ... import forecast_calibration as fc
from ... import forecast_refine
from ...params import CacheParams
from ...schedule import optimal_full_steps
from ..settings import Setting

__all__ = ["CALIBRATED_KINDS", "FORECAST_MAX_GAP", "FORECAST_MAX_SPAN", "LINEAR_MAX_INTERVAL", "calibrate_branch",
           "reuse_within"]

#: The kinds whose settings come from a calibration run.
CALIBRATED_KINDS: tuple[str, ...] = ("calibrated", "forecast")
#: The forecast replay's bounds (those of ``helper.calibrate(K, forecast=True)``).
FORECAST_MAX_GAP, FORECAST_MAX_SPAN = fc.MAX_GAP, fc.MAX_SPAN
#: ``linear`` (uniform, ``forecast="linear"``, weight 1) is tried at intervals up to this one only: on the embedded
#: model it gained 9.5 dB over uniform reuse at N = 3 and lost from N = 4 on (issue 19's table).
LINEAR_MAX_INTERVAL = 3


def reuse_within(errors: Sequence[Sequence[float]], max_gap: int) -> list[list[float]]:
    """Reuse errors with every gap longer than ``max_gap`` set to infinity (what a replay bounded there measures).

    >>> reuse_within([[0.0, 1.0, 2.0], [math.inf, 0.0, 1.0], [math.inf, math.inf, 0.0]], 1)
    [[0.0, 1.0, inf], [inf, 0.0, 1.0], [inf, inf, 0.0]]
    """
    return [[e if k - a <= max_gap else math.inf for k, e in enumerate(row)] for a, row in enumerate(errors)]


def _forecast_choice(pipe: Any, measured: fc.ForecastErrors, budget: int, reference: torch.Tensor, rewind: Any,
                     call: dict[str, Any]) -> CacheParams | None:
    """The calibrated forecast with ``budget`` full steps whose closed-loop latents are closest (first on ties);
    ``None`` when no forecast has a nonzero weight (it would be reuse)."""
    options = [p for p in fc.candidate_params(measured, budget) if p.forecast is not None]
    if not options:
        return None
    scores = fc.closed_loop_errors(pipe, pipe.unet, options, reference, rewind, call)
    best = min(range(len(options)), key=lambda i: (scores[i], i))

    def score(params: CacheParams) -> float:
        return fc.closed_loop_errors(pipe, pipe.unet, [params], reference, rewind, call)[0]

    refined, _, _ = forecast_refine.refine(score, forecast_refine.as_forecast(options[best], measured.num_steps), scores[best])
    return refined if any(refined.forecast_weights) else None


def calibrate_branch(pipe: Any, branch: int, budgets: Sequence[int], kinds: Sequence[str], call: dict[str, Any],
                     reuse_gap: int) -> dict[str, dict[int, Setting]]:
    """``{kind: {K: setting}}`` for the calibrated kinds among ``kinds``, from one recording of ``call``.

    ``call`` is the pipeline call on the calibration prompts (its ``generator`` list fixes the noise).
    """
    wanted = [k for k in CALIBRATED_KINDS if k in kinds]
    if not wanted:
        return {}
    budgets = sorted(set(budgets))
    out: dict[str, dict[int, Setting]] = {kind: {} for kind in wanted}
    if "forecast" not in wanted:
        errors = calibration.measure_reuse_errors(pipe, pipe.unet, branch, reuse_gap, **call)
    else:
        with fc.recorded(pipe, pipe.unet, call) as (rec, reference, rewind):
            measured = fc.forecast_errors(pipe.unet, rec, branch, max_gap=FORECAST_MAX_GAP, max_span=FORECAST_MAX_SPAN)
            for k in budgets:
                params = _forecast_choice(pipe, measured, k, reference, rewind, call)
                if params is not None:
                    out["forecast"][k] = Setting.of(params)
        errors = reuse_within(measured.reuse, reuse_gap)
    if "calibrated" in wanted:
        for k in budgets:
            out["calibrated"][k] = Setting(1, branch, "custom", full_steps=optimal_full_steps(errors, k))
    return out
