"""Tests of ``deepcache bench``: grid, configs, FLOP counting, JSON schema and the CLI (tiny models, CPU)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from DeepCache.tools import bench
from DeepCache.tools.bench import results as bench_report
from DeepCache.tools.bench import timing as bench_timing
from DeepCache.tools.bench import BenchConfig, BenchReport, ScenarioResult, preset_config
from DeepCache.tools.flops import (
    StepFlops,
    count_flops,
    count_unet_step_flops,
    ideal_speedup_pattern,
    ideal_speedup_uniform,
)
from DeepCache.tools.bench.models import load_config, tiny_config
from DeepCache.tools.flops import build_meta_unet, build_meta_vae
from DeepCache.tools.settings import Setting

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One CPU thread: far faster than two on a machine shared with other jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- scenarios and the grid ------------------------------------------------------------------------


def test_variant_is_the_shared_setting() -> None:
    """``bench.Variant`` is the former name of the shared type; ``--variant`` parses into it."""
    assert bench.Variant is Setting and bench.Variant(5, 1, "non-uniform").label == "I=5, B=1, non-uniform"
    from DeepCache.tools import cli

    args = cli.build_parser().parse_args(["bench", "--variant", "5,1,non-uniform", "--variant", "3,0,start_step=2"])
    cfg = bench.config_from_args(args)
    assert cfg.variants == (Setting(5, 1, "non-uniform"), Setting(3, 0, start_step=2))
    assert [s.label for s in cfg.scenarios()] == ["512x512 b1 original", "512x512 b1 I=5, B=1, non-uniform",
                                                  "512x512 b1 I=3, B=0, start_step=2"]


def test_a_variant_that_never_caches_is_the_original_and_runs_once() -> None:
    cfg = BenchConfig(variants=(Setting(1, 0), Setting(3, 0), Setting(3, 0)))
    assert [s.label for s in cfg.scenarios()] == ["512x512 b1 original", "512x512 b1 I=3, B=0"]


def test_docs_table_preset_grid_is_the_documented_table() -> None:
    cfg = preset_config("docs-table")
    assert (cfg.model, cfg.steps, cfg.scheduler) == ("sd21", 50, "ddim")
    assert cfg.shapes() == [(r, r, b) for r in (512, 768, 1024) for b in (8, 4, 1)]
    assert [v.label for v in cfg.variants] == ["I=3, B=0", "I=5, B=0", "I=5, B=1"]
    scenarios = cfg.scenarios()
    assert len(scenarios) == 9 * 4
    assert [s.label for s in scenarios[:5]] == [
        "512x512 b8 original", "512x512 b8 I=3, B=0", "512x512 b8 I=5, B=0", "512x512 b8 I=5, B=1",
        "512x512 b4 original",
    ]
    assert scenarios[-1] == bench.Scenario(1024, 1024, 1, Setting(5, 1))


def test_tiny_divides_resolutions_and_non_square() -> None:
    cfg = preset_config("docs-table", tiny=True)
    assert cfg.shapes_hw() == [(64, 64), (96, 96), (128, 128)]
    cfg = BenchConfig(resolutions=((768, 512), 256), batch_sizes=(2,), variants=())
    assert cfg.shapes() == [(768, 512, 2), (256, 256, 2)]
    assert [s.label for s in cfg.scenarios()] == ["768x512 b2 original", "256x256 b2 original"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"resolutions": (500,)}, "multiple of 8"),
        ({"resolutions": (512,), "tiny": True, "model": "sd15"}, None),
        ({"resolutions": (520,), "tiny": True, "model": "sd15"}, "multiple of 8"),
        ({"model": "/some/path", "tiny": True}, "--tiny needs a built-in model"),
        ({"batch_sizes": (0,)}, "batch sizes must be >= 1"),
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"scheduler": "lms"}, "unknown scheduler"),
        ({"dtype": "int8"}, "unknown dtype"),
    ],
)
def test_config_validation(kwargs: dict, message: str | None) -> None:
    if message is None:
        BenchConfig(**kwargs)
    else:
        with pytest.raises(ValueError, match=message):
            BenchConfig(**kwargs)


def test_unknown_preset_and_model() -> None:
    with pytest.raises(ValueError, match="unknown preset 'paper'"):
        preset_config("paper")
    with pytest.raises(ValueError, match="unknown built-in model 'sd3'"):
        load_config("sd3")


# -- shipped configs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name, unet_m, vae_m", [("sd15", 859.52, 83.65), ("sd21", 865.91, 83.65), ("sdxl", 2567.46, 83.65)])
def test_full_size_param_counts_on_meta(name: str, unet_m: float, vae_m: float) -> None:
    cfg = load_config(name)
    unet = build_meta_unet(cfg["unet"])
    vae = build_meta_vae(cfg["vae"])
    assert round(sum(p.numel() for p in unet.parameters()) / 1e6, 2) == unet_m
    assert round(sum(p.numel() for p in vae.parameters()) / 1e6, 2) == vae_m
    assert next(unet.parameters()).device.type == "meta"


@pytest.mark.parametrize("name", ["sd15", "sd21", "sdxl"])
def test_tiny_config_keeps_structure(name: str) -> None:
    full = load_config(name)
    before = json.dumps(full, sort_keys=True)
    tiny = tiny_config(full)
    assert json.dumps(full, sort_keys=True) == before  # input not mutated
    for key in ("down_block_types", "up_block_types", "mid_block_type"):
        assert tiny["unet"][key] == full["unet"][key]
    assert tiny["unet"]["layers_per_block"] == 2
    assert len(tiny["unet"]["block_out_channels"]) == len(full["unet"]["block_out_channels"])
    assert len(tiny["vae"]["block_out_channels"]) == 4  # latents stay 8x smaller than images
    assert "text_encoder" not in tiny
    unet = build_meta_unet(tiny["unet"])
    assert sum(p.numel() for p in unet.parameters()) < 5e6


# -- FLOP counting -------------------------------------------------------------------------------------


class _Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.lin = torch.nn.Linear(8, 16)

    def forward(self, img: torch.Tensor, tokens: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> tuple:
        a = self.conv(img)  # (2, 4, 8, 8) outputs, 3*3*3 MACs each
        b = self.lin(tokens).relu()  # (10, 8) @ (8, 16); relu is not counted
        c = F.scaled_dot_product_attention(q, kv, kv)  # QK^T and PV
        return a, b, c


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_count_flops_toy_model_exact(device: str) -> None:
    toy = _Toy().to(device)
    img = torch.zeros(2, 3, 8, 8, device=device)
    tokens = torch.zeros(10, 8, device=device)
    q = torch.zeros(2, 4, 16, 8, device=device)
    kv = torch.zeros(2, 4, 32, 8, device=device)
    conv = 2 * (2 * 4 * 8 * 8) * (3 * 3 * 3)
    lin = 2 * 10 * 8 * 16
    sdpa = 2 * (2 * 4 * 16 * 32 * 8) * 2
    assert (conv, lin, sdpa) == (27_648, 2_560, 131_072)
    assert count_flops(lambda: toy(img, tokens, q, kv)) == conv + lin + sdpa


def test_cpu_sdpa_is_counted() -> None:
    # torch does not count aten._scaled_dot_product_flash_attention_for_cpu by itself
    from torch.utils.flop_counter import FlopCounterMode

    q = torch.zeros(1, 2, 4, 8)
    with FlopCounterMode(display=False) as plain:
        F.scaled_dot_product_attention(q, q, q)
    assert count_flops(lambda: F.scaled_dot_product_attention(q, q, q)) == 2 * (2 * 4 * 4 * 8) * 2
    assert plain.get_total_flops() in (0, 2 * (2 * 4 * 4 * 8) * 2)


def test_ideal_speedup_formulas() -> None:
    assert ideal_speedup_uniform(1, 0.0) == 1.0
    assert ideal_speedup_uniform(1, 0.7) == 1.0
    assert ideal_speedup_uniform(3, 0.0) == 3.0
    assert ideal_speedup_uniform(5, 0.25) == pytest.approx(5 / 2)
    assert ideal_speedup_pattern((True,) * 50, 100, 10) == 1.0
    assert ideal_speedup_pattern((True, False, False), 100, 10) == pytest.approx(300 / 120)
    assert ideal_speedup_pattern((True, False, False), 100, 10, fixed_flops=30) == pytest.approx(330 / 150)
    # many steps of a uniform pattern tend to N / (1 + (N-1) f)
    pattern = tuple(k % 4 == 0 for k in range(4000))
    assert ideal_speedup_pattern(pattern, 1.0, 0.2) == pytest.approx(ideal_speedup_uniform(4, 0.2))
    with pytest.raises(ValueError):
        ideal_speedup_uniform(0, 0.1)
    with pytest.raises(ValueError):
        ideal_speedup_pattern((), 1.0, 0.1)


@pytest.fixture(scope="module")
def tiny_sd15_unet() -> torch.nn.Module:
    import diffusers

    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel.from_config(tiny_config(load_config("sd15"))["unet"]).eval()


@pytest.mark.parametrize("branch", [0, 1, 5])
def test_unet_step_flops_retrieval_fewer_and_meta_equals_cpu(tiny_sd15_unet: torch.nn.Module, branch: int) -> None:
    cpu = count_unet_step_flops(tiny_sd15_unet, batch=2, latent_height=8, latent_width=8, cache_branch_id=branch)
    meta = count_unet_step_flops(build_meta_unet(tiny_sd15_unet.config), batch=2, latent_height=8, latent_width=8,
                                 cache_branch_id=branch)
    assert cpu == meta  # CPU SDPA formula == meta's decomposed bmm count
    assert 0 < cpu.retrieval < cpu.full
    assert ideal_speedup_uniform(1, cpu.ratio) == 1.0


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_flops_are_linear_in_batch(name: str) -> None:
    """The benchmark counts at batch 1 and scales: check that this is exact."""
    cfg = tiny_config(load_config(name))
    unet, vae = build_meta_unet(cfg["unet"]), build_meta_vae(cfg["vae"])
    one = count_unet_step_flops(unet, batch=1, latent_height=16, latent_width=8, cache_branch_id=1)
    three = count_unet_step_flops(unet, batch=3, latent_height=16, latent_width=8, cache_branch_id=1)
    assert three == StepFlops(full=3 * one.full, retrieval=3 * one.retrieval)
    from DeepCache.tools.flops import count_vae_decode_flops

    assert count_vae_decode_flops(vae, batch=3, latent_height=16, latent_width=8) == 3 * count_vae_decode_flops(
        vae, batch=1, latent_height=16, latent_width=8)


def test_unet_step_flops_grow_with_branch_full_size_sd21() -> None:
    unet = build_meta_unet(load_config("sd21")["unet"])
    counts = [count_unet_step_flops(unet, batch=2, latent_height=64, latent_width=64, cache_branch_id=b) for b in (0, 1)]
    assert counts[0].full == counts[1].full == 1_608_514_928_640
    assert counts[0].retrieval < counts[1].retrieval < counts[0].full
    assert counts[0].ratio == pytest.approx(0.0787, abs=1e-4)


# -- a real (tiny) run ------------------------------------------------------------------------------

# The JSON schema (version 1), written out: a field added or removed must show up here.
RESULT_KEYS = {
    "model", "height", "width", "batch_size", "variant", "cache_interval", "cache_branch_id", "skip_mode", "steps",
    "seconds", "seconds_all", "speedup", "peak_memory_bytes", "memory_overhead", "unet_calls", "full_steps",
    "retrieval_steps", "pattern", "step_ms_full", "step_ms_retrieval", "flops_full_step", "flops_retrieval_step",
    "flop_ratio", "flops_vae_decode", "ideal_speedup", "ideal_speedup_unet", "ideal_speedup_uniform",
    "achieved_fraction", "compile_mode", "warmup_seconds", "graphs_compiled", "recompiles_timed", "speedup_vs_compiled",
    "achieved_fraction_compiled",
}
SETTINGS_KEYS = {
    "model", "resolutions", "batch_sizes", "variants", "steps", "scheduler", "dtype", "device", "guidance_scale",
    "repeats", "warmup_steps", "tiny", "seed", "threads", "count_flops", "preset", "model_name", "model_source", "weights",
    "timed", "text_encoding", "output_type", "shapes_run", "tiny_resolution_divisor", "flops_only", "compile", "compile_mode",
    "denoiser",
}
ENV_KEYS = {"python", "platform", "torch", "diffusers", "transformers", "deepcache", "device", "gpu_name", "cuda",
            "cpu_threads", "dtype", "attention_backend", "sdpa_kernels_enabled", "cudnn_benchmark", "date_utc"}


@pytest.fixture(scope="module")
def tiny_report() -> BenchReport:
    cfg = BenchConfig(model="sd15", resolutions=(512,), batch_sizes=(1,), variants=(Setting(3, 0), Setting(2, 1)),
                      steps=4, scheduler="ddim", device="cpu", repeats=2, warmup_steps=1, tiny=True, threads=1)
    seen: list[str] = []
    report = bench.run_benchmark(cfg, progress=False, on_result=lambda r: seen.append(r.variant))
    assert seen == ["original", "I=3, B=0", "I=2, B=1"]
    return report


def test_run_tiny_results(tiny_report: BenchReport) -> None:
    rows = tiny_report.results
    assert [(r.height, r.batch_size, r.variant) for r in rows] == [(64, 1, "original"), (64, 1, "I=3, B=0"), (64, 1, "I=2, B=1")]
    base, i3, i2 = rows
    assert [r.pattern for r in rows] == ["FFFF", "FrrF", "FrFr"]
    assert (i3.full_steps, i3.retrieval_steps, i3.unet_calls) == (2, 2, 4)
    assert base.speedup == 1.0 and base.ideal_speedup == 1.0 and base.achieved_fraction == 1.0
    for r in rows:
        assert len(r.seconds_all) == 2 and r.seconds == pytest.approx(sorted(r.seconds_all)[0] / 2 + sorted(r.seconds_all)[1] / 2)
        assert r.peak_memory_bytes is None and r.memory_overhead is None  # CPU: n/a
        # per-step times come from inside the timed call: the full steps alone fit in the slowest call
        assert r.step_ms_full is not None and 0 < r.step_ms_full * r.full_steps <= 1000 * max(r.seconds_all)
        assert r.flops_full_step == base.flops_full_step
    assert i3.speedup == pytest.approx(base.seconds / i3.seconds)
    assert i3.step_ms_retrieval is not None and base.step_ms_retrieval is None
    assert i3.flops_retrieval_step < i2.flops_retrieval_step < i3.flops_full_step
    assert i3.ideal_speedup == pytest.approx(ideal_speedup_pattern((True, False, False, True), i3.flops_full_step,
                                                                   i3.flops_retrieval_step, i3.flops_vae_decode))
    assert i3.ideal_speedup_uniform == pytest.approx(ideal_speedup_uniform(3, i3.flop_ratio))
    assert i3.achieved_fraction == pytest.approx(i3.speedup / i3.ideal_speedup)


def test_json_schema(tiny_report: BenchReport) -> None:
    from DeepCache.tools.report import to_jsonable

    data = json.loads(json.dumps(to_jsonable(tiny_report.to_json()), allow_nan=False))
    assert set(data) == {"schema_version", "tool", "settings", "env", "results"}
    assert data["schema_version"] == 1
    assert set(data["settings"]) == SETTINGS_KEYS
    assert set(data["env"]) == ENV_KEYS
    assert all(set(r) == RESULT_KEYS for r in data["results"])
    s = data["settings"]
    assert (s["weights"], s["text_encoding"], s["model_name"], s["dtype"]) == ("random", "excluded", "sd15-tiny", "float32")
    assert "VAE decode" in s["timed"] and s["shapes_run"] == [[64, 64, 1]]
    assert s["denoiser"] == "unet" and s["timed"].startswith("pipeline call end to end: U-Net denoising loop")
    assert s["variants"][0] == {"cache_interval": 3, "cache_branch_id": 0, "skip_mode": "uniform", "center": 15,
                                "pow": 1.4, "full_steps": None, "start_step": 0, "end_step": None, "threshold": None,
                                "forecast": None, "forecast_weight": 1.0, "forecast_weights": None,
                                "front_blocks": None, "back_blocks": None, "label": "I=3, B=0"}
    assert data["env"]["attention_backend"] == "torch SDPA (AttnProcessor2_0)"


def test_flops_only_counts_equal_the_timed_run(tiny_report: BenchReport) -> None:
    """``--flops-only`` and a timed run derive the FLOP columns the same way (one place assembles results)."""
    keys = ("variant", "pattern", "flops_full_step", "flops_retrieval_step", "flop_ratio", "flops_vae_decode",
            "ideal_speedup", "ideal_speedup_unet", "ideal_speedup_uniform")
    s = tiny_report.settings
    cfg = BenchConfig(model="sd15", resolutions=(512,), batch_sizes=(1,), variants=tuple(Setting.of(v["label"])
                      for v in s["variants"]), steps=s["steps"], scheduler="ddim", tiny=True)
    counted = bench.flops_report(cfg).results
    assert [[getattr(r, k) for k in keys] for r in counted] == [[getattr(r, k) for k in keys] for r in tiny_report.results]
    assert all(math.isnan(r.seconds) and r.achieved_fraction is None for r in counted)


def _result(h: int, b: int, variant: str, seconds: float, speedup: float) -> ScenarioResult:
    none = {f.name: None for f in dataclasses.fields(ScenarioResult)}
    return ScenarioResult(**{**none, "model": "m", "height": h, "width": h, "batch_size": b, "variant": variant,
                             "steps": 50, "seconds": seconds, "seconds_all": [seconds], "speedup": speedup,
                             "unet_calls": 50, "full_steps": 50, "retrieval_steps": 0, "pattern": "F" * 50})


def test_markdown_table_layout_exact() -> None:
    report = BenchReport(settings={}, env={}, results=[
        _result(512, 8, "original", 2.653, 1.0), _result(512, 8, "I=3, B=0", 1.149, 2.309),
        _result(1024, 1, "original", 11.69, 1.0), _result(1024, 1, "I=3, B=0", 5.27, 2.218),
    ])
    assert bench.markdown_table(report) == (
        "| Resolution | Batch size | Original | DeepCache (I=3, B=0) |\n"
        "|---|---|---|---|\n"
        "| 512 | 8 | 2.653 | 1.149 (2.31×) |\n"
        "| 1024 | 1 | 11.69 | 5.270 (2.22×) |"
    )


def test_memory_overhead_column() -> None:
    assert bench_report._overhead(None, None) is None and bench_report._overhead(5, None) is None
    assert bench_report._overhead(102 * 2**20, 100 * 2**20) == pytest.approx(0.02)
    base = _result(512, 1, "original", 1.0, 1.0)
    var = _result(512, 1, "I=3, B=0", 0.5, 2.0)
    base.peak_memory_bytes, base.memory_overhead = 10 * 2**30, 0.0
    var.peak_memory_bytes, var.memory_overhead = int(10.2 * 2**30), 0.02
    rows = bench.markdown_details(BenchReport(settings={}, env={}, results=[base, var])).splitlines()
    assert rows[2].endswith("| 10.00 | +0.0 % |") and rows[3].endswith("| 10.20 | +2.0 % |")
    assert "| 512 | 1 | I=3, B=0 | 0.500 | 2.00× | n/a | n/a |" in rows[3]


# -- the CLI ---------------------------------------------------------------------------------------------


def test_cli_docs_table_tiny(tmp_path, capsys) -> None:
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    rc = bench.main(["--preset", "docs-table", "--device", "cpu", "--tiny", "--steps", "2", "--repeats", "1",
                     "--warmup-steps", "0", "--threads", "1", "--no-progress", "--jsonl", "--out", str(out), "--markdown", str(md)])
    assert rc == 0
    stdout = capsys.readouterr().out
    lines = [json.loads(x) for x in stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 36 and all(set(x) == RESULT_KEYS for x in lines)
    data = json.loads(out.read_text())
    assert [(r["height"], r["batch_size"], r["variant"]) for r in data["results"]] == [
        (h, b, v) for h in (64, 96, 128) for b in (8, 4, 1) for v in ("original", "I=3, B=0", "I=5, B=0", "I=5, B=1")
    ]
    assert data["settings"]["preset"] == "docs-table" and data["settings"]["tiny"] is True
    text = md.read_text()
    assert "| Resolution | Batch size | Original | DeepCache (I=3, B=0) | DeepCache (I=5, B=0) | DeepCache (I=5, B=1) |" in text
    assert text.count("\n| 96 | ") == 3 + 12  # 3 summary rows + 12 detailed rows
    assert "TINY models" in text and "Random weights" in text and text in stdout


def test_compile_grid_and_validation() -> None:
    cfg = BenchConfig(variants=(Setting(3, 0),), compile="auto")
    assert [s.label for s in cfg.scenarios()] == ["512x512 b1 original", "512x512 b1 I=3, B=0",
                                                  "512x512 b1 compiled original", "512x512 b1 compiled I=3, B=0"]
    with pytest.raises(ValueError, match="unknown compile mode"):
        BenchConfig(compile="fast")


def test_cli_compile_columns(tmp_path, capsys, monkeypatch) -> None:
    """The --compile plumbing (columns, fields, graph counting) with torch.compile replaced by a stand-in.

    Compiling even the tiny SD1.5 takes minutes on 2 CPU cores; that DeepCache compiles to two graphs,
    without recompiles and with the same images, is tested on a smaller U-Net in tests/test_compile.py.
    """
    monkeypatch.setattr(bench_timing, "compile_unet", lambda unet, mode, n_graphs: unet)
    out = tmp_path / "r.json"
    rc = bench.main(["--model", "sd15", "--device", "cpu", "--tiny", "--steps", "2", "--repeats", "1", "--warmup-steps",
                     "2", "--threads", "1", "--variant", "2,0", "--compile", "--no-progress", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert ("| Resolution | Batch size | Original | DeepCache (I=2, B=0) | Compiled original | "
            "Compiled DeepCache (I=2, B=0) |\n|---|---|---|---|---|---|\n| 64 | 1 | ") in text
    assert "vs compiled) |" in text and "| Compile + warm-up s | Graphs compiled | Recompiles (timed) |" in text
    data = json.loads(out.read_text())
    assert data["settings"]["compile"] == "auto" and data["settings"]["compile_mode"] == "default"  # CPU
    rows = data["results"]
    assert [(r["variant"], r["compile_mode"]) for r in rows] == [
        ("original", None), ("I=2, B=0", None), ("original", "default"), ("I=2, B=0", "default")]
    assert all(r["warmup_seconds"] > 0 and r["graphs_compiled"] == 0 == r["recompiles_timed"] for r in rows)
    assert rows[2]["speedup_vs_compiled"] == 1.0 and rows[0]["speedup_vs_compiled"] is None
    assert math.isclose(rows[3]["speedup_vs_compiled"], rows[2]["seconds"] / rows[3]["seconds"])
    assert math.isclose(rows[3]["achieved_fraction_compiled"], rows[3]["speedup_vs_compiled"] / rows[3]["ideal_speedup"])
    assert rows[3]["pattern"].startswith("Fr")


def test_cli_registered_and_errors(capsys) -> None:
    from DeepCache.tools import cli

    args = cli.build_parser().parse_args(["bench", "--preset", "docs-table", "--variant", "3,0"])
    assert args.func is not None and args.preset == "docs-table"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--variant", "3;0", "--flops-only"])
    assert exit_info.value.code == 2
    assert "argument --variant: malformed setting '3;0'" in capsys.readouterr().err
    assert bench.main(["--resolution", "big", "--flops-only"]) == 2
    assert capsys.readouterr().err == (
        "deepcache bench: error: malformed resolution 'big': use 512 or HEIGHTxWIDTH like 768x512.\n")
    assert cli.main(["bench", "--model", "sd15", "--resolution", "500", "--flops-only"]) == 2
    assert "deepcache bench: error: resolution must be a positive multiple of 8" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--preset", "paper"])


def test_cli_flops_only_full_size_sdxl(capsys) -> None:
    rc = bench.main(["--model", "sdxl", "--resolution", "1024", "--variant", "3,0", "--flops-only", "--jsonl"])
    assert rc == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [r["variant"] for r in rows] == ["original", "I=3, B=0"]
    assert rows[1]["pattern"] == "Frr" * 16 + "Fr" and rows[1]["seconds"] is None
    assert rows[1]["flops_full_step"] == 13_522_472_796_160
    assert math.isclose(rows[1]["ideal_speedup_uniform"], 3 / (1 + 2 * rows[1]["flop_ratio"]))


@pytest.mark.slow
def test_gpu_bench_script_on_cpu(tmp_path) -> None:
    """tools/gpu_bench.sh end to end with tiny models on CPU (one stage to keep it short)."""
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OUT": str(tmp_path), "STAGES": "sd15-512"}
    proc = subprocess.run(
        ["bash", str(root / "tools" / "gpu_bench.sh"), "--tiny", "--device", "cpu", "--dtype", "float32", "--threads", "1",
         "--steps", "3", "--repeats", "1", "--warmup-steps", "0", "--no-flops"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    events = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith('{"stage"')]
    assert [e["stage"] for e in events] == ["env", "sd15-512", "sd15-512", "done"]
    assert events[-1]["status"] == 0
    rows = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith('{"model"')]
    assert [r["variant"] for r in rows] == ["original", "I=3, B=0", "I=5, B=0", "I=5, B=1"]
    files = {"env.json", "benchmarks.md", "sd15-512.json", "sd15-512.md", "sd15-512.log", "sd15-512.err"}
    assert {p.name for p in tmp_path.iterdir()} == files | {"gpu_bench.tgz"}
    assert _tgz_names(tmp_path / "gpu_bench.tgz") == files  # one file to fetch from the device tool
    data = json.loads((tmp_path / "sd15-512.json").read_text())
    assert data["settings"]["dtype"] == "float32" and data["settings"]["repeats"] == 1
    assert "### sd15-512" in (tmp_path / "benchmarks.md").read_text()


def _tgz_names(path) -> set[str]:
    import tarfile

    with tarfile.open(path) as tar:
        return {m.name.removeprefix("./") for m in tar.getmembers() if m.isfile()}


def _bench_process_running(session: int) -> bool:
    """Whether a process of ``session`` runs ``python -m DeepCache.tools.bench`` and has torch loaded (Linux /proc)."""
    from pathlib import Path

    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[3]) != session:  # field 6: the session id
                continue
            if b"DeepCache.tools.bench" in (proc / "cmdline").read_bytes() and "libtorch" in (proc / "maps").read_text():
                return True
        except (OSError, ValueError, IndexError):  # the process ended meanwhile
            continue
    return False


def test_gpu_bench_script_packs_its_files_when_terminated(tmp_path) -> None:
    """A time-out's TERM in the middle of a stage still leaves $OUT/gpu_bench.tgz with what was written."""
    import os
    import signal
    import subprocess
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OUT": str(tmp_path), "STAGES": "sd15-512"}
    proc = subprocess.Popen(
        ["bash", str(root / "tools" / "gpu_bench.sh"), "--tiny", "--device", "cpu", "--dtype", "float32", "--threads",
         "1", "--steps", "200", "--repeats", "1", "--warmup-steps", "0", "--no-flops"],
        env=env, stdout=subprocess.PIPE, text=True, start_new_session=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:  # wait until the stage has started
        if '"event": "start"' in line:
            break
    # wait for an event, not a time: the stage's python process has loaded torch (it runs the stage now)
    deadline = time.monotonic() + 120
    while not _bench_process_running(proc.pid):
        assert time.monotonic() < deadline, "the bench stage never started"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)  # what `timeout` does to the command
    proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert {"env.json", "sd15-512.log", "sd15-512.err"} <= _tgz_names(tmp_path / "gpu_bench.tgz")
