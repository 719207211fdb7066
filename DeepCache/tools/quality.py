"""What ``deepcache eval`` and ``deepcache demo`` report: every setting generated, timed and scored against the
original pipeline (:mod:`DeepCache.tools.runs`, :mod:`DeepCache.tools.scoring`), one row per setting.

A row holds the median seconds and the speedup over the original, the mean PSNR, SSIM (and LPIPS) against the
original's images, and for the embedded demo model the task accuracy (its classifier checks shape, colour,
background, position and size against the prompt) and the Fréchet distance, in that classifier's feature space, to
real renders of the same prompts; for other models the CLIP score where CLIP weights are local. Columns without a
value in any row are left out of the printed table.

Example::

    result, runs = evaluate(pipe, [Setting(3, 0)], seeded_items([PromptItem("a red circle")] * 16))
    print(format_table(result.rows))
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import metrics
from .cli_common import (add_device_options, add_generation_arguments, add_json_option, add_model_option,
                         add_prompt_options, add_table_options, add_threads_option, add_variant_option, apply_threads,
                         kind_from_args, quiet_third_party)
from .distributed import ProcessInfo, process_info
from .kinds import PipelineKind, kind_of
from .pipelines import model_name
from .prompts import PromptItem, prompt_seeds, read_prompt_file, seeded_items
from .report import Column, environment, json_document, render_table, write_json
from .runs import DEFAULT_GUIDANCE, DEFAULT_STEPS, RunSpec, SettingRun, run_and_score_sharded
from .scoring import Scorer, classify, prompt_labels, reference_images
from .settings import Setting

__all__ = ["COLUMNS", "EvalResult", "add_common_arguments", "evaluate", "evaluate_from_args", "format_table",
           "summarize", "write_report"]

#: Fewer images than this say nothing about a covariance in the classifier's feature space: Fréchet is n/a.
MIN_FRECHET_IMAGES = 16

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


def summarize(runs: Sequence[SettingRun], prompts: Sequence[str],
              classifier: torch.nn.Module | None = None) -> list[dict[str, Any]]:
    """One row per setting: seconds, speedup, PSNR/SSIM (and LPIPS) vs the original, task metrics, CLIP score
    (means over the images; Fréchet distance of the classifier features to real renders of the prompts)."""
    from .demo_model.data import ATTRIBUTE_CLASSES

    baseline = runs[0]
    if not baseline.setting.is_baseline:
        raise ValueError("the first run must be the original (uncached) pipeline; use run_and_score().")
    targets = prompt_labels(prompts) if classifier is not None else None
    enough = len(prompts) >= MIN_FRECHET_IMAGES
    reference = classify(classifier, reference_images(prompts))[1] if classifier is not None and enough else None
    rows: list[dict[str, Any]] = []
    for run in runs:
        cached = not run.setting.is_baseline
        scores = run.scores
        assert scores is not None  # run_and_score scores every setting
        means = scores.means()
        row: dict[str, Any] = {
            "setting": run.setting.label,
            "interval": run.setting.cache_interval,
            "branch": run.setting.cache_branch_id if cached else None,
            "params": run.setting.helper_kwargs() if cached else None,
            "seconds": run.median_seconds,
            "speedup": baseline.median_seconds / run.median_seconds,
            "psnr": means["psnr"], "ssim": means["ssim"], "lpips": means["lpips"],
        }
        if targets is not None and scores.predicted is not None and scores.features is not None:
            predicted = scores.predicted
            row["task_accuracy"] = float((predicted == targets).mean())
            row["attribute_accuracy"] = {
                name: float((predicted[:, k] == targets[:, k]).mean()) for k, name in enumerate(ATTRIBUTE_CLASSES)
            }
            row["all_attributes_accuracy"] = metrics.accuracy(predicted, targets)
            row["frechet"] = metrics.frechet_distance(scores.features, reference) if reference is not None else None
        if means["clip"] is not None:
            row["clip_score"] = means["clip"]
        rows.append(row)
    return rows


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
        guidance = "true CFG" if "guidance_mode" in m else "guidance"
        return (f"{model_name(m)}; {m['steps']} {m['scheduler']} steps, {len(m['prompts'])} prompts, {guidance} "
                f"{m['guidance']}, {m['torch_threads']} CPU thread(s), {m['device']} {m['dtype']}{processes}"
                + (f"; prompt embeddings: {m['prompt_embeddings']}" if "prompt_embeddings" in m else ""))


def evaluate(pipe: PipelineKind | Any, settings: Sequence[Setting], items: Sequence[PromptItem],
             spec: RunSpec | None = None, *, classifier_path: Path | None = None, clip_name: str | None = None,
             info: ProcessInfo | None = None, keep_images: bool = False) -> tuple[EvalResult, list[SettingRun]] | None:
    """Generate every seeded item with every setting, time it and score it (:func:`~DeepCache.tools.runs.run_and_score`);
    task metrics need a demo pipeline and its classifier.

    ``pipe``: the pipeline's kind (as ``eval`` and ``demo`` load it: :func:`~DeepCache.tools.kinds.load_kind`), or a
    bare pipeline, whose kind is decided here, once. ``items``: the prompts, each with its seed (none: its index) and
    negative prompt. ``spec``: steps, guidance, repeats, batch size (default: 25 steps, guidance 4, one repeat, the
    kind's :attr:`~DeepCache.tools.kinds.PipelineKind.default_batch_size`). ``classifier_path``: the demo classifier
    (default: the kind's). ``info``: this process among several (:func:`~DeepCache.tools.distributed.process_info`);
    each generates and scores its share, and the main process returns the result, the others ``None``.
    ``keep_images`` keeps the images in the returned runs.
    """
    kind = kind_of(pipe)
    items = seeded_items(items)  # an item without a seed of its own gets its index
    info = info or ProcessInfo()
    spec = spec or RunSpec(DEFAULT_STEPS, DEFAULT_GUIDANCE, 1, kind.default_batch_size)
    scorer = Scorer.load(classifier_path or kind.classifier, clip_name)
    runs = run_and_score_sharded(kind, items, settings, scorer, spec, info, keep_images=keep_images)
    if runs is None:
        return None
    prompts, seeds = [i.prompt for i in items], [int(i.seed) for i in items]  # type: ignore[arg-type]
    rows = summarize(runs, prompts, scorer.classifier)
    negatives = [i.negative_prompt for i in items]
    meta = kind.run_meta(
        spec.steps, spec.guidance, prompts, seeds, repeats=spec.repeats, batch_size=spec.batch_size,
        lpips="computed" if scorer.lpips_net is not None else "n/a (lpips weights not available locally)",
        clip_score="computed" if scorer.clip is not None
        else f"n/a ({'no --clip-model given' if not clip_name else 'weights not available locally'})",
        processes=info.world_size, **({"negative_prompts": negatives} if any(negatives) else {}))
    return EvalResult(rows, meta, environment(kind.device, kind.dtype, kind)), runs


def add_common_arguments(parser: argparse.ArgumentParser, *, default_prompts: int, default_variants: str,
                         default_repeats: int = 1) -> None:
    """Options shared by ``deepcache eval`` and ``deepcache demo``."""
    add_model_option(parser, "local folder or hub id of an SD/SDXL or diffusion-transformer pipeline, or embedded-dit "
                     "(the shipped tiny Flux DiT, offline) (default: the embedded demo model, offline)")
    add_variant_option(parser, default_help=default_variants)
    add_prompt_options(parser, default_count=default_prompts)
    add_generation_arguments(parser, default_repeats=default_repeats)
    add_device_options(parser, default_device="cpu")
    add_threads_option(parser)
    add_json_option(parser)
    add_table_options(parser)


def evaluate_from_args(args: argparse.Namespace, settings: Sequence[Setting], clip_name: str | None = None,
                       keep_images: bool = False) -> tuple[EvalResult, list[SettingRun]] | None:
    """Threads, device, pipeline and prompts from the shared options, then :func:`evaluate` (quietly).

    Launched as several processes (``accelerate launch``, ``torchrun``), each generates and scores its share and the
    main process reports everything; the others return ``None``.
    """
    apply_threads(args.threads)
    file = getattr(args, "prompts", None)
    if file is not None and args.prompt:
        raise ValueError("give either --prompts FILE or --prompt, not both.")
    from_file = seeded_items(read_prompt_file(file), args.seed) if file is not None else None
    info = process_info(args.device)
    with quiet_third_party(not args.verbose):
        kind, prompts = kind_from_args(args, info.device)
        items = from_file or [PromptItem(p, s) for p, s in zip(prompts, prompt_seeds(prompts, args.seed))]
        spec = RunSpec(args.steps, args.guidance, args.repeats, kind.default_batch_size)
        return evaluate(kind, settings, items, spec, clip_name=clip_name, info=info, keep_images=keep_images)


def write_report(result: EvalResult, path: Path | None) -> None:
    """``--json``: write the report and say where."""
    if path is not None:
        print(f"wrote {write_json(path, result.to_json())}")
