"""`deepcache tune`: the pure search parts, and end to end on the embedded model: it meets the bound it prints."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from DeepCache import CacheParams
from DeepCache.tools.cli import main
from DeepCache.tools.demo_model import EMBEDDED_MODEL
from DeepCache.tools import metrics
from DeepCache.tools.pipelines import load_pipeline
from DeepCache.tools.prompts import GENERIC_CALIBRATION_PROMPTS, PromptItem, calibration_prompts, embedded_prompts
from DeepCache.tools.runs import RunSpec, generate_batch
from DeepCache.tools.settings import BASELINE, Setting
from DeepCache.tools.tune import (KIND_STYLE, KINDS, chosen_label, choose, credible_speedup, full_step_budget,
                                  pareto_front, plot_series, search_threshold, unmet_bound)
from DeepCache.tools.tune.calibrated import LINEAR_MAX_INTERVAL, reuse_within
from DeepCache.tools.tune.plan import Slot, best_credible, contenders, could_win, order
from DeepCache.tools.tune.search import PromptSplit, calibrated_budgets, candidate_setting

needs_model = pytest.mark.skipif(
    not (EMBEDDED_MODEL / "model_index.json").is_file(), reason="embedded demo model not built"
)

STEPS = 10
BOUND_DB = 25.0
#: The SSIM bound on the smoke-trained pipeline, 4 steps: I=2/B=0 misses it (0.99934), calibrated keeps it (0.99992).
SSIM_BOUND = 0.9995
SMALL = ["--intervals", "2,4", "--branches", "0", "--num-prompts", "3", "--num-calibration-prompts", "2",
         "--steps", str(STEPS), "--no-progress"]


# -- pure parts ------------------------------------------------------------------------------
def test_budget_is_the_full_steps_of_the_uniform_interval() -> None:
    assert [full_step_budget(25, n) for n in (2, 3, 4, 5, 6)] == [13, 9, 7, 5, 5]
    assert full_step_budget(49, 3) == 17  # Heun: 2 * 25 - 1 evaluations


def test_threshold_search_returns_a_measured_threshold_that_keeps_the_budget() -> None:
    measured: list[float] = []

    def full_steps(t: float) -> float:  # decreasing in the threshold, a step function like the real one
        measured.append(t)
        return float(max(3, 25 - int(100 * t)))

    t = search_threshold(full_steps, 9)
    assert t in measured and full_steps(t) <= 9
    assert full_steps(t / 1.2) > 9  # within the bisection's resolution of the smallest that keeps it
    assert len(measured) <= 8  # a short bisection
    # the upper end grows until some threshold keeps the budget
    grown = search_threshold(lambda t: 25.0 if t < 50 else 5.0, 9)
    assert grown >= 50
    with pytest.raises(ValueError, match="no adaptive threshold"):
        search_threshold(lambda t: 25.0, 9)


def test_pareto_front_and_choice() -> None:
    rows = [
        {"kind": "uniform", "setting": "I=2, B=0", "speedup": 1.7, "psnr": 45.0, "ssim": 0.99},
        {"kind": "uniform", "setting": "I=5, B=0", "speedup": 3.2, "psnr": 29.0, "ssim": 0.90},
        {"kind": "calibrated", "setting": "I=1, B=0, custom", "speedup": 3.1, "psnr": 31.0, "ssim": 0.93},
        {"kind": "non-uniform", "setting": "I=5, B=0, non-uniform", "speedup": 3.0, "psnr": 22.0, "ssim": 0.75},
    ]
    assert pareto_front([(r["speedup"], r["psnr"]) for r in rows]) == [0, 1, 2]
    assert choose(rows, 30.0, None) is rows[2]
    assert choose(rows, None, 0.95) is rows[0]
    assert choose(rows, 30.0, 0.95) is rows[0]
    assert choose(rows, 50.0, None) is None
    # a measured speedup above its FLOP-ideal bound is noise: the row counts at its bound
    rows[2]["ideal_speedup"], rows[1]["ideal_speedup"] = 2.0, 3.5
    assert credible_speedup(rows[2]) == 2.0 and credible_speedup(rows[1]) == 3.2
    assert choose(rows, 30.0, None) is rows[2]  # still the only fast one that meets 30 dB
    rows.append({"kind": "adaptive", "setting": "I=6, B=0, adaptive", "speedup": 2.4, "ideal_speedup": 2.6,
                 "psnr": 30.5, "ssim": 0.93})
    assert choose(rows, 30.0, None) is rows[4]  # 2.4x supported beats 3.1x measured against a 2.0x bound
    message = str(unmet_bound(rows, 50.0, None))
    assert "no candidate meets PSNR >= 50 dB" in message
    assert "best PSNR reached is 45.00 dB (uniform I=2, B=0)" in message


def test_calibration_prompts_are_never_evaluated() -> None:
    evaluated = embedded_prompts(6)
    chosen = calibration_prompts(embedded=True, count=4, exclude=evaluated)
    assert chosen == embedded_prompts(10)[6:] and not set(chosen) & set(evaluated)
    given = ["a small red circle on a blue background, top left"]
    assert calibration_prompts(embedded=True, count=4, exclude=evaluated, given=given) == given
    with pytest.raises(ValueError, match="must differ"):
        calibration_prompts(embedded=True, count=4, exclude=evaluated, given=evaluated[:1])
    assert calibration_prompts(embedded=False, count=2, exclude=["a cat"]) == list(GENERIC_CALIBRATION_PROMPTS[:2])


def test_candidate_settings_of_each_kind() -> None:
    assert candidate_setting("uniform", 3, 1, 25) == Setting(3, 1)
    assert candidate_setting("non-uniform", 3, 1, 25) == Setting(3, 1, "non-uniform", center=8)
    for kind in ("calibrated", "forecast", "adaptive"):  # built from runs on the calibration prompts
        assert candidate_setting(kind, 3, 0, 25) is None
    # linear: uniform with the straight-line forecast, weight 1, at N <= 3 only
    assert LINEAR_MAX_INTERVAL == 3
    assert [candidate_setting("linear", n, 2, 25) for n in (2, 3, 4, 6)] == [
        Setting(2, 2, forecast="linear"), Setting(3, 2, forecast="linear"), None, None]
    assert Setting(3, 2, forecast="linear").forecast_weight == 1.0
    # the calibrated kinds: every K between the intervals' budgets, each with the smallest interval that gives it
    assert calibrated_budgets(25, (2, 3, 4, 5, 6)) == {5: 5, 6: None, 7: 4, 8: None, 9: 3, 10: None, 11: None,
                                                       12: None, 13: 2}


def test_prompt_split_keeps_calibration_and_judging_prompts_apart() -> None:
    a, b = PromptItem("a red circle", 1), PromptItem("a blue square", 2)
    assert PromptSplit((a,), (b,)).judging == (b,)
    with pytest.raises(ValueError, match="must differ; both have 'a red circle'"):
        PromptSplit((a,), (PromptItem("a red circle", 7), b))  # the same prompt with another seed is not held out
    with pytest.raises(ValueError, match="at least one"):
        PromptSplit((a,), ())


def test_pruning_drops_only_candidates_that_cannot_win() -> None:
    """A candidate's credible speedup never exceeds its FLOP-ideal bound: below the best that meets, it cannot win."""
    rows = [{"speedup": 2.5, "ideal_speedup": 2.6, "psnr": 31.0, "ssim": 0.9},  # meets: credible 2.5
            {"speedup": 2.9, "ideal_speedup": 2.7, "psnr": 30.5, "ssim": 0.9},  # meets: credible 2.7 (its bound)
            {"speedup": 2.0, "ideal_speedup": 2.69, "psnr": 35.0, "ssim": 0.9},  # meets, bound below 2.7
            {"speedup": 3.3, "ideal_speedup": 3.4, "psnr": 20.0, "ssim": 0.8}]  # fast, misses the bound
    assert best_credible(rows, 30, None) == 2.7 and best_credible(rows, 40, None) is None
    assert contenders(rows, 30, None) == [1]  # 2.5x cannot reach 2.7x: its ideal is 2.6x
    assert contenders(rows, 34, None) == [2]  # the only one that meets
    assert [could_win(b, 2.7) for b in (2.69, 2.7, 3.0, None)] == [False, True, True, True]
    assert could_win(1.01, None)  # nothing meets yet: everything can win
    for rows_ in ([dict(r, psnr=None) for r in rows],):  # pruned rows (no PSNR) are never contenders
        assert contenders(rows_, 30, None) == [] and best_credible(rows_, 30, None) is None
    # the order: free to build first (they set the bar), then calibrated, then the searches; each by bound
    slots = [Slot("forecast", 0, None, 6, 3.0), Slot("adaptive", 0, 2, 13, 2.7), Slot("calibrated", 1, 5, 5, 2.9),
             Slot("uniform", 0, 3, 9, 2.29), Slot("uniform", 0, 5, 5, 3.38), Slot("linear", 0, 2, 13, None)]
    assert [(s.kind, s.budget) for s in order(slots)] == [
        ("linear", 13), ("uniform", 5), ("uniform", 9), ("calibrated", 5), ("forecast", 6), ("adaptive", 13)]


def test_a_bounded_replay_keeps_the_reuse_errors_within_the_gap() -> None:
    errors = [[0.0, 1.0, 2.0, 3.0], [math.inf, 0.0, 1.5, 2.5], [math.inf] * 2 + [0.0, 0.5], [math.inf] * 3 + [0.0]]
    assert reuse_within(errors, 2) == [[0.0, 1.0, 2.0, math.inf], [math.inf, 0.0, 1.5, 2.5],
                                       [math.inf, math.inf, 0.0, 0.5], [math.inf] * 3 + [0.0]]
    assert reuse_within(errors, 3) == errors


def test_every_kind_has_its_own_colour_marker_and_legend_entry() -> None:
    assert KINDS == ("uniform", "non-uniform", "calibrated", "adaptive", "forecast", "linear")
    assert len({KIND_STYLE[k][0] for k in KINDS}) == len(KINDS)  # distinct colours
    assert KIND_STYLE["forecast"][1] == "diamond" and KIND_STYLE["linear"][1] == "triangle"
    rows = [{"kind": kind, "speedup": 1.0 + k, "psnr": 40.0 - k} for k, kind in enumerate(reversed(KINDS))]
    series = plot_series(rows)
    assert [s.label for s in series] == list(KINDS)  # one legend entry per kind, in KINDS order
    assert [(s.colour, s.marker) for s in series] == [KIND_STYLE[k] for k in KINDS]
    assert series[4].points == [(2.0, 39.0)]  # forecast's point
    assert [s.label for s in plot_series(rows[:1])] == ["linear"]


def test_the_chosen_label_is_the_set_params_line_not_the_budget_interval() -> None:
    """The plot once said "adaptive N=4" (the budget's interval) while set_params got cache_interval=8."""
    setting = Setting(8, 0, "adaptive", threshold=0.16)
    row = {"kind": "adaptive", "interval": 4, "branch": 0, "params": setting.helper_kwargs()}
    assert chosen_label(row) == "adaptive I=8, B=0, adaptive, threshold=0.16"
    assert "cache_interval=8" in setting.set_params_call()


def independent_psnr(pipe: Any, meta: dict[str, Any], setting: Setting) -> float:
    """The mean PSNR of ``setting`` against the original on the report's prompts, computed here, not by tune."""
    from DeepCache import DeepCacheSDHelper

    helper, spec = DeepCacheSDHelper(pipe=pipe), RunSpec(STEPS, meta["guidance"], 1, meta["batch_size"])
    items = [PromptItem(p, s) for p, s in zip(meta["prompts"], meta["seeds"])]
    reference = generate_batch(pipe, helper, BASELINE, items, spec)[0]
    images = generate_batch(pipe, helper, setting, items, spec)[0]
    return float(np.mean(metrics.psnr(images, reference)))


def _params(row: dict[str, Any]) -> dict[str, Any]:
    """A JSON row's ``params`` as ``CacheParams`` keywords (lists back to tuples)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in row["params"].items()}


# -- end to end ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One small `deepcache tune` run on the embedded model: its files, what it printed, and which prompts every
    pipeline call of the calibration side (recording, closed loop, adaptive search) and of the judge got."""
    import contextlib
    import io

    from DeepCache.schedules import closed_loop
    from DeepCache.tools.tune import judge, search

    out = tmp_path_factory.mktemp("tune")
    files = {"save": out / "params.json", "plot": out / "pareto.png", "json": out / "report.json"}
    seen: dict[str, list[Any]] = {"calibration": [], "judging": []}

    def spy(target: Any, name: str, side: str, prompts: Any) -> None:
        real = getattr(target, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            seen[side].append(prompts(*args, **kwargs))
            return real(*args, **kwargs)

        patch.setattr(target, name, wrapper)

    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        spy(closed_loop, "recorded", "calibration", lambda pipe, unet, call: tuple(call["prompt"]))
        spy(closed_loop, "closed_loop_errors", "calibration", lambda pipe, unet, c, r, w, call: tuple(call["prompt"]))
        spy(search, "generate_batch", "calibration", lambda pipe, h, s, items, spec: tuple(i.prompt for i in items))
        spy(judge, "generate_batch", "judging", lambda pipe, h, s, items, spec: (s, tuple(i.prompt for i in items)))
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            status = main(["tune", "--min-psnr", str(BOUND_DB), *SMALL, "--save", str(files["save"]),
                           "--plot", str(files["plot"]), "--json", str(files["json"])])
    return {"status": status, "out": stdout.getvalue(), "err": stderr.getvalue(), "seen": seen, **files}


@needs_model
def test_tune_meets_the_bound_it_prints(tuned: dict[str, Any]) -> None:
    assert tuned["status"] == 0, tuned["err"]
    out = tuned["out"]
    assert f"bound: PSNR >= {BOUND_DB:g} dB" in out
    printed = re.search(r"^    (helper\.set_params\(.*\))$", out, re.M)
    assert printed, out
    report = json.loads(tuned["json"].read_text())
    meta = report["meta"]
    # the printed line, the saved JSON and the report name the same parameters
    calls: list[dict[str, Any]] = []

    class Recorder:
        def set_params(self, **kwargs: Any) -> None:
            calls.append(kwargs)

    eval(printed.group(1), {"helper": Recorder()})  # noqa: S307 - the line tune printed for users to paste
    saved = CacheParams.from_json(tuned["save"].read_text())
    assert saved == CacheParams(**calls[0]) == CacheParams(**{
        k: tuple(v) if isinstance(v, list) else v for k, v in report["chosen"]["params"].items()})
    # re-generate with the saved parameters: the same PSNR, at or above the bound
    pipe = load_pipeline()
    psnr = independent_psnr(pipe, meta, Setting.of(saved))
    assert psnr >= BOUND_DB
    assert psnr == pytest.approx(report["chosen"]["psnr"], abs=1e-6)
    # the line above the set_params call names the same parameters (so does the plot: chosen_label)
    assert f"fastest setting that meets it: {report['chosen']['kind']} {Setting.of(saved).label}: " in out
    assert f"PSNR {psnr:.2f} dB" in out


@needs_model
def test_every_candidate_is_judged_on_prompts_its_calibration_never_saw(tuned: dict[str, Any]) -> None:
    meta = json.loads(tuned["json"].read_text())["meta"]
    calibration, judging = set(meta["calibration_prompts"]), set(meta["prompts"])
    assert len(calibration) == 2 and len(judging) == 3 and not calibration & judging
    seen = tuned["seen"]
    # the calibration side: one recording (shared by every branch and K), closed loops and the adaptive search
    assert seen["calibration"] and {p for call in seen["calibration"] for p in call} == calibration
    assert meta["calibration_runs"] == 1
    # the judge: the original and every judged candidate on exactly the judging prompts, nothing else
    assert {p for _, call in seen["judging"] for p in call} == judging
    judged = {s for s, _ in seen["judging"]} - {BASELINE}
    assert len(judged) == meta["judged"]
    for setting, call in seen["judging"]:  # one batch of all three (batch 16); the warm-up is the original's
        assert call == tuple(meta["prompts"]) or (setting == BASELINE and call == (meta["prompts"][0],))


@needs_model
def test_tune_tries_every_kind_and_prunes_only_what_cannot_win(tuned: dict[str, Any]) -> None:
    report = json.loads(tuned["json"].read_text())
    assert (report["schema_version"], report["tool"]) == (1, "deepcache tune")
    rows = report["rows"]
    assert rows[0]["kind"] == "original" and rows[0]["psnr"] is None
    candidates = rows[1:]
    # every slot has a row: the fixed kinds at each interval, the calibrated ones at every K from 3 to 5
    assert {(r["kind"], r["budget"]) for r in candidates} >= {
        (kind, k) for kind in ("uniform", "non-uniform", "adaptive") for k in (5, 3)} | {("linear", 5)} | {
        (kind, k) for kind in ("calibrated",) for k in (3, 4, 5)}
    assert {(r["kind"], r["interval"]) for r in candidates if r["kind"] != "calibrated" and r["kind"] != "forecast"} \
        == {(kind, n) for kind in ("uniform", "non-uniform", "adaptive") for n in (2, 4)} | {("linear", 2)}
    assert [r["interval"] for r in candidates if r["kind"] == "calibrated" and r["budget"] == 4] == [None]
    pipe, meta, chosen = load_pipeline(), report["meta"], report["chosen"]
    assert meta["repeats"] == 3  # the CPU default
    judged = [r for r in candidates if r["status"] != "pruned"]
    pruned = [r for r in candidates if r["status"] == "pruned"]
    # whether a slot is pruned depends on the speed measured for the best one so far (a loaded machine measures less,
    # and prunes less): the counts must agree and every pruned row must have been unable to win
    assert (len(judged), len(pruned)) == (meta["judged"], meta["pruned"])
    best = credible_speedup(chosen)
    assert chosen["timings"] == 3 and chosen["seconds"] == sorted(chosen["seconds_all"])[1]
    for r in pruned:  # could not have won: its FLOP bound is below what the choice reached
        assert r["ideal_speedup"] < best and r["psnr"] is None and r["seconds_all"] == [] and r["timings"] == 0
    for r in judged:
        assert r["budget"] == (full_step_budget(STEPS, r["interval"]) if r["interval"] else r["budget"])
        if r["kind"] != "adaptive":  # adaptive keeps the budget on the calibration prompts, on average
            assert r["full_steps"] == r["budget"]
        # timings: the contenders (they meet the bound and their FLOP bound reaches the choice) get all three
        # repeats, rotated, their median counts; every other judged candidate one, from its judging run, or three if
        # it met the bound and was a contender while the best so far was lower (a later, faster median raised it)
        contender = r["meets"] and r["ideal_speedup"] >= best
        assert r["timings"] == len(r["seconds_all"])
        assert r["timings"] == 3 if contender else r["timings"] in ((1, 3) if r["meets"] else (1,))
        assert r["seconds"] == sorted(r["seconds_all"])[len(r["seconds_all"]) // 2]
        assert r["speedup"] == pytest.approx(rows[0]["seconds"] / r["seconds"])
        if r["meets"] and not contender:  # timed once: could not have won, more timings or not
            assert r["ideal_speedup"] < best
        # the FLOP bound: above 1, below the interval for a uniform schedule (retrievals cost something)
        assert 1.0 < r["ideal_speedup"] < (r["interval"] if r["kind"] in ("uniform", "linear") else STEPS)
        assert r["beats_bound"] == (r["speedup"] > 1.1 * r["ideal_speedup"])
        # quality, recomputed here from fresh images: the row and the "meets" column are true
        psnr = independent_psnr(pipe, meta, Setting(**_params(r)))
        assert r["psnr"] == pytest.approx(psnr, abs=1e-6) and r["meets"] == (psnr >= BOUND_DB)
    assert rows[0]["timings"] == 3
    assert any(r["pareto"] for r in judged)
    assert "pruned" in tuned["out"] and f"{meta['judged']} candidates judged and {meta['pruned']} pruned" in tuned["out"]


@needs_model
def test_forecast_candidates_are_the_calibrated_forecast_and_linear_at_small_intervals(tuned: dict[str, Any]) -> None:
    from DeepCache.schedules.forecast_heldout import calibrate_forecast

    report = json.loads(tuned["json"].read_text())
    meta, candidates = report["meta"], report["rows"][1:]
    linear = [r for r in candidates if r["kind"] == "linear"]
    assert [(r["interval"], r["status"]) for r in linear] == [(2, "judged")]  # N <= 3 only; free, so judged first
    assert Setting(**_params(linear[0])) == Setting(2, 0, forecast="linear")  # weight 1
    assert linear[0]["setting"] == "I=2, B=0, forecast=linear" and linear[0]["full_steps"] == 5
    forecasts = {r["budget"]: r for r in candidates if r["kind"] == "forecast" and r["status"] != "pruned"}
    pruned = {r["budget"] for r in candidates if r["kind"] == "forecast" and r["status"] == "pruned"}  # never built
    budgets = sorted({r["budget"] for r in candidates if r["kind"] == "calibrated" and r["status"] != "pruned"} - pruned)
    assert budgets, "calibrated candidates were judged"
    pipe = load_pipeline()
    for budget in budgets:
        # independently: helper.calibrate(K, forecast=True)'s held-out choice on the calibration prompts; tune has a
        # forecast at K exactly when the rule accepts one, and it is that forecast
        best, info = calibrate_forecast(
            pipe, pipe.unet, 0, budget, prompt=meta["calibration_prompts"], num_inference_steps=STEPS,
            guidance_scale=meta["guidance"], output_type="latent",
            generator=[torch.Generator().manual_seed(int(s)) for s in meta["calibration_seeds"]])
        assert (budget in forecasts) == (info["choice"].option != "reuse"), budget
        if budget not in forecasts:
            continue
        row = forecasts[budget]
        params = CacheParams(**_params(row))
        assert row["budget"] == budget == len(params.full_steps) == row["full_steps"]
        assert (params.skip_mode, params.forecast, len(params.forecast_weights)) == ("custom", "linear", STEPS)
        assert Setting.parse(row["setting"]) == Setting.of(params)  # the label parses back to the parameters run
        assert params == best
        assert any(w > 0 for w in params.forecast_weights) or any(w != 0 for w in params.forecast_weights)


@needs_model
def test_tune_with_only_forecast_candidates_saves_a_forecast_that_reproduces_its_images(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from DeepCache import DeepCacheSDHelper

    save, report = tmp_path / "params.json", tmp_path / "report.json"
    # 4 calibration prompts and 25 steps: enough for the held-out rule to accept a forecast at N = 3 (K = 9)
    argv = ["tune", "--min-psnr", "0", "--kinds", "forecast", "--intervals", "3", "--branches", "0",
            "--num-prompts", "2", "--num-calibration-prompts", "4", "--steps", "25", "--repeats", "1", "--no-progress",
            "--save", str(save), "--plot", str(tmp_path / "plot.png"), "--json", str(report)]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    data = json.loads(report.read_text())
    assert [(r["kind"], r["budget"]) for r in data["rows"]] == [("original", 25), ("forecast", 9)]
    chosen = data["chosen"]
    assert chosen["kind"] == "forecast"
    saved = CacheParams.from_json(save.read_text())
    assert saved == CacheParams(**_params(chosen)) and saved.forecast == "linear" and len(saved.forecast_weights) == 25
    assert any(w > 0 for w in saved.forecast_weights)
    printed = re.search(r"^    (helper\.set_params\(.*\))$", out, re.M)
    assert printed and 'forecast="linear"' in printed.group(1) and "forecast_weights=[" in printed.group(1)
    calls: list[dict[str, Any]] = []

    class Recorder:
        def set_params(self, **kwargs: Any) -> None:
            calls.append(kwargs)

    eval(printed.group(1), {"helper": Recorder()})  # noqa: S307 - the line tune printed for users to paste
    assert CacheParams(**calls[0]) == saved
    assert f"fastest setting that meets it: forecast {Setting.of(saved).label}: " in out
    # the saved JSON reproduces the images tune scored; the forecast changed them (the same full steps reusing differ)
    pipe, meta = load_pipeline(), data["meta"]
    helper, spec = DeepCacheSDHelper(pipe=pipe), RunSpec(25, meta["guidance"], 1, meta["batch_size"])
    items = [PromptItem(p, s) for p, s in zip(meta["prompts"], meta["seeds"])]
    reference = generate_batch(pipe, helper, BASELINE, items, spec)[0]
    images = generate_batch(pipe, helper, Setting.of(saved), items, spec)[0]
    assert float(np.mean(metrics.psnr(images, reference))) == pytest.approx(chosen["psnr"], abs=1e-6)
    reuse = dataclasses.replace(Setting.of(saved), forecast=None, forecast_weight=1.0, forecast_weights=None)
    assert not np.array_equal(generate_batch(pipe, helper, reuse, items, spec)[0], images)


@needs_model
def test_a_speedup_above_its_flop_bound_is_flagged_and_not_trusted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A measurement 100x too fast (what a noisy machine can produce): tune warns and ranks it at its FLOP bound."""
    from DeepCache.tools.tune import judge

    real = judge.generate_batch

    def lucky(pipe: Any, helper: Any, setting: Setting, items: Any, spec: Any) -> Any:
        images, seconds, pattern = real(pipe, helper, setting, items, spec)
        return images, seconds / 100 if setting == Setting(4, 0) else seconds, pattern

    monkeypatch.setattr(judge, "generate_batch", lucky)
    report = tmp_path / "report.json"
    argv = ["tune", "--min-psnr", "0", "--intervals", "2,4", "--branches", "0", "--kinds", "uniform", "--num-prompts",
            "2", "--num-calibration-prompts", "1", "--steps", "6", "--repeats", "1", "--no-progress",
            "--save", str(tmp_path / "p.json"), "--plot", str(tmp_path / "p.png"), "--json", str(report)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    rows = {r["setting"]: r for r in json.loads(report.read_text())["rows"]}
    lucky_row = rows["I=4, B=0"]  # the fastest by its bound: judged first
    assert lucky_row["speedup"] > 10 * lucky_row["ideal_speedup"] and lucky_row["beats_bound"]
    assert "measured speedups beat their FLOP bound by more than 10 %" in captured.err
    assert f"uniform I=4, B=0: {lucky_row['speedup']:.2f}x measured, FLOP-ideal {lucky_row['ideal_speedup']:.2f}x" \
        in captured.err
    assert "> bound" in captured.out  # the table's noise column


@needs_model
def test_tune_saves_a_pareto_plot(tuned: dict[str, Any]) -> None:
    from PIL import Image

    with Image.open(tuned["plot"]) as image:
        image.verify()
    with Image.open(tuned["plot"]) as image:
        assert image.format == "PNG" and image.size == (760, 500)
        pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 4  # points in colours, not a blank page
    # the legend, bottom left: one entry per kind in KINDS order (its marker in its colour), then the Pareto front
    report = json.loads(tuned["json"].read_text())
    kinds = [k for k in KINDS if any(r["kind"] == k and r["status"] != "pruned" for r in report["rows"])]
    # every kind but the forecast, which the held-out rule rejects on 2 calibration prompts (reuse is kept)
    assert kinds == [k for k in KINDS if k != "forecast"]
    top = 500 - 50 - 6 - 16 * (len(kinds) + 1)
    for i, kind in enumerate(kinds):
        entry = pixels[top + 16 * i + 3:top + 16 * i + 12, 70 + 8:70 + 8 + 11].reshape(-1, 3)
        assert (entry == KIND_STYLE[kind][0]).all(axis=1).any(), kind


@needs_model
def test_a_bound_nothing_meets_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save = tmp_path / "params.json"
    argv = ["tune", "--min-psnr", "200", "--intervals", "2", "--branches", "0", "--kinds", "uniform",
            "--num-prompts", "1", "--num-calibration-prompts", "1", "--steps", "4", "--no-progress",
            "--save", str(save), "--plot", str(tmp_path / "plot.png")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    # on a loaded machine the noise warning (a speedup above its FLOP bound) may come first; nothing else may
    before, sep, error = err.partition("deepcache tune: error: ")
    assert sep and all(line.startswith("deepcache tune: warning: ") for line in before.splitlines())
    assert error.startswith("no candidate meets PSNR >= 200 dB")
    assert re.search(r"the best PSNR reached is \d+\.\d\d dB \(uniform I=2, B=0\)", error)
    assert not save.exists() and (tmp_path / "plot.png").is_file()


def test_tune_options_are_checked(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["tune", "--kinds", "uniform,fast"])
    assert "unknown kind(s) ['fast']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["tune", "--intervals", "3,x"])
    assert "expected integers separated by commas" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["tune", "--intervals", "1,3"])  # 1 is the uncached pipeline
    assert "expected integers >= 2 separated by commas, got '1,3'" in capsys.readouterr().err
    assert main(["tune", "--branches", "0,99", "--no-progress"]) == 2
    assert "deepcache tune: error: --branches 99: valid ids for this U-Net are 0..8." in capsys.readouterr().err


def test_tune_help_documents_the_bound_and_the_outputs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["tune", "--help"])
    out = capsys.readouterr().out
    for option in ("--model", "--min-psnr", "--min-ssim", "--intervals", "--branches", "--all-branches", "--kinds",
                   "--calibration-prompt", "--save", "--plot", "--json", "--no-progress"):
        assert option in out
    text = " ".join(out.split())
    assert "(default 3 on a CPU, where a shared machine's load changes from call to call" in text  # how many, why
    assert "more than 10 % above that bound is noise" in text
    assert ("forecast (the calibrated forecast of calibrate(K, forecast=True): K full steps and a weight per step "
            'for forecast="linear"') in text
    assert 'linear (uniform with forecast="linear" at weight 1, at N <= 3 only' in text
    assert "calibrated,adaptive,forecast,linear)" in text  # --kinds' default (argparse may break "non-uniform")
    assert "Held out: calibration and the adaptive search see only the calibration prompts" in text
    assert "pruned (never built, run or timed)" in text and "only the contenders and the original are timed" in text


def test_tune_on_a_local_pipeline_with_an_ssim_bound(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--model PATH`: any local pipeline folder; calibration prompts of its own; batch 1; an SSIM-only bound."""
    from DeepCache.tools.demo_model.train import SMOKE, build_components, save_pipeline

    components = build_components(SMOKE)
    save_pipeline(components, components.unet, components.text_encoder, tmp_path / "pipe")
    report = tmp_path / "report.json"
    argv = ["tune", "--model", str(tmp_path / "pipe"), "--min-ssim", str(SSIM_BOUND), "--prompt", "a red circle",
            "--prompt", "a blue square", "--calibration-prompt", "a green triangle", "--intervals", "2",
            "--branches", "0,1", "--kinds", "uniform,calibrated,adaptive", "--steps", "4", "--no-progress",
            "--save", str(tmp_path / "params.json"), "--plot", str(tmp_path / "plot.png"), "--json", str(report)]
    assert main(argv) == 0, capsys.readouterr().err
    assert f"bound: SSIM >= {SSIM_BOUND:g}\n" in capsys.readouterr().out
    data = json.loads(report.read_text())
    assert data["meta"]["embedded"] is False and data["meta"]["batch_size"] == 1
    assert data["meta"]["calibration_prompts"] == ["a green triangle"]
    assert len(data["rows"]) == 1 + 3 * 2 and data["chosen"] is not None
    chosen = data["chosen"]
    assert chosen["ssim"] >= SSIM_BOUND and chosen["params"]["cache_branch_id"] in (0, 1)
    judged = [r for r in data["rows"][1:] if r["status"] != "pruned"]
    assert all(r["meets"] == (r["ssim"] >= SSIM_BOUND) for r in judged)
    assert any(not r["meets"] for r in judged), "the bound should rule something out"
    assert CacheParams.from_json((tmp_path / "params.json").read_text()) == CacheParams(**{
        k: tuple(v) if isinstance(v, list) else v for k, v in chosen["params"].items()})
