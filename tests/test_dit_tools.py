"""The command-line tools on a diffusion-transformer pipeline folder: a tiny PixArt-Sigma (tests/tiny_dit_pipelines.py,
no text encoder) saved with ``save_pretrained``. Its prompts become embeddings seeded by their text
(DeepCache/tools/kinds/embeddings.py), labelled in every report."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch

from DeepCache.engine.transformer.discovery import MIN_DIFFUSERS, _diffusers_version
from DeepCache.tools import cli
from DeepCache.tools.kinds import TransformerKind, UNetKind, default_batch_size, kind_of, load_kind
from DeepCache.tools.kinds.embeddings import SEEDED_LABEL, require_spec
from DeepCache.tools.tune import KINDS

pytestmark = pytest.mark.skipif(_diffusers_version() < MIN_DIFFUSERS, reason="DiTs need diffusers >= 0.35")

# The tiny PixArt: 4 blocks, width D = 2 heads x 4 = 8, an 8x8 latent in patches of 2 (L = 16 image tokens), the
# tools' made-up embeddings have T = 77 tokens (projected to D).
L, D, T, HEADS, FF = 16, 8, 77, 2, 4 * 8


def block_macs_per_image() -> int:
    """A PixArt block's MACs for one image, by hand: self-attention (q, k, v, out; Q.K^T and A.V), cross-attention
    (q and out on the image tokens, k and v on the text tokens; Q.K^T and A.V), the feed-forward (D -> 4D -> D)."""
    self_attn = 4 * L * D * D + HEADS * L * L * (D // HEADS) * 2
    cross_attn = 2 * L * D * D + 2 * T * D * D + HEADS * L * T * (D // HEADS) * 2
    return self_attn + cross_attn + 2 * L * D * FF  # = 48,000


def rest_macs_per_image() -> int:
    """The tiny PixArt's MACs outside its blocks for one image, by hand: the patch embedding (a 2x2 conv, 4 -> D
    channels, on L patches), the timestep embedding (256 -> D -> D) and its adaLN projection (D -> 6D), the caption
    projection (16 -> D -> D on T tokens), the output projection (D -> 2x2 patches x 8 channels on L tokens)."""
    patch_embed = L * D * 4 * 2 * 2
    timestep = 256 * D + D * D + D * 6 * D
    caption = T * (16 * D + D * D)
    proj_out = L * D * 2 * 2 * 8
    return patch_embed + timestep + caption + proj_out  # = 23,424


def vae_decode_macs_per_image() -> int:
    """The tiny VAE's decoder for one 8x8 latent (4 channels, one level: no upsampling), by hand: conv_in, the mid
    block's two resnets (two 3x3 convs each) and its one-head attention (q, k, v, out; Q.K^T and A.V over P = 64
    pixels), the up block's two resnets, conv_out (4 -> 3 channels)."""
    pixels, conv = 8 * 8, 8 * 8 * 4 * 4 * 3 * 3
    attention = 4 * pixels * 4 * 4 + 2 * pixels * pixels * 4
    return conv + 4 * conv + attention + 4 * conv + pixels * 3 * 4 * 3 * 3  # = 126,720


def ideal_speedup_by_hand(full: float, total: int, branch: int, images: int = 1) -> float:
    """The FLOP-ideal speedup of ``full`` full steps of ``total`` (summed over ``images`` images) at ``branch`` with
    CFG: a step runs the rest and its blocks on the doubled batch, a retrieval step skips the 4 - 2b middle blocks,
    every image is decoded once; FLOPs = 2 x MACs (the factor cancels)."""
    rest, block, vae = 2 * rest_macs_per_image(), 2 * block_macs_per_image(), vae_decode_macs_per_image()
    step, retrieval = rest + 4 * block, rest + 2 * branch * block
    return (total * step + images * vae) / (full * step + (total - full) * retrieval + images * vae)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from tests.tiny_dit_pipelines import pixart_sigma

    path = tmp_path_factory.mktemp("dit") / "pixart"
    pixart_sigma()[0].save_pretrained(path)
    return path


def test_the_folder_is_a_transformer_kind(folder) -> None:
    kind = load_kind(str(folder))
    assert isinstance(kind, TransformerKind) and kind.family == "transformer" and not kind.embedded
    assert kind.classifier is None and kind.default_batch_size == default_batch_size(str(folder)) == 1
    assert kind.describe() == {"family": "transformer", "prompt_embeddings": SEEDED_LABEL}
    assert kind_of(kind) is kind and kind_of(kind.pipe).denoiser is kind.pipe.transformer
    assert isinstance(load_kind(None), UNetKind) and default_batch_size(None) == 16


def test_dit_macs_are_the_hand_count(folder) -> None:
    """Every block of the stack costs the hand count, x2 for the CFG batch, x2 for FLOPs; a retrieval step at branch b
    skips exactly the 4 - 2b middle blocks; branch 2 (an empty middle) costs a full step; no CFG halves the blocks."""
    counter = load_kind(str(folder)).flop_counter()
    counts = counter.counts(1, 8, 8, 4.5)
    assert block_macs_per_image() == 48_000
    assert counts.blocks == (2 * 2 * 48_000,) * 4
    for branch, skipped in ((0, 4), (1, 2), (2, 0)):
        step = counter.step(1, 8, 8, branch, 4.5)
        assert step.full == counts.transformer and step.full - step.retrieval == skipped * 2 * 2 * 48_000
    assert counter.counts(1, 8, 8, 1.0).blocks == (2 * 48_000,) * 4
    assert counter.counts(3, 8, 8, 4.5).blocks == (3 * 2 * 2 * 48_000,) * 4
    flops = counter.for_pattern((True, False, True, False), images=1, latent=(8, 8), branch=1, guidance_scale=4.5,
                                uniform_interval=2)
    assert flops.full_step == counts.transformer and flops.vae_decode == counts.vae_decode > 0
    assert flops.ideal_unet == pytest.approx(4 * counts.transformer / (2 * counts.transformer + 2 * flops.retrieval_step))


def test_the_counter_is_the_hand_count_outside_the_blocks_too(folder) -> None:
    counts = load_kind(str(folder)).flop_counter().counts(1, 8, 8, 4.5)
    assert counts.transformer == 2 * 2 * (rest_macs_per_image() + 4 * block_macs_per_image())
    assert counts.vae_decode == 2 * vae_decode_macs_per_image()


def test_bench_counts_and_times_a_dit_folder(folder, tmp_path, capsys) -> None:
    out, table = tmp_path / "bench.json", tmp_path / "bench.md"
    args = ["bench", "--model", str(folder), "--resolution", "8", "--steps", "4", "--variant", "2,1", "--repeats", "1",
            "--warmup-steps", "0", "--device", "cpu", "--guidance-scale", "4.5", "--no-progress", "--markdown",
            str(table), "--json", str(out)]
    assert cli.main(args) == 0
    rows, settings = json.loads(out.read_text())["results"], json.loads(out.read_text())["settings"]
    assert settings["denoiser"] == "transformer" and "transformer denoising loop" in settings["timed"]
    step = load_kind(str(folder)).flop_counter().step(1, 8, 8, 1, 4.5)
    cached = next(r for r in rows if r["variant"] == "I=2, B=1")
    assert cached["pattern"] == "FrFr" and cached["unet_calls"] == 4
    assert (cached["flops_full_step"], cached["flops_retrieval_step"]) == (step.full, step.retrieval)
    text = table.read_text()  # the tables name the transformer, never a U-Net
    assert "| Ideal transformer N/(1+(N-1)f) |" in text and "transformer step FLOPs" in text and "U-Net" not in text
    assert cli.main([*args[:-2], "--flops-only", "--json", str(out)]) == 0
    only = next(r for r in json.loads(out.read_text())["results"] if r["variant"] == "I=2, B=1")
    assert (only["flops_full_step"], only["flops_retrieval_step"]) == (step.full, step.retrieval)
    text = table.read_text()
    assert "| Ideal transformer loop |" in text and "one transformer evaluation per step" in text
    assert "U-Net" not in text


def test_bench_counts_an_asymmetric_split(folder, tmp_path) -> None:
    """front_blocks=1, back_blocks=0: a retrieval step runs block 0 only and skips the other 3 blocks (branch 0 would
    skip all 4); counted by hand."""
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--model", str(folder), "--resolution", "8", "--steps", "4", "--variant",
                     "2,0,front_blocks=1,back_blocks=0", "--variant", "2,0", "--device", "cpu", "--guidance-scale",
                     "4.5", "--flops-only", "--json", str(out)]) == 0
    rows = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    full, block = 2 * 2 * (rest_macs_per_image() + 4 * block_macs_per_image()), 2 * 2 * block_macs_per_image()
    split = rows["I=2, B=0, front_blocks=1, back_blocks=0"]
    assert (split["flops_full_step"], split["flops_retrieval_step"]) == (full, full - 3 * block)
    assert rows["I=2, B=0"]["flops_retrieval_step"] == full - 4 * block
    vae = 2 * vae_decode_macs_per_image()
    assert split["ideal_speedup"] == pytest.approx((4 * full + vae) / (2 * full + 2 * (full - 3 * block) + vae))


def test_eval_on_a_dit_folder(folder, tmp_path, capsys) -> None:
    """An empty middle (branch 2 of 4 blocks) is the uncached image bit for bit: PSNR inf; branch 0 is not."""
    out = tmp_path / "eval.json"
    assert cli.main(["eval", "--model", str(folder), "--num-prompts", "2", "--steps", "4", "--variant", "2,2",
                     "--variant", "2,0", "--threads", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"prompt embeddings: {SEEDED_LABEL}" in printed.splitlines()[0]
    report = json.loads(out.read_text())
    rows = {row["setting"]: row for row in report["rows"]}
    assert rows["I=2, B=2"]["psnr"] is None and rows["I=2, B=2"]["ssim"] == 1.0  # strict JSON writes inf as null
    assert [line for line in printed.splitlines() if line.startswith("| I=2, B=2 |")][0].split("|")[4].strip() == "inf"
    assert 10 < rows["I=2, B=0"]["psnr"] < float("inf")
    assert report["meta"]["family"] == "transformer" and report["meta"]["embedded"] is False
    assert "task_accuracy" not in rows["I=2, B=0"]


def test_generate_on_a_dit_folder(folder, tmp_path, capsys) -> None:
    """The images of an empty-middle split are the original's bytes; prompts map to their own seeded embeddings."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    made = {}
    for variant in ("original", "2,2", "2,0"):
        out = tmp_path / variant.replace(",", "_")
        assert cli.main(["generate", "--model", str(folder), "--prompts", str(prompts), "--out", str(out), "--steps",
                         "4", "--variant", variant, "--device", "cpu", "--threads", "1", "--no-progress"]) == 0
        made[variant] = [(out / f"{i:05d}.png").read_bytes() for i in range(2)]
    assert f"prompt embeddings: {SEEDED_LABEL}" in capsys.readouterr().out
    assert made["2,2"] == made["original"] and made["2,0"] != made["original"]
    assert made["original"][0] != made["original"][1]


def test_a_folder_whose_prompts_cannot_be_made_is_a_clear_error() -> None:
    class WanPipeline:  # a pipeline class the tools have no embedding spec for
        pass

    with pytest.raises(ValueError, match="WanPipeline folder without a text encoder.*PixArtSigmaPipeline"):
        require_spec(WanPipeline())


# -- deepcache tune on a transformer ---------------------------------------------------------------
TUNE_STEPS, TUNE_BOUND = 6, 30.0
DIT_KINDS = list(KINDS)  # every kind, the calibrated forecast included


def uncached_and_cached(kind, prompts, seeds, params) -> tuple:
    """The images of ``prompts`` uncached and with ``params`` enabled by hand (one prompt per call, as tune's
    batch 1), generated here, not by tune."""
    from DeepCache import DeepCacheHelper

    def images(helper=None):
        out = []
        for prompt, seed in zip(prompts, seeds):
            call = kind.call_kwargs([prompt], [seed], steps=TUNE_STEPS, guidance=4.0)  # seeded embeddings and noise
            if helper is None:
                out.append(kind.pipe(**call).images)
            else:
                with helper:
                    out.append(kind.pipe(**call).images)
        return np.concatenate(out).astype(np.float64)

    helper = DeepCacheHelper(pipe=kind.pipe)
    helper.params = params
    return images(), images(helper)


@pytest.fixture(scope="module")
def dit_tuned(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("dit-tune")
    argv = ["tune", "--model", str(folder), "--min-psnr", str(TUNE_BOUND), "--intervals", "2,3", "--branches", "0,1",
            "--num-prompts", "2", "--num-calibration-prompts", "2", "--steps", str(TUNE_STEPS), "--repeats", "1",
            "--threads", "1", "--no-progress", "--save", str(out / "params.json"), "--plot", str(out / "plot.png"),
            "--json", str(out / "report.json")]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = cli.main(argv)
    assert "note:" not in err.getvalue(), err.getvalue()
    return status, json.loads((out / "report.json").read_text()), out / "params.json"


def test_tune_on_a_dit_folder_reports_every_kind_and_budget_with_hand_counted_bounds(dit_tuned, capsys) -> None:
    status, report, _ = dit_tuned
    assert status == 0
    meta, rows = report["meta"], report["rows"]
    assert meta["family"] == "transformer" and meta["evaluations"] == TUNE_STEPS and meta["guidance"] == 4.0
    assert meta["kinds"] == DIT_KINDS and meta["batch_size"] == 1 and len(meta["prompts"]) == 2
    assert rows[0]["kind"] == "original" and rows[0]["budget"] == TUNE_STEPS
    # a row per kind, interval (its budget K = ceil(6 / N): 3 and 2) and branch; the calibrated kinds at K = 2..3
    # (a calibrated forecast that chose reuse is the calibrated row's setting: judged once, under "calibrated")
    slots = {(r["kind"], r["interval"], r["budget"], r["branch"]) for r in rows[1:]}
    expected = {(kind, n, k, b) for kind in DIT_KINDS for n, k in ((2, 3), (3, 2)) for b in (0, 1)}
    assert len(slots) == len(rows) - 1 and slots <= expected
    assert {s for s in expected - slots} <= {s for s in expected if s[0] == "forecast"}
    assert (meta["judged"], meta["pruned"]) == (sum(r["status"] != "pruned" for r in rows[1:]),
                                                sum(r["status"] == "pruned" for r in rows[1:]))
    for r in rows[1:]:
        if r["status"] == "pruned":  # the bound: K full steps, or those adaptive's cap 2N forces (6 steps: 2, 1)
            full = {2: 2, 3: 1}[r["interval"]] if r["kind"] == "adaptive" else r["budget"]
            assert r["ideal_speedup"] == pytest.approx(ideal_speedup_by_hand(full, TUNE_STEPS, r["branch"]), rel=1e-12)
            continue
        if r["kind"] != "adaptive":
            assert r["full_steps"] == r["budget"]
        images = len(meta["prompts"])  # the full steps of both judging prompts, each decoded once
        assert r["ideal_speedup"] == pytest.approx(ideal_speedup_by_hand(
            r["full_steps"] * images, TUNE_STEPS * images, r["branch"], images), rel=1e-12), r["setting"]
        assert r["meets"] == (r["psnr"] >= TUNE_BOUND)


def test_tune_on_a_dit_folder_chooses_a_setting_that_meets_the_bound(dit_tuned, folder) -> None:
    from DeepCache import CacheParams

    _, report, saved = dit_tuned
    chosen, meta = report["chosen"], report["meta"]
    params = CacheParams.from_json(saved.read_text())
    assert params == CacheParams(**{k: tuple(v) if isinstance(v, list) else v for k, v in chosen["params"].items()})
    reference, cached = uncached_and_cached(load_kind(str(folder)), meta["prompts"], meta["seeds"], params)
    psnr = np.mean([10 * np.log10(1 / np.mean((a - b) ** 2)) for a, b in zip(cached, reference)])
    assert psnr >= TUNE_BOUND and psnr == pytest.approx(chosen["psnr"], abs=1e-6)
