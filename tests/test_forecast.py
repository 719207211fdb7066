"""The pure forecast functions (issue 19): the linear formula, fitted weights and the forecast-error DP,
each against a hand computation or brute force; and the forecast fields of CacheParams."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
import torch

from DeepCache.schedules.forecast import (
    CANDIDATE_WEIGHTS,
    coefficient,
    extrapolate,
    fit_weights,
    linear_forecast,
    optimal_forecast_full_steps,
    schedule_error,
    step_weights,
)
from DeepCache.schedules.schedule import CacheParams, as_params

# -- the formula -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("before, last, step", [(0, 1, 2), (0, 3, 4), (2, 4, 9), (1, 7, 8), (5, 6, 12)])
@pytest.mark.parametrize("weight", [0.0, 0.25, 1.0, 1.5])
def test_linear_forecast_matches_the_formula_by_hand(before: int, last: int, step: int, weight: float) -> None:
    gen = torch.Generator().manual_seed(step * 31 + last)
    f_last, f_before = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64)
    by_hand = f_last + weight * (step - last) * (f_last - f_before) / (last - before)
    got = linear_forecast(f_last, f_before, step, last, before, weight)
    assert torch.allclose(got, by_hand, rtol=0, atol=1e-12)
    assert coefficient(weight, step, last, before) == pytest.approx(weight * (step - last) / (last - before), abs=0)


def test_a_straight_line_is_forecast_exactly_and_weight_zero_is_reuse_bit_for_bit() -> None:
    # features on a line: F_k = A + k*B (exact in binary: small integers and halves)
    a, b = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.5, 1.0, -1.5])
    feature = {k: a + k * b for k in range(10)}
    assert torch.equal(linear_forecast(feature[4], feature[2], 7, 4, 2, 1.0), feature[7])
    noisy = torch.randn(2, 8, 5, 5)
    diff = torch.randn(2, 8, 5, 5)
    assert torch.equal(extrapolate(noisy, diff, torch.tensor(0.0)), noisy)


def test_one_full_step_so_far_means_reuse() -> None:
    assert coefficient(1.0, step=3, last=0, before=None) == 0.0
    with pytest.raises(ValueError, match="before < last < step"):
        coefficient(1.0, step=3, last=3, before=1)


# -- weights, judged by the error they cause -----------------------------------------------------------------------


def _synthetic_errors(n: int, candidates, seed: int) -> tuple[list[list[float]], np.ndarray]:
    """Errors of a forecast on a synthetic feature trajectory, judged through a nonlinear 'output' (tanh)."""
    rng = np.random.default_rng(seed)
    base, slope, curve = rng.normal(size=(3, 16))
    features = [torch.tensor(base + slope * k + curve * k * k / n) for k in range(n)]

    def error(feature, k):
        return float((torch.tanh(feature) - torch.tanh(features[k])).abs().mean())

    reuse = [[0.0 if k == a else (error(features[a], k) if k > a else math.inf) for k in range(n)] for a in range(n)]
    errors = np.full((n, n, n, len(candidates)), math.inf)
    for p, a, k in itertools.combinations(range(n), 3):
        for j, w in enumerate(candidates):
            errors[p, a, k, j] = error(linear_forecast(features[a], features[p], k, a, p, w), k)
    return reuse, errors


@pytest.mark.parametrize("seed", range(3))
def test_fitted_weights_are_the_brute_force_best_with_reuse_winning_ties(seed: int) -> None:
    candidates = (0.25, 0.5, 1.0)
    n = 7
    reuse, errors = _synthetic_errors(n, candidates, seed)
    errors[1, 3, 5, :] = reuse[3][5]  # a tie everywhere: reuse must win
    errors[0, 2, 4, :] = [0.5, 0.125, 0.125]  # a tie between candidates: the first wins
    cost, weight = fit_weights(reuse, errors, candidates)
    for p, a, k in itertools.product(range(n), repeat=3):
        best_error, best_weight = reuse[a][k], 0.0
        for j, w in enumerate(candidates):
            if errors[p, a, k, j] < best_error:
                best_error, best_weight = errors[p, a, k, j], w
        assert (cost[p, a, k], weight[p, a, k]) == (best_error, best_weight), (p, a, k)
    assert weight[1, 3, 5] == 0.0
    if reuse[2][4] > 0.125:
        assert weight[0, 2, 4] == 0.5


def test_fit_weights_rejects_bad_input() -> None:
    reuse = [[0.0, 1.0], [math.inf, 0.0]]
    with pytest.raises(ValueError, match="shape"):
        fit_weights(reuse, np.zeros((2, 2, 2, 3)), (0.5, 1.0))
    with pytest.raises(ValueError, match=">= 0"):
        fit_weights(reuse, np.full((2, 2, 2, 1), math.nan), (1.0,))
    with pytest.raises(ValueError, match="finite"):
        fit_weights(reuse, np.zeros((2, 2, 2, 1)), (math.nan,))
    with pytest.raises(ValueError, match="square"):
        fit_weights([[0.0, 1.0]], np.zeros((1, 1, 1, 1)), (1.0,))


def test_candidate_weights_include_reuse() -> None:
    assert 0.0 in CANDIDATE_WEIGHTS and list(CANDIDATE_WEIGHTS) == sorted(set(CANDIDATE_WEIGHTS))


# -- the dynamic programme over the last two full steps ---------------------------------------------------------


def _brute_force_total(reuse, cost, full) -> float:
    """Step by step, written independently of the module: reuse until two full steps, then the better of both."""
    n, total, history = len(reuse), 0.0, []
    for k in range(n):
        if k in full:
            history.append(k)
            continue
        a = history[-1]
        total += reuse[a][k] if len(history) < 2 else min(reuse[a][k], cost[history[-2], a, k])
    return total


def _random_problem(n: int, seed: int, forbid: float = 0.0):
    rng = random.Random(seed)
    reuse = [[0.0 if k == a else (rng.random() * (k - a) if k > a else math.inf) for k in range(n)] for a in range(n)]
    cost = np.full((n, n, n), math.inf)
    for p, a, k in itertools.combinations(range(n), 3):
        if rng.random() >= forbid:
            cost[p, a, k] = rng.random() * (k - a) * rng.choice([0.1, 0.5, 1.0, 2.0])
    return reuse, cost


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("seed", range(3))
def test_the_forecast_dp_is_optimal_for_every_number_of_full_steps(n: int, seed: int) -> None:
    reuse, cost = _random_problem(n, seed, forbid=0.2 if seed == 2 else 0.0)
    for num_full in range(1, n + 1):
        got = optimal_forecast_full_steps(reuse, cost, num_full)
        assert len(got) == num_full and got[0] == 0 and list(got) == sorted(set(got)) and got[-1] < n
        best = min(_brute_force_total(reuse, cost, {0, *rest}) for rest in itertools.combinations(range(1, n), num_full - 1))
        assert _brute_force_total(reuse, cost, set(got)) == pytest.approx(best, abs=1e-12), (n, num_full, got)
        assert schedule_error(reuse, cost, got) == pytest.approx(best, abs=1e-12)


def test_the_dp_uses_a_pair_of_adjacent_full_steps_for_a_long_jump() -> None:
    # reuse is bad everywhere; a forecast from (0, 1) is exact for every later step: two early full steps win
    n = 8
    reuse = [[0.0 if k == a else (float(k - a) if k > a else math.inf) for k in range(n)] for a in range(n)]
    cost = np.full((n, n, n), math.inf)
    cost[0, 1, 2:] = 0.0
    assert optimal_forecast_full_steps(reuse, cost, 2) == (0, 1)
    # without the forecast, the reuse-optimal pair spreads out
    assert optimal_forecast_full_steps(reuse, np.full((n, n, n), math.inf), 2) == (0, 4)


def test_joint_schedule_and_weights_against_brute_force() -> None:
    """Full steps and a weight per retrieval step, enumerated jointly, cost no less than DP + fitted weights."""
    candidates = (0.0, 0.5, 1.0)
    n = 6
    reuse, errors = _synthetic_errors(n, candidates, seed=7)
    cost, weight = fit_weights(reuse, errors, candidates)
    for num_full in range(1, n + 1):
        got = optimal_forecast_full_steps(reuse, cost, num_full)
        weights = step_weights(got, weight, n)
        brute = math.inf
        for rest in itertools.combinations(range(1, n), num_full - 1):
            full = (0, *rest)
            retrieval = [k for k in range(n) if k not in full]
            for choice in itertools.product([None, *range(len(candidates))], repeat=len(retrieval)):
                total = 0.0
                for k, j in zip(retrieval, choice):
                    history = [s for s in full if s < k][-2:]
                    a = history[-1]
                    total += reuse[a][k] if j is None or len(history) < 2 else errors[history[0], a, k, j]
                brute = min(brute, total)
        # the weights chosen reproduce the DP's total, step by step
        total, history = 0.0, []
        for k in range(n):
            if k in got:
                history.append(k)
                assert weights[k] == 0.0
            elif len(history) < 2 or weights[k] == 0.0:
                total += reuse[history[-1]][k]
            else:
                total += errors[history[-2], history[-1], k, candidates.index(weights[k])]
        assert total == pytest.approx(brute, abs=1e-12), num_full


def test_step_weights_follow_the_last_two_full_steps() -> None:
    n = 6
    weight = np.zeros((n, n, n))
    weight[0, 2, 3], weight[0, 2, 4], weight[2, 5, 5] = 0.25, 1.0, 0.5
    assert step_weights((0, 2), weight, n) == (0.0, 0.0, 0.0, 0.25, 1.0, 0.0)
    assert step_weights((0, 2, 5), weight, n) == (0.0, 0.0, 0.0, 0.25, 1.0, 0.0)


def test_the_dp_rejects_bad_input() -> None:
    reuse, cost = _random_problem(4, 0)
    with pytest.raises(ValueError, match=r"integer in \[1, 4\]"):
        optimal_forecast_full_steps(reuse, cost, 5)
    with pytest.raises(ValueError, match=r"integer in \[1, 4\]"):
        optimal_forecast_full_steps(reuse, cost, True)
    with pytest.raises(ValueError, match="shape"):
        optimal_forecast_full_steps(reuse, cost[:3], 2)
    with pytest.raises(ValueError, match=">= 0"):
        optimal_forecast_full_steps(reuse, np.full((4, 4, 4), -1.0), 2)
    blocked = [[0.0] + [math.inf] * 3] + [[math.inf] * k + [0.0] + [math.inf] * (3 - k) for k in range(1, 4)]
    with pytest.raises(ValueError, match="steps 1, 2, 3 cannot reuse .* at least 4, got 2"):  # every step forced
        optimal_forecast_full_steps(blocked, np.full((4, 4, 4), math.inf), 2)
    gap = [[0.0 if k == a else 1.0 if 0 < k - a <= 2 else math.inf for k in range(4)] for a in range(4)]
    with pytest.raises(ValueError, match="allow longer gaps"):
        optimal_forecast_full_steps(gap, np.full((4, 4, 4), math.inf), 1)


# -- CacheParams ----------------------------------------------------------------------------------------------


def test_forecast_defaults_are_reuse() -> None:
    params = CacheParams(cache_interval=3)
    assert params.forecast is None and not params.forecasts and params.weight_at(4) == 0.0


@pytest.mark.parametrize("weight", [0, 0.0, 0.25, 1, 1.0, 2.5, np.float64(0.5)])
def test_every_kind_of_valid_weight_is_accepted_as_a_float(weight) -> None:
    params = CacheParams(cache_interval=3, forecast="linear", forecast_weight=weight)
    assert type(params.forecast_weight) is float and params.forecast_weight == float(weight)
    assert params.weight_at(0) == params.weight_at(100) == float(weight)


def test_per_step_weights_then_the_single_weight() -> None:
    params = CacheParams(skip_mode="custom", full_steps=(0, 3), forecast="linear", forecast_weights=[0, 0.5, 1],
                         forecast_weight=0.0)
    assert params.forecast_weights == (0.0, 0.5, 1.0)
    assert all(type(w) is float for w in params.forecast_weights)
    assert [params.weight_at(k) for k in range(5)] == [0.0, 0.5, 1.0, 0.0, 0.0]
    assert as_params(params, forecast_weights=[0.25]).forecast_weights == (0.25,)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"forecast": "quadratic"}, 'forecast must be None .* or "linear"'),
        ({"forecast": "Linear"}, "forecast must be"),
        ({"forecast": True}, "forecast must be"),
        ({"forecast": 1}, "forecast must be"),
        ({"forecast": "linear", "forecast_weight": -math.inf}, "forecast_weight must be a finite number"),
        ({"forecast": "linear", "forecast_weight": math.nan}, "forecast_weight must be"),
        ({"forecast": "linear", "forecast_weight": math.inf}, "forecast_weight must be"),
        ({"forecast": "linear", "forecast_weight": True}, "forecast_weight must be"),
        ({"forecast": "linear", "forecast_weight": "1"}, "forecast_weight must be"),
        ({"forecast": "linear", "forecast_weight": None}, "forecast_weight must be"),
        ({"forecast": "linear", "forecast_weights": ()}, "forecast_weights must be a non-empty sequence"),
        ({"forecast": "linear", "forecast_weights": (0.5, -math.inf)}, "forecast_weights must be"),
        ({"forecast": "linear", "forecast_weights": (0.5, math.nan)}, "forecast_weights must be"),
        ({"forecast": "linear", "forecast_weights": (0.5, math.inf)}, "forecast_weights must be"),
        ({"forecast": "linear", "forecast_weights": (0.5, False)}, "forecast_weights must be"),
        ({"forecast": "linear", "forecast_weights": (0.5, "1")}, "forecast_weights must be"),
        ({"forecast": "linear", "forecast_weights": "0.5"}, "forecast_weights must be a sequence"),
        ({"forecast": "linear", "forecast_weights": 0.5}, "forecast_weights must be a sequence"),
        ({"forecast_weight": 0.5}, 'only used with forecast="linear"'),
        ({"forecast_weights": (0.0, 1.0)}, 'only used with forecast="linear"'),
    ],
)
def test_invalid_forecast_params_raise_with_a_fix(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CacheParams(cache_interval=3, **kwargs)


@pytest.mark.parametrize(
    "params",
    [
        CacheParams(cache_interval=3, forecast="linear"),
        CacheParams(cache_interval=4, cache_branch_id=1, forecast="linear", forecast_weight=0.25),
        CacheParams(skip_mode="custom", full_steps=(0, 1, 5, 9), forecast="linear",
                    forecast_weights=(0.0, 0.0, 0.1, 1 / 3, 0.75, 0.0, 1.25, 2.0), forecast_weight=0.0),
        CacheParams(cache_interval=4, skip_mode="adaptive", threshold=0.1, forecast="linear", forecast_weight=0.5),
    ],
    ids=["linear", "single-weight", "per-step", "adaptive"],
)
def test_forecast_json_round_trip(params: CacheParams) -> None:
    text = params.to_json()
    assert CacheParams.from_json(text) == params
    assert '"forecast": "linear"' in text


def test_json_without_forecast_is_unchanged() -> None:
    text = CacheParams(cache_interval=3).to_json()
    assert "forecast" not in text  # readable by versions that predate the forecast


def test_set_params_takes_the_forecast_and_validates_it() -> None:
    from DeepCache import DeepCacheSDHelper
    from DeepCache.tools.settings import Setting

    from .tiny import tiny_sd_unet

    helper = DeepCacheSDHelper(pipe=tiny_sd_unet())
    helper.set_params(cache_interval=3, forecast="linear", forecast_weight=0.5)
    assert helper.params == CacheParams(cache_interval=3, forecast="linear", forecast_weight=0.5)
    helper.set_params(skip_mode="custom", full_steps=[0, 2], forecast="linear", forecast_weights=[0, 0, 0.75])
    assert helper.params.forecast_weights == (0.0, 0.0, 0.75)
    helper.set_params(**Setting.of(helper.params).helper_kwargs())  # every field is a set_params keyword
    assert helper.params.forecast_weights == (0.0, 0.0, 0.75)
    with pytest.raises(ValueError, match="forecast must be"):
        helper.set_params(cache_interval=3, forecast="cubic")
    with pytest.raises(ValueError, match="forecast_weights must be a sequence"):
        helper.set_params(cache_interval=3, forecast="linear", forecast_weights=0.5)
    helper.set_params(cache_interval=3)
    assert helper.params.forecast is None
