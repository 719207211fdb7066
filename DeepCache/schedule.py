"""Which U-Net evaluations are full steps: pure functions, no model needed.

A *full step* runs the whole U-Net and refreshes the cache; a *retrieval step* runs only the
shallow branch and reuses the deep feature cached at the last full step. Steps are counted
per generation from 0: step ``k`` is the ``k``-th U-Net evaluation of the current pipeline call
(a second-order scheduler such as Heun evaluates the U-Net about twice per denoising step, and
each evaluation counts).

Example::

    >>> from DeepCache.schedule import CacheParams, schedule_pattern
    >>> p = CacheParams(cache_interval=3)
    >>> "".join("F" if full else "r" for full in schedule_pattern(p, 10))
    'FrrFrrFrrF'
"""

from __future__ import annotations

import functools
import json
import math
import numbers
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

SKIP_MODES = ("uniform", "non-uniform", "custom", "adaptive")
FORECASTS = (None, "linear")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_weight(value: object) -> bool:
    """A finite real number >= 0 (not a bool)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


@dataclass(frozen=True)
class CacheParams:
    """Validated caching parameters (what :meth:`DeepCacheSDHelper.set_params` accepts).

    Important args:
        cache_interval: U-Net evaluations between cache refreshes (1 = no caching). 3 is a good start.
        cache_branch_id: the skip connection whose deeper layers are cached (0 = shallowest, fastest).

    Args to tinker with:
        skip_mode: ``"uniform"`` (a full step every ``cache_interval`` evaluations),
            ``"non-uniform"`` (the paper's Eq. 7: full steps dense around ``center``),
            ``"custom"`` (exactly the steps in ``full_steps``, e.g. from ``helper.calibrate``) or
            ``"adaptive"`` (decided at run time: a full step when the branch's skip feature moved by
            ``threshold`` or more since the last full step, and at least every ``cache_interval`` steps).
        center: non-uniform only; the step around which full steps are densest (paper: 15 of 50).
        pow: non-uniform only; > 1, how strongly full steps gather around ``center`` (paper: 1.4).
        full_steps: custom only; the step indices that are full steps (step 0 is always full).
        start_step: no caching before this step (all earlier steps are full).
        end_step: no caching from this step on (``None`` = cache until the end).
        threshold: adaptive only; the relative L1 change of the skip feature that triggers a full step
            (0 = every step full; larger = fewer full steps).
        forecast: ``None`` (a retrieval step reuses the cached feature verbatim) or ``"linear"`` (it
            extrapolates from the generation's last two full steps ``a' < a``:
            ``F_a + w*(k-a)*(F_a - F_a')/(a - a')`` at step ``k``; reuse until there are two full steps).
            See :mod:`DeepCache.forecast`.
        forecast_weight: linear only; the weight ``w`` (finite, >= 0; 0 = reuse, 1 = the straight line).
        forecast_weights: linear only; ``w`` per U-Net evaluation (index = step), e.g. from
            ``helper.calibrate(K, forecast=True)``; evaluations past its end use ``forecast_weight``.
    """

    cache_interval: int = 1
    cache_branch_id: int = 0
    skip_mode: str = "uniform"
    center: int = 15
    pow: float = 1.4
    full_steps: tuple[int, ...] | None = field(default=None)
    start_step: int = 0
    end_step: int | None = None
    threshold: float | None = None
    forecast: str | None = None
    forecast_weight: float = 1.0
    forecast_weights: tuple[float, ...] | None = field(default=None)

    def __post_init__(self) -> None:
        if not _is_int(self.cache_interval) or self.cache_interval < 1:
            raise ValueError(
                f"cache_interval must be an integer >= 1 (1 disables caching), got {self.cache_interval!r}."
            )
        if not _is_int(self.cache_branch_id) or self.cache_branch_id < 0:
            raise ValueError(
                f"cache_branch_id must be an integer >= 0 (0 = shallowest skip branch), got {self.cache_branch_id!r}."
            )
        if self.skip_mode not in SKIP_MODES:
            raise ValueError(f"skip_mode must be one of {SKIP_MODES}, got {self.skip_mode!r}.")
        if not _is_int(self.center) or self.center < 0:
            raise ValueError(f"center must be an integer step index >= 0, got {self.center!r}.")
        if isinstance(self.pow, bool) or not isinstance(self.pow, (int, float)) or not math.isfinite(self.pow) or self.pow <= 1:
            raise ValueError(f"pow must be a finite number > 1 (the paper uses 1.4), got {self.pow!r}.")
        if self.skip_mode == "custom":
            if self.full_steps is None:
                raise ValueError('skip_mode="custom" needs full_steps, e.g. full_steps=[0, 1, 2, 4, 8, 16].')
        elif self.full_steps is not None:
            raise ValueError(f'full_steps is only used with skip_mode="custom" (got skip_mode={self.skip_mode!r}).')
        if self.full_steps is not None:
            steps = tuple(self.full_steps)
            if not all(_is_int(s) and s >= 0 for s in steps):
                raise ValueError(f"full_steps must be integer step indices >= 0, got {list(self.full_steps)!r}.")
            object.__setattr__(self, "full_steps", tuple(sorted(set(steps))))
        if not _is_int(self.start_step) or self.start_step < 0:
            raise ValueError(f"start_step must be an integer >= 0, got {self.start_step!r}.")
        if self.end_step is not None and (not _is_int(self.end_step) or self.end_step <= self.start_step):
            raise ValueError(
                f"end_step must be None or an integer > start_step ({self.start_step}), got {self.end_step!r}."
            )
        if self.skip_mode == "adaptive":
            t = self.threshold
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
                raise ValueError(
                    f'skip_mode="adaptive" needs a finite threshold >= 0 (e.g. threshold=0.1), got {t!r}.'
                )
            object.__setattr__(self, "threshold", float(t))
        elif self.threshold is not None:
            raise ValueError(f'threshold is only used with skip_mode="adaptive" (got skip_mode={self.skip_mode!r}).')
        self._check_forecast()

    def _check_forecast(self) -> None:
        if self.forecast not in FORECASTS:
            raise ValueError(f"forecast must be None (reuse the cached feature) or \"linear\", got {self.forecast!r}.")
        w = self.forecast_weight
        if not _is_weight(w):
            raise ValueError(f"forecast_weight must be a finite number >= 0 (0 = reuse, 1 = linear), got {w!r}.")
        object.__setattr__(self, "forecast_weight", float(w))
        if self.forecast_weights is not None:
            weights = self.forecast_weights
            if isinstance(weights, (str, bytes)) or not isinstance(weights, Iterable):
                raise ValueError(f"forecast_weights must be a sequence of numbers >= 0 (one per step), got {weights!r}.")
            weights = tuple(weights)
            bad = [x for x in weights if not _is_weight(x)]
            if not weights or bad:
                raise ValueError(
                    f"forecast_weights must be a non-empty sequence of finite numbers >= 0 (one per U-Net evaluation), "
                    f"got {list(weights)!r}."
                )
            object.__setattr__(self, "forecast_weights", tuple(float(x) for x in weights))
        if self.forecast is None and (self.forecast_weight != 1.0 or self.forecast_weights is not None):
            raise ValueError('forecast_weight and forecast_weights are only used with forecast="linear" (got forecast=None).')

    @property
    def needs_num_steps(self) -> bool:
        """Whether the pattern depends on the total number of steps (non-uniform schedules)."""
        return self.skip_mode == "non-uniform" and self.cache_interval > 1

    @property
    def forecasts(self) -> bool:
        """Whether retrieval steps extrapolate the cached feature (``forecast="linear"``) instead of reusing it."""
        return self.forecast is not None

    def weight_at(self, step: int) -> float:
        """The forecast weight of U-Net evaluation ``step``: ``forecast_weights[step]`` while it lasts, else
        ``forecast_weight``; 0.0 without a forecast.

        >>> CacheParams(forecast="linear", forecast_weights=(0, 0.5), forecast_weight=0.25).weight_at(1)
        0.5
        """
        if self.forecast is None:
            return 0.0
        if self.forecast_weights is not None and 0 <= step < len(self.forecast_weights):
            return self.forecast_weights[step]
        return self.forecast_weight

    @property
    def adaptive(self) -> bool:
        """Whether full steps are decided at run time (``skip_mode="adaptive"``)."""
        return self.skip_mode == "adaptive"

    def to_json(self) -> str:
        """These parameters as JSON (what :meth:`from_json` reads), e.g. to ship a calibrated schedule.

        >>> CacheParams.from_json(CacheParams(cache_interval=3).to_json()) == CacheParams(cache_interval=3)
        True
        """
        values = asdict(self)
        if values["full_steps"] is not None:
            values["full_steps"] = list(values["full_steps"])
        if self.forecast is None:  # files without a forecast stay what they were (older readers load them)
            for name in ("forecast", "forecast_weight", "forecast_weights"):
                del values[name]
        elif values["forecast_weights"] is not None:
            values["forecast_weights"] = list(values["forecast_weights"])
        return json.dumps({"format": "deepcache.CacheParams/1", **values}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "CacheParams":
        """Parameters saved by :meth:`to_json` (validated like any others).

        Raises:
            ValueError: not JSON, another format, or unknown keys (the message names them).
        """
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not a DeepCache parameters JSON: {exc}") from None
        if not isinstance(data, dict) or data.pop("format", None) != "deepcache.CacheParams/1":
            raise ValueError('not a DeepCache parameters JSON (expected {"format": "deepcache.CacheParams/1", ...}).')
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown parameter(s) {unknown} in the JSON; valid ones are {sorted(cls.__dataclass_fields__)}.")
        for name in ("full_steps", "forecast_weights"):
            if isinstance(data.get(name), list):
                data[name] = tuple(data[name])
        return cls(**data)


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


def optimal_full_steps(errors: Sequence[Sequence[float]], num_full: int) -> tuple[int, ...]:
    """The ``num_full`` full steps (step 0 included) that minimise the total reuse error of an ``n``-step run.

    ``errors[a][k]`` (``k > a``) is the error of retrieval step ``k`` reusing the feature of full step ``a``
    (``math.inf``: not allowed). A segment ``[a, b)`` costs ``errors[a][a+1] + ... + errors[a][b-1]``; an
    exact dynamic programme over step indices: ``best[m][e]``, the least cost of steps ``0..e-1`` with ``m``
    full steps, in ``O(num_full * n^2)``.

    >>> optimal_full_steps(drift_errors([0.1, 0.1, 5.0, 0.1, 0.1]), 2)  # refresh right after the big change
    (0, 3)
    """
    n = len(errors)
    if not _is_int(num_full) or not 1 <= num_full <= n:
        raise ValueError(f"num_full_steps must be an integer in [1, {n}] for a {n}-evaluation generation, got {num_full!r}.")
    if any(math.isnan(e) or e < 0 for row in errors for e in row):
        raise ValueError("reuse errors must be >= 0 (math.inf where a reuse is not allowed).")
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


def as_params(params: CacheParams | None = None, **overrides: object) -> CacheParams:
    """A new :class:`CacheParams` from an existing one (or the defaults) with ``overrides`` applied."""
    base = params if params is not None else CacheParams()
    values = {name: getattr(base, name) for name in base.__dataclass_fields__}
    unknown = sorted(set(overrides) - set(values))
    if unknown:
        raise TypeError(f"unknown parameter(s) {unknown}; valid ones are {sorted(values)}.")
    values.update(overrides)
    for name in ("full_steps", "forecast_weights"):
        if isinstance(values.get(name), Sequence) and not isinstance(values[name], (tuple, str)):
            values[name] = tuple(values[name])  # type: ignore[arg-type]
    return CacheParams(**values)  # type: ignore[arg-type]
