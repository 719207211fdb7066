"""`deepcache tune`: the pure search parts, and end to end on the embedded model: it meets the bound it prints."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from DeepCache import CacheParams
from DeepCache.tools.cli import main
from DeepCache.tools.demo_model import EMBEDDED_MODEL
from DeepCache.tools.evaluate import fidelity, generate
from DeepCache.tools.pipelines import load_pipeline
from DeepCache.tools.prompts import GENERIC_CALIBRATION_PROMPTS, calibration_prompts, embedded_prompts
from DeepCache.tools.settings import BASELINE, Setting
from DeepCache.tools.tune import choose, full_step_budget, pareto_front, search_threshold, unmet_bound

needs_model = pytest.mark.skipif(
    not (EMBEDDED_MODEL / "model_index.json").is_file(), reason="embedded demo model not built"
)

STEPS = 10
BOUND_DB = 25.0
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


# -- end to end ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One small `deepcache tune` run on the embedded model: its files and what it printed."""
    out = tmp_path_factory.mktemp("tune")
    files = {"save": out / "params.json", "plot": out / "pareto.png", "json": out / "report.json"}
    import contextlib
    import io

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = main(["tune", "--min-psnr", str(BOUND_DB), *SMALL, "--save", str(files["save"]),
                       "--plot", str(files["plot"]), "--json", str(files["json"])])
    return {"status": status, "out": stdout.getvalue(), "err": stderr.getvalue(), **files}


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
    prompts, seeds = meta["prompts"], meta["seeds"]
    reference, _ = generate(pipe, prompts, seeds, BASELINE, STEPS, meta["guidance"], meta["batch_size"])
    images, _ = generate(pipe, prompts, seeds, Setting.of(saved), STEPS, meta["guidance"], meta["batch_size"])
    psnr = fidelity(images, reference)["psnr"]
    assert psnr >= BOUND_DB
    assert psnr == pytest.approx(report["chosen"]["psnr"], abs=1e-6)
    assert f"PSNR {psnr:.2f} dB" in out


@needs_model
def test_tune_tries_every_kind_and_picks_the_fastest_that_meets_the_bound(tuned: dict[str, Any]) -> None:
    report = json.loads(tuned["json"].read_text())
    assert (report["schema_version"], report["tool"]) == (1, "deepcache tune")
    rows = report["rows"]
    assert rows[0]["kind"] == "original" and rows[0]["psnr"] is None
    candidates = rows[1:]
    assert {(r["kind"], r["interval"]) for r in candidates} == {
        (kind, n) for kind in ("uniform", "non-uniform", "calibrated", "adaptive") for n in (2, 4)}
    assert not set(report["meta"]["prompts"]) & set(report["meta"]["calibration_prompts"])
    for r in candidates:
        assert r["budget"] == full_step_budget(STEPS, r["interval"])
        assert r["ideal_speedup"] > 1.0 and r["speedup"] > 0
        assert r["meets"] == (r["psnr"] >= BOUND_DB)
        if r["kind"] != "adaptive":  # adaptive keeps the budget on the calibration prompts, on average
            assert r["full_steps"] == r["budget"]
    chosen = report["chosen"]
    assert chosen["meets"] and chosen["speedup"] == max(r["speedup"] for r in candidates if r["meets"])
    assert any(r["pareto"] for r in candidates)


@needs_model
def test_tune_saves_a_pareto_plot(tuned: dict[str, Any]) -> None:
    from PIL import Image

    with Image.open(tuned["plot"]) as image:
        image.verify()
    with Image.open(tuned["plot"]) as image:
        assert image.format == "PNG" and image.size == (760, 500)
        pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 4  # points in colours, not a blank page


@needs_model
def test_a_bound_nothing_meets_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save = tmp_path / "params.json"
    argv = ["tune", "--min-psnr", "200", "--intervals", "2", "--branches", "0", "--kinds", "uniform",
            "--num-prompts", "1", "--num-calibration-prompts", "1", "--steps", "4", "--no-progress",
            "--save", str(save), "--plot", str(tmp_path / "plot.png")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("deepcache tune: error: no candidate meets PSNR >= 200 dB")
    assert re.search(r"the best PSNR reached is \d+\.\d\d dB \(uniform I=2, B=0\)", err)
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


def test_tune_on_a_local_pipeline_with_an_ssim_bound(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--model PATH`: any local pipeline folder; calibration prompts of its own; batch 1; an SSIM-only bound."""
    from DeepCache.tools.demo_model.train import SMOKE, build_components, save_pipeline

    components = build_components(SMOKE)
    save_pipeline(components, components.unet, components.text_encoder, tmp_path / "pipe")
    report = tmp_path / "report.json"
    argv = ["tune", "--model", str(tmp_path / "pipe"), "--min-ssim", "0", "--prompt", "a red circle",
            "--prompt", "a blue square", "--calibration-prompt", "a green triangle", "--intervals", "2",
            "--branches", "0,1", "--kinds", "uniform,calibrated,adaptive", "--steps", "4", "--no-progress",
            "--save", str(tmp_path / "params.json"), "--plot", str(tmp_path / "plot.png"), "--json", str(report)]
    assert main(argv) == 0, capsys.readouterr().err
    assert "bound: SSIM >= 0\n" in capsys.readouterr().out
    data = json.loads(report.read_text())
    assert data["meta"]["embedded"] is False and data["meta"]["batch_size"] == 1
    assert data["meta"]["calibration_prompts"] == ["a green triangle"]
    assert len(data["rows"]) == 1 + 3 * 2 and data["chosen"] is not None
    assert CacheParams.from_json((tmp_path / "params.json").read_text()).cache_branch_id in (0, 1)
