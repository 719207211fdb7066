"""The guard of ``calibrate(K)``: the evenly spread schedule (pure, every budget), the k-fold rule (pure: a score
function stands in for the pipeline) and ``calibrate(K)`` itself on a tiny U-Net and a tiny Flux with true CFG,
where the replay's errors are rigged so that the DP picks a bad schedule (it switches) or the evenly spread one
(nothing runs); the closed loop scores decoded images (a decoder rigged to ignore its input ties every run: no
switch), or final latents for a pipeline that cannot decode."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from DeepCache import DeepCacheHelper, DeepCacheSDHelper
from DeepCache.schedules import closed_loop as cl
from DeepCache.schedules import forecast_calibration as fc
from DeepCache.schedules import forecast_refine as fr
from DeepCache.schedules import reuse_guard as rg
from DeepCache.schedules.params import CacheParams
from DeepCache.schedules.schedule import even_full_steps, optimal_full_steps

from .tiny import prompt_kwargs, tiny_sd_pipe

STEPS, BAD = 7, (0, 4, 5)  # BAD: steps 1-3 reuse step 0 (the tiny U-Net changes most early on)


@pytest.mark.parametrize("num_full, expected", [
    (1, (0,)), (2, (0, 4)), (3, (0, 2, 5)), (4, (0, 2, 4, 5)), (5, (0, 1, 3, 4, 6)), (6, (0, 1, 2, 4, 5, 6)),
    (7, (0, 1, 2, 3, 4, 5, 6)),
])
def test_even_full_steps_of_every_budget(num_full: int, expected: tuple[int, ...]) -> None:
    assert even_full_steps(STEPS, num_full) == expected


@pytest.mark.parametrize("num_full, expected", [
    (2, (0, 4)), (3, (0, 2, 4)), (4, (0, 1, 3, 4)), (5, (0, 1, 3, 4, 5)), (6, (0, 1, 2, 3, 4, 5)),
])
def test_even_full_steps_keep_the_forced_ones(num_full: int, expected: tuple[int, ...]) -> None:
    # Wan 2.2 of 6 steps switching at step 4: parts [0, 4) and [4, 6), the longer mean gap gets the next full step
    assert even_full_steps(6, num_full, forced=(4,)) == expected


def test_even_full_steps_refuse_a_budget_that_misses_the_forced_steps() -> None:
    assert even_full_steps(25, 5) == (0, 5, 10, 15, 20) and even_full_steps(25, 4) == (0, 6, 13, 19)
    with pytest.raises(ValueError, match=r"integer in \[2, 6\] .* 1 forced"):
        even_full_steps(6, 1, forced=(4,))
    with pytest.raises(ValueError, match=r"integer in \[1, 7\]"):
        even_full_steps(7, 8)
    with pytest.raises(ValueError, match=r"step indices in \[1, 5\]"):
        even_full_steps(6, 3, forced=(6,))


def _rigged(samples: int, n: int = STEPS) -> fc.ForecastErrors:
    """Reuse errors that make the DP pick BAD for K = 3 (steps 1-3 reusing step 0 and step 6 reusing 5 are free, any
    other reuse costs the gap), the same for every sample; no forecast measured."""
    a, k = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    free = ((a == 0) & (k <= 3)) | (a == 5)
    reuse = np.where(k >= a, np.where(free, 0.0, (k - a).astype(float)), math.inf)
    return fc.ForecastErrors(reuse.tolist(), np.full((n, n, n, 1), math.inf), (0.0,), 0, (n, 0),
                             np.stack([reuse] * samples)[None], np.full((1, samples, n, n, n, 1), math.inf),
                             np.ones((1, samples, n)))


@pytest.mark.parametrize("even_db, switched", [(1.0, True), (-1.0, False), (0.0, False)])
def test_decide_switches_only_on_a_clear_held_out_win(even_db: float, switched: bool) -> None:
    measured, seen = _rigged(8), []

    def score(params: CacheParams) -> np.ndarray:  # latent error: the evenly spread steps gain even_db on each sample
        seen.append(params.full_steps)
        return np.full(8, -even_db / 10 if params.full_steps == (0, 2, 5) else 0.0)

    got = rg.decide(measured, 3, score)
    assert got.dp_steps == BAD and got.even_steps == (0, 2, 5) and got.switched == switched
    assert got.params == CacheParams(skip_mode="custom", full_steps=(0, 2, 5) if switched else BAD)
    np.testing.assert_allclose(got.gains, [even_db] * 8)
    assert got.verdict == fr.held_out_verdict(got.gains, keep="DP steps")
    assert got.runs == 2 and set(seen) == {BAD, (0, 2, 5)}
    assert got.reason.startswith("evenly spread steps: 8 of 8 held-out samples gain" if switched else "DP steps:")


def test_decide_judges_each_fold_against_the_dp_fitted_without_it() -> None:
    measured = _rigged(8)
    # sample 3 makes reusing step 5 expensive: the DP fitted on the folds that hold it changes
    reuse = measured.branch_reuse.copy()
    reuse[0, 3, 5, 6:] = 100.0
    pooled = fc._pooled(reuse, measured.branch_weight).tolist()
    measured = dataclasses.replace(measured, branch_reuse=reuse, reuse=pooled)
    folds = {tuple(held): measured.subset([s for s in range(8) if s not in held]).reuse_params(3).full_steps
             for held in fr.kfold(8)}
    assert folds[(3, 7)] == BAD and len(set(folds.values())) == 2  # the fold without sample 3 fits BAD
    scores = {steps: np.arange(8) * 0.01 * i for i, steps in enumerate([(0, 2, 5), *sorted(set(folds.values()))])}
    got = rg.decide(measured, 3, lambda p: scores[p.full_steps])
    expected = np.full(8, np.nan)
    for held, steps in folds.items():
        expected[list(held)] = 10.0 * (scores[steps][list(held)] - scores[(0, 2, 5)][list(held)])
    np.testing.assert_allclose(got.gains, expected)
    assert got.runs == 3 and got.dp_steps == measured.reuse_params(3).full_steps


def test_decide_runs_nothing_when_the_dp_picks_the_evenly_spread_steps_or_they_were_not_measured() -> None:
    never = lambda p: pytest.fail("no closed-loop run expected")  # noqa: E731
    measured = _rigged(4)
    got = rg.decide(measured, 1, never)  # one full step: (0,) either way
    assert (got.option, got.params.full_steps, got.runs, got.gains) == (rg.DP, (0,), 0, None)
    short = _rigged(4)
    short.reuse[2][3] = math.inf  # the even steps (0, 2, 5) need it: not measured (max_gap); BAD does not
    assert optimal_full_steps(short.reuse, 3) == BAD
    got = rg.decide(short, 3, never)
    assert got.option == rg.DP and got.params.full_steps == BAD and "did not measure" in got.reason


def _rig(monkeypatch, module, samples: int) -> list:
    """Let the real replay run, then hand the guard :func:`_rigged` errors (keeping the real step count)."""
    real, calls = rg.forecast_errors, []

    def rigged(model, rec, branch, **kwargs):
        measured = real(model, rec, branch, **kwargs)
        calls.append(kwargs)
        return dataclasses.replace(_rigged(samples, measured.num_steps), branch=branch)

    monkeypatch.setattr(module, "forecast_errors", rigged)
    return calls


@pytest.fixture(scope="module")
def unet_call():
    return tiny_sd_pipe(), dict(num_inference_steps=STEPS, guidance_scale=5.0, output_type="latent",
                                **prompt_kwargs(batch=4))


def test_calibrate_switches_to_the_evenly_spread_steps_when_the_dp_picks_a_bad_schedule(unet_call, monkeypatch) -> None:
    pipe, call = unet_call
    calls = _rig(monkeypatch, rg, 4)
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_branch_id=1)
    params = helper.calibrate(3, generator=torch.Generator().manual_seed(0), **call)
    assert calls == [dict(candidates=(0.0,), max_span=0, samples=4, reuse_gap=None)]  # reuse only, per sample
    assert params == helper.params == CacheParams(skip_mode="custom", full_steps=(0, 2, 5), cache_branch_id=1)
    # what it judged: the two schedules in closed loop, the same noise, against the uncached decoded images
    call = {**call, "generator": torch.Generator().manual_seed(0)}
    with cl.recorded(pipe, pipe.unet, call) as (_, final, rewind):
        bad, even = cl.closed_loop_sample_errors(pipe, pipe.unet, [dataclasses.replace(params, full_steps=BAD), params],
                                                 final, rewind, call)
    assert final.shape == (4, 3, 32, 32) and 0.0 <= final.min() and final.max() <= 1.0  # images, not latents
    assert (10 * (bad - even) > fr.TIE_DB).all()  # 4 of 4 held-out samples gain: the sign test's clear majority


def _guarded(pipe, call, monkeypatch) -> rg.Guard:
    seen, real = [], rg.guard
    monkeypatch.setattr(rg, "guard", lambda *a, **kw: seen.append(real(*a, **kw)) or seen[-1])
    DeepCacheSDHelper(pipe=pipe).calibrate(3, generator=torch.Generator().manual_seed(0), **call)
    return seen[0]


def test_calibrate_scores_the_decoded_images(unet_call, monkeypatch) -> None:
    pipe, call = unet_call
    _rig(monkeypatch, rg, 4)
    decoded = []
    decode = pipe.vae.decode

    def constant(z, *args, **kwargs):  # a decoder that ignores the latents: every run gives the same images
        decoded.append(z.shape)
        return (torch.zeros(z.shape[0], 3, 8, 8),)

    monkeypatch.setattr(pipe.vae, "decode", constant)
    got = _guarded(pipe, call, monkeypatch)  # the latents favour the evenly spread steps (previous test)
    assert len(decoded) == 1 + got.runs == 3  # the recording and each closed-loop run decode once
    assert got.option == rg.DP and got.params.full_steps == BAD and (got.gains == 0.0).all()
    assert got.reason.startswith("DP steps: 0 of 4 held-out samples gain")
    monkeypatch.setattr(pipe.vae, "decode", decode)
    assert _guarded(pipe, call, monkeypatch).switched  # the real decoder: the images favour them too


class _FlagEverything:
    """A safety checker that flags every image (Stable Diffusion blacks flagged images out)."""

    calls = 0

    def __call__(self, images, clip_input):
        self.calls += 1
        return torch.zeros_like(images), [True] * len(images)


class _Features:
    def __call__(self, images, return_tensors):
        return self

    def to(self, device):
        self.pixel_values = torch.zeros(1, 3, 4, 4)
        return self


def test_the_closed_loop_scores_what_the_model_drew_not_what_a_safety_checker_blacked_out(monkeypatch) -> None:
    pipe, checker = tiny_sd_pipe(), _FlagEverything()
    object.__setattr__(pipe, "safety_checker", checker)
    object.__setattr__(pipe, "feature_extractor", _Features())
    config = dict(pipe.config)
    call = lambda: dict(num_inference_steps=STEPS, guidance_scale=5.0, output_type="latent",  # noqa: E731
                        generator=torch.Generator().manual_seed(0), **prompt_kwargs(batch=2))
    shown = pipe(**{**call(), "output_type": "pt"}).images
    assert checker.calls == 1 and (shown == 0).all()  # what the user sees: blacked out
    scored = cl._output(pipe, call())
    assert checker.calls == 1 and pipe.safety_checker is checker and dict(pipe.config) == config  # put back as it was
    object.__setattr__(pipe, "safety_checker", None)
    drawn = pipe(**{**call(), "output_type": "pt"}).images
    object.__setattr__(pipe, "safety_checker", checker)
    assert scored.shape == (2, 3, 32, 32) and scored.abs().sum() > 0 and torch.equal(scored, drawn)

    def broken(*args, **kwargs):
        raise RuntimeError("decoder out of memory")

    monkeypatch.setattr(pipe.vae, "decode", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        cl._output(pipe, call())
    assert pipe.safety_checker is checker  # also when the call fails


def test_calibrate_scores_final_latents_when_the_pipeline_cannot_decode(monkeypatch) -> None:
    pipe = tiny_sd_pipe()
    pipe.vae = None
    call = dict(num_inference_steps=STEPS, guidance_scale=5.0, output_type="latent", **prompt_kwargs(batch=4))
    assert cl.scored_call(pipe, call) == (call, False)
    _rig(monkeypatch, rg, 4)
    got = _guarded(pipe, call, monkeypatch)
    assert got.switched and got.runs == 2
    call = {**call, "generator": torch.Generator().manual_seed(0)}
    with cl.recorded(pipe, pipe.unet, call) as (_, final, rewind):
        bad, even = cl.closed_loop_sample_errors(pipe, pipe.unet, [dataclasses.replace(got.params, full_steps=BAD),
                                                                   got.params], final, rewind, call)
    assert final.shape == (4, 4, 16, 16)  # the final latents
    np.testing.assert_allclose(got.gains, 10 * (bad - even))


def test_calibrate_keeps_the_dp_steps_when_they_are_the_evenly_spread_ones(unet_call, monkeypatch) -> None:
    pipe, call = unet_call
    _rig(monkeypatch, rg, 4)
    monkeypatch.setattr(cl, "closed_loop_sample_errors", lambda *a: pytest.fail("no closed-loop run expected"))
    params = DeepCacheSDHelper(pipe=pipe).calibrate(1, generator=torch.Generator().manual_seed(0), **call)
    assert params.full_steps == (0,)


def test_calibrate_with_forecast_builds_its_ladder_on_the_guarded_steps(unet_call, monkeypatch) -> None:
    from DeepCache.schedules import forecast_heldout as fh

    pipe, call = unet_call
    _rig(monkeypatch, fh, 4)
    seen = {}
    choose = fh.choose
    monkeypatch.setattr(fh, "choose", lambda *a, **kw: seen.update(kw) or choose(*a, **kw))
    helper = DeepCacheSDHelper(pipe=pipe)
    params = helper.calibrate(3, forecast=True, generator=torch.Generator().manual_seed(0), **call)
    assert seen["steps"] == (0, 2, 5) and params.full_steps == (0, 2, 5)  # reuse, or a forecast at those steps
    assert set(seen["scores"]) >= {CacheParams(skip_mode="custom", full_steps=s) for s in (BAD, (0, 2, 5))}


def test_calibrate_guards_a_transformer_with_true_cfg(monkeypatch) -> None:
    pytest.importorskip("diffusers.pipelines.flux")
    from .tiny_dit_pipelines import TINY_DIT_PIPELINES

    pipe, kwargs = TINY_DIT_PIPELINES["FluxPipeline"]()
    kwargs = {k: v.repeat(4, *[1] * (v.dim() - 1)) if torch.is_tensor(v) else v for k, v in kwargs.items()}
    if not kwargs.get("true_cfg_scale", 1.0) > 1.0:
        pytest.skip("the tiny Flux call has no true CFG")
    steps = kwargs["num_inference_steps"]
    calls, seen, real = _rig(monkeypatch, rg, 4), [], rg.guard
    monkeypatch.setattr(rg, "guard", lambda *a, **kw: seen.append(real(*a, **kw)) or seen[-1])
    helper = DeepCacheHelper(pipe=pipe)
    params = helper.calibrate(2, **kwargs)  # 4 steps: the rig's DP is (0, 3)
    got = seen[0]
    assert helper.params == params == got.params and not helper.enabled
    assert calls and steps == 4 and got.dp_steps == (0, 3) and got.even_steps == (0, 2)
    assert got.runs == 2 and got.gains.shape == (4,) and np.isfinite(got.gains).all()
    assert got.params.full_steps == ((0, 2) if got.verdict.accept else (0, 3))
    assert got.verdict == fr.held_out_verdict(got.gains, keep="DP steps")
