"""``calibrate(K, forecast=True)`` on a tiny pipeline: the replay measures what it says (against an independent
computation), the choice is a valid forecast schedule (or calibrated reuse), the call's noise is rewound."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from DeepCache import DeepCacheSDHelper
from DeepCache import forecast_calibration as fc
from DeepCache import forecast_refine as fr
from DeepCache.calibration import _sample, recording, reuse_errors
from DeepCache.engine import boundary_module, relative_l1
from DeepCache.schedule import CacheParams

from .tiny import prompt_kwargs, tiny_sd_pipe

STEPS = 7


def _call() -> dict:
    return dict(num_inference_steps=STEPS, guidance_scale=5.0, output_type="latent",
                generator=torch.Generator().manual_seed(0), **prompt_kwargs(batch=2))


def test_the_replay_measures_the_forecast_it_describes() -> None:
    pipe = tiny_sd_pipe()
    unet, branch = pipe.unet, 2
    with recording(pipe, unet) as rec, torch.no_grad():
        pipe(**_call())
    measured = fc.forecast_errors(unet, rec, branch, candidates=(0.0, 0.5, 1.25), max_gap=2, max_span=2)
    # reuse through a ForecastFeature (coefficient 0) is reuse bit for bit
    np.testing.assert_array_equal(np.array(measured.reuse), np.array(reuse_errors(unet, rec, branch)))
    boundary = boundary_module(unet, branch)
    features = {}
    with torch.no_grad():
        for j in range(STEPS):
            h = boundary.register_forward_hook(lambda m, a, o, j=j: features.__setitem__(j, o[0] if isinstance(o, tuple) else o))
            args, kwargs = rec.calls[j]
            unet(*args, **kwargs)
            h.remove()
        checked = 0
        for p in range(STEPS):
            for a in range(p + 1, STEPS):
                for k in range(a + 1, STEPS):
                    for j, w in enumerate(measured.candidates):
                        got = measured.errors[p, a, k, j]
                        if a - p > 2 or k - a > 2:
                            assert got == math.inf
                            continue
                        if w == 0.0:
                            assert got == measured.reuse[a][k]
                            continue
                        line = features[a] + w * (k - a) * (features[a] - features[p]) / (a - p)
                        h = boundary.register_forward_hook(lambda m, i, o: (line, *o[1:]) if isinstance(o, tuple) else line)
                        args, kwargs = rec.calls[k]
                        out = _sample(unet(*args, **kwargs))
                        h.remove()
                        expected = relative_l1(out, rec.outputs[k]) * rec.sensitivity[k]
                        assert got == pytest.approx(expected, rel=1e-4), (p, a, k, w)
                        checked += 1
    assert checked == 2 * sum(1 for p in range(STEPS) for a in range(p + 1, min(STEPS, p + 3))
                              for k in range(a + 1, min(STEPS, a + 3)))
    assert measured.evaluations == (STEPS, STEPS * (STEPS - 1) // 2 + checked)


def test_calibrate_with_forecast_returns_and_sets_a_valid_schedule_and_rewinds_the_noise() -> None:
    pipe = tiny_sd_pipe()
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_branch_id=1)
    call = _call()
    params = helper.calibrate(3, forecast=True, **call)
    assert helper.params == params and params.skip_mode == "custom" and params.cache_branch_id == 1
    assert len(params.full_steps) == 3 and params.full_steps[0] == 0
    if params.forecast is not None:
        assert params.forecast == "linear" and len(params.forecast_weights) == STEPS and params.forecast_weight == 0.0
        assert all(params.forecast_weights[k] == 0.0 for k in params.full_steps)
    # the generator moved as after one pipeline call, not after the closed-loop runs
    ran_once = torch.Generator().manual_seed(0)
    with torch.no_grad():
        pipe(**{**call, "generator": ran_once})
    assert torch.equal(call["generator"].get_state(), ran_once.get_state())
    assert not helper.enabled


def test_the_closed_loop_keeps_reuse_when_it_is_best_and_scores_by_final_latents() -> None:
    pipe = tiny_sd_pipe()
    call = _call()
    with fc.recorded(pipe, pipe.unet, call) as (rec, final, rewind):
        measured = fc.forecast_errors(pipe.unet, rec, 0, max_gap=2, max_span=2)
        uncached = CacheParams()  # every step full: exactly the recorded call
        scores = fc.closed_loop_errors(pipe, pipe.unet, [uncached, measured.reuse_params(3)], final, rewind, call)
    assert scores[0] == math.log10(1e-20) and scores[1] > scores[0]  # the same noise: uncached reproduces the call
    assert fc.latent_error(torch.ones(2, 3), torch.zeros(2, 3)) == 0.0
    assert fc.candidate_params(measured, 3)[0] == measured.reuse_params(3)
    assert all(p.forecast == "linear" for p in fc.candidate_params(measured, 3)[1:])


def test_calibrate_rejects_bad_values() -> None:
    pipe = tiny_sd_pipe()
    helper = DeepCacheSDHelper(pipe=pipe)
    with pytest.raises(ValueError, match="forecast must be True or False"):
        helper.calibrate(3, forecast="linear", **_call())
    with pytest.raises(ValueError, match=r"integer in \[1, 7\]"):
        helper.calibrate(8, forecast=True, **_call())
    with pytest.raises(ValueError, match=r"integer in \[1, 7\]"):
        helper.calibrate(0, forecast=True, **_call())


# -- the closed-loop refinement (pure: a score function stands in for the pipeline) ----------------------------


def _schedule(full_steps: tuple[int, ...], n: int) -> CacheParams:
    return fr.as_forecast(CacheParams(skip_mode="custom", full_steps=full_steps), n)


def test_as_forecast_is_the_same_run_with_a_weight_per_evaluation() -> None:
    reuse = CacheParams(skip_mode="custom", full_steps=(0, 3), cache_branch_id=2)
    got = fr.as_forecast(reuse, 6)
    assert (got.forecast, got.forecast_weights, got.full_steps, got.cache_branch_id) == ("linear", (0.0,) * 6, (0, 3), 2)
    short = CacheParams(skip_mode="custom", full_steps=(0, 1), forecast="linear", forecast_weights=(0, 0, 0.5),
                        forecast_weight=-0.25)
    assert fr.as_forecast(short, 5).forecast_weights == (0.0, 0.0, 0.5, -0.25, -0.25)


@pytest.mark.parametrize("min_length", range(0, 8))
def test_segments_are_the_long_runs_after_the_second_full_step_on(min_length: int) -> None:
    # retrieval runs: 1-2 (one full step: no line yet), 4-8, none between 9 and 10, 11-14
    runs = [range(4, 9), range(11, 15)]
    assert fr.segments(_schedule((0, 3, 9, 10), 15), min_length) == [r for r in runs if len(r) >= max(1, min_length)]
    assert fr.segments(_schedule((0,), 15), min_length) == []


@pytest.mark.parametrize("sweeps", range(0, 4))
def test_refine_is_coordinate_descent_over_the_segment_weights(sweeps: int) -> None:
    targets = {4: -0.3, 11: 0.2}  # a separable score: each segment has one best weight
    calls = []

    def score(p: CacheParams) -> float:
        calls.append(p)
        return sum((p.forecast_weights[lo] - w) ** 2 for lo, w in targets.items())

    start = _schedule((0, 3, 9, 10), 15)
    got, got_score, trials = fr.refine(score, start, score(start), sweeps=sweeps, min_length=4)
    calls.pop(0)
    grid = fr.SEGMENT_WEIGHTS
    assert trials == len(calls) == sweeps * 2 * (len(grid) - 1)  # the current weight is never rerun
    expected = list(start.forecast_weights)
    if sweeps:
        expected[4:9], expected[11:15] = [-0.3] * 5, [0.2] * 4
    assert got.forecast_weights == tuple(expected) and got_score == pytest.approx(score(got))
    assert (got.full_steps, got.forecast, got.cache_branch_id) == (start.full_steps, "linear", start.cache_branch_id)


@pytest.mark.parametrize("gain", [0.0, fr.REFINE_MARGIN / 2, fr.REFINE_MARGIN * 2])
def test_refine_keeps_a_change_only_if_it_gains_the_margin(gain: float) -> None:
    start = _schedule((0, 2, 8), 9)  # one segment long enough: 3-7

    def score(p: CacheParams) -> float:  # -0.1 is better by `gain`, everything else equal
        return 1.0 - gain * (p.forecast_weights[3] == -0.1)

    got, got_score, _ = fr.refine(score, start, 1.0)
    moved = gain > fr.REFINE_MARGIN
    assert got.forecast_weights[3:8] == ((-0.1,) * 5 if moved else (0.0,) * 5)
    assert got_score == (1.0 - gain if moved else 1.0)


def test_choose_is_never_worse_in_closed_loop_than_its_best_candidate() -> None:
    pipe = tiny_sd_pipe()
    call = _call()
    with fc.recorded(pipe, pipe.unet, call) as (rec, final, rewind):
        measured = fc.forecast_errors(pipe.unet, rec, 0, max_gap=3, max_span=2)
        chosen, candidates, scores = fc.choose(pipe, pipe.unet, measured, 2, final, rewind, call)
        again = fc.closed_loop_errors(pipe, pipe.unet, [chosen], final, rewind, call)[0]
    assert again <= min(scores) + 1e-6
    assert chosen == candidates[0] or (chosen.forecast == "linear" and any(chosen.forecast_weights))
