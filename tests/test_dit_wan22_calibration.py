"""``calibrate(K)`` and ``calibrate(K, forecast=True)`` on Wan 2.2 (tests/tiny_dit_pipelines.py, 8 steps: ``transformer``
runs steps 0-3, ``transformer_2`` steps 4-7, each with a cond and an uncond call per step).

* The recording holds the calls of both transformers; the replay runs each step on the transformer that ran it, and
  its errors equal the independent reference (tests/dit_reference.py) summed over the CFG branches.
* The error model is the engine's: no step of ``transformer_2`` reuses (or forecasts from) a feature of
  ``transformer`` (``inf``), and a run with full steps ``0..a`` scores at step ``a+1`` exactly what the replay says,
  where the engine runs step 4 in full whatever the schedule (its cache is empty) and, with a forecast, reuses
  right after it (its line needs two full steps of its own).
* ``calibrate(K)`` (and ``forecast=True``) choose among the steps of both transformers, step 4 always; the engine,
  fed the recorded inputs, makes exactly the predicted error; ``last_steps`` of an enabled run matches.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from DeepCache import CacheParams, DeepCacheHelper, engine
from DeepCache.engine.transformer.discovery import MIN_DIFFUSERS, _diffusers_version
from DeepCache.schedules import calibration
from DeepCache.schedules import forecast_calibration as fc
from DeepCache.schedules import reuse_guard as rg
from DeepCache.schedules.forecast import fit_weights, schedule_error
from DeepCache.schedules.schedule import even_full_steps, optimal_full_steps

from .dit_reference import ReferenceBranch
from .tiny import untouched
from .tiny_dit_pipelines import TINY_DIT_PIPELINES, output_of

STEPS, SWITCH, BRANCH, WEIGHTS = 8, 4, 1, (0.0, 0.75, -0.5)

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.skipif(_diffusers_version() < MIN_DIFFUSERS, reason="DeepCache caches transformers with diffusers >= 0.35"),
]


def _call(kwargs: dict) -> dict:
    return {**kwargs, "num_inference_steps": STEPS, "generator": torch.Generator().manual_seed(0)}


@functools.lru_cache(maxsize=None)
def recorded():
    """The pipeline, its call, one uncached recording, which transformer ran each call (seen by hooks of this test)."""
    pipe, kwargs = TINY_DIT_PIPELINES["WanPipeline2.2"]()
    models = [pipe.transformer, pipe.transformer_2]
    seen: list[int] = []
    hooks = [m.register_forward_pre_hook(lambda mod, a, i=i: seen.append(i)) for i, m in enumerate(models)]
    try:
        with calibration.recording(pipe, pipe.transformer) as rec, torch.no_grad():
            pipe(**_call(kwargs))
    finally:
        for h in hooks:
            h.remove()
    return pipe, kwargs, rec, [models[i] for i in seen]


@functools.lru_cache(maxsize=None)
def replayed():
    pipe, _, rec, _ = recorded()
    reuse = calibration.reuse_errors(pipe.transformer, rec, BRANCH)
    forecast = fc.forecast_errors(pipe.transformer, rec, BRANCH, candidates=WEIGHTS, max_gap=2, max_span=2)
    return reuse, forecast


def _branches(rec) -> list[list[int]]:
    """The calls of each branch, by the identity of the recorded conditioning (independent of DeepCache)."""
    groups: dict[int, list[int]] = {}
    for i, (_, kw) in enumerate(rec.calls):
        groups.setdefault(id(kw["encoder_hidden_states"]), []).append(i)
    return list(groups.values())


def _l1(out: torch.Tensor, target: torch.Tensor) -> float:
    return float((out - target).abs().mean() / target.abs().mean())


def _same_transformer(*steps: int) -> bool:
    return len({s >= SWITCH for s in steps}) == 1


def test_the_replay_covers_both_transformers_and_equals_the_reference() -> None:
    _, _, rec, ran = recorded()
    reuse, _ = replayed()
    groups = _branches(rec)
    assert rec.denoisers == [int(m is rec.extras[0]) for m in ran] and len(groups) == 2
    assert all([rec.denoiser(i) for i in calls] == [0] * SWITCH + [1] * (STEPS - SWITCH) for calls in groups)
    run = lambda i: (lambda: ran[i](*rec.calls[i][0], **rec.calls[i][1]))  # noqa: E731
    for a in range(STEPS):
        for k in range(STEPS):
            if k <= a or not _same_transformer(a, k):  # no reuse across the switch
                assert reuse[a][k] == (0.0 if k == a else math.inf), (a, k)
                continue
            want = 0.0
            for calls in groups:
                ref = ReferenceBranch(ran[calls[a]], BRANCH, BRANCH)
                with torch.no_grad():
                    ref.full(run(calls[a]))
                    out = output_of(ref.retrieve(run(calls[k])))
                want += _l1(out, rec.outputs[calls[k]]) * rec.sensitivity[k]
            assert reuse[a][k] == pytest.approx(want, rel=1e-5, abs=1e-9), (a, k)


def _run(pipe, kwargs, params: CacheParams) -> tuple[list[torch.Tensor], tuple[bool, ...]]:
    """The pipeline run with ``params``: every transformer call's output, in order, and ``last_steps``."""
    helper = DeepCacheHelper(pipe=pipe)
    helper.params = params
    outputs: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda mod, i, o: outputs.append(output_of(o)))
             for m in (pipe.transformer, pipe.transformer_2)]
    try:
        with helper, torch.no_grad():
            pipe(**_call(kwargs))
            steps = helper.last_steps
    finally:
        for h in hooks:
            h.remove()
    return outputs, steps


def test_a_run_scores_what_the_replay_says_and_runs_the_switch_in_full() -> None:
    """Full steps 0..a, then step a+1 (its inputs are the recorded ones): reuse, and each forecast weight."""
    pipe, kwargs, rec, _ = recorded()
    reuse, got = replayed()
    groups = _branches(rec)
    across = [(p, a, k) for p, a, k in np.ndindex(STEPS, STEPS, STEPS) if p < a < k and not _same_transformer(p, a, k)]
    assert all((got.errors[i] == math.inf).all() for i in across) and len(across) == 56 - 8
    np.testing.assert_allclose(np.array(got.reuse), np.array(reuse), rtol=1e-5)
    for a in range(STEPS - 1):
        for j, w in enumerate(WEIGHTS if a > 0 else (0.0,)):
            params = CacheParams(skip_mode="custom", full_steps=tuple(range(a + 1)), cache_branch_id=BRANCH,
                                 forecast="linear", forecast_weights=(0.0,) * (a + 1) + (w,) * (STEPS - a - 1),
                                 forecast_weight=0.0)
            outputs, steps = _run(pipe, kwargs, params)
            assert len(outputs) == len(rec.calls)
            # the engine runs the first step of transformer_2 in full whatever the schedule: the replay's inf
            assert steps[a + 1] == (a + 1 == SWITCH) == math.isinf(reuse[a][a + 1]), a
            if a + 1 == SWITCH:
                continue
            error = sum(_l1(outputs[c[a + 1]], rec.outputs[c[a + 1]]) * rec.sensitivity[a + 1] for c in groups)
            # right after the switch transformer_2 has one full step of its own: the forecast is reuse
            want = reuse[a][a + 1] if w == 0.0 or a == SWITCH else got.errors[a - 1, a, a + 1, j]
            assert error == pytest.approx(want, rel=1e-4), (a, w)
    assert untouched(pipe.transformer, pipe.transformer_2)


def _forced(pipe, rec, params: CacheParams) -> tuple[float, list[bool]]:
    """The engine (the generations a pipeline call opens) fed the recorded inputs: its total latent error and the
    first branch's steps."""
    lease = engine.acquire_all(pipe.transformer, [pipe.transformer_2])
    models, total, step = [pipe.transformer, pipe.transformer_2], 0.0, {}
    try:
        with engine.running_call(lease, params) as gens, torch.no_grad():
            for i, (args, kw) in enumerate(rec.calls):
                out = output_of(models[rec.denoiser(i)](*args, **kw))
                k = step[rec.branches[i]] = step.get(rec.branches[i], -1) + 1
                total += _l1(out, rec.outputs[i]) * rec.sensitivity[k]
            steps = list(gens[0].steps) + list(gens[1].steps)
    finally:
        lease.release()
    return total, steps


@pytest.mark.parametrize("num_full", [2, 3, 4])
def test_calibrate_chooses_over_both_transformers_and_the_engine_makes_the_predicted_error(num_full) -> None:
    pipe, kwargs, rec, _ = recorded()
    reuse, got = replayed()
    helper = DeepCacheHelper(pipe=pipe)
    helper.set_params(cache_branch_id=BRANCH)
    seen, real = [], rg.guard
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rg, "guard", lambda *a, **kw: seen.append(real(*a, **kw)) or seen[-1])
        params = helper.calibrate(num_full, **_call(kwargs))
    full = params.full_steps
    # the guard's evenly spread steps keep the switch, as the DP does; one sample: the DP's unless even gains 3 dB
    assert seen[0].even_steps == even_full_steps(STEPS, num_full, (SWITCH,)) and SWITCH in seen[0].even_steps
    assert not seen[0].switched and seen[0].dp_steps == full
    assert full == optimal_full_steps(reuse, num_full) and len(full) == num_full and {0, SWITCH} <= set(full)
    best = min(sum(reuse[a][k] for k in range(STEPS) if k not in s for a in [max(x for x in s if x <= k)])
               for s in ({0, SWITCH, *rest} for rest in _subsets(num_full - 2)))
    predicted = sum(reuse[max(a for a in full if a <= k)][k] for k in range(STEPS) if k not in full)
    assert predicted == pytest.approx(best, rel=1e-12)
    total, steps = _forced(pipe, rec, params)
    assert total == pytest.approx(predicted, rel=1e-4) and steps == [k in full for k in range(STEPS)]
    # the forecast: the DP's choice over the replay's measurements, the engine makes the error it predicts
    forecast = got.params(num_full)
    cost, _ = fit_weights(got.reuse, got.errors, got.candidates)
    total, steps = _forced(pipe, rec, forecast)
    assert total == pytest.approx(schedule_error(got.reuse, cost, forecast.full_steps), rel=1e-4)
    assert steps == [k in forecast.full_steps for k in range(STEPS)] and SWITCH in forecast.full_steps
    _, steps = _run(pipe, kwargs, params)
    assert steps == tuple(k in full for k in range(STEPS))


def _subsets(size: int):
    import itertools

    others = [s for s in range(1, STEPS) if s != SWITCH]
    return [set(c) for c in itertools.combinations(others, size)]


def test_calibrate_with_forecast_on_wan22_and_too_few_full_steps() -> None:
    pipe, kwargs, _, _ = recorded()
    helper = DeepCacheHelper(pipe=pipe)
    helper.set_params(cache_branch_id=BRANCH)
    with pytest.warns(UserWarning, match="prompts"):
        params = helper.calibrate(3, forecast=True, max_gap=2, **_call(kwargs))
    assert len(params.full_steps) == 3 and {0, SWITCH} <= set(params.full_steps) and helper.params == params
    assert _run(pipe, kwargs, params)[1] == tuple(k in params.full_steps for k in range(STEPS))
    with pytest.raises(ValueError, match="step 4 cannot reuse .* at least 2, got 1"):
        helper.calibrate(1, **_call(kwargs))
    assert not helper.enabled and untouched(pipe.transformer, pipe.transformer_2)
