"""The closed-loop refinement of a calibrated forecast (step 4 of :mod:`DeepCache.forecast_calibration`): one weight
per long segment between full steps, by coordinate descent on a score that runs the pipeline.

Pure: the score is a callable (``CacheParams -> float``, lower is better), so the search is tested without a model.

>>> from DeepCache import CacheParams
>>> p = as_forecast(CacheParams(skip_mode="custom", full_steps=(0, 2, 8)), 9)
>>> got, score, trials = refine(lambda q: abs(q.forecast_weights[3] + 0.2), p, 0.2)
>>> got.forecast_weights, round(score, 6), trials
((0.0, 0.0, 0.0, -0.2, -0.2, -0.2, -0.2, -0.2, 0.0), 0.0, 14)
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from .params import CacheParams

#: The weights tried per segment (negative: back along the line), the sweeps over the segments, the shortest
#: segment refined (in retrieval steps; shorter ones are left as the replay fitted them) and the least improvement
#: of the score (the latent error, log10 MSE) that counts.
SEGMENT_WEIGHTS = (-0.4, -0.3, -0.2, -0.1, 0.0, 0.1, 0.2, 0.3)
REFINE_SWEEPS, REFINE_MIN_LENGTH, REFINE_MARGIN = 2, 5, 1e-3


def as_forecast(params: CacheParams, num_steps: int) -> CacheParams:
    """``params`` as a linear forecast with a weight for each of ``num_steps`` evaluations (all 0 for a reuse
    schedule: the same run)."""
    weights = tuple(params.weight_at(k) for k in range(num_steps))
    return dataclasses.replace(params, forecast="linear", forecast_weight=0.0, forecast_weights=weights)


def segments(params: CacheParams, min_length: int = REFINE_MIN_LENGTH) -> list[range]:
    """The runs of retrieval steps after each full step but the first (which has no line yet) with at least
    ``min_length`` steps, within ``params.forecast_weights``.

    >>> p = CacheParams(skip_mode="custom", full_steps=(0, 3, 9), forecast="linear", forecast_weights=(0,) * 14)
    >>> segments(p), segments(p, min_length=4)
    ([range(4, 9)], [range(4, 9), range(10, 14)])
    """
    n = len(params.forecast_weights or ())
    steps = sorted(params.full_steps or ())
    bounds = [(a + 1, steps[i + 1] if i + 1 < len(steps) else n) for i, a in enumerate(steps) if i > 0]
    return [range(lo, hi) for lo, hi in bounds if hi - lo >= max(1, min_length)]


def refine(score: Callable[[CacheParams], float], params: CacheParams, start: float,
           grid: Sequence[float] = SEGMENT_WEIGHTS, sweeps: int = REFINE_SWEEPS,
           min_length: int = REFINE_MIN_LENGTH) -> tuple[CacheParams, float, int]:
    """Coordinate descent over one weight per long segment (:func:`segments`), judged by ``score`` (closed loop:
    lower is better; ``start`` is the score of ``params``): each sweep tries every weight of ``grid`` on each
    segment in turn (the others as they stand), keeping the best that lowers the score by ``REFINE_MARGIN``.
    Returns the result, its score and the number of trials (``score`` calls).

    >>> target = {4: -0.2, 10: 0.3}  # the best weight of each segment, by its first step
    >>> loss = lambda p: sum((p.forecast_weights[lo] - w) ** 2 for lo, w in target.items())
    >>> p = as_forecast(CacheParams(skip_mode="custom", full_steps=(0, 3, 9)), 14)
    >>> got, _, _ = refine(loss, p, loss(p), min_length=4)
    >>> got.forecast_weights[4:9], got.forecast_weights[10:]
    ((-0.2, -0.2, -0.2, -0.2, -0.2), (0.3, 0.3, 0.3, 0.3))
    """
    best, best_score, trials = params, start, 0
    for _ in range(max(0, sweeps)):
        for seg in segments(best, min_length):
            before = best
            for w in grid:
                weights = list(before.forecast_weights)
                weights[seg.start : seg.stop] = [float(w)] * len(seg)
                trial = dataclasses.replace(before, forecast_weights=tuple(weights))
                if trial == before:  # the segment's weight on entering its turn: its score is known
                    continue
                got = score(trial)
                trials += 1
                if got < best_score - REFINE_MARGIN:
                    best, best_score = trial, got
    return best, best_score, trials
