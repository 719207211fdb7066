"""``calibrate(K, forecast=True)`` on a tiny pipeline: the replay measures what it says per sample (against an
independent computation), the choice is a valid forecast schedule (or calibrated reuse), the call's noise is rewound;
and the pure held-out rule, branch by branch."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from DeepCache import DeepCacheSDHelper
from DeepCache.schedules import closed_loop as cl
from DeepCache.schedules import forecast_calibration as fc
from DeepCache.schedules import forecast_heldout as fh
from DeepCache.schedules import forecast_refine as fr
from DeepCache.schedules.calibration import _sample, recording, reuse_errors
from DeepCache.engine import boundary_module, relative_l1
from DeepCache.schedules.schedule import CacheParams

from .tiny import prompt_kwargs, tiny_sd_pipe

STEPS = 7


def _call(batch: int = 2) -> dict:
    return dict(num_inference_steps=STEPS, guidance_scale=5.0, output_type="latent",
                generator=torch.Generator().manual_seed(0), **prompt_kwargs(batch=batch))


def _per_sample_l1(out: torch.Tensor, ref: torch.Tensor, s: int, samples: int) -> float:
    """Independent: the relative L1 of the rows of sample ``s`` (CFG: rows s and s + samples)."""
    rows = [i for i in range(out.shape[0]) if i % samples == s]
    return relative_l1(out[rows], ref[rows])


def test_the_replay_measures_the_forecast_it_describes() -> None:
    pipe = tiny_sd_pipe()
    unet, branch = pipe.unet, 2
    with recording(pipe, unet) as rec, torch.no_grad():
        pipe(**_call())
    measured = fc.forecast_errors(unet, rec, branch, candidates=(0.0, 0.5, 1.25), max_gap=2, max_span=2, samples=2)
    # reuse through a ForecastFeature (coefficient 0) is reuse; all samples pooled: the batch's relative L1
    np.testing.assert_allclose(np.array(measured.reuse), np.array(reuse_errors(unet, rec, branch)), rtol=1e-5)
    assert measured.samples == 2 and measured.sample_errors.shape == (2, STEPS, STEPS, STEPS, 3)
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
                        got = measured.sample_errors[:, p, a, k, j]
                        if a - p > 2 or k - a > 2:
                            assert (got == math.inf).all() and measured.errors[p, a, k, j] == math.inf
                            continue
                        if w == 0.0:
                            assert (got == measured.sample_reuse[:, a, k]).all()
                            continue
                        line = features[a] + w * (k - a) * (features[a] - features[p]) / (a - p)
                        h = boundary.register_forward_hook(lambda m, i, o: (line, *o[1:]) if isinstance(o, tuple) else line)
                        args, kwargs = rec.calls[k]
                        out = _sample(unet(*args, **kwargs))
                        h.remove()
                        for sample in range(2):
                            expected = _per_sample_l1(out, rec.outputs[k], sample, 2) * rec.sensitivity[k]
                            assert got[sample] == pytest.approx(expected, rel=1e-4), (p, a, k, w, sample)
                        pooled = relative_l1(out, rec.outputs[k]) * rec.sensitivity[k]
                        assert measured.errors[p, a, k, j] == pytest.approx(pooled, rel=1e-4)
                        checked += 1
    assert checked == 2 * sum(1 for p in range(STEPS) for a in range(p + 1, min(STEPS, p + 3))
                              for k in range(a + 1, min(STEPS, a + 3)))
    assert measured.evaluations == (STEPS, STEPS * (STEPS - 1) // 2 + checked)
    one = measured.subset([1])  # fitting on part of the batch: that sample's own errors, no model run
    np.testing.assert_allclose(np.array(one.reuse), measured.sample_reuse[1], rtol=1e-12)
    np.testing.assert_allclose(one.errors, measured.sample_errors[1], rtol=1e-12)
    both = measured.subset([0, 1])
    np.testing.assert_allclose(both.errors, measured.errors, rtol=1e-12)
    with pytest.raises(ValueError, match="at least one sample"):
        measured.subset([])


def test_calibrate_with_forecast_returns_and_sets_a_valid_schedule_and_rewinds_the_noise() -> None:
    pipe = tiny_sd_pipe()
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_branch_id=1)
    call = _call()
    with pytest.warns(UserWarning, match="2 calibration sample"):
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


def test_the_closed_loop_keeps_reuse_when_it_is_best_and_scores_by_decoded_images() -> None:
    pipe = tiny_sd_pipe()
    call = _call()
    uncached_images = pipe(**{**call, "generator": torch.Generator().manual_seed(0), "output_type": "pt"}).images
    with cl.recorded(pipe, pipe.unet, call) as (rec, final, rewind):
        assert torch.equal(final, uncached_images)  # output_type="latent" asked for; the images are scored
        measured = fc.forecast_errors(pipe.unet, rec, 0, max_gap=2, max_span=2)
        uncached = CacheParams()  # every step full: exactly the recorded call
        scores = cl.closed_loop_errors(pipe, pipe.unet, [uncached, measured.reuse_params(3)], final, rewind, call)
    assert scores[0] == math.log10(1e-20) and scores[1] > scores[0]  # the same noise: uncached reproduces the call
    per = cl.closed_loop_sample_errors(pipe, pipe.unet, [measured.reuse_params(3)], final, rewind, call)
    assert per.shape == (1, 2) and per[0].mean() == pytest.approx(scores[1])
    assert cl.log_mse(torch.ones(2, 3), torch.zeros(2, 3)).tolist() == [0.0, 0.0]  # log10 of MSE 1
    assert fc.candidate_params(measured, 3)[0] == measured.reuse_params(3)
    assert all(p.forecast == "linear" for p in fc.candidate_params(measured, 3)[1:])


def test_calibrate_rejects_bad_values() -> None:
    pipe = tiny_sd_pipe()
    helper = DeepCacheSDHelper(pipe=pipe)
    with pytest.raises(ValueError, match="forecast must be True or False"):
        helper.calibrate(3, forecast="linear", **_call())
    with pytest.raises(ValueError, match="does not split into 3 samples"):
        fc.sample_l1(torch.ones(4, 2), torch.ones(4, 2), 3)
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


@pytest.mark.parametrize("batch", [1, 4])
def test_choose_fits_each_rung_on_other_samples_and_refits_the_kept_one_on_all(batch: int, monkeypatch) -> None:
    pipe = tiny_sd_pipe()
    call = _call(batch)
    runs: dict = {}  # every closed-loop run, by its parameters: the checks below rerun none
    run = cl.closed_loop_sample_errors

    def cached(pipeline, unet, candidates, reference, rewind, call_kwargs):
        for p in candidates:
            if p not in runs:
                runs[p] = run(pipeline, unet, [p], reference, rewind, call_kwargs)[0]
        return np.stack([runs[p] for p in candidates])

    monkeypatch.setattr(cl, "closed_loop_sample_errors", cached)
    with cl.recorded(pipe, pipe.unet, call) as (rec, final, rewind):
        measured = fc.forecast_errors(pipe.unet, rec, 0, max_gap=3, max_span=2, samples=batch)
        if batch < fr.MIN_HELD_OUT:
            with pytest.warns(UserWarning, match="too few"):
                choice = fh.choose(pipe, pipe.unet, measured, 2, final, rewind, call)
        else:
            choice = fh.choose(pipe, pipe.unet, measured, 2, final, rewind, call)
        assert choice.runs == len(runs)
        score = lambda p: cached(pipe, pipe.unet, [p], final, rewind, call)[0]  # noqa: E731
        rungs = {r.name: r for r in fh.LADDER}
        assert set(choice.gains) == set(choice.verdicts) and list(choice.verdicts) == [
            name for name in rungs if name in choice.verdicts]  # judged in climbing order
        assert batch > 1 or not any(rungs[name].refined for name in choice.verdicts)
        # the held-out gains are what the rung fitted without each fold scores on it
        for held in fr.kfold(batch) or [[0]]:
            train = [s for s in range(batch) if s not in held] or [0]
            for name, gains in choice.gains.items():
                reuse, params = fh.fit_rung(score, measured, 2, rungs[name], train)
                np.testing.assert_allclose(gains[held], 10.0 * (score(reuse)[held] - score(params)[held]), atol=1e-9)
        verdicts = list(choice.verdicts.values())
        assert all(v.accept for v in verdicts[:-1])  # the climb stopped at its first rejection, if any
        accepted = [name for name, v in choice.verdicts.items() if v.accept]
        if not accepted:
            assert choice.option == "reuse" and choice.params == measured.reuse_params(2)
        else:
            kept = max(accepted, key=lambda name: choice.verdicts[name].mean_db)
            refit = fh.fit_rung(score, measured, 2, rungs[kept], range(batch))[1]
            assert (choice.option, choice.params) in ((kept, refit), ("reuse", measured.reuse_params(2)))
        assert len(runs) == choice.runs  # the checks reran nothing


def test_a_rung_names_its_recipe_and_refuses_unknown_steps() -> None:
    assert [r.name for r in fh.LADDER] == ["reuse steps x0.25", "reuse steps x0.5", "reuse steps x0.75",
                                           "reuse steps x1", "reuse steps x1, refined"]
    with pytest.raises(ValueError, match="'reuse' .* or 'dp'"):
        fh.Rung("own", 1.0)


def _synthetic_errors(samples: int = 8, n: int = 6) -> fc.ForecastErrors:
    """A replay where reuse costs the gap and the forecast with weight w costs (1 - w/2) of it: weight 1 wins."""
    a, k = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    reuse = np.where(k >= a, (k - a).astype(float), math.inf)
    w = np.asarray(fc.CANDIDATE_WEIGHTS)
    p3, a3, k3 = np.meshgrid(np.arange(n), np.arange(n), np.arange(n), indexing="ij")
    errors = np.where(((p3 < a3) & (a3 < k3))[..., None], (k3 - a3)[..., None] * (1 - w / 2), math.inf)
    branch_reuse, branch_errors = np.stack([reuse] * samples)[None], np.stack([errors] * samples)[None]  # one branch
    return fc.ForecastErrors(reuse.tolist(), errors, tuple(w), 0, (n, 0), branch_reuse, branch_errors,
                             np.ones((1, samples, n)))


@pytest.mark.parametrize("bad, kept, judged", [
    # the gain of sample 7 at each factor f of the forecast (the other samples gain 4 f dB): the climb stops at the
    # first rung whose held-out gains fail the rule, never running a later one, and keeps the accepted rung with
    # the largest mean gain
    (lambda f: 4 * f - 20 * f**3, "reuse steps x0.5", 3),  # x0.75: 7 of 8 win but the mean is within 2 SE
    (lambda f: 4 * f - 5.0, "reuse", 1),  # x0.25 loses 4 dB on sample 7: 7 of 8 win, but within the spread
    (lambda f: -0.5, "reuse steps x1", 4),  # 7 of 8 win at every factor: the boldest reuse-steps rung
])
def test_choose_climbs_the_ladder_and_stops_at_the_first_rung_that_fails(bad, kept, judged, monkeypatch) -> None:
    measured, samples = _synthetic_errors(), 8
    factors = []

    def closed_loop(pipeline, unet, candidates, reference, rewind, call_kwargs):  # image error, log10 MSE
        f = max(max(p.forecast_weights or (0.0,)) for p in candidates)
        factors.append(f)
        return np.asarray([[-(bad(f) if s == 7 else 4 * f) / 10 if f else 0.0 for s in range(samples)]])

    monkeypatch.setattr(cl, "closed_loop_sample_errors", closed_loop)
    choice = fh.choose(None, None, measured, 3, torch.zeros(samples, 1), lambda: None, {})
    names = [r.name for r in fh.LADDER]
    assert list(choice.verdicts)[:judged] == names[:judged] and choice.option == kept
    assert all(choice.verdicts[name].accept for name in names[:judged - 1])
    if judged < 4:
        assert list(choice.verdicts) == names[:judged] and not choice.verdicts[names[judged - 1]].accept
        assert sorted(set(factors)) == [0.0] + [r.factor for r in fh.LADDER[:judged]]  # later rungs never ran
    reuse = measured.reuse_params(3)
    if kept == "reuse":
        assert choice.params == reuse
    else:
        weights = set(choice.params.forecast_weights)
        assert choice.params.full_steps == reuse.full_steps and weights == {0.0, float(kept.split("x")[1])}
    for name, gains in choice.gains.items():
        f = fh.LADDER[names.index(name)].factor
        np.testing.assert_allclose(gains, [4 * f] * 7 + [bad(f)], atol=1e-9)


# -- the held-out rule (pure) ----------------------------------------------------------------------------------


def test_kfold_holds_every_sample_out_once() -> None:
    assert fr.kfold(0) == fr.kfold(1) == []
    assert fr.kfold(2) == [[0], [1]] and fr.kfold(3) == [[0], [1], [2]]  # leave one out
    assert fr.kfold(4) == [[0], [1], [2], [3]] and fr.kfold(5) == [[0, 4], [1], [2], [3]]
    for n in range(2, 20):
        folds = fr.kfold(n)
        assert sorted(s for f in folds for s in f) == list(range(n)) and len(folds) == min(n, fr.KFOLDS)


def test_sign_test_is_the_binomial_tail() -> None:
    assert fr.sign_test(0, 5) == 1.0 and fr.sign_test(5, 5) == 1 / 32 and fr.sign_test(4, 5) == 6 / 32
    # the fewest wins the rule accepts: 4 of 4, 5 of 5, 5 of 6, 6 of 7, 6 of 8, 7 of 9, 8 of 10
    least = {n: min(w for w in range(n + 1) if fr.sign_test(w, n) <= fr.SIGN_ALPHA) for n in range(4, 11)}
    assert least == {4: 4, 5: 5, 6: 5, 7: 6, 8: 6, 9: 7, 10: 8}


def test_held_out_rule_accepts_a_clear_majority_beyond_the_spread() -> None:
    v = fr.held_out_verdict([1.0, 1.1, 0.9, 1.2, 1.0, 0.8, -0.5, -0.2])  # 6 of 8 win, mean 0.66 > 2 x 0.21
    assert v.accept and (v.wins, v.losses) == (6, 2) and v.reason.startswith("accepted: 6 of 8")
    assert v.mean_db == pytest.approx(0.6625) and v.stderr_db == pytest.approx(np.std(
        [1.0, 1.1, 0.9, 1.2, 1.0, 0.8, -0.5, -0.2], ddof=1) / math.sqrt(8))


def test_held_out_rule_rejects_without_a_clear_majority() -> None:
    v = fr.held_out_verdict([5.0, 5.0, 5.0, 5.0, 5.0, -0.1, -0.1, -0.1])  # 5 of 8: p = 0.36, however large the mean
    assert not v.accept and "5 of 8" in v.reason and "sign test" in v.reason
    assert not fr.held_out_verdict([1.0, 1.0, 1.0, -1.0]).accept  # 3 of 4


def test_held_out_rule_rejects_a_mean_within_the_spread() -> None:
    v = fr.held_out_verdict([0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 3.0, -3.0])  # 7 of 8 win, mean 0.04 < 2 SE
    assert not v.accept and "spread" in v.reason and v.wins == 7
    # the spread test alone: all win, mean 0.26, SE 0.2
    assert not fr.held_out_verdict([0.02, 0.02, 0.02, 1.0]).accept


def test_held_out_rule_caps_gains_for_the_spread_test_but_never_losses() -> None:
    gains = [1.0, 1.2, 0.9, 1.1, 1.0, 0.8, 1.3, 30.0]  # every sample wins; uncapped: mean 4.66 < 2 x 3.62
    assert np.mean(gains) < 2 * np.std(gains, ddof=1) / math.sqrt(8)
    v = fr.held_out_verdict(gains)
    assert v.accept and v.mean_db == pytest.approx(np.mean(gains)) and v.stderr_db == pytest.approx(
        np.std(gains, ddof=1) / math.sqrt(8))  # reported: the gains themselves
    capped = np.minimum(gains, fr.GAIN_CAP_DB)
    assert f"capped {capped.mean():.3f} dB > 2 x {np.std(capped, ddof=1) / math.sqrt(8):.3f} dB" in v.reason
    v = fr.held_out_verdict([30.0] * 7 + [-20.0])  # a loss counts in full: capped mean 0.125 < 2 x 2.87
    assert not v.accept and v.mean_db == pytest.approx(23.75) and "within" in v.reason


def test_held_out_rule_counts_ties_and_nans_against_the_forecast() -> None:
    ties = fr.held_out_verdict([0.0] * 8)
    assert not ties.accept and (ties.wins, ties.losses) == (0, 0)
    near = fr.held_out_verdict([fr.TIE_DB] * 4 + [1.0] * 4)  # a gain of exactly TIE_DB is a tie: 4 of 8
    assert not near.accept and near.wins == 4
    assert not fr.held_out_verdict([1.0, 1.1, 0.9, float("nan")]).accept  # 3 of 4 win
    assert not fr.held_out_verdict([]).accept and fr.held_out_verdict([]).reason == "reuse: no held-out samples"


@pytest.mark.parametrize("gains, accept", [
    ([3.0], True), ([2.99], False), ([10.0, 3.0], True), ([10.0, 2.9], False), ([4.0, 4.0, 4.0], True),
    ([4.0, 4.0, -1.0], False), ([0.0, 0.0, 0.0], False),
])
def test_held_out_rule_with_1_to_3_samples_needs_a_large_gain_on_each(gains: list[float], accept: bool) -> None:
    v = fr.held_out_verdict(gains)
    assert v.accept is accept and f"few samples ({len(gains)})" in v.reason


def test_climb_stops_at_the_first_rejection_and_keeps_the_largest_accepted_mean() -> None:
    def verdict(accept: bool, mean: float) -> fr.Verdict:
        return fr.Verdict(accept, "", 0, 0, mean, 0.1)

    asked = []

    def judge(ladder):
        return lambda i: asked.append(i) or ladder[i]

    ladder = [verdict(True, 1.0), None, verdict(True, 3.0), verdict(True, 2.0), verdict(False, 9.0), verdict(True, 8.0)]
    best, judged = fr.climb(judge(ladder), len(ladder))
    assert best == 2 and judged == ladder[:5] + [None] and asked == [0, 1, 2, 3, 4]  # rung 5 never judged
    asked.clear()
    assert fr.climb(judge([verdict(False, 5.0), verdict(True, 9.0)]), 2) == (None, [verdict(False, 5.0), None])
    assert asked == [0]
    assert fr.climb(judge([None, None]), 2) == (None, [None, None])
    assert fr.climb(judge([verdict(True, 2.0), verdict(True, 2.0)]), 2)[0] == 0  # the first of equals
    assert fr.climb(judge([]), 0) == (None, [])


def test_shrink_scales_every_weight_toward_reuse() -> None:
    p = CacheParams(skip_mode="custom", full_steps=(0, 2), forecast="linear", forecast_weights=(0, 0, 0, 0.6, -0.4))
    assert fr.shrink(p, 0.5).forecast_weights == (0.0, 0.0, 0.0, 0.3, -0.2)
    assert fr.shrink(p, 0.0).forecast_weights == (0.0,) * 5 and fr.shrink(p, 1.0) == dataclasses.replace(
        p, forecast_weights=(0.0, 0.0, 0.0, 0.6, -0.4))
