"""The tiny Flux DiT demo model: a smoke run of its training, and the shipped folder loads, runs and caches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from DeepCache.tools.demo_model import ASSETS
from DeepCache.tools.demo_model import DIT_CALL_KWARGS as CALL_KWARGS
from DeepCache.tools.demo_model.train_dit import (DIT_DIR, SMOKE, SUMMARY, _batches, held_out_prompts,
                                                  train_dit)

SHIPPED = ASSETS / DIT_DIR
PROMPT = "a large red circle on a blue background, top left"


def _generate(pipe: object, steps: int = 4, **kwargs: object) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return pipe([PROMPT, "a small white square on a black background, bottom right"],  # type: ignore[operator]
                num_inference_steps=steps, generator=generator, output_type="np", **CALL_KWARGS, **kwargs).images


def test_training_batches_never_contain_held_out_prompts() -> None:
    held_out = held_out_prompts(64)
    assert len(held_out) == 64
    batches = _batches(32, stream_seed=6, skip=held_out)
    for _ in range(20):
        images, captions = next(batches)
        assert images.shape == (32, 3, 32, 32) and len(captions) == 32
        assert not held_out & set(captions)


def test_smoke_training_writes_a_flux_pipeline_that_loads_and_runs(tmp_path: Path) -> None:
    from diffusers import FluxPipeline

    summary = train_dit(SMOKE, tmp_path)
    folder = tmp_path / DIT_DIR
    assert summary["dit_steps_done"] == SMOKE.steps
    assert json.loads((folder / SUMMARY).read_text())["config"]["steps"] == SMOKE.steps
    pipe = FluxPipeline.from_pretrained(folder, local_files_only=True)
    assert pipe.vae.config.shift_factor == pytest.approx(summary["vae_shift_factor"])
    assert pipe.vae_scale_factor * 2 * pipe.transformer.config.in_channels // 4 > 0
    images = _generate(pipe, steps=2, negative_prompt="", true_cfg_scale=3.0)
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()


@pytest.mark.skipif(not (SHIPPED / "model_index.json").is_file(), reason="the trained DiT is not shipped here")
def test_shipped_dit_loads_offline_follows_a_prompt_and_deepcache_interval_1_is_exact() -> None:
    from diffusers import FluxPipeline

    from DeepCache import DeepCacheHelper
    from DeepCache.tools.demo_model.classifier import load_classifier
    from DeepCache.tools.demo_model import EMBEDDED_CLASSIFIER
    from DeepCache.tools.scoring import classify, prompt_labels

    pipe = FluxPipeline.from_pretrained(SHIPPED, local_files_only=True)
    plain = _generate(pipe, steps=8)
    predicted, _ = classify(load_classifier(EMBEDDED_CLASSIFIER), plain)
    wanted = prompt_labels([PROMPT, "a small white square on a black background, bottom right"])
    assert (predicted == wanted).mean() >= 0.6, (predicted, wanted)  # 5 attributes x 2 images; chance ~0.3
    helper = DeepCacheHelper(pipe=pipe)
    helper.set_params(cache_interval=1, cache_branch_id=0)
    with helper:
        assert np.array_equal(_generate(pipe, steps=8), plain)
    helper.set_params(cache_interval=3, cache_branch_id=0)
    with helper:
        cached = _generate(pipe, steps=8)
    assert not np.array_equal(cached, plain) and np.abs(cached - plain).mean() < 0.1
    assert np.array_equal(_generate(pipe, steps=8), plain)  # disabled: the pipeline is back


@pytest.mark.skipif(not (SHIPPED / "model_index.json").is_file(), reason="the trained DiT is not shipped here")
def test_demo_on_the_embedded_dit_scores_its_captions_with_true_cfg(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """``deepcache demo --model embedded-dit``: the shipped DiT at its own size, true CFG with an empty negative
    prompt (also while the helper is enabled), captions scored by the shipped classifier."""
    from diffusers import FluxPipeline

    from DeepCache import DeepCacheHelper
    from DeepCache.tools.cli import main
    from DeepCache.tools.kinds import load_kind
    from DeepCache.tools.prompts import choose_prompts

    out, report = tmp_path / "demo.png", tmp_path / "demo.json"
    argv = ["demo", "--model", "embedded-dit", "--out", str(out), "--num-prompts", "2", "--steps", "6",
            "--variant", "2,1", "--repeats", "1", "--json", str(report)]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (f"DeepCache demo: embedded demo DiT (offline); 6 FlowMatchEulerDiscreteScheduler steps, 2 "
                        f"prompts, true CFG 4.0, {torch.get_num_threads()} CPU thread(s), cpu float32; prompt "
                        "embeddings: from the pipeline's text encoder")
    prompts = choose_prompts(embedded=True, count=2)  # the demo U-Net's captions
    assert lines[1:3] == [f"  [0] seed 0: {prompts[0]}", f"  [1] seed 1: {prompts[1]}"]
    assert lines[3] == "| setting | seconds | speedup | PSNR dB | SSIM | task acc | all-attr acc |"
    rows = json.loads(report.read_text())["rows"]
    assert [r["setting"] for r in rows] == ["original", "I=2, B=1"]

    # the kind calls the pipeline exactly as a user of the shipped DiT would, enabled or not
    pipe = FluxPipeline.from_pretrained(SHIPPED, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)

    def by_hand() -> np.ndarray:
        generators = [torch.Generator().manual_seed(k) for k in range(2)]
        return pipe(prompts, num_inference_steps=6, generator=generators, output_type="np", negative_prompt=["", ""],
                    true_cfg_scale=4.0, **CALL_KWARGS).images

    kind = load_kind("embedded-dit")
    assert (kind.embedded, kind.true_cfg, kind.default_batch_size) == (True, True, 16)
    assert np.array_equal(kind.call(prompts, [0, 1], steps=6, guidance=4.0), by_hand())
    helper = DeepCacheHelper(pipe=kind.pipe)
    helper.set_params(cache_interval=2, cache_branch_id=1)
    with helper:
        cached_by_kind = kind.call(prompts, [0, 1], steps=6, guidance=4.0)
    with DeepCacheHelper(pipe=pipe) as by_hand_helper:
        by_hand_helper.set_params(cache_interval=2, cache_branch_id=1)
        cached_by_hand = by_hand()
    assert np.array_equal(cached_by_kind, cached_by_hand)
