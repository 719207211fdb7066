"""The pure schedule functions: which U-Net evaluations are full steps."""

from __future__ import annotations

import itertools
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from DeepCache.schedules.schedule import (
    CacheParams,
    adaptive_is_full_step,
    as_params,
    calibrated_full_steps,
    drift_errors,
    forced_full_steps,
    optimal_full_steps,
    format_pattern,
    is_full_step,
    non_uniform_full_steps,
    schedule_pattern,
    segment_cost,
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


# -- calibrated and adaptive schedules (issue 11) ----------------------------------------------------------


def _total(drift, full_steps) -> float:
    bounds = list(full_steps) + [len(drift) + 1]
    return sum(segment_cost(drift, a, b) for a, b in zip(bounds, bounds[1:]))


def _distance_by_hand(drift, a, k) -> float:
    return sum(drift[a:k])


def test_segment_cost_is_the_accumulated_drift_of_every_retrieval_step() -> None:
    drift = [0.5, 1.0, 2.0, 0.25, 3.0]
    for a in range(len(drift) + 1):
        for b in range(a + 1, len(drift) + 2):
            assert segment_cost(drift, a, b) == sum(_distance_by_hand(drift, a, k) for k in range(a + 1, b))


@pytest.mark.parametrize("seed", range(6))
def test_calibration_is_optimal_against_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    drift = [rng.choice([0.0, 0.1, 0.5, 1.0, 3.0]) * rng.random() for _ in range(9)]  # 10 evaluations
    for k in range(1, 11):
        got = calibrated_full_steps(drift, k)
        assert len(got) == k and got[0] == 0 and list(got) == sorted(set(got)) and got[-1] <= 9
        best = min(_total(drift, (0, *rest)) for rest in itertools.combinations(range(1, 10), k - 1))
        assert _total(drift, got) == pytest.approx(best, abs=1e-12)


def test_calibration_on_a_hand_made_drift_sequence() -> None:
    # calm, one big jump between evaluations 4 and 5, calm again: refresh right after the jump
    drift = [0.01] * 4 + [10.0] + [0.01] * 5
    assert calibrated_full_steps(drift, 2) == (0, 5)
    # uniform drift: the optimum spreads the full steps evenly
    assert calibrated_full_steps([1.0] * 8, 3) == (0, 3, 6)
    assert calibrated_full_steps([1.0] * 8, 9) == tuple(range(9))
    assert calibrated_full_steps([1.0] * 8, 1) == (0,)


@pytest.mark.parametrize("seed", range(4))
def test_the_dp_is_optimal_for_any_reuse_error_matrix(seed: int) -> None:
    rng = random.Random(seed)
    n = 8
    errors = [[0.0 if k == a else (rng.random() * (k - a) if k > a else math.inf) for k in range(n)] for a in range(n)]

    def total(full):
        bounds = list(full) + [n]
        return sum(errors[a][k] for a, b in zip(bounds, bounds[1:]) for k in range(a + 1, b))

    for k in range(1, n + 1):
        got = optimal_full_steps(errors, k)
        best = min(total((0, *rest)) for rest in itertools.combinations(range(1, n), k - 1))
        assert len(got) == k and got[0] == 0 and total(got) == pytest.approx(best, abs=1e-12)


def test_drift_errors_accumulate_and_forbidden_gaps_are_respected() -> None:
    assert drift_errors([1.0, 2.0]) == [[0.0, 1.0, 3.0], [math.inf, 0.0, 2.0], [math.inf, math.inf, 0.0]]
    errors = drift_errors([1.0] * 5)
    for a in range(6):
        for k in range(a + 3, 6):
            errors[a][k] = math.inf  # at most 2 steps apart
    assert optimal_full_steps(errors, 2) == (0, 3)
    with pytest.raises(ValueError, match="allow longer gaps"):
        optimal_full_steps(errors, 1)


def test_a_step_that_can_reuse_nothing_earlier_is_always_chosen() -> None:
    errors = drift_errors([1.0] * 5)
    for a in range(3):
        for k in range(3, 6):
            errors[a][k] = math.inf  # another denoiser takes over at step 3 (Wan 2.2's transformer_2)
    assert forced_full_steps(errors) == (3,)
    assert optimal_full_steps(errors, 2) == (0, 3)
    assert optimal_full_steps(errors, 3) in {(0, 1, 3), (0, 2, 3), (0, 3, 4), (0, 3, 5)}  # all cost 1 + 3
    with pytest.raises(ValueError, match="step 3 cannot reuse .* at least 2, got 1"):
        optimal_full_steps(errors, 1)


def test_calibration_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"integer in \[1, 4\]"):
        calibrated_full_steps([1.0, 1.0, 1.0], 5)
    with pytest.raises(ValueError, match="finite and >= 0"):
        calibrated_full_steps([1.0, float("nan")], 2)


@pytest.mark.parametrize(
    "params",
    [
        CacheParams(),
        CacheParams(cache_interval=3, cache_branch_id=2),
        CacheParams(cache_interval=5, skip_mode="non-uniform", center=8, pow=1.6, start_step=1, end_step=20),
        CacheParams(skip_mode="custom", full_steps=(0, 3, 4, 9), cache_branch_id=1),
        CacheParams(cache_interval=4, skip_mode="adaptive", threshold=0.125),
    ],
    ids=["default", "uniform", "non-uniform", "custom", "adaptive"],
)
def test_json_round_trip(params: CacheParams) -> None:
    text = params.to_json()
    assert CacheParams.from_json(text) == params
    assert '"format": "deepcache.CacheParams/1"' in text


def test_json_errors_say_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="not a DeepCache parameters JSON"):
        CacheParams.from_json("{")
    with pytest.raises(ValueError, match="not a DeepCache parameters JSON"):
        CacheParams.from_json('{"cache_interval": 3}')
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['speed'\]"):
        CacheParams.from_json('{"format": "deepcache.CacheParams/1", "speed": 3}')
    with pytest.raises(ValueError, match="cache_interval must be"):
        CacheParams.from_json('{"format": "deepcache.CacheParams/1", "cache_interval": 0}')


def test_adaptive_parameters_are_validated() -> None:
    with pytest.raises(ValueError, match="needs a finite threshold >= 0"):
        CacheParams(skip_mode="adaptive")
    with pytest.raises(ValueError, match="needs a finite threshold >= 0"):
        CacheParams(skip_mode="adaptive", threshold=-1)
    with pytest.raises(ValueError, match='threshold is only used with skip_mode="adaptive"'):
        CacheParams(cache_interval=3, threshold=0.1)
    with pytest.raises(ValueError, match="decides full steps at run time"):
        schedule_pattern(CacheParams(cache_interval=3, skip_mode="adaptive", threshold=0.1), 5)


def test_adaptive_decision_rule() -> None:
    p = CacheParams(cache_interval=3, skip_mode="adaptive", threshold=0.1, start_step=2, end_step=8)
    assert adaptive_is_full_step(p, 0, 0, 0.0)  # step 0
    assert adaptive_is_full_step(p, 1, 0, 0.0)  # before the window
    assert adaptive_is_full_step(p, 8, 0, 0.0)  # after it
    assert not adaptive_is_full_step(p, 3, 1, 0.0999)
    assert adaptive_is_full_step(p, 3, 1, 0.1)  # at the threshold
    assert adaptive_is_full_step(p, 3, 2, 0.0)  # the cap: at most cache_interval - 1 retrievals in a row
    assert not adaptive_is_full_step(p, 3, 1, None)  # only forced full steps without a signal
