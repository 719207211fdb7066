"""Quality of DeepCache on the embedded demo model, and `deepcache demo` / `deepcache eval` end to end.

The bounds were measured on the shipped weights (see docs/demo.md, "Measured quality"); they leave a
margin below the measured values so that BLAS differences between machines do not flip them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from DeepCache.tools.demo_model import EMBEDDED_MODEL
from DeepCache.tools.pipelines import load_pipeline
from DeepCache.tools.prompts import PromptItem, choose_prompts, embedded_prompts
from DeepCache.tools.quality import evaluate
from DeepCache.tools.runs import RunSpec
from DeepCache.tools.settings import Setting, setting_grid

needs_model = pytest.mark.skipif(
    not (EMBEDDED_MODEL / "model_index.json").is_file(), reason="embedded demo model not built"
)

STEPS = 20


def seeded(prompts: list[str], seeds: list[int] | None = None) -> list[PromptItem]:
    return [PromptItem(p, s) for p, s in zip(prompts, seeds if seeds is not None else range(len(prompts)))]
NUM_PROMPTS = 32
# Chance level of the mean per-attribute accuracy: mean of 1/3, 1/6, 1/5, 1/4, 1/2.
CHANCE = (1 / 3 + 1 / 6 + 1 / 5 + 1 / 4 + 1 / 2) / 5
# Measured bounds (docs/demo.md); see the module docstring.
# Measured with this configuration (32 prompts, 20 DDIM steps, guidance 4): baseline task accuracy 0.806;
# shape 0.81, colour 1.0, background 1.0, position 0.22, size 1.0; I=3/B=0: PSNR 35.9 dB, task accuracy 0.819.
MIN_BASELINE_TASK_ACCURACY = 0.75
# Per attribute (chance: shape 0.33, colour 0.17, background 0.2, size 0.5).
MIN_BASELINE_ATTRIBUTE_ACCURACY = {"shape": 0.7, "colour": 0.95, "background": 0.95, "size": 0.95}
MIN_I3_B0_PSNR = 33.0
MAX_I3_B0_ACCURACY_DROP = 0.05
# Branches 0 and 1 differ by one resnet+attention layer per side and are nearly equal here (measured
# margins 0.05-0.7 dB; with 64 prompts at 25 steps, I=4 gave B=1 0.01 dB *below* B=0), so B=1 >= B=0 is
# checked within this tolerance; every other step is strict.
BRANCH_01_TOLERANCE_DB = 0.25


@pytest.fixture(scope="module")
def grid() -> dict[str, dict[str, Any]]:
    pipe = load_pipeline()
    prompts = embedded_prompts(NUM_PROMPTS, seed=0)
    result, _ = evaluate(pipe, setting_grid(), seeded(prompts), RunSpec(STEPS, 4.0, 1, 32))
    return {row["setting"]: row for row in result.rows}


@needs_model
def test_uncached_pipeline_follows_prompts(grid: dict[str, dict[str, Any]]) -> None:
    baseline = grid["original"]
    assert baseline["psnr"] == float("inf") and baseline["ssim"] == pytest.approx(1.0)
    assert baseline["task_accuracy"] >= MIN_BASELINE_TASK_ACCURACY > 2 * CHANCE
    accuracy = baseline["attribute_accuracy"]
    for name, bound in MIN_BASELINE_ATTRIBUTE_ACCURACY.items():
        assert accuracy[name] >= bound, (name, accuracy)
    # Position is not learnt by the shipped weights (docs/demo.md, "Known limits"); it stays near chance.
    assert accuracy["position"] <= 0.5


@needs_model
@pytest.mark.parametrize("branch", [0, 1, 2])
def test_fidelity_decreases_as_interval_grows(grid: dict[str, dict[str, Any]], branch: int) -> None:
    psnrs = [grid[Setting(i, branch).label]["psnr"] for i in (2, 3, 4, 5)]
    ssims = [grid[Setting(i, branch).label]["ssim"] for i in (2, 3, 4, 5)]
    assert psnrs == sorted(psnrs, reverse=True), psnrs
    assert ssims == sorted(ssims, reverse=True), ssims


@needs_model
@pytest.mark.parametrize("interval", [2, 3, 4, 5])
def test_fidelity_decreases_as_branch_gets_shallower(grid: dict[str, dict[str, Any]], interval: int) -> None:
    b0, b1, b2 = (grid[Setting(interval, b).label]["psnr"] for b in (0, 1, 2))
    assert b2 > b1 >= b0 - BRANCH_01_TOLERANCE_DB, (b0, b1, b2)
    assert b2 > b0


@needs_model
def test_default_setting_stays_within_measured_bounds(grid: dict[str, dict[str, Any]]) -> None:
    row, baseline = grid["I=3, B=0"], grid["original"]
    assert MIN_I3_B0_PSNR <= row["psnr"] < float("inf")  # close, but caching must change something
    assert baseline["task_accuracy"] - row["task_accuracy"] <= MAX_I3_B0_ACCURACY_DROP


@needs_model
def test_disabling_restores_the_exact_baseline() -> None:
    from DeepCache import DeepCacheSDHelper

    pipe = load_pipeline()
    prompt = embedded_prompts(1)[0]

    def run() -> np.ndarray:
        out = pipe(prompt, generator=torch.Generator().manual_seed(0), num_inference_steps=10, output_type="np")
        return out.images

    before = run()
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, cache_branch_id=0)
    with helper:
        cached = run()
    after = run()
    assert not np.array_equal(before, cached)
    assert np.array_equal(before, after)


@needs_model
def test_demo_command_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    from DeepCache.tools.cli import main

    out, report = tmp_path / "demo.png", tmp_path / "demo.json"
    assert main(["demo", "--out", str(out), "--num-prompts", "2", "--steps", "6", "--json", str(report)]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    prompts = choose_prompts(embedded=True, count=2)
    assert lines[:3] == [
        "DeepCache demo: embedded demo model (offline); 6 DDIMScheduler steps, 2 prompts, guidance 4.0, "
        f"{torch.get_num_threads()} CPU thread(s), cpu float32",
        f"  [0] seed 0: {prompts[0]}",
        f"  [1] seed 1: {prompts[1]}",
    ]
    # Columns without a value in any row (LPIPS offline, Frechet for 2 images) are left out.
    assert lines[3:5] == ["| setting | seconds | speedup | PSNR dB | SSIM | task acc | all-attr acc |",
                          "|---|---:|---:|---:|---:|---:|---:|"]
    assert [line.split(" | ")[0] for line in lines[5:9]] == ["| original", "| I=3, B=0", "| I=5, B=0", "| I=3, B=1"]
    assert lines[9:] == [f"saved side-by-side images to {out}", f"wrote {report}"]
    # third-party warnings and loading bars are held back
    assert "Loading pipeline components" not in captured.err and "torchvision" not in captured.err
    data = json.loads(report.read_text())
    assert (data["schema_version"], data["tool"]) == (1, "deepcache eval")
    assert [r["setting"] for r in data["rows"]] == ["original", "I=3, B=0", "I=5, B=0", "I=3, B=1"]
    assert data["rows"][0]["psnr"] is None  # infinite PSNR is written as null (strict JSON)
    assert data["rows"][1]["params"]["cache_interval"] == 3 and data["env"]["torch"] == torch.__version__
    width, height = Image.open(out).size
    assert (width, height) == (150 + 2 * 100, 44 + 4 * 100)


@needs_model
def test_demo_prompts_are_the_first_eval_prompts() -> None:
    assert choose_prompts(embedded=True, count=6) == choose_prompts(embedded=True, count=64)[:6]
    assert choose_prompts(embedded=True, count=64, seed=3) == embedded_prompts(64, seed=3)


@needs_model
def test_eval_command_prints_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from DeepCache.tools.cli import main

    report = tmp_path / "eval.json"
    argv = ["eval", "--variant", "3,0", "--variant", "4,0,non-uniform", "--num-prompts", "4", "--steps", "6",
            "--table", "plain", "--json", str(report)]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["setting", "seconds", "speedup", "PSNR", "dB", "SSIM", "task", "acc", "all-attr", "acc"]
    assert [line[:22].rstrip() for line in lines[3:6]] == ["original", "I=3, B=0", "I=4, B=0, non-uniform"]
    assert lines[6].startswith("LPIPS: ") and lines[6].endswith("; CLIP score: n/a (no --clip-model given)")
    data = json.loads(report.read_text())
    assert [r["setting"] for r in data["rows"]] == ["original", "I=3, B=0", "I=4, B=0, non-uniform"]
    assert data["meta"]["embedded"] is True and data["meta"]["steps"] == 6
    assert data["rows"][2]["params"]["skip_mode"] == "non-uniform" and data["rows"][2]["params"]["center"] == 15
    assert data["rows"][1]["lpips"] is None or isinstance(data["rows"][1]["lpips"], float)


def test_eval_errors_are_clear(capsys: pytest.CaptureFixture[str]) -> None:
    from DeepCache.tools.cli import main

    with pytest.raises(SystemExit):
        main(["eval", "--variant", "three"])
    assert "argument --variant: malformed setting 'three'" in capsys.readouterr().err
    assert main(["eval", "--model", "/nonexistent/pipeline", "--num-prompts", "1"]) == 2
    assert capsys.readouterr().err.startswith("deepcache eval: error: ")


def test_eval_on_a_non_demo_pipeline_with_local_clip(tmp_path: Path) -> None:
    """A pipeline without the demo marker gets fidelity and CLIP score (from a local CLIP folder), no task metrics."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from DeepCache.tools.demo_model.train import SMOKE, build_components, save_pipeline

    components = build_components(SMOKE)
    save_pipeline(components, components.unet, components.text_encoder, tmp_path / "pipe")
    tokenizer = components.tokenizer
    clip = CLIPModel(
        CLIPConfig(
            text_config={
                "vocab_size": len(tokenizer),
                "hidden_size": 16,
                "intermediate_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "max_position_embeddings": 16,
                "eos_token_id": tokenizer.eos_token_id,
            },
            vision_config={
                "hidden_size": 16,
                "intermediate_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "image_size": 32,
                "patch_size": 8,
            },
            projection_dim=8,
        )
    )
    clip.save_pretrained(tmp_path / "clip")
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    processor.save_pretrained(tmp_path / "clip")

    pipe = load_pipeline(str(tmp_path / "pipe"))
    prompts = ["a red circle", "a blue square"]
    result, runs = evaluate(pipe, [Setting(3, 0)], seeded(prompts), RunSpec(4, 4.0, 1, 1),
                            clip_name=str(tmp_path / "clip"), keep_images=True)
    assert result.meta["embedded"] is False and result.meta["clip_score"] == "computed"
    rows = result.rows
    assert [r["setting"] for r in rows] == ["original", "I=3, B=0"]
    assert "task_accuracy" not in rows[0] and 0.0 <= rows[0]["clip_score"] <= 100.0
    assert runs[0].images.shape == (2, 32, 32, 3)
    missing = evaluate(pipe, [Setting(3, 0)], seeded(prompts[:1]), RunSpec(2, 4.0, 1, 1),
                       clip_name=str(tmp_path / "absent"))[0]
    assert missing.meta["clip_score"] == "n/a (weights not available locally)"


@needs_model
def test_eval_scores_one_batch_at_a_time_and_keeps_no_images(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each batch is generated and scored on its own; the scores equal scoring every image at once, and no images are
    kept (runs.run_and_score is the one streaming loop; its memory bound is tested in test_runs.py)."""
    from DeepCache import DeepCacheSDHelper
    from DeepCache.tools import metrics, runs

    pipe = load_pipeline()
    items = seeded(embedded_prompts(16, seed=3))  # 16: enough for a Fréchet distance
    calls: list[int] = []
    real = runs.generate_batch
    monkeypatch.setattr(runs, "generate_batch", lambda pipe, helper, setting, batch, spec: (
        calls.append(len(batch)), real(pipe, helper, setting, batch, spec))[1])
    result, scored = evaluate(pipe, [Setting(3, 0)], items, RunSpec(3, 4.0, 1, 4))
    assert calls == [1] + [4] * 8  # the warm-up, then 4 batches x (original, I=3)
    assert all(run.images is None for run in scored)
    assert result.rows[1]["frechet"] is not None and len(scored[1].patterns) == 4 and len(scored[1].seconds) == 1
    # the same PSNR as generating all 16 at once, batch by batch, and scoring them together
    helper = DeepCacheSDHelper(pipe=pipe)
    spec = RunSpec(3, 4.0, 1, 4)
    whole = {s: np.concatenate([real(pipe, helper, s, items[k:k + 4], spec)[0] for k in range(0, 16, 4)])
             for s in (Setting(), Setting(3, 0))}
    assert result.rows[1]["psnr"] == pytest.approx(float(np.mean(metrics.psnr(whole[Setting(3, 0)], whole[Setting()]))),
                                                   abs=1e-9)
