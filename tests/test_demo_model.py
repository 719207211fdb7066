"""The procedural data, the offline tokenizer, the classifier and a smoke run of the training script."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from DeepCache.tools.demo_model import data
from DeepCache.tools.demo_model.tokenizer import build_tokenizer, learn_merges

ASSETS = Path(__file__).resolve().parents[1] / "DeepCache" / "assets"


def test_dataset_is_deterministic_and_seed_dependent() -> None:
    a, b, c = data.make_dataset(16, seed=3), data.make_dataset(16, seed=3), data.make_dataset(16, seed=4)
    assert np.array_equal(a.images, b.images) and a.captions == b.captions
    assert not np.array_equal(a.images, c.images)
    assert a.images.shape == (16, 32, 32, 3) and a.images.dtype == np.uint8


def test_captions_describe_the_pixels() -> None:
    batch = data.make_dataset(64, seed=0)
    for image, text in zip(batch.images, batch.captions):
        attrs = data.parse_caption(text)
        assert data.caption(attrs) == text
        # The corner opposite the shape shows the exact background colour.
        row = 31 if attrs.position.startswith("top") else 0
        col = 31 if attrs.position.endswith("left") else 0
        assert tuple(image[row, col]) == data.PALETTE[attrs.background]
        # The quadrant of the shape contains its colour, the opposite quadrant does not.
        quadrant = image[:16, :16] if attrs.position == "top left" else None
        ys = slice(0, 16) if attrs.position.startswith("top") else slice(16, 32)
        xs = slice(0, 16) if attrs.position.endswith("left") else slice(16, 32)
        fg = np.array(data.PALETTE[attrs.colour])
        assert (np.abs(image[ys, xs].astype(int) - fg).sum(-1) == 0).any(), text
        opposite = image[
            slice(16, 32) if ys.start == 0 else slice(0, 16), slice(16, 32) if xs.start == 0 else slice(0, 16)
        ]
        assert not (np.abs(opposite.astype(int) - fg).sum(-1) == 0).any(), text
        del quadrant


def test_large_shapes_cover_more_pixels_than_small() -> None:
    rng = np.random.default_rng(0)
    for shape in data.SHAPES:
        areas = {}
        for size in data.SIZES:
            attrs = data.Attributes(shape, "red", "blue", "top left", size)
            image = data.render(attrs, rng)
            areas[size] = int((image == np.array(data.PALETTE["red"])).all(-1).sum())
        assert areas["large"] > 2 * areas["small"] > 0, (shape, areas)


def test_attribute_validation_and_parsing_errors() -> None:
    with pytest.raises(ValueError, match="invisible"):
        data.Attributes("circle", "red", "red", "top left", "small")
    with pytest.raises(ValueError, match="one of"):
        data.Attributes("hexagon", "red", "blue", "top left", "small")
    with pytest.raises(ValueError, match="expected 'a <size>"):
        data.parse_caption("a cat")
    assert len(data.all_attributes()) == 3 * 6 * 5 * 4 * 2


def test_tokenizer_keeps_every_caption_word_whole_and_round_trips(tmp_path: Path) -> None:
    from transformers import CLIPTokenizer

    tokenizer = build_tokenizer(data.caption_words(), max_length=16)
    for attrs in data.all_attributes()[::7]:
        text = data.caption(attrs)
        ids = tokenizer(text)["input_ids"]
        tokens = tokenizer.convert_ids_to_tokens(ids)
        words = text.replace(",", " ,").split()
        assert tokens == ["<|startoftext|>"] + [w + "</w>" for w in words] + ["<|endoftext|>"]
        assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ,", ",") == text
        assert len(ids) <= 16
    tokenizer.save_pretrained(tmp_path)
    reloaded = CLIPTokenizer.from_pretrained(tmp_path)
    text = "a large blue triangle on a white background, bottom right"
    assert (
        reloaded(text, padding="max_length", max_length=16)["input_ids"]
        == tokenizer(text, padding="max_length", max_length=16)["input_ids"]
    )
    # Unknown words still tokenize (into byte-level pieces), never to an unknown token.
    pieces = tokenizer.convert_ids_to_tokens(tokenizer("zebra")["input_ids"])
    assert "".join(pieces[1:-1]) == "zebra</w>" and len(pieces) > 3


def test_learn_merges_is_deterministic() -> None:
    merges = learn_merges(["red", "green", "square"])
    assert merges == learn_merges(["red", "green", "square"])
    # ('r', 'e') occurs twice (red, green); every other pair once, so ties go alphabetically.
    assert merges == [
        ("r", "e"),
        ("a", "r"),
        ("ar", "e</w>"),
        ("e", "n</w>"),
        ("g", "re"),
        ("gre", "en</w>"),
        ("q", "u"),
        ("qu", "are</w>"),
        ("re", "d</w>"),
        ("s", "quare</w>"),
    ]
    with pytest.raises(ValueError, match="empty"):
        learn_merges([])


def test_classifier_forward_shapes() -> None:
    from DeepCache.tools.demo_model.classifier import FEATURE_DIM, ShapeClassifier

    logits, feats = ShapeClassifier()(torch.zeros(3, 3, 32, 32))
    assert {k: tuple(v.shape) for k, v in logits.items()} == {
        name: (3, len(classes)) for name, classes in data.ATTRIBUTE_CLASSES.items()
    }
    assert feats.shape == (3, FEATURE_DIM)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        ShapeClassifier()(torch.zeros(3, 32, 32))


def test_training_smoke_run_writes_a_loadable_pipeline(tmp_path: Path) -> None:
    """`deepcache train-demo-model --smoke`: a few steps of every stage, then load and generate offline."""
    from diffusers import StableDiffusionPipeline

    from DeepCache.tools.cli import main
    from DeepCache.tools.demo_model.classifier import load_classifier

    threads = torch.get_num_threads()
    assert main(["train-demo-model", "--out", str(tmp_path), "--smoke"]) == 0
    assert torch.get_num_threads() == threads  # the run restores the process's thread count
    summary = json.loads((tmp_path / "training-summary.json").read_text())
    assert summary["unet_steps_done"] == 3 and summary["config"]["unet_channels"] == [8, 16, 16]
    assert {"vae_mse", "unet_loss", "decoder_mse", "classifier_acc_shape"} <= set(summary)
    assert (tmp_path / "demo-model" / "deepcache-demo.json").is_file()
    assert {p.name for p in (tmp_path / "demo-model" / "tokenizer").iterdir()} >= {"vocab.json", "merges.txt"}
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "demo-model", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 2 and pipe.unet.config.sample_size == 16
    image = pipe("a small red circle on a blue background, top left", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 32, 32, 3)
    classifier = load_classifier(tmp_path / "demo-classifier")
    assert classifier.feature_dim == 32


def test_vae_stage_alone_saves_the_autoencoder_the_unet_stage_then_uses(tmp_path: Path) -> None:
    """`--stages vae` used to train the autoencoder and throw it away; `--stages unet` then found none."""
    from diffusers import AutoencoderKL

    from DeepCache.tools.cli import main

    argv = ["train-demo-model", "--out", str(tmp_path), "--smoke", "--vae-steps", "1"]
    assert main([*argv, "--stages", "vae"]) == 0
    summary = json.loads((tmp_path / "training-summary.json").read_text())
    vae = AutoencoderKL.from_pretrained(tmp_path / "demo-model" / "vae")
    assert vae.config.scaling_factor == pytest.approx(summary["vae_scaling_factor"]) != 0.18215  # ours, not the default
    assert not (tmp_path / "demo-model" / "deepcache-demo.json").exists()  # not a whole pipeline yet
    assert main([*argv, "--stages", "unet", "--unet-steps", "1"]) == 0
    assert (tmp_path / "demo-model" / "deepcache-demo.json").is_file()
    saved = AutoencoderKL.from_pretrained(tmp_path / "demo-model" / "vae")
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), saved.state_dict().values()))


def test_train_cli_errors_are_clear(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from DeepCache.tools.cli import main

    assert main(["train-demo-model", "--out", str(tmp_path), "--stages", "vae,gan"]) == 2
    assert "deepcache train-demo-model: error: unknown --stages ['gan']" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_iter_batches_is_the_training_stream() -> None:
    from DeepCache.tools.demo_model.vae_stages import image_batches

    images, captions = next(image_batches(3, stream_seed=7))
    batch = next(data.iter_batches(3, seed=7))
    assert captions == batch.captions and torch.equal(images, data.images_to_tensor(batch.images))
    assert images.shape == (3, 3, 32, 32) and images.min() >= -1 and images.max() <= 1


@pytest.mark.skipif(not (ASSETS / "demo-model" / "model_index.json").is_file(), reason="embedded model not built")
def test_shipped_assets_fit_the_size_budget() -> None:
    def size(folder: str) -> int:
        return sum(p.stat().st_size for p in (ASSETS / folder).rglob("*") if p.is_file())

    total = size("demo-model") + size("demo-classifier")
    assert total <= 20 * 1024 * 1024, f"U-Net model and classifier are {total / 2**20:.1f} MiB; the budget is 20 MB"
    dit = size("demo-flux")  # the tiny Flux DiT (issue 27): its own budget
    assert dit <= 15 * 1024 * 1024, f"demo-flux is {dit / 2**20:.1f} MiB; the budget is 15 MB"
    unet = json.loads((ASSETS / "demo-model" / "unet" / "config.json").read_text())
    assert len(unet["block_out_channels"]) >= 3 and unet["layers_per_block"] == 2
    index = json.loads((ASSETS / "demo-model" / "model_index.json").read_text())
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"] and index["safety_checker"] == [None, None]
