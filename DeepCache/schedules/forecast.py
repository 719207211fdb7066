"""Forecast the cached feature on a retrieval step instead of reusing it: pure functions, no model needed.

With ``forecast="linear"`` a retrieval step ``k`` whose generation has full steps ``a' < a`` (its last two)
hands out ``F_a + w*(k - a)*(F_a - F_a')/(a - a')`` instead of ``F_a``: the feature extrapolated along the line
through the last two full steps, trusted with weight ``w`` (0 = reuse, 1 = the straight line). Until a
generation has two full steps, retrieval steps reuse. The engine keeps ``F_a`` (the cache) and the difference
``F_a - F_a'`` (one more feature map), so a retrieval step costs one fused multiply-add
(:func:`extrapolate`) with the scalar :func:`coefficient` as a 0-d tensor.

How far to trust the line depends on the gap and on where in the trajectory the step is. The calibrated
forecast (``helper.calibrate(K, forecast=True)``) measures, for each pair of full steps ``(a', a)``, each later
step ``k`` and each candidate weight, the error the forecast causes at the U-Net's *output*; :func:`fit_weights`
keeps the best weight per ``(a', a, k)`` (reuse, weight 0, whenever nothing beats it) and
:func:`optimal_forecast_full_steps` picks the full steps by an exact dynamic programme whose state is the last
two full steps.

    >>> coefficient(weight=1.0, step=5, last=4, before=2)   # one step past a, the line through steps 2 and 4
    0.5
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from .schedule import check_budget

#: The weights the calibrated forecast tries on every (pair of full steps, retrieval step); 0 = reuse.
CANDIDATE_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)


def coefficient(weight: float, step: int, last: int, before: int | None) -> float:
    """``weight * (step - last) / (last - before)``: how many differences ``F_last - F_before`` to add at ``step``.

    0.0 when the generation has only one full step (``before is None``): reuse.

    >>> coefficient(0.5, step=7, last=4, before=1), coefficient(1.0, step=2, last=0, before=None)
    (0.5, 0.0)
    """
    if before is None:
        return 0.0
    if not before < last < step:
        raise ValueError(f"a forecast needs full steps before < last < step, got before={before}, last={last}, step={step}.")
    return float(weight) * (step - last) / (last - before)


def extrapolate(cache: torch.Tensor, difference: torch.Tensor, coeff: torch.Tensor) -> torch.Tensor:
    """``cache + coeff * difference`` in one fused multiply-add; ``coeff`` is a 0-d tensor (so a compiled graph
    does not specialise on its value). With ``coeff == 0`` the result equals ``cache`` bit for bit."""
    return torch.addcmul(cache, difference, coeff)


def linear_forecast(current: torch.Tensor, previous: torch.Tensor, step: int, last: int, before: int,
                    weight: float) -> torch.Tensor:
    """The forecast of the feature at ``step`` from the features of full steps ``before < last`` (reference form).

    >>> linear_forecast(torch.tensor([3.0]), torch.tensor([1.0]), step=6, last=4, before=2, weight=1.0)
    tensor([5.])
    """
    c = coefficient(weight, step, last, before)
    return extrapolate(current, current - previous, torch.tensor(c, dtype=current.dtype, device=current.device))


def fit_weights(reuse: Sequence[Sequence[float]], errors: np.ndarray,
                candidates: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """The best weight per (pair of full steps, retrieval step), judged by the measured error.

    Args:
        reuse: ``reuse[a][k]``, the error of step ``k`` reusing full step ``a`` (weight 0; ``math.inf``: not allowed).
        errors: shape ``(n, n, n, len(candidates))``: ``errors[a', a, k, j]``, the error of step ``k`` forecast from
            full steps ``a' < a < k`` with ``candidates[j]`` (``inf``: not measured).
        candidates: the weights tried.

    Returns:
        ``(cost, weight)``, both of shape ``(n, n, n)``: the least error at ``[a', a, k]`` and its weight. Reuse is
        always a candidate and wins ties (a forecast must be strictly better); among tied candidates the first.
    """
    r = _matrix(reuse, "reuse errors")
    n = len(r)
    e = np.asarray(errors, dtype=np.float64)
    w = np.asarray(candidates, dtype=np.float64)
    if e.shape != (n, n, n, len(w)) or len(w) == 0:
        raise ValueError(f"errors must have shape (n, n, n, candidates) = {(n, n, n, len(w))}, got {e.shape}.")
    if np.isnan(e).any() or (e < 0).any() or not np.isfinite(w).all():
        raise ValueError("forecast errors must be >= 0 (inf where not measured) and candidate weights finite.")
    j = e.argmin(axis=3)
    best = np.take_along_axis(e, j[..., None], axis=3)[..., 0]
    reuse_cost = np.broadcast_to(r[None, :, :], best.shape)
    better = best < reuse_cost
    return np.where(better, best, reuse_cost), np.where(better, w[j], 0.0)


def optimal_forecast_full_steps(reuse: Sequence[Sequence[float]], cost: np.ndarray, num_full: int) -> tuple[int, ...]:
    """The ``num_full`` full steps (step 0 included) that minimise the total error of an ``n``-step forecast run.

    A retrieval step ``k`` after full steps ``... a' < a`` costs ``min(reuse[a][k], cost[a', a, k])`` (a weight
    0 is always allowed), or ``reuse[a][k]`` while ``a`` is the only full step so far. Exact dynamic programme
    over the last two full steps: ``best[m][a', a]``, the least cost of steps ``0..a`` with ``m`` full steps of
    which the last two are ``a' < a``; ``O(num_full * n^3)`` time, ``O(n^3)`` memory.

    >>> reuse = [[0, 1, 2, 3], [math.inf, 0, 1, 2], [math.inf, math.inf, 0, 1], [math.inf] * 3 + [0]]
    >>> cost = np.full((4, 4, 4), math.inf); cost[0, 1, 2] = cost[0, 1, 3] = 0.0   # forecasting from (0, 1) is exact
    >>> optimal_forecast_full_steps(reuse, cost, 2)
    (0, 1)
    """
    r = _matrix(reuse, "reuse errors")
    n = len(r)
    c = np.asarray(cost, dtype=np.float64)
    if c.shape != (n, n, n):
        raise ValueError(f"cost must have shape {(n, n, n)} for {n} steps, got {c.shape}.")
    if np.isnan(c).any() or (c < 0).any():
        raise ValueError("forecast costs must be >= 0 (math.inf where not allowed).")
    if isinstance(num_full, bool) or not isinstance(num_full, int) or not 1 <= num_full <= n:
        raise ValueError(f"num_full_steps must be an integer in [1, {n}] for a {n}-evaluation generation, got {num_full!r}.")
    check_budget(r.tolist(), num_full)
    steps = np.arange(n)
    # step cost per state (p, a) and step k; row n is the state "a is the only full step so far" (reuse)
    per_step = np.empty((n + 1, n, n))
    per_step[:n] = np.minimum(c, r[None])
    per_step[n] = r
    per_step = np.where(steps[None, None, :] > steps[None, :, None], per_step, 0.0)  # only k > a is a retrieval step
    per_step[:n][steps[:, None] >= steps[None, :]] = math.inf  # states need a' < a
    segment = np.zeros((n + 1, n, n + 1))  # segment[p, a, b]: steps a+1 .. b-1 (b = n: to the end)
    segment[:, :, 1:] = np.cumsum(per_step, axis=2)
    best = np.full((n + 1, n), math.inf)
    best[n, 0] = 0.0
    later = steps[None, :] > steps[:, None]  # (a, b): b > a
    backs = []
    for _ in range(2, num_full + 1):
        total = best[:, :, None] + segment[:, :, :n]  # (p, a, b): b the next full step
        back = total.argmin(axis=0)
        value = np.where(later, np.take_along_axis(total, back[None], axis=0)[0], math.inf)
        best = np.full((n + 1, n), math.inf)
        best[:n] = value  # the new state (a, b)
        backs.append(back)
    final = best + segment[:, :, n]
    p, a = np.unravel_index(int(final.argmin()), final.shape)
    if math.isinf(final[p, a]):
        raise ValueError(f"no schedule of {num_full} full steps keeps every retrieval within the measured gaps; allow longer gaps.")
    chosen = [int(a)]
    for back in reversed(backs):
        chosen.append(int(p))
        p, a = int(back[p, a]), int(p)
    return tuple(sorted(chosen))


def step_weights(full_steps: Sequence[int], weight: np.ndarray, num_steps: int) -> tuple[float, ...]:
    """The weight of each of ``num_steps`` evaluations under ``full_steps``: ``weight[a', a, k]`` for a retrieval
    step ``k`` after full steps ``a' < a`` (its last two), 0.0 for full steps and before the second full step.

    >>> w = np.full((4, 4, 4), 0.5)
    >>> step_weights((0, 1), w, 4)
    (0.0, 0.0, 0.5, 0.5)
    """
    full = set(full_steps) | {0}
    out, last = [], []
    for k in range(num_steps):
        if k in full:
            out.append(0.0)
            last = (last + [k])[-2:]
        else:
            out.append(float(weight[last[0], last[1], k]) if len(last) == 2 else 0.0)
    return tuple(out)


def schedule_error(reuse: Sequence[Sequence[float]], cost: np.ndarray, full_steps: Sequence[int],
                   num_steps: int | None = None) -> float:
    """The total error of ``full_steps`` as :func:`optimal_forecast_full_steps` counts it (step by step)."""
    r = _matrix(reuse, "reuse errors")
    n = len(r) if num_steps is None else num_steps
    full, last, total = set(full_steps) | {0}, [], 0.0
    for k in range(n):
        if k in full:
            last = (last + [k])[-2:]
        elif len(last) == 2:
            total += min(float(r[last[1], k]), float(cost[last[0], last[1], k]))
        else:
            total += float(r[last[0], k])
    return total


def _matrix(values: Sequence[Sequence[float]], what: str) -> np.ndarray:
    m = np.asarray(values, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(f"{what} must be a square n x n matrix (n >= 1), got shape {m.shape}.")
    if np.isnan(m).any() or (m < 0).any():
        raise ValueError(f"{what} must be >= 0 (math.inf where not allowed).")
    return m
