"""The caching parameters: :class:`CacheParams`, validated when made, saved and loaded as JSON.

What :meth:`DeepCacheSDHelper.set_params` accepts and ``helper.calibrate`` returns, as one frozen dataclass: every
field is checked on construction (a ``ValueError`` names the valid values), and ``to_json``/``from_json`` ship a
calibrated schedule. Which steps the parameters make full is :mod:`DeepCache.schedules.schedule`; what a forecast does is
:mod:`DeepCache.schedules.forecast`.

Example::

    >>> from DeepCache.schedules.params import CacheParams, as_params
    >>> p = as_params(CacheParams(cache_interval=3), skip_mode="custom", full_steps=[8, 0, 4, 4])
    >>> p.full_steps                       # sorted, duplicates dropped
    (0, 4, 8)
    >>> CacheParams.from_json(p.to_json()) == p
    True
    >>> CacheParams(cache_interval=0)
    Traceback (most recent call last):
    ...
    ValueError: cache_interval must be an integer >= 1 (1 disables caching), got 0.
"""

from __future__ import annotations

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
    """A finite real number (not a bool); a negative weight forecasts back along the line."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


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
            See :mod:`DeepCache.schedules.forecast`.
        forecast_weight: linear only; the weight ``w`` (finite; 0 = reuse, 1 = the straight line, < 0 = back along
            it, for features that turn back over long gaps).
        forecast_weights: linear only; ``w`` per U-Net evaluation (index = step), e.g. from
            ``helper.calibrate(K, forecast=True)``; evaluations past its end use ``forecast_weight``.
        front_blocks, back_blocks: transformers only, both or neither; a retrieval step runs the first
            ``front_blocks`` and the last ``back_blocks`` blocks (an asymmetric split; ``cache_branch_id=b`` is
            ``b`` and ``b``), their sum at most the transformer's blocks.
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
    front_blocks: int | None = None
    back_blocks: int | None = None

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
        front, back = self.front_blocks, self.back_blocks
        if (front is None) != (back is None):
            raise ValueError("front_blocks and back_blocks go together: pass both (e.g. front_blocks=1, back_blocks=0), "
                             "or neither (cache_branch_id=b is front_blocks=back_blocks=b).")
        if front is not None and not (_is_int(front) and _is_int(back) and front >= 0 and back >= 0):
            raise ValueError(f"front_blocks and back_blocks must be integers >= 0, got {front!r} and {back!r}.")

    def _check_forecast(self) -> None:
        if self.forecast not in FORECASTS:
            raise ValueError(f"forecast must be None (reuse the cached feature) or \"linear\", got {self.forecast!r}.")
        w = self.forecast_weight
        if not _is_weight(w):
            raise ValueError(f"forecast_weight must be a finite number (0 = reuse, 1 = linear), got {w!r}.")
        object.__setattr__(self, "forecast_weight", float(w))
        if self.forecast_weights is not None:
            weights = self.forecast_weights
            if isinstance(weights, (str, bytes)) or not isinstance(weights, Iterable):
                raise ValueError(f"forecast_weights must be a sequence of finite numbers (one per step), got {weights!r}.")
            weights = tuple(weights)
            bad = [x for x in weights if not _is_weight(x)]
            if not weights or bad:
                raise ValueError(
                    f"forecast_weights must be a non-empty sequence of finite numbers (one per U-Net evaluation), "
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
        if self.front_blocks is None:  # files without a split stay what they were (older readers load them)
            del values["front_blocks"], values["back_blocks"]
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
