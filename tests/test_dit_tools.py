"""The command-line tools on a diffusion-transformer pipeline folder: a tiny PixArt-Sigma (tests/tiny_dit_pipelines.py,
no text encoder) saved with ``save_pretrained``. Its prompts become embeddings seeded by their text
(DeepCache/tools/kinds/embeddings.py), labelled in every report."""

from __future__ import annotations

import json

import pytest
import torch

from DeepCache.engine.transformer.discovery import MIN_DIFFUSERS, _diffusers_version
from DeepCache.tools import cli
from DeepCache.tools.kinds import TransformerKind, UNetKind, default_batch_size, kind_of, load_kind
from DeepCache.tools.kinds.embeddings import SEEDED_LABEL, require_spec

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


def test_bench_counts_and_times_a_dit_folder(folder, tmp_path, capsys) -> None:
    out = tmp_path / "bench.json"
    args = ["bench", "--model", str(folder), "--resolution", "8", "--steps", "4", "--variant", "2,1", "--repeats", "1",
            "--warmup-steps", "0", "--device", "cpu", "--guidance-scale", "4.5", "--no-progress", "--json", str(out)]
    assert cli.main(args) == 0
    rows = json.loads(out.read_text())["results"]
    step = load_kind(str(folder)).flop_counter().step(1, 8, 8, 1, 4.5)
    cached = next(r for r in rows if r["variant"] == "I=2, B=1")
    assert cached["pattern"] == "FrFr" and cached["unet_calls"] == 4
    assert (cached["flops_full_step"], cached["flops_retrieval_step"]) == (step.full, step.retrieval)
    assert cli.main([*args[:-2], "--flops-only", "--json", str(out)]) == 0
    only = next(r for r in json.loads(out.read_text())["results"] if r["variant"] == "I=2, B=1")
    assert (only["flops_full_step"], only["flops_retrieval_step"]) == (step.full, step.retrieval)


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
