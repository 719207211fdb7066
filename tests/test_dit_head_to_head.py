"""tools/dit_head_to_head.py's core on a tiny random Flux DiT (the demo's VAE and CLIP): the MACs it counts are
exactly what ran, ours and a diffusers hook run through it, cache-dit is optional."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))

from dit_h2h_core import MacCounter, count_table, generate  # noqa: E402
from dit_h2h_methods import (Context, cache_dit_method, first_block_cache, ours_forecast, ours_uniform,  # noqa: E402
                             parse_mag_ratios, uncached)
from dit_head_to_head import DEMO_FLUX, evaluate_mode, load_pipe  # noqa: E402

PROMPT = "a large red circle on a blue background, top left"
pytestmark = pytest.mark.skipif(not (DEMO_FLUX / "model_index.json").is_file(), reason="demo-flux is not shipped")


@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The demo FluxPipeline folder with a tiny random transformer (1 dual + 2 single blocks), saved and reloaded."""
    from diffusers import FluxTransformer2DModel

    pipe = load_pipe(DEMO_FLUX)
    torch.manual_seed(0)
    pipe.transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=64, pooled_projection_dim=64, guidance_embeds=False, axes_dims_rope=(4, 2, 2)).eval()
    folder = tmp_path_factory.mktemp("tiny-flux")
    pipe.save_pretrained(folder)
    return load_pipe(folder)


@pytest.mark.parametrize("cfg,branches", [(4.0, 2), (1.0, 1)])
def test_uncached_macs_are_steps_x_branches_x_one_call(tiny_pipe, cfg: float, branches: int) -> None:
    table = count_table(tiny_pipe)
    assert len(table.blocks) == 3 and all(b > 0 for b in table.blocks)
    assert set(table.attention_self) == {"transformer_blocks.0.attn", "single_transformer_blocks.0.attn",
                                         "single_transformer_blocks.1.attn"}
    with MacCounter(tiny_pipe.transformer, table) as counter:
        _, macs, _ = generate(tiny_pipe, PROMPT, 0, steps=3, cfg=cfg, counter=counter)
        assert counter.take() == (0, 0)
    assert macs == 3 * branches * table.per_call


@pytest.mark.parametrize("cfg,branches", [(4.0, 2), (1.0, 1)])
def test_uniform_interval_2_branch_0_macs_are_the_hand_count(tiny_pipe, cfg: float, branches: int) -> None:
    table = count_table(tiny_pipe)
    method = ours_uniform(2, 0)
    helper = method.enable(tiny_pipe, Context(4, cfg, []))
    try:
        with MacCounter(tiny_pipe.transformer, table) as counter:
            _, macs, _ = generate(tiny_pipe, PROMPT, 0, steps=4, cfg=cfg, counter=counter)
    finally:
        method.disable(tiny_pipe, helper)
    # steps 0 and 2 full, 1 and 3 run all but the 3 blocks (branch 0 keeps none), per CFG branch
    retrieval = table.per_call - sum(table.blocks)
    assert macs == branches * (2 * table.per_call + 2 * retrieval)


@pytest.mark.parametrize("warmup,end,full", [(0, None, 3), (3, None, 4), (0, 3, 4)])
def test_uniform_forecast_counts_warmup_and_forecasts(tiny_pipe, warmup: int, end: int | None, full: int) -> None:
    """I=2 over 5 steps: full 0, 2, 4 (W=0), 0, 1, 2, 4 (W=3: steps before 3 full, then every 2nd of the
    schedule) or 0, 2, 3, 4 (E=3: full from step 3 on); retrieval steps hand out the line through the last two full
    steps, so the image is not reuse's."""
    table = count_table(tiny_pipe)
    images = {}
    for method in (ours_forecast(2, 0, warmup, end), ours_uniform(2, 0)):
        helper = method.enable(tiny_pipe, Context(5, 1.0, []))
        try:
            with MacCounter(tiny_pipe.transformer, table) as counter:
                images[method.family], macs, _ = generate(tiny_pipe, PROMPT, 0, steps=5, cfg=1.0, counter=counter)
            if method.family == "ours: uniform forecast":
                assert helper.params.forecast == "linear" and helper.params.start_step == warmup
                assert helper.params.end_step == end
                retrieval = table.per_call - sum(table.blocks)
                assert macs == full * table.per_call + (5 - full) * retrieval
        finally:
            method.disable(tiny_pipe, helper)
    assert ours_forecast(3, 0, 3).label == "I=3 B=0 W=3" and ours_forecast(3, 0).label == "I=3 B=0"
    assert ours_forecast(2, 0, end_step=27).label == "I=2 B=0 E=27"
    assert not np.array_equal(images["ours: uniform forecast"], images["ours: uniform"])


def test_image_metrics_say_how_many_images_were_left_untouched() -> None:
    """Three identical images of four (100 dB each in the mean) and one with MSE 1e-4 (40 dB): the mean of per-image
    PSNR says 85 dB; the PSNR of the mean MSE (2.5e-5) says 46.02 dB."""
    from dit_h2h_core import image_metrics

    reference = np.full((4, 8, 8, 3), 0.5)
    images = reference.copy()
    images[3] += 0.01
    row = image_metrics(images, reference, ["a"] * 4, None)
    assert row["untouched"] == 3 and row["psnr"] == pytest.approx(85.0) and row["psnr_min"] == pytest.approx(40.0)
    assert row["psnr_of_mean_mse"] == pytest.approx(10 * np.log10(1 / 2.5e-5))
    same = image_metrics(reference, reference, ["a"] * 4, None)
    assert same["untouched"] == 4 and same["psnr"] == same["psnr_of_mean_mse"] == 100.0


def test_core_runs_ours_and_a_diffusers_hook_and_resets_state(tiny_pipe) -> None:
    methods = [uncached(), ours_uniform(2, 0), first_block_cache(0.05), uncached(2)]
    items = [(PROMPT, 0), ("a small white square on a black background, bottom right", 1)]
    out = evaluate_mode(tiny_pipe, methods, Context(4, 4.0, []), items, None, log=lambda line: None)
    rows = {r["family"]: r for r in out["rows"]}
    assert [r["status"] for r in out["rows"]] == ["ok", "ok", rows["diffusers: FirstBlockCache"]["status"], "ok"]
    assert rows["uncached"]["macs"] == [out["uncached_macs"]] * 2 and rows["uncached"]["psnr"] == 100.0
    assert out["uncached_macs"] == 4 * 2 * out["per_call_macs"]
    retrieval = out["per_call_macs"] - sum(out["block_macs"])
    assert rows["ours: uniform"]["macs"] == [2 * (2 * out["per_call_macs"] + 2 * retrieval)] * 2
    assert rows["fewer steps"]["mac_fraction"] == 0.5
    fbc = rows["diffusers: FirstBlockCache"]
    assert fbc["status"] in ("ok", "no skipping") and out["per_call_macs"] * 8 >= max(fbc["macs"])
    assert out["uncached_again_identical"]


def test_cache_dit_rows_say_not_installed_without_it(tiny_pipe, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cache_dit", None)
    out = evaluate_mode(tiny_pipe, [uncached(), cache_dit_method(1, 0.2, 1)], Context(3, 1.0, []), [(PROMPT, 0)],
                        None, log=lambda line: None)
    assert out["rows"][1]["status"] == "not installed" and "cache_dit" in out["rows"][1]["error"]


def test_cache_dit_dbcache_runs_with_separate_cfg_and_counts(tiny_pipe) -> None:
    pytest.importorskip("cache_dit")
    out = evaluate_mode(tiny_pipe, [uncached(), cache_dit_method(1, 10.0, 1)], Context(4, 4.0, []), [(PROMPT, 0)],
                        None, log=lambda line: None)
    row = out["rows"][1]
    assert row["status"] == "ok", row
    # warm-up step 0 full; steps 1-3 run only the first block (plus everything outside the stack), both branches
    first_only = out["per_call_macs"] - sum(out["block_macs"][1:])
    assert row["macs"] == [2 * (out["per_call_macs"] + 3 * first_only)]


def test_parse_mag_ratios_reads_every_printed_list() -> None:
    printed = "\n[MagCache] Calibration Complete. Copy:\n[1.0, 0.5]\n\nnoise [x]\n[1.0, 0.25]\n"
    assert parse_mag_ratios(printed) == [[1.0, 0.5], [1.0, 0.25]]


def test_merge_keeps_one_row_per_setting_and_an_ok_rerun_replaces_a_failure() -> None:
    from dit_head_to_head import merge

    def row(label: str, status: str, **extra: object) -> dict:
        return {"family": "f", "label": label, "status": status, **extra}
    first = {"modes": [{"cfg": 1.0, "rows": [row("uncached", "ok"), row("a", "failed", error="boom")],
                        "timing_eager": {"x": {"ratio": 1.0}}}]}
    second = {"modes": [{"cfg": 1.0, "rows": [row("uncached", "ok"), row("a", "ok"), row("b", "ok")]},
                        {"cfg": 4.0, "rows": [row("uncached", "ok")]}]}
    merged = merge([first, second])
    assert [m["cfg"] for m in merged["modes"]] == [4.0, 1.0]
    rows = merged["modes"][1]["rows"]
    assert [(r["label"], r["status"]) for r in rows] == [("uncached", "ok"), ("a", "ok"), ("b", "ok")]
    assert rows[1]["replaces"] == "boom" and merged["modes"][1]["timing_runs"] == [{"timing_eager": {"x": {"ratio": 1.0}}}]
    again = merge([merged, {"modes": [{"cfg": 1.0, "rows": [row("c", "ok"), row("a", "ok", psnr=50.0),
                                                            row("b", "no skipping")]}]}])  # reruns merged in
    assert [r["label"] for r in again["modes"][1]["rows"]] == ["uncached", "a", "b", "c"]
    assert again["modes"][1]["rows"][1] == row("a", "ok", psnr=50.0)  # an ok rerun replaces its row in place
    assert again["modes"][1]["rows"][2] == row("b", "ok")  # a rerun that did not run ok does not
    assert again["modes"][1]["timing_runs"] == merged["modes"][1]["timing_runs"]


def test_equal_mac_gaps_compare_each_peer_with_ours_at_no_more_macs() -> None:
    from dit_h2h_report import equal_mac_gaps, equal_mac_table

    def row(family: str, macs: float, psnr: float, status: str = "ok") -> dict:
        return {"family": family, "label": f"{macs}", "status": status, "mac_fraction": macs, "psnr": psnr}
    rows = [row("uncached", 1.0, 100.0), row("ours: uniform", 0.5, 40.0), row("ours: adaptive", 0.3, 35.0),
            row("ours: calibrated", 0.2, 50.0, "failed"), row("diffusers: TaylorSeer", 0.5, 39.0),
            row("cache-dit: DBCache F1B0", 0.35, 36.0), row("fewer steps", 0.25, 45.0),
            row("diffusers: MagCache", 0.25, 30.0)]
    gaps = [(p["family"], o and o["family"], gap) for p, o, gap in equal_mac_gaps({"rows": rows})]
    assert gaps == [("diffusers: TaylorSeer", "ours: uniform", 1.0), ("cache-dit: DBCache F1B0", "ours: adaptive", -1.0),
                    ("diffusers: MagCache", None, None)]
    table = equal_mac_table({"rows": rows}).splitlines()
    assert table[2].startswith("| cache-dit: DBCache F1B0") and table[2].endswith("| -1.00 |")
    assert table[-1].startswith("| diffusers: MagCache") and "none" in table[-1]
