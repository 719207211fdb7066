"""The pure schedule functions: which U-Net evaluations are full steps."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from DeepCache.schedule import (
    CacheParams,
    as_params,
    format_pattern,
    is_full_step,
    non_uniform_full_steps,
    schedule_pattern,
)


@pytest.mark.parametrize(
    "interval, expected",
    [
        (1, "FFFFFFFFFF"),
        (2, "FrFrFrFrFr"),
        (3, "FrrFrrFrrF"),
        (4, "FrrrFrrrFr"),
        (5, "FrrrrFrrrr"),
    ],
)
def test_uniform_pattern(interval: int, expected: str) -> None:
    assert format_pattern(schedule_pattern(CacheParams(cache_interval=interval), 10)) == expected


def test_window_makes_steps_outside_full_and_restarts_the_interval() -> None:
    params = CacheParams(cache_interval=3, start_step=2, end_step=8)
    assert format_pattern(schedule_pattern(params, 10)) == "FFFrrFrrFF"


def test_custom_full_steps() -> None:
    params = CacheParams(skip_mode="custom", full_steps=[5, 0, 2, 2])
    assert params.full_steps == (0, 2, 5)
    assert format_pattern(schedule_pattern(params, 7)) == "FrFrrFr"


def test_custom_step_zero_is_always_full() -> None:
    params = CacheParams(skip_mode="custom", full_steps=[3])
    assert format_pattern(schedule_pattern(params, 5)) == "FrrFr"


def test_non_uniform_known_values() -> None:
    # The formula as written: center + sign(u)|u|^p on an even grid in u (paper Eq. 7).
    assert non_uniform_full_steps(50, 10, center=15, pow=1.4) == (0, 6, 11, 14, 17, 21, 27, 33, 41, 49)
    assert non_uniform_full_steps(50, 1, center=15) == (0,)


def test_non_uniform_is_densest_around_center() -> None:
    steps = non_uniform_full_steps(50, 17, center=15, pow=1.4)
    gaps = [b - a for a, b in zip(steps, steps[1:])]
    near = [g for a, g in zip(steps, gaps) if abs(a - 15) <= 4]
    far = [g for a, g in zip(steps, gaps) if a >= 35]
    assert max(near) < min(far)


def test_non_uniform_pattern_counts_ceil_n_over_interval() -> None:
    params = CacheParams(cache_interval=3, skip_mode="non-uniform")
    assert sum(schedule_pattern(params, 50)) == 17
    assert schedule_pattern(params, 50)[0]


def test_non_uniform_needs_num_steps_else_full() -> None:
    params = CacheParams(cache_interval=3, skip_mode="non-uniform")
    assert params.needs_num_steps
    assert is_full_step(params, 7, None)


def test_non_uniform_center_out_of_range_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"center=15 .* \[0, 9\]"):
        non_uniform_full_steps(10, 4, center=15)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"cache_interval": 0}, "cache_interval must be an integer >= 1"),
        ({"cache_interval": 2.5}, "cache_interval"),
        ({"cache_interval": True}, "cache_interval"),
        ({"cache_branch_id": -1}, "cache_branch_id must be an integer >= 0"),
        ({"skip_mode": "fast"}, "skip_mode must be one of"),
        ({"pow": 1.0}, "pow must be a finite number > 1"),
        ({"pow": float("nan")}, "pow"),
        ({"center": -3}, "center"),
        ({"skip_mode": "custom"}, "needs full_steps"),
        ({"full_steps": [0, 3]}, "only used with"),
        ({"skip_mode": "custom", "full_steps": [0, -1]}, "full_steps must be"),
        ({"start_step": -1}, "start_step"),
        ({"start_step": 5, "end_step": 5}, "end_step must be None or an integer > start_step"),
    ],
)
def test_invalid_params_raise_with_a_fix(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CacheParams(**kwargs)


def test_as_params_rejects_unknown_names() -> None:
    with pytest.raises(TypeError, match="unknown parameter"):
        as_params(cache_intervall=3)
    assert as_params(cache_interval=4).cache_interval == 4


@settings(max_examples=200, deadline=None)
@given(
    interval=st.integers(1, 12),
    n=st.integers(1, 80),
    start=st.integers(0, 20),
    length=st.one_of(st.none(), st.integers(1, 40)),
)
def test_uniform_properties(interval: int, n: int, start: int, length: int | None) -> None:
    end = None if length is None else start + length
    pattern = schedule_pattern(CacheParams(cache_interval=interval, start_step=start, end_step=end), n)
    assert len(pattern) == n and pattern[0]
    for k, full in enumerate(pattern):
        inside = start <= k and (end is None or k < end)
        assert full == (not inside or (k - start) % interval == 0 or k == 0)
    # never more than interval-1 retrieval steps in a row
    assert "r" * interval not in format_pattern(pattern)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 120), interval=st.integers(1, 10), data=st.data())
def test_non_uniform_properties(n: int, interval: int, data: st.DataObject) -> None:
    center = data.draw(st.integers(0, n - 1))
    power = data.draw(st.floats(1.01, 3.0))
    num_full = math.ceil(n / interval)
    steps = non_uniform_full_steps(n, num_full, center, power)
    assert len(steps) == num_full
    assert steps[0] == 0
    assert list(steps) == sorted(set(steps))
    assert all(0 <= s < n for s in steps)


@settings(max_examples=100, deadline=None)
@given(
    interval=st.one_of(st.integers(-5, 0), st.floats(allow_nan=True), st.text(max_size=2), st.booleans()),
)
def test_invalid_intervals_never_accepted(interval: object) -> None:
    with pytest.raises(ValueError):
        CacheParams(cache_interval=interval)  # type: ignore[arg-type]
