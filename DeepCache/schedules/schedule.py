"""Which U-Net evaluations are full steps: pure functions, no model needed.

A *full step* runs the whole U-Net and refreshes the cache; a *retrieval step* runs only the
shallow branch and reuses the deep feature cached at the last full step. Steps are counted
per generation from 0: step ``k`` is the ``k``-th U-Net evaluation of the current pipeline call
(a second-order scheduler such as Heun evaluates the U-Net about twice per denoising step, and
each evaluation counts). The parameters, :class:`~DeepCache.schedules.params.CacheParams` (validation, JSON), are
:mod:`DeepCache.schedules.params`; ``from DeepCache.schedules.schedule import CacheParams`` works as well.

Example::

    >>> from DeepCache.schedules.schedule import CacheParams, schedule_pattern
    >>> p = CacheParams(cache_interval=3)
    >>> "".join("F" if full else "r" for full in schedule_pattern(p, 10))
    'FrrFrrFrrF'
"""

from __future__ import annotations

import functools
import math
from typing import Iterable, Sequence

# CacheParams and as_params are re-exported: `from DeepCache.schedules.schedule import CacheParams` is how users and docs name it
from .params import FORECASTS, SKIP_MODES, CacheParams, _is_int, as_params  # noqa: F401


def non_uniform_full_steps(num_steps: int, num_full: int, center: int, pow: float = 1.4) -> tuple[int, ...]:
    """Full-step indices of the paper's non-uniform schedule (Eq. 7), symmetric around ``center``.

    ``num_full`` points are spaced evenly in ``u`` between ``-center**(1/p)`` and
    ``(num_steps-1-center)**(1/p)`` and mapped to ``center + sign(u)*|u|**p`` (floored), so the gaps
    between full steps grow with the distance from ``center`` on both sides. Index 0 is always
    included. If flooring merges points, ``p`` is lowered by 0.02 (as the original does) until
    ``num_full`` distinct indices remain; ``p = 1`` gives evenly spaced steps.

    The original implementation computes ``(-center)**(1/p)`` with NumPy, which is NaN, so its
    schedule is not the formula's; this function implements the formula as written.

    >>> non_uniform_full_steps(50, 10, center=15, pow=1.4)
    (0, 6, 11, 14, 17, 21, 27, 33, 41, 49)
    """
    if not _is_int(num_steps) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}.")
    if not _is_int(num_full) or not 1 <= num_full <= num_steps:
        raise ValueError(f"num_full must be an integer in [1, num_steps={num_steps}], got {num_full!r}.")
    if not _is_int(center) or not 0 <= center < num_steps:
        raise ValueError(
            f"center={center!r} must be a step index in [0, {num_steps - 1}] for a {num_steps}-step generation; "
            "lower it with set_params(center=...)."
        )
    if num_full == 1:
        return (0,)
    p = float(pow)
    while True:
        p_eff = max(p, 1.0)
        lo = -(center ** (1.0 / p_eff))
        hi = (num_steps - 1 - center) ** (1.0 / p_eff)
        points = set()
        for i in range(num_full):
            u = lo + (hi - lo) * i / (num_full - 1)
            x = center + math.copysign(abs(u) ** p_eff, u)
            points.add(min(num_steps - 1, max(0, int(math.floor(x + 1e-9)))))
        points.add(0)
        if len(points) >= num_full or p_eff <= 1.0:
            break
        p -= 0.02
    steps = sorted(points)
    if len(steps) < num_full:  # p reached 1 and rounding still merged points: fill evenly
        missing = [s for s in range(num_steps) if s not in points]
        steps = sorted(steps + missing[: num_full - len(steps)])
    return tuple(steps[:num_full]) if len(steps) > num_full else tuple(steps)


def is_full_step(params: CacheParams, step: int, num_steps: int | None = None) -> bool:
    """Whether U-Net evaluation ``step`` (0-based, within one generation) is a full step.

    Step 0 is always full. ``num_steps`` (U-Net evaluations in the generation) is only needed by
    the non-uniform schedule; without it, that schedule makes every step full.

    >>> is_full_step(CacheParams(cache_interval=3), 3), is_full_step(CacheParams(cache_interval=3), 4)
    (True, False)
    """
    if step <= 0:
        return True
    if step < params.start_step or (params.end_step is not None and step >= params.end_step):
        return True
    if params.skip_mode == "uniform":
        return (step - params.start_step) % params.cache_interval == 0
    if params.skip_mode == "custom":
        assert params.full_steps is not None
        return step in params.full_steps or step == params.start_step
    if params.skip_mode == "adaptive":
        raise ValueError(
            'skip_mode="adaptive" decides full steps at run time, so no pattern can be computed ahead (FLOP counts '
            'need one): time it instead, or fix the decisions of an adaptive run with skip_mode="custom".'
        )
    if num_steps is None or step >= num_steps:
        return True
    return step in _non_uniform_set(params, num_steps) or step == params.start_step


@functools.lru_cache(maxsize=64)
def _non_uniform_set(params: CacheParams, num_steps: int) -> frozenset[int]:
    num_full = -(-num_steps // params.cache_interval)
    return frozenset(non_uniform_full_steps(num_steps, num_full, params.center, params.pow))


def adaptive_is_full_step(params: CacheParams, step: int, retrievals_in_a_row: int, signal: float | None) -> bool:
    """Whether evaluation ``step`` of an adaptive generation is a full step.

    Full at step 0, outside the ``[start_step, end_step)`` window, after ``cache_interval - 1`` retrieval
    steps in a row (the cap), and when ``signal`` (the relative L1 change of the branch's skip feature since
    the last full step) is ``threshold`` or more. ``signal=None`` asks only whether the step is forced full.

    >>> p = CacheParams(cache_interval=3, skip_mode="adaptive", threshold=0.1)
    >>> adaptive_is_full_step(p, 5, 0, 0.05), adaptive_is_full_step(p, 5, 0, 0.2), adaptive_is_full_step(p, 5, 2, 0.0)
    (False, True, True)
    """
    if step <= 0 or step < params.start_step or (params.end_step is not None and step >= params.end_step):
        return True
    if retrievals_in_a_row >= params.cache_interval - 1:
        return True
    return signal is not None and signal >= (params.threshold or 0.0)


def segment_cost(drift: Sequence[float], start: int, end: int) -> float:
    """Accumulated drift of reusing the feature of full step ``start`` on the retrieval steps ``start+1..end-1``.

    ``drift[j]`` is how much the cached feature changes from evaluation ``j`` to ``j + 1``; the reused feature
    at retrieval step ``k`` is ``drift[start] + ... + drift[k-1]`` away from the true one (accumulated).

    >>> segment_cost([1.0, 2.0, 4.0], 0, 3)   # step 1: 1; step 2: 1 + 2
    4.0
    """
    return float(sum(drift[j] * (end - 1 - j) for j in range(start, end - 1)))


def drift_errors(drift: Sequence[float]) -> list[list[float]]:
    """The reuse errors implied by consecutive drifts: ``errors[a][k] = drift[a] + ... + drift[k-1]``."""
    n = len(drift) + 1
    errors = [[math.inf] * n for _ in range(n)]
    for a in range(n):
        acc = errors[a][a] = 0.0
        for k in range(a + 1, n):
            acc += drift[k - 1]
            errors[a][k] = acc
    return errors


def forced_full_steps(errors: Sequence[Sequence[float]]) -> tuple[int, ...]:
    """The steps ``k > 0`` that can reuse no earlier step (``errors[a][k]`` is ``math.inf`` for every ``a < k``):
    full in every schedule. Wan 2.2: the first step of ``transformer_2``, which has a cache of its own.

    >>> forced_full_steps([[0, 1, math.inf], [math.inf, 0, math.inf], [math.inf, math.inf, 0]])
    (2,)
    """
    return tuple(k for k in range(1, len(errors)) if all(math.isinf(errors[a][k]) for a in range(k)))


def check_budget(errors: Sequence[Sequence[float]], num_full: int) -> None:
    """Raise ``ValueError`` if ``num_full`` full steps cannot cover step 0 and the :func:`forced_full_steps`."""
    forced = forced_full_steps(errors)
    if _is_int(num_full) and 1 <= num_full < 1 + len(forced):
        raise ValueError(
            f"step{'s' if len(forced) > 1 else ''} {', '.join(map(str, forced))} cannot reuse the feature of any "
            "earlier step, so every schedule runs them in full (Wan 2.2: the first step of transformer_2, whose cache "
            f"is its own): num_full_steps must be at least {1 + len(forced)}, got {num_full}.")


def optimal_full_steps(errors: Sequence[Sequence[float]], num_full: int) -> tuple[int, ...]:
    """The ``num_full`` full steps (step 0 included) that minimise the total reuse error of an ``n``-step run.

    ``errors[a][k]`` (``k > a``) is the error of retrieval step ``k`` reusing the feature of full step ``a``
    (``math.inf``: not allowed). A segment ``[a, b)`` costs ``errors[a][a+1] + ... + errors[a][b-1]``; an
    exact dynamic programme over step indices: ``best[m][e]``, the least cost of steps ``0..e-1`` with ``m``
    full steps, in ``O(num_full * n^2)``. A step that can reuse no earlier one (:func:`forced_full_steps`) is
    always chosen; fewer full steps than those and step 0 raise ``ValueError``.

    >>> optimal_full_steps(drift_errors([0.1, 0.1, 5.0, 0.1, 0.1]), 2)  # refresh right after the big change
    (0, 3)
    """
    n = len(errors)
    if not _is_int(num_full) or not 1 <= num_full <= n:
        raise ValueError(f"num_full_steps must be an integer in [1, {n}] for a {n}-evaluation generation, got {num_full!r}.")
    if any(math.isnan(e) or e < 0 for row in errors for e in row):
        raise ValueError("reuse errors must be >= 0 (math.inf where a reuse is not allowed).")
    check_budget(errors, num_full)
    cost = [[0.0] * (n + 1) for _ in range(n + 1)]  # cost[a][b]: segment [a, b), full step at a
    for a in range(n):
        for b in range(a + 2, n + 1):
            cost[a][b] = cost[a][b - 1] + errors[a][b - 1]
    best = [[math.inf] * (n + 1) for _ in range(num_full + 1)]
    back = [[-1] * (n + 1) for _ in range(num_full + 1)]
    for e in range(1, n + 1):
        best[1][e] = cost[0][e]
    for m in range(2, num_full + 1):
        for e in range(m, n + 1):
            for a in range(m - 1, e):  # the last full step
                value = best[m - 1][a] + cost[a][e]
                if value < best[m][e]:
                    best[m][e], back[m][e] = value, a
    if math.isinf(best[num_full][n]):
        raise ValueError(f"no schedule of {num_full} full steps keeps every reuse within the measured gaps; allow longer gaps.")
    steps, e = [], n
    for m in range(num_full, 1, -1):
        e = back[m][e]
        steps.append(e)
    return tuple([0] + sorted(steps))


def even_full_steps(num_steps: int, num_full: int, forced: Sequence[int] = ()) -> tuple[int, ...]:
    """The evenly spread schedule of exactly ``num_full`` full steps over ``num_steps`` evaluations: step 0 and the
    ``forced`` steps (:func:`forced_full_steps`, Wan 2.2's switch to ``transformer_2``) are full, as in
    :func:`optimal_full_steps`. The forced steps cut the run into parts; each part gets one full step (its first)
    and the others go, one at a time, to the part with the longest mean gap (``length / full steps``; the earlier
    of equals); within a part of length ``L`` with ``c`` full steps they sit at ``round(i * L / c)`` (halves up).
    The guard of ``calibrate(K)`` (:mod:`DeepCache.schedules.reuse_guard`) checks the DP's steps against it.

    >>> even_full_steps(25, 5), even_full_steps(25, 4), even_full_steps(10, 4, forced=(4,))
    ((0, 5, 10, 15, 20), (0, 6, 13, 19), (0, 2, 4, 7))
    """
    if not _is_int(num_steps) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}.")
    cuts = sorted(set(forced))
    if any(not _is_int(f) or not 0 < f < num_steps for f in cuts):
        raise ValueError(f"forced full steps must be step indices in [1, {num_steps - 1}], got {tuple(forced)!r}.")
    if not _is_int(num_full) or not 1 + len(cuts) <= num_full <= num_steps:
        raise ValueError(f"num_full must be an integer in [{1 + len(cuts)}, {num_steps}] for a {num_steps}-evaluation "
                         f"generation with {len(cuts)} forced full step(s), got {num_full!r}.")
    starts = [0, *cuts]
    lengths = [b - a for a, b in zip(starts, [*cuts, num_steps])]
    counts = [1] * len(starts)
    for _ in range(num_full - len(starts)):
        best = max(range(len(starts)), key=lambda i: (lengths[i] / counts[i] if counts[i] < lengths[i] else -1.0, -i))
        counts[best] += 1
    return tuple(start + int(math.floor(i * length / count + 0.5))
                 for start, length, count in zip(starts, lengths, counts) for i in range(count))


def calibrated_full_steps(drift: Sequence[float], num_full: int) -> tuple[int, ...]:
    """:func:`optimal_full_steps` when the reuse error is the accumulated drift of the cached feature.

    ``drift[j]``: how much the cached feature changes from evaluation ``j`` to ``j + 1``.

    >>> calibrated_full_steps([0.1, 0.1, 5.0, 0.1, 0.1], 2)
    (0, 3)
    """
    if any(not math.isfinite(d) or d < 0 for d in drift):
        raise ValueError("drift values must be finite and >= 0.")
    return optimal_full_steps(drift_errors(drift), num_full)


def schedule_pattern(params: CacheParams, num_steps: int) -> tuple[bool, ...]:
    """The full (True) / retrieval (False) pattern of a ``num_steps``-evaluation generation.

    >>> schedule_pattern(CacheParams(cache_interval=2, start_step=1, end_step=5), 7)
    (True, True, False, True, False, True, True)
    """
    if not _is_int(num_steps) or num_steps < 0:
        raise ValueError(f"num_steps must be an integer >= 0, got {num_steps!r}.")
    return tuple(is_full_step(params, k, num_steps) for k in range(num_steps))


def format_pattern(pattern: Iterable[bool]) -> str:
    """Render a pattern as a string: ``F`` for a full step, ``r`` for a retrieval step.

    >>> format_pattern((True, False, False, True))
    'FrrF'
    """
    return "".join("F" if full else "r" for full in pattern)
