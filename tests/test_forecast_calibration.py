"""``calibrate(K, forecast=True)`` on a tiny pipeline: the replay measures what it says (against an independent
computation), the choice is a valid forecast schedule (or calibrated reuse), the call's noise is rewound."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from DeepCache import DeepCacheSDHelper
from DeepCache import forecast_calibration as fc
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
