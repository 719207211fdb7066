"""``deepcache eval``: quality and speed of DeepCache settings against the same pipeline uncached.

Same prompts, same seeds, same scheduler; each setting's images are compared with the original's:

* fidelity: PSNR and SSIM (:mod:`DeepCache.tools.metrics`); LPIPS only where the ``lpips`` package and
  its backbone weights are already on disk;
* embedded model: task accuracy (the shipped attribute classifier checks shape, colour, background,
  position and size against the prompt) and the Fréchet distance, in that classifier's feature
  space, to real renders of the same prompts;
* other models: CLIP score where CLIP weights are available locally (``--clip-model``).

Models are loaded once; features are extracted here, the metrics themselves are pure functions.
Columns without a value in any row (LPIPS offline, for instance) are left out of the printed table.

Example::

    $ deepcache eval --variant 3,0 --variant 5,0 --json eval.json
    $ deepcache eval --grid               # intervals 2-5 x branches 0-2
    $ deepcache eval --model ./my-sd-pipeline --prompt "a cat" --steps 25 --variant 3,1
    $ accelerate launch --num_processes 8 -m DeepCache eval --device cuda --model ./sd-1.5 --prompts captions.csv \\
          --clip-model ./clip-vit-large-patch14 --variant 3,1

``--prompts FILE`` reads prompts (and their seeds and negative prompts) from a ``.txt``, ``.jsonl`` or ``.csv`` file.
Under ``accelerate launch`` or ``torchrun`` each process generates whole batches of the prompts (the batches
:func:`DeepCache.tools.distributed.global_batches` forms, dealt out by :func:`DeepCache.tools.distributed.shard`); the main
process gathers their scores. Images are scored as they are made, :data:`EVAL_CHUNK_IMAGES` at a time, one batch at
a time, and dropped, so memory does not grow with the number of prompts and the scores do not depend on the number
of processes. A setting's seconds are the slowest process's.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import metrics
from .cli_common import (
    add_device_options,
    add_json_option,
    add_model_option,
    add_prompt_options,
    add_table_options,
    add_threads_option,
    add_variant_option,
    apply_threads,
    positive_int,
    quiet_third_party,
    register,
    resolve_device,
    resolve_dtype,
)
from .demo_model import EMBEDDED_MODEL  # noqa: F401  (re-exported: where the embedded model lives)
from .distributed import ProcessInfo, gather, global_batches, process_info, shard
from .pipelines import call_batch, default_batch_size, demo_classifier_path, is_demo_pipeline, load_pipeline
from .prompts import GENERIC_PROMPTS, choose_prompts, embedded_prompts, prompt_seeds, read_prompt_file, seeded_items  # noqa: F401
from .report import Column, environment, json_document, render_table, write_json
from .settings import BASELINE, Setting, applied, baseline_first, setting_grid

DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 4.0
MIN_FRECHET_IMAGES = 16
#: What ``deepcache eval`` compares when no ``--variant`` is given.
EVAL_SETTINGS: tuple[Setting, ...] = (Setting(2, 0), Setting(3, 0), Setting(3, 1), Setting(5, 0))

#: Former name of :func:`DeepCache.tools.settings.setting_grid`.
grid_settings = setting_grid


# -- generation ------------------------------------------------------------------------------
@dataclasses.dataclass
class SettingRun:
    """The images one setting produced, float (N, H, W, 3) in [0, 1], and the wall time of each repeat.

    ``patterns``: each batch's full (True) / retrieval (False) steps (``helper.last_steps``; empty for the original).
    """

    setting: Setting
    images: np.ndarray
    seconds: list[float]
    patterns: list[tuple[bool, ...]] = dataclasses.field(default_factory=list)

    @property
    def median_seconds(self) -> float:
        return statistics.median(self.seconds)


def generate(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    setting: Setting,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    batch_size: int = 16,
    patterns: list[tuple[bool, ...]] | None = None,
    negative_prompts: Sequence[str | None] | None = None,
) -> tuple[np.ndarray, float]:
    """Generate one image per (prompt, seed) pair with ``setting``; returns images and seconds taken.

    ``patterns``, when given, receives each cached batch's ``helper.last_steps`` (an adaptive schedule decides
    per batch). ``negative_prompts``: one per prompt (``None`` or ``""``: none).
    """
    from ..helper import DeepCacheSDHelper

    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds; pass one seed per prompt.")
    if negative_prompts is not None and len(negative_prompts) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(negative_prompts)} negative prompts; pass one per prompt.")
    helper = DeepCacheSDHelper(pipe=pipe)
    chunks: list[np.ndarray] = []
    start = time.perf_counter()
    with applied(helper, setting, steps), torch.no_grad():
        for first in range(0, len(prompts), batch_size):
            batch = slice(first, first + batch_size)
            images = call_batch(pipe, prompts[batch], seeds[batch], steps=steps, guidance=guidance,
                                negative_prompts=None if negative_prompts is None else negative_prompts[batch])
            chunks.append(np.asarray(images, dtype=np.float32))
            if patterns is not None and not setting.is_baseline:
                patterns.append(helper.last_steps)
    return np.concatenate(chunks), time.perf_counter() - start


def run_settings(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    settings: Sequence[Setting],
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    repeats: int = 1,
    batch_size: int = 16,
    on_run: Callable[[Setting], None] | None = None,
    negative_prompts: Sequence[str | None] | None = None,
    warm_up: bool = True,
) -> list[SettingRun]:
    """The original pipeline first, then each setting; repeats are interleaved so load changes hit all alike.

    ``on_run(setting)`` is called after every generation (a progress bar). ``warm_up``: first one short untimed
    uncached call (allocations, lazy imports).
    """
    order = baseline_first(settings)
    if warm_up:
        generate(pipe, list(prompts[:1]), list(seeds[:1]), BASELINE, steps=2, guidance=guidance)
    results = {s: SettingRun(s, np.empty(0), []) for s in order}
    for repeat in range(repeats):
        for setting in order:
            patterns: list[tuple[bool, ...]] = []
            images, seconds = generate(pipe, prompts, seeds, setting, steps, guidance, batch_size, patterns,
                                       negative_prompts)
            results[setting].seconds.append(seconds)
            if repeat == 0:
                results[setting].images, results[setting].patterns = images, patterns
            if on_run is not None:
                on_run(setting)
    return [results[s] for s in order]


@dataclasses.dataclass
class Scorers:
    """The models that score images, each ``None`` where it is not available."""

    classifier: torch.nn.Module | None = None
    lpips_net: Any | None = None
    clip: tuple[Any, Any] | None = None


@dataclasses.dataclass
class ImageScores:
    """One setting's per-image measurements against the original's images, in prompt order.

    ``predicted`` (N, attributes) and ``features`` (N, D) come from the demo model's classifier; ``lpips`` and
    ``clip`` from their models; each is ``None`` where its model is not available.
    """

    psnr: np.ndarray
    ssim: np.ndarray
    lpips: np.ndarray | None = None
    predicted: np.ndarray | None = None
    features: np.ndarray | None = None
    clip: np.ndarray | None = None

    @classmethod
    def concatenate(cls, parts: Sequence[ImageScores]) -> ImageScores:
        """The parts one after the other (prompt order when the parts are in order)."""
        fields = {}
        for field in dataclasses.fields(cls):
            values = [getattr(part, field.name) for part in parts]
            fields[field.name] = None if any(v is None for v in values) else np.concatenate(values)
        return cls(**fields)


@dataclasses.dataclass
class ScoredRun:
    """What ``deepcache eval`` keeps of one setting: wall time per repeat, step patterns per batch, per-image scores,
    and the images themselves only when asked to (``keep_images``; the demo's picture)."""

    setting: Setting
    seconds: list[float]
    patterns: list[tuple[bool, ...]]
    scores: ImageScores
    images: np.ndarray | None = None

    @property
    def median_seconds(self) -> float:
        return statistics.median(self.seconds)


#: ``deepcache eval`` generates and scores this many images at a time (whole batches; at least one batch), so its
#: memory does not grow with the number of prompts.
EVAL_CHUNK_IMAGES = 64


def measure(images: np.ndarray, original: np.ndarray, prompts: Sequence[str], scorers: Scorers) -> ImageScores:
    """Per-image scores of ``images`` against the original pipeline's ``original`` images of the same prompts."""
    scores = ImageScores(metrics.psnr(images, original), metrics.ssim(images, original))
    if scorers.lpips_net is not None:
        with torch.no_grad():
            a, b = (to_classifier_input(x, size=x.shape[1]) for x in (images, original))
            scores.lpips = scorers.lpips_net(a, b).reshape(len(images)).numpy().astype(np.float64)
    if scorers.classifier is not None:
        scores.predicted, scores.features = classify(scorers.classifier, images)
    if scorers.clip is not None:
        scores.clip = clip_scores(scorers.clip, images, prompts)
    return scores


def chunks_of_batches(batches: Sequence[Sequence[int]], max_images: int = EVAL_CHUNK_IMAGES) -> list[list[list[int]]]:
    """Consecutive batches grouped into chunks of at most ``max_images`` images (at least one batch per chunk).

    >>> chunks_of_batches([[0, 1], [2, 3], [4]], max_images=4)
    [[[0, 1], [2, 3]], [[4]]]
    """
    chunks: list[list[list[int]]] = []
    for batch in batches:
        if chunks and sum(map(len, chunks[-1])) + len(batch) <= max_images:
            chunks[-1].append(list(batch))
        else:
            chunks.append([list(batch)])
    return chunks


def run_and_score(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    settings: Sequence[Setting],
    batches: Sequence[Sequence[int]],
    scorers: Scorers,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    repeats: int = 1,
    negative_prompts: Sequence[str | None] | None = None,
    keep_images: bool = False,
) -> list[ScoredRun]:
    """:func:`run_settings` on ``batches`` (global item indices) a chunk at a time, each image scored against the
    original's right away and dropped (unless ``keep_images``). Scores are measured one batch at a time, so they do
    not depend on how the batches are grouped or shared out. A repeat's seconds are the sum over the chunks."""
    order = baseline_first(settings)
    seconds = [[0.0] * repeats for _ in order]
    patterns: list[list[tuple[bool, ...]]] = [[] for _ in order]
    parts: list[list[ImageScores]] = [[] for _ in order]
    kept: list[list[np.ndarray]] = [[] for _ in order]
    for number, chunk in enumerate(chunks_of_batches(batches, max(EVAL_CHUNK_IMAGES, max(map(len, batches))))):
        mine = [i for batch in chunk for i in batch]
        negatives = None if negative_prompts is None else [negative_prompts[i] for i in mine]
        runs = run_settings(pipe, [prompts[i] for i in mine], [seeds[i] for i in mine], settings, steps, guidance,
                            repeats, max(map(len, chunk)), negative_prompts=negatives, warm_up=number == 0)
        original = runs[0].images
        for k, run in enumerate(runs):
            seconds[k] = [a + b for a, b in zip(seconds[k], run.seconds)]
            patterns[k].extend(run.patterns)
            first = 0
            for batch in chunk:
                rows = slice(first, first + len(batch))
                parts[k].append(measure(run.images[rows], original[rows], [prompts[i] for i in batch], scorers))
                first += len(batch)
            if keep_images:
                kept[k].append(run.images)
    return [ScoredRun(setting, seconds[k], patterns[k], ImageScores.concatenate(parts[k]),
                      np.concatenate(kept[k]) if keep_images else None) for k, setting in enumerate(order)]


def run_and_score_sharded(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    settings: Sequence[Setting],
    info: ProcessInfo,
    scorers: Scorers,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    repeats: int = 1,
    batch_size: int = 16,
    negative_prompts: Sequence[str | None] | None = None,
    keep_images: bool = False,
) -> list[ScoredRun] | None:
    """:func:`run_and_score` on this process's whole batches (:func:`~DeepCache.tools.distributed.global_batches` dealt
    out by :func:`~DeepCache.tools.distributed.shard`); the main process gets every setting's scores in prompt order
    (each repeat's seconds the slowest process's), the others ``None``. Only scores travel, not images (unless
    ``keep_images``)."""
    batches = shard(global_batches(len(prompts), batch_size), info.rank, info.world_size)
    runs = None
    if batches:
        runs = run_and_score(pipe, prompts, seeds, settings, batches, scorers, steps, guidance, repeats,
                             negative_prompts, keep_images)
    parts = gather(info, (batches, runs))
    if parts is None:
        return None
    return merge_scored_runs(parts)


def merge_scored_runs(parts: Sequence[tuple[Sequence[Sequence[int]], list[ScoredRun] | None]]) -> list[ScoredRun]:
    """One run per setting from every process's (batches, runs): scores (and images) in prompt order, patterns in
    batch order, each repeat's seconds the slowest process's."""
    done = [(batches, runs) for batches, runs in parts if runs is not None]
    order = np.argsort(np.concatenate([np.concatenate([np.asarray(b) for b in batches]) for batches, _ in done]),
                       kind="stable")
    merged = []
    for k, first in enumerate(done[0][1]):  # type: ignore[index]
        runs = [r[k] for _, r in done]  # type: ignore[index]
        scores = ImageScores.concatenate([run.scores for run in runs])
        for field in dataclasses.fields(ImageScores):
            value = getattr(scores, field.name)
            if value is not None:
                setattr(scores, field.name, value[order])
        patterns = {batch[0]: p for (batches, _), run in zip(done, runs) for batch, p in zip(batches, run.patterns)}
        images = None if first.images is None else np.concatenate([run.images for run in runs])[order]  # type: ignore[misc]
        seconds = [max(run.seconds[r] for run in runs) for r in range(len(first.seconds))]
        merged.append(ScoredRun(first.setting, seconds, [patterns[i] for i in sorted(patterns)], scores, images))
    return merged


# -- features --------------------------------------------------------------------------------
def to_classifier_input(images: np.ndarray, size: int = 32) -> torch.Tensor:
    """float (N, H, W, 3) in [0, 1] -> (N, 3, size, size) in [-1, 1] (area-resized if needed)."""
    tensor = torch.from_numpy(np.ascontiguousarray(images)).float().permute(0, 3, 1, 2) * 2.0 - 1.0
    if tensor.shape[-1] != size or tensor.shape[-2] != size:
        tensor = torch.nn.functional.interpolate(tensor, size=(size, size), mode="area")
    return tensor


def classify(classifier: torch.nn.Module, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Predicted class indices (N, attributes) in ``ATTRIBUTE_CLASSES`` order and features (N, D)."""
    from .demo_model.data import ATTRIBUTE_CLASSES

    with torch.no_grad():
        logits, feats = classifier(to_classifier_input(images))
    predicted = np.stack([logits[name].argmax(1).numpy() for name in ATTRIBUTE_CLASSES], axis=1)
    return predicted, feats.numpy().astype(np.float64)


def prompt_labels(prompts: Sequence[str]) -> np.ndarray:
    """Target class indices (N, attributes) parsed from embedded-model captions."""
    from .demo_model.data import ATTRIBUTE_CLASSES, parse_caption

    rows = [parse_caption(p).labels() for p in prompts]
    return np.array([[row[name] for name in ATTRIBUTE_CLASSES] for row in rows], dtype=np.int64)


def reference_images(prompts: Sequence[str], seed: int = 12345) -> np.ndarray:
    """Real procedural renders of the prompts, float (N, 32, 32, 3) in [0, 1] (the Fréchet reference)."""
    from .demo_model.data import parse_caption, render

    rng = np.random.default_rng(seed)
    return np.stack([render(parse_caption(p), rng) for p in prompts]).astype(np.float64) / 255.0


def lpips_model() -> Any | None:
    """An LPIPS network if the ``lpips`` package and its backbone weights are already local, else ``None``."""
    import importlib.util

    if importlib.util.find_spec("lpips") is None or importlib.util.find_spec("torchvision") is None:
        return None
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    if not any(checkpoints.glob("alexnet-*.pth")):
        return None
    import lpips  # type: ignore[import-not-found]

    return lpips.LPIPS(net="alex", verbose=False).eval()


def clip_model(name: str) -> tuple[Any, Any] | None:
    """(CLIPModel, CLIPProcessor) from local files only, or ``None`` when the weights are not on disk."""
    from transformers import CLIPModel, CLIPProcessor

    try:
        return CLIPModel.from_pretrained(name, local_files_only=True).eval(), CLIPProcessor.from_pretrained(
            name, local_files_only=True
        )
    except (OSError, ValueError):
        return None


def clip_scores(model: tuple[Any, Any], images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
    """CLIP score per image/prompt pair (features extracted here, scored by :func:`metrics.cosine_score`)."""
    clip, processor = model
    pixels = [np.round(img * 255).astype(np.uint8) for img in images]
    inputs = processor(text=list(prompts), images=pixels, return_tensors="pt", padding=True, truncation=True)
    with torch.no_grad():
        image_embeds = _embeds(clip.get_image_features(pixel_values=inputs["pixel_values"]))
        text_embeds = _embeds(
            clip.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        )
    return metrics.cosine_score(image_embeds.numpy(), text_embeds.numpy())


def _embeds(output: Any) -> torch.Tensor:
    """transformers 4.x returns the projected embeddings; 5.x an output whose ``pooler_output`` holds them."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


# -- scoring ---------------------------------------------------------------------------------
def fidelity(images: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """``{"psnr": ..., "ssim": ...}``: the means over the images against the original's images."""
    return {"psnr": float(np.mean(metrics.psnr(images, reference))),
            "ssim": float(np.mean(metrics.ssim(images, reference)))}


def summarize(runs: Sequence[ScoredRun], prompts: Sequence[str], classifier: torch.nn.Module | None = None) -> list[dict[str, Any]]:
    """One row per setting: seconds, speedup, PSNR/SSIM (and LPIPS) vs the original, task metrics, CLIP score
    (means over the images; Fréchet distance of the classifier features to real renders of the prompts)."""
    from .demo_model.data import ATTRIBUTE_CLASSES

    baseline = runs[0]
    if not baseline.setting.is_baseline:
        raise ValueError("the first run must be the original (uncached) pipeline; use run_and_score().")
    targets = prompt_labels(prompts) if classifier is not None else None
    # Too few images for a covariance in FEATURE_DIM dimensions says nothing: report n/a.
    enough = len(prompts) >= MIN_FRECHET_IMAGES
    reference = classify(classifier, reference_images(prompts))[1] if classifier is not None and enough else None
    rows: list[dict[str, Any]] = []
    for run in runs:
        cached = not run.setting.is_baseline
        scores = run.scores
        row: dict[str, Any] = {
            "setting": run.setting.label,
            "interval": run.setting.cache_interval,
            "branch": run.setting.cache_branch_id if cached else None,
            "params": run.setting.helper_kwargs() if cached else None,
            "seconds": run.median_seconds,
            "speedup": baseline.median_seconds / run.median_seconds,
            "psnr": float(np.mean(scores.psnr)),
            "ssim": float(np.mean(scores.ssim)),
            "lpips": None if scores.lpips is None else float(np.mean(scores.lpips)),
        }
        if targets is not None and scores.predicted is not None and scores.features is not None:
            predicted = scores.predicted
            row["task_accuracy"] = float((predicted == targets).mean())
            row["attribute_accuracy"] = {
                name: float((predicted[:, k] == targets[:, k]).mean()) for k, name in enumerate(ATTRIBUTE_CLASSES)
            }
            row["all_attributes_accuracy"] = metrics.accuracy(predicted, targets)
            row["frechet"] = metrics.frechet_distance(scores.features, reference) if reference is not None else None
        if scores.clip is not None:
            row["clip_score"] = float(np.mean(scores.clip))
        rows.append(row)
    return rows


COLUMNS: tuple[Column, ...] = (
    Column("setting", "setting"),
    Column("seconds", "seconds", ".2f", align="right"),
    Column("speedup", "speedup", ".2f", align="right"),
    Column("psnr", "PSNR dB", ".2f", align="right"),
    Column("ssim", "SSIM", ".4f", align="right"),
    Column("lpips", "LPIPS", ".4f", align="right"),
    Column("task_accuracy", "task acc", ".3f", align="right"),
    Column("all_attributes_accuracy", "all-attr acc", ".3f", align="right"),
    Column("frechet", "Frechet", ".2f", align="right"),
    Column("clip_score", "CLIP score", ".2f", align="right"),
)


def format_table(rows: Sequence[dict[str, Any]], style: str = "markdown") -> str:
    """The rows as a table; columns without a value in any row are left out."""
    return render_table(COLUMNS, rows, style=style, drop_empty=True)


@dataclasses.dataclass
class EvalResult:
    """Everything ``deepcache eval`` reports; :meth:`to_json` is what ``--json`` writes."""

    rows: list[dict[str, Any]]
    meta: dict[str, Any]
    env: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return json_document("deepcache eval", meta=self.meta, env=self.env, rows=self.rows)

    def header(self) -> str:
        """One line: which model, steps, prompts, guidance, threads, device."""
        m = self.meta
        processes = f", {m['processes']} processes" if m.get("processes", 1) > 1 else ""
        return (f"{model_name(m)}; {m['steps']} {m['scheduler']} steps, {len(m['prompts'])} prompts, guidance "
                f"{m['guidance']}, {m['torch_threads']} CPU thread(s), {m['device']} {m['dtype']}{processes}")


def model_name(meta: dict[str, Any]) -> str:
    """How a header names the model of a :func:`run_meta`."""
    return "embedded demo model (offline)" if meta["embedded"] else meta["model"]


def run_meta(pipe: Any, steps: int, guidance: float, prompts: Sequence[str], seeds: Sequence[int],
             **more: Any) -> dict[str, Any]:
    """What a report says about the run (model, steps, scheduler, prompts, seeds, threads, device, dtype), and ``more``."""
    device, dtype = pipeline_device(pipe)
    return {
        "model": str(getattr(pipe.config, "_name_or_path", "")),
        "embedded": is_demo_pipeline(pipe),
        "steps": steps,
        "guidance": guidance,
        "scheduler": type(pipe.scheduler).__name__,
        "prompts": list(prompts),
        "seeds": list(seeds),
        **more,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
    }


def pipeline_device(pipe: Any) -> tuple[torch.device, torch.dtype]:
    """The device and dtype the pipeline's U-Net runs in."""
    return torch.device(str(getattr(pipe, "device", "cpu"))), pipe.unet.dtype


def evaluate(
    pipe: Any,
    settings: Sequence[Setting],
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    repeats: int = 1,
    classifier_path: Path | None = None,
    clip_name: str | None = None,
    batch_size: int | None = None,
    negative_prompts: Sequence[str | None] | None = None,
    info: ProcessInfo | None = None,
    keep_images: bool = False,
) -> tuple[EvalResult, list[ScoredRun]] | None:
    """Generate with every setting and score it; task metrics need a demo pipeline and its classifier.

    Images are scored as they are made, :data:`EVAL_CHUNK_IMAGES` at a time, and dropped (``keep_images`` keeps
    them in the returned runs), so a large prompt set needs no more memory than a small one. ``info``: this process
    among several (:func:`~DeepCache.tools.distributed.process_info`); each generates and scores its share, and the main
    process returns the result, the others ``None``.

    Example::

        result, runs = evaluate(pipe, [Setting(3, 0)], ["a red circle"] * 16, list(range(16)))
        print(format_table(result.rows))
    """
    from .demo_model.classifier import load_classifier

    info = info or ProcessInfo()
    classifier_path = classifier_path or demo_classifier_path(pipe)
    scorers = Scorers(load_classifier(classifier_path) if classifier_path is not None else None, lpips_model(),
                      clip_model(clip_name) if clip_name else None)
    runs = run_and_score_sharded(pipe, prompts, seeds, settings, info, scorers, steps, guidance, repeats,
                                 batch_size or default_batch_size(pipe), negative_prompts, keep_images)
    if runs is None:
        return None
    rows = summarize(runs, prompts, scorers.classifier)
    meta = run_meta(
        pipe, steps, guidance, prompts, seeds, repeats=repeats,
        lpips="computed" if scorers.lpips_net is not None else "n/a (lpips weights not available locally)",
        clip_score="computed" if scorers.clip is not None
        else f"n/a ({'no --clip-model given' if not clip_name else 'weights not available locally'})",
        processes=info.world_size,
    )
    return EvalResult(rows, meta, environment(*pipeline_device(pipe), pipe)), runs


# -- command line ----------------------------------------------------------------------------
def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    """``--seed``, ``--steps``, ``--guidance``, ``--repeats``: how every setting generates (``eval``, ``demo``, ``tune``)."""
    parser.add_argument("--seed", type=int, default=0, help="first seed; image k uses seed+k (default 0)")
    parser.add_argument("--steps", type=positive_int, default=DEFAULT_STEPS,
                        help=f"denoising steps (default {DEFAULT_STEPS})")
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                        help=f"guidance scale (default {DEFAULT_GUIDANCE})")
    parser.add_argument("--repeats", type=positive_int, default=1,
                        help="timed repeats per setting; the median is reported")


def add_common_arguments(parser: argparse.ArgumentParser, *, default_prompts: int, default_variants: str) -> None:
    """Options shared by ``deepcache eval`` and ``deepcache demo``."""
    add_model_option(parser, "local folder or hub id of an SD/SDXL pipeline (default: the embedded demo model, offline)")
    add_variant_option(parser, default_help=default_variants)
    add_prompt_options(parser, default_count=default_prompts)
    add_generation_arguments(parser)
    add_device_options(parser, default_device="cpu")
    add_threads_option(parser)
    add_json_option(parser)
    add_table_options(parser)


def pipeline_from_args(args: argparse.Namespace, device: torch.device | None = None) -> tuple[Any, list[str]]:
    """The pipeline (``--model``, ``--device`` unless ``device`` is given, ``--dtype``) and its prompts (``--prompt``,
    ``--num-prompts``, ``--seed``)."""
    device = device or resolve_device(args.device)
    pipe = load_pipeline(args.model, device, resolve_dtype(args.dtype, device))
    prompts = choose_prompts(embedded=is_demo_pipeline(pipe), count=args.num_prompts, seed=args.seed, given=args.prompt)
    return pipe, prompts


def evaluate_from_args(args: argparse.Namespace, settings: Sequence[Setting], clip_name: str | None = None,
                       keep_images: bool = False) -> tuple[EvalResult, list[ScoredRun]] | None:
    """Threads, device, pipeline and prompts from the shared options, then :func:`evaluate` (quietly).

    Launched as several processes (``accelerate launch``, ``torchrun``), each generates and scores its share and the
    main process reports everything; the others return ``None``.
    """
    apply_threads(args.threads)
    file = getattr(args, "prompts", None)
    if file is not None and args.prompt:
        raise ValueError("give either --prompts FILE or --prompt, not both.")
    items = seeded_items(read_prompt_file(file), args.seed) if file is not None else None
    info = process_info(args.device)
    with quiet_third_party(not args.verbose):
        pipe, prompts = pipeline_from_args(args, info.device)
        seeds, negatives = prompt_seeds(prompts, args.seed), None
        if items is not None:
            prompts, seeds = [i.prompt for i in items], [int(i.seed) for i in items]  # type: ignore[arg-type]
            negatives = [i.negative_prompt for i in items] if any(i.negative_prompt for i in items) else None
        evaluated = evaluate(pipe, settings, prompts, seeds, args.steps, args.guidance, args.repeats,
                             clip_name=clip_name, negative_prompts=negatives, info=info, keep_images=keep_images)
        if evaluated is not None and negatives is not None:
            evaluated[0].meta["negative_prompts"] = negatives
        return evaluated


def write_report(result: EvalResult, path: Path | None) -> None:
    """``--json``: write the report and say where."""
    if path is not None:
        print(f"wrote {write_json(path, result.to_json())}")


def run(args: argparse.Namespace) -> int:
    settings = setting_grid() if args.grid else list(args.variant or EVAL_SETTINGS)
    evaluated = evaluate_from_args(args, settings, clip_name=args.clip_model)
    if evaluated is None:  # not the main process: it only generated its share
        return 0
    result = evaluated[0]
    print(result.header())
    print(format_table(result.rows, args.table))
    print(f"LPIPS: {result.meta['lpips']}; CLIP score: {result.meta['clip_score']}")
    write_report(result, args.json)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``deepcache eval``."""
    add_common_arguments(parser, default_prompts=64, default_variants="2,0 3,0 3,1 5,0")
    parser.add_argument("--grid", action="store_true", help="evaluate intervals 2-5 x branches 0-2")
    parser.add_argument("--clip-model", help="CLIP weights (local folder or cached hub id) for the CLIP score")
    parser.add_argument("--prompts", type=Path, metavar="FILE",
                        help="read the prompts from a .txt (one a line), .jsonl ({\"prompt\", \"seed\", "
                        "\"negative_prompt\"} a line) or .csv (a 'prompt' column) file; item i uses seed --seed+i unless "
                        "it gives its own; under accelerate launch / torchrun the prompts are shared out")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    """Register ``deepcache eval``."""
    return register(subparsers, "eval", help="quality (PSNR, SSIM, task accuracy, Frechet) and speed of DeepCache "
                    "settings vs no caching", module_doc=__doc__, add_arguments=add_arguments, run=run)
