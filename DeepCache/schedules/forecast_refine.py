"""The closed-loop refinement of a calibrated forecast (step 4 of :mod:`DeepCache.schedules.forecast_calibration`): one weight
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
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .params import CacheParams

#: The weights tried per segment (negative: back along the line), the sweeps over the segments, the shortest
#: segment refined (in retrieval steps; shorter ones are left as the replay fitted them) and the least improvement
#: of the score (the closed loop's image error, log10 MSE) that counts.
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


# -- the held-out choice (pure: per-sample scores in, a verdict out) --------------------------------------------

#: The held-out rule (:func:`held_out_verdict`): fewer held-out samples than ``MIN_HELD_OUT`` take the few-samples
#: branch; a sign test at ``SIGN_ALPHA`` (one-sided); the mean gain above ``SPREAD_Z`` standard errors; gains within
#: ``TIE_DB`` of 0 are ties (never wins); with few samples every gain must reach ``FEW_GAIN_DB``. Gains in dB
#: (``10 * (reuse - forecast)`` closed-loop errors, log10 MSE: the PSNR gain of the decoded images).
MIN_HELD_OUT, SIGN_ALPHA, SPREAD_Z, TIE_DB, FEW_GAIN_DB = 4, 0.15, 2.0, 0.01, 3.0
#: The spread test caps each gain at ``GAIN_CAP_DB`` first (losses count in full): a sample that gains 20 dB must
#: not widen the spread enough to reject a forecast that gains on every sample. ``mean(min(g, cap)) > 0`` implies
#: ``mean(g) > 0``, so the capped test is a test of the same claim (the forecast gains on average).
GAIN_CAP_DB = 3.0
#: Folds of the k-fold split of the calibration samples (fewer samples: leave one out).
KFOLDS = 4


@dataclass(frozen=True)
class Verdict:
    """What :func:`held_out_verdict` decided, and why (``reason`` names the branch of the rule)."""

    accept: bool
    reason: str
    wins: int
    losses: int
    mean_db: float
    stderr_db: float


def sign_test(wins: int, n: int) -> float:
    """One-sided sign-test p-value: the chance of at least ``wins`` wins in ``n`` fair coin flips.

    >>> sign_test(6, 8), sign_test(8, 8)
    (0.14453125, 0.00390625)
    """
    return sum(math.comb(n, i) for i in range(max(0, wins), n + 1)) / 2**n


def held_out_verdict(gains_db: Sequence[float], what: str = "held-out samples", keep: str = "reuse") -> Verdict:
    """Accept a forecast over calibrated reuse only on clear held-out evidence (``gains_db``: one per held-out
    calibration sample, forecast minus reuse, each fitted without that sample; a tie or a NaN counts against it).

    * 4 or more samples (``MIN_HELD_OUT``): accept if the forecast wins (gain > ``TIE_DB``) on a clear majority,
      a one-sided sign test with p <= ``SIGN_ALPHA`` (ties count as losses: 6 of 8, 5 of 6, all of 4), **and** the
      mean of the gains capped at ``GAIN_CAP_DB`` (losses in full) exceeds ``SPREAD_Z`` standard errors of those
      capped gains (and ``TIE_DB``). ``mean_db`` and ``stderr_db`` are those of the gains themselves.
    * 1-3 samples: too few for either test: accept only if every gain is at least ``FEW_GAIN_DB`` (3 dB).
    * no samples: reuse.

    ``what`` names the samples and ``keep`` the option kept on a rejection, in ``reason`` only (the guard of
    ``calibrate(K)``, :mod:`DeepCache.schedules.reuse_guard`, applies the same rule to other options).

    >>> held_out_verdict([1.0, 1.2, 0.9, 1.1, 1.0, -0.1, 1.3, 0.8]).reason
    'accepted: 7 of 8 held-out samples gain, mean 0.900 dB; capped 0.900 dB > 2 x 0.154 dB (the spread; gains capped at 3 dB)'
    >>> held_out_verdict([1.0, 1.2, 0.9, 1.1, 1.0, -0.1, 1.3, 30.0]).accept  # a large gain does not widen the spread
    True
    >>> held_out_verdict([4.0, 3.5]).accept, held_out_verdict([4.0, 2.5]).accept
    (True, False)
    """
    g = np.asarray(gains_db, dtype=np.float64).ravel()
    g = np.where(np.isnan(g), -math.inf, g)
    n = len(g)
    wins, losses = int((g > TIE_DB).sum()), int((g < -TIE_DB).sum())
    if n == 0:
        return Verdict(False, f"{keep}: no {what}", 0, 0, math.nan, math.nan)
    finite = np.isfinite(g).all()
    mean = float(g.mean()) if finite else -math.inf
    se = float(g.std(ddof=1) / math.sqrt(n)) if n > 1 and finite else math.inf
    if n < MIN_HELD_OUT:
        if float(g.min()) >= FEW_GAIN_DB:
            return Verdict(True, f"accepted: few samples ({n}), every gain >= {FEW_GAIN_DB:g} dB", wins, losses, mean, se)
        return Verdict(False, f"{keep}: few samples ({n}), a gain below {FEW_GAIN_DB:g} dB", wins, losses, mean, se)
    capped = np.minimum(g, GAIN_CAP_DB)
    capped_mean = float(capped.mean()) if finite else -math.inf
    capped_se = float(capped.std(ddof=1) / math.sqrt(n)) if finite else math.inf
    p = sign_test(wins, n)
    if p > SIGN_ALPHA:
        return Verdict(False, f"{keep}: {wins} of {n} {what} gain (sign test p = {p:.3f} > {SIGN_ALPHA:g})",
                       wins, losses, mean, se)
    capped_text = f"{capped_mean:.3f} dB {{}} {SPREAD_Z:g} x {capped_se:.3f} dB (the spread; gains capped at {GAIN_CAP_DB:g} dB)"
    if not capped_mean > max(SPREAD_Z * capped_se, TIE_DB):
        return Verdict(False, f"{keep}: mean gain {mean:.3f} dB; capped {capped_text.format('within')}",
                       wins, losses, mean, se)
    return Verdict(True, f"accepted: {wins} of {n} {what} gain, mean {mean:.3f} dB; capped "
                   f"{capped_text.format('>')}", wins, losses, mean, se)


def climb(judge: Callable[[int], Verdict | None], rungs: int) -> tuple[int | None, list[Verdict | None]]:
    """Fixed-sequence testing up a ladder of ``rungs`` options ordered from mildest to boldest, fixed in advance:
    ``judge(i)`` is rung ``i``'s :func:`held_out_verdict` (or None: nothing new to test, e.g. the rung equals reuse
    or an earlier rung on every fold; it is passed over). The climb stops at the first rung not accepted, so later
    rungs are never judged (nor run); of the accepted rungs the one with the largest mean held-out gain is kept
    (the first of equals), None: reuse. Returns it and the verdicts (None where not judged).

    Why a ladder: each rung is tested on its own held-out gains, and testing in a fixed order, stopping at the
    first failure, keeps the chance of accepting *any* rung that does not beat reuse at the level of one test (the
    fixed-sequence procedure), however many rungs there are. Keeping the accepted rung with the largest mean
    therefore costs no safety (each accepted rung passed), while picking the best of many options by the same
    held-out gains and then testing only that one would accept a rung that won by chance.

    >>> v = lambda mean: Verdict(mean > 0, "", 8, 0, mean, 0.1)
    >>> climb(lambda i: v([1.0, None, 3.0, -1.0, 9.0][i]) if i != 1 else None, 5)[0]  # stops at rung 3
    2
    >>> climb(lambda i: v(-1.0), 3)
    (None, [Verdict(accept=False, reason='', wins=8, losses=0, mean_db=-1.0, stderr_db=0.1), None, None])
    """
    verdicts: list[Verdict | None] = [None] * max(0, rungs)
    best = None
    for i in range(max(0, rungs)):
        verdict = judge(i)
        verdicts[i] = verdict
        if verdict is None:
            continue
        if not verdict.accept:
            break
        if best is None or verdict.mean_db > verdicts[best].mean_db:
            best = i
    return best, verdicts


def kfold(samples: int, folds: int = KFOLDS) -> list[list[int]]:
    """The held-out samples of each fold: ``folds`` interleaved folds (sample ``s`` in fold ``s % folds``) when
    there are at least ``MIN_HELD_OUT`` samples, else leave one out; none for one sample (nothing to hold out).

    >>> kfold(8), kfold(6), kfold(3), kfold(1)
    ([[0, 4], [1, 5], [2, 6], [3, 7]], [[0, 4], [1, 5], [2], [3]], [[0], [1], [2]], [])
    """
    if samples < 2:
        return []
    k = min(max(2, folds), samples) if samples >= MIN_HELD_OUT else samples
    return [list(range(f, samples, k)) for f in range(k)]


def fold_splits(samples: int) -> list[tuple[list[int], list[int]]]:
    """``(train, held)`` per fold of :func:`kfold`: each fold's held-out samples and the others; one sample (no fold):
    that sample on both sides.

    >>> fold_splits(3), fold_splits(1)
    ([([1, 2], [0]), ([0, 2], [1]), ([0, 1], [2])], [([0], [0])])
    """
    everyone = list(range(samples))
    return [([s for s in everyone if s not in held], held) for held in kfold(samples)] or [(everyone, everyone)]


def shrink(params: CacheParams, factor: float) -> CacheParams:
    """``params`` with every forecast weight times ``factor`` (toward reuse).

    >>> p = CacheParams(skip_mode="custom", full_steps=(0, 1), forecast="linear", forecast_weights=(0, 0, 0.5, -0.2))
    >>> shrink(p, 0.5).forecast_weights
    (0.0, 0.0, 0.25, -0.1)
    """
    weights = tuple(float(w) * factor for w in params.forecast_weights or ())
    return dataclasses.replace(params, forecast_weights=weights)
