"""``calibrate(K, forecast=True)`` on tiny DiT pipelines: Flux with true CFG (a cond and an uncond call per step), SD3
(batched CFG) and Lumina2 (separate calls, the uncond one dropped after half the steps).

* The forecast replay measures, per CFG branch and sample, what it says: each error equals the independent
  reference (tests/dit_reference.py, its residual set to the forecast line) summed over the branches, and the first
  retrieval step after a run of full steps equals the error of actually running the pipeline with those parameters.
* ``helper.calibrate(K, forecast=True)`` returns and sets a valid forecast or reuse schedule with ``K`` full steps,
  and the held-out rule holds: the gains it judged are what the ladder's rungs fitted without each fold score on
  that fold, and a forecast comes back only when its held-out gains passed the rule (else calibrated reuse).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from DeepCache import CacheParams, DeepCacheHelper
from DeepCache.engine.transformer.discovery import MIN_DIFFUSERS, _diffusers_version
from DeepCache.schedules import calibration
from DeepCache.schedules import closed_loop as cl
from DeepCache.schedules import forecast_calibration as fc
from DeepCache.schedules import forecast_heldout as fh
from DeepCache.schedules import forecast_refine as fr
from DeepCache.schedules.schedule import even_full_steps

from .dit_reference import ReferenceBranch
from .tiny import untouched
from .tiny_dit_pipelines import TINY_DIT_PIPELINES, output_of

NAMES = ["FluxPipeline", "StableDiffusion3Pipeline", "Lumina2Pipeline"]
SAMPLES, BRANCH, WEIGHTS = 4, 1, (0.0, 0.75, -0.5)
#: Full steps of the calibrate test (of 4 steps); seen here: a forecast comes back on SD3 and Lumina2, reuse on Flux
#: (the test checks whichever comes back).
BUDGET = {"FluxPipeline": 2, "StableDiffusion3Pipeline": 3, "Lumina2Pipeline": 2}

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.skipif(_diffusers_version() < MIN_DIFFUSERS, reason="DeepCache caches transformers with diffusers >= 0.35"),
]


def _batched(kwargs: dict, n: int) -> dict:
    """The call for ``n`` samples: every conditioning tensor repeated (one generator: different noise per sample)."""
    return {k: v.repeat(n, *[1] * (v.dim() - 1)) if torch.is_tensor(v) else v for k, v in kwargs.items()}


def _call(kwargs: dict) -> dict:
    return {**kwargs, "generator": torch.Generator().manual_seed(0)}


@functools.lru_cache(maxsize=None)
def measured(name: str):
    """The pipeline, its call for SAMPLES samples, one uncached recording and the forecast replay of it."""
    pipe, kwargs = TINY_DIT_PIPELINES[name]()
    kwargs = _batched(kwargs, SAMPLES)
    with calibration.recording(pipe, pipe.transformer) as rec, torch.no_grad():
        pipe(**_call(kwargs))
    got = fc.forecast_errors(pipe.transformer, rec, BRANCH, candidates=WEIGHTS, max_gap=2, max_span=2, samples=SAMPLES)
    return pipe, kwargs, rec, got


def _branches(rec) -> list[list[int]]:
    """The evaluations of each branch, by the identity of the recorded conditioning (independent of DeepCache)."""
    groups: dict[int, list[int]] = {}
    for i, (_, kw) in enumerate(rec.calls):
        cond = next(v for k, v in kw.items() if k.startswith("encoder_hidden_states"))
        groups.setdefault(id(cond), []).append(i)
    return list(groups.values())


def _per_sample(out: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """Each sample's relative L1 (row i: sample i % SAMPLES; batched CFG stacks uncond rows, then cond rows)."""
    rows = lambda x, s: x[[i for i in range(x.shape[0]) if i % SAMPLES == s]]  # noqa: E731
    return np.array([float((rows(out, s) - rows(target, s)).abs().mean() / rows(target, s).abs().mean())
                     for s in range(SAMPLES)])


def _line(r_a: list, r_p: list, c: float) -> list:
    """The reference's residuals moved along the line: ``R_a + c*(R_a - R_p)``, stream by stream."""
    return [[None if x is None else x + c * (x - y) for x, y in zip(seg_a, seg_p)] for seg_a, seg_p in zip(r_a, r_p)]


@pytest.mark.parametrize("name", NAMES)
def test_the_forecast_replay_equals_the_reference_summed_over_cfg_branches(name) -> None:
    pipe, _, rec, got = measured(name)
    model, groups, n = pipe.transformer, _branches(rec), rec.num_steps
    assert len(groups) == (1 if name == "StableDiffusion3Pipeline" else 2) and n == 4
    assert got.samples == SAMPLES and got.sample_errors.shape == (SAMPLES, n, n, n, len(WEIGHTS))
    # reuse through the forecast replay is the reuse replay (both branches summed)
    np.testing.assert_allclose(np.array(got.reuse), np.array(calibration.reuse_errors(model, rec, BRANCH)), rtol=1e-5)
    run = lambda i: (lambda: model(*rec.calls[i][0], **rec.calls[i][1]))  # noqa: E731
    want = np.zeros((SAMPLES, n, n, n, len(WEIGHTS)))
    pooled = np.zeros((n, n, n, len(WEIGHTS)))
    ref = ReferenceBranch(model, BRANCH, BRANCH)
    with torch.no_grad():
        for calls in groups:
            residuals = []
            for i in calls:
                ref.full(run(i))
                residuals.append(ref.residuals)
            for p, a, k in ((p, a, k) for a in range(n) for p in range(max(0, a - 2), a) for k in range(a + 1, a + 3)):
                if k >= len(calls):  # a step this branch does not run adds nothing
                    continue
                for j, w in enumerate(WEIGHTS):
                    ref.residuals = _line(residuals[a], residuals[p], w * (k - a) / (a - p))
                    out, target = output_of(ref.retrieve(run(calls[k]))), rec.outputs[calls[k]]
                    want[:, p, a, k, j] += _per_sample(out, target) * rec.sensitivity[k]
                    pooled[p, a, k, j] += float((out - target).abs().mean() / target.abs().mean()) * rec.sensitivity[k]
    checked = 0
    for p, a, k in np.ndindex(n, n, n):
        if not (p < a < k):
            continue
        if a - p > 2 or k - a > 2:  # outside the replay's bounds: left to reuse
            assert (got.sample_errors[:, p, a, k] == math.inf).all() and (got.errors[p, a, k] == math.inf).all()
            continue
        np.testing.assert_allclose(got.sample_errors[:, p, a, k], want[:, p, a, k], rtol=1e-4, err_msg=str((p, a, k)))
        np.testing.assert_allclose(got.errors[p, a, k], pooled[p, a, k], rtol=1e-4, err_msg=str((p, a, k)))
        checked += 1
    assert checked == 4  # (a', a, k) = (0, 1, 2), (0, 1, 3), (0, 2, 3), (1, 2, 3)
    np.testing.assert_allclose(got.subset([2]).errors, got.sample_errors[2], rtol=1e-12)  # one sample: its own


@pytest.mark.parametrize("name", NAMES)
def test_the_replay_error_is_the_error_of_running_the_pipeline_with_those_params(name) -> None:
    """Full steps 0..a, then a forecast at step a+1: the run's inputs at a+1 are the recorded ones, so each
    branch's output there scores exactly what the replay measured for (a-1, a, a+1)."""
    pipe, kwargs, rec, got = measured(name)
    n, groups = rec.num_steps, _branches(rec)
    helper = DeepCacheHelper(pipe=pipe)
    for a in (1, 2):
        for j, w in enumerate(WEIGHTS):
            helper.params = CacheParams(skip_mode="custom", full_steps=tuple(range(a + 1)), cache_branch_id=BRANCH,
                                        forecast="linear", forecast_weights=(0.0,) * (a + 1) + (w,) * (n - a - 1),
                                        forecast_weight=0.0)
            outputs: list[torch.Tensor] = []
            handle = pipe.transformer.register_forward_hook(lambda m, i, o: outputs.append(output_of(o)))
            try:
                with helper, torch.no_grad():
                    pipe(**_call(kwargs))
            finally:
                handle.remove()
            assert len(outputs) == len(rec.calls)  # the same calls, in the same order
            error = sum(_per_sample(outputs[calls[a + 1]], rec.outputs[calls[a + 1]]) * rec.sensitivity[a + 1]
                        for calls in groups if a + 1 < len(calls))
            np.testing.assert_allclose(got.sample_errors[:, a - 1, a, a + 1, j], error, rtol=1e-4, err_msg=str((a, w)))
    assert untouched(pipe.transformer)


@pytest.mark.parametrize("name", NAMES)
def test_calibrate_with_forecast_sets_k_full_steps_and_keeps_the_held_out_guarantee(name, monkeypatch) -> None:
    pipe, kwargs, _, _ = measured(name)
    runs: dict = {}  # every closed-loop run, by its parameters: the checks below rerun none
    closed_loop, choose, seen = cl.closed_loop_sample_errors, fh.choose, {}

    def cached(pipeline, model, candidates, reference, rewind, call_kwargs):
        for p in candidates:
            if p not in runs:
                runs[p] = closed_loop(pipeline, model, [p], reference, rewind, call_kwargs)[0]
        return np.stack([runs[p] for p in candidates])

    def spy(pipeline, model, measured_, num_full, *args, steps=None, scores=None):
        seen["measured"], seen["steps"] = measured_, steps
        seen["choice"] = choose(pipeline, model, measured_, num_full, *args, steps=steps, scores=scores)
        return seen["choice"]

    monkeypatch.setattr(cl, "closed_loop_sample_errors", cached)  # the guard's and the ladder's runs (one scorer)
    monkeypatch.setattr(fh, "choose", spy)
    helper = DeepCacheHelper(pipe=pipe)
    helper.set_params(cache_branch_id=BRANCH)
    k, n = BUDGET[name], 4
    params = helper.calibrate(k, forecast=True, **_call(kwargs))
    choice, errors, steps = seen["choice"], seen["measured"], seen["steps"]
    assert steps in (None, even_full_steps(n, k))  # the guard's evenly spread steps, or the DP's per fold
    assert helper.params == params == choice.params and not helper.enabled and untouched(pipe.transformer)
    assert params.skip_mode == "custom" and params.cache_branch_id == BRANCH
    assert len(params.full_steps) == k and params.full_steps[0] == 0
    if params.forecast is None:
        assert choice.option == "reuse" and params == fh.reuse_schedule(errors, k, steps)
    else:
        assert params.forecast == "linear" and len(params.forecast_weights) == n and params.forecast_weight == 0.0
        assert all(params.forecast_weights[s] == 0.0 for s in params.full_steps) and any(params.forecast_weights)
    with helper, torch.no_grad():
        pipe(**_call(kwargs))
        assert helper.last_steps == tuple(s in params.full_steps for s in range(n))
    # the held-out gains are what the ladder's rungs fitted without each fold score on it ...
    score = lambda p: runs[p]  # noqa: E731 - a KeyError would be a run the choice did not make
    rungs = {r.name: r for r in fh.LADDER}
    for held in fr.kfold(SAMPLES):
        train = [s for s in range(SAMPLES) if s not in held]
        for option, gains in choice.gains.items():
            reuse, fitted = fh.fit_rung(score, errors, k, rungs[option], train, steps)
            np.testing.assert_allclose(gains[held], 10.0 * (score(reuse)[held] - score(fitted)[held]),
                                       rtol=1e-9, atol=1e-9)
    # ... and a forecast comes back only if its held-out gains passed the rule: a clear majority, mean above the spread
    assert {o: fr.held_out_verdict(g) for o, g in choice.gains.items()} == choice.verdicts
    if choice.option != "reuse":
        gains = choice.gains[choice.option]
        assert choice.verdicts[choice.option].accept and (gains > fr.TIE_DB).sum() == SAMPLES
        capped = np.minimum(gains, fr.GAIN_CAP_DB)  # the spread test caps gains (never losses)
        assert capped.mean() > fr.SPREAD_Z * capped.std(ddof=1) / math.sqrt(SAMPLES)
        assert params == fh.fit_rung(score, errors, k, rungs[choice.option], range(SAMPLES), steps)[1]
    else:
        assert params == fh.reuse_schedule(errors, k, steps)
