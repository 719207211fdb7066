"""Head-to-head on the shipped tiny Flux DiT: DeepCache vs diffusers' cache hooks vs cache-dit vs fewer steps.

Every setting generates the same (prompt, seed) pairs as the uncached 28-step pipeline, one image per call (so
threshold methods decide per image), with true CFG (``true_cfg_scale`` with an empty negative prompt: separate
cond/uncond transformer calls) or without. Per setting: the transformer MACs each generation really ran (hooks,
:mod:`dit_h2h_core`; both CFG branches and warm-up steps included), PSNR/SSIM against the uncached image of the same
pair, task accuracy and Fréchet distance from the shipped classifier. Then wall time per image (eager, and with
``--compile``: ours ``torch.compile(fullgraph=True)``, peers ``fullgraph=False``) on a few pairs, as ratios to the
uncached pipeline timed in the same run. cache-dit is optional: without it its rows say "not installed".

Examples::

    $ python tools/dit_head_to_head.py --num-prompts 16 --cfg-modes on --json /tmp/on.json
    $ python tools/dit_head_to_head.py --merge /tmp/on.json /tmp/off.json --json docs/dit-head-to-head.json \\
          --plot docs/dit-pareto.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from DeepCache.tools.metrics import psnr  # noqa: E402
from dit_h2h_core import MacCounter, count_table, generate, generate_batch, image_metrics, mac_summary, quiet  # noqa: E402
from dit_h2h_methods import Context, Method, catalogue, uncached  # noqa: E402
from dit_h2h_report import (BUDGETS, best_per_family, budget_table, equal_mac_table, failures, goal_table,  # noqa: E402
                            pareto_plot, timing_table)

DEMO_FLUX = Path(__file__).resolve().parents[1] / "DeepCache" / "assets" / "demo-flux"


def load_pipe(path: Path) -> Any:
    from diffusers import FluxPipeline
    from diffusers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    pipe = FluxPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def status_of(error: BaseException) -> str:
    missing = isinstance(error, ModuleNotFoundError) and (error.name or "").startswith("cache_dit")
    return "not installed" if missing else "failed"


def run_method(pipe: Any, method: Method, ctx: Context, items: Sequence[tuple[str, int]], counter: MacCounter,
               batch: int = 1) -> tuple[dict[str, Any], np.ndarray | None, list[int]]:
    """Enable, generate every pair, disable. The row, the images (None on failure) and the MACs per image."""
    row: dict[str, Any] = {"family": method.family, "label": method.label, "cfg": ctx.cfg,
                           "steps": method.steps or ctx.steps}
    images, macs, seconds = [], [], []
    counter.take()
    handle, enabled = None, False
    try:
        with quiet():
            handle = method.enable(pipe, ctx)
            enabled = True
            row["calibration_macs"] = counter.take()[0]
            # a threshold method decides per call for the whole batch: one image per call; others in batches
            size = 1 if method.threshold else batch
            for start in range(0, len(items), size):
                chunk = items[start:start + size]
                batch_images, used, wall = generate_batch(pipe, chunk, steps=method.steps or ctx.steps, cfg=ctx.cfg,
                                                          counter=counter)
                images += list(batch_images)
                macs += [used // len(chunk)] * len(chunk)
                seconds.append(wall / len(chunk))
    except Exception as error:  # a peer failing is a result: record it with its message
        row |= {"status": status_of(error), "error": f"{type(error).__name__}: {error}"[:400]}
        return row, None, []
    finally:
        if enabled:
            with quiet():
                method.disable(pipe, handle)
    row |= {"status": "ok", "batch": 1 if method.threshold else batch}
    return row, np.stack(images), macs


def evaluate_mode(pipe: Any, methods: Sequence[Method], ctx: Context, items: Sequence[tuple[str, int]],
                  classifier: Any, log: Any = print, batch: int = 1, save: Any = None) -> dict[str, Any]:
    """All methods at one guidance setting; the uncached run (first, one image per call) is the reference. Methods
    that do not decide per image run ``batch`` images per call. ``save(out)`` after each method."""
    table = count_table(pipe)
    prompts = [p for p, _ in items]
    out: dict[str, Any] = {"cfg": ctx.cfg, "per_call_macs": table.per_call, "block_macs": list(table.blocks),
                           "rows": []}
    with MacCounter(pipe.transformer, table) as counter:
        reference, ref_macs = None, 0
        for method in methods:
            started = time.monotonic()
            row, images, macs = run_method(pipe, method, ctx, items, counter, 1 if reference is None else batch)
            if images is not None:
                if reference is None:
                    reference, ref_macs = images, macs[0]
                    out["uncached_macs"] = ref_macs
                row |= image_metrics(images, reference, prompts, classifier) | mac_summary(macs, ref_macs)
                row["macs"] = macs
                if min(macs) >= ref_macs and method.steps is None and method.family != "uncached":
                    row["status"] = "no skipping"
            row["run_seconds"] = time.monotonic() - started
            out["rows"].append(row)
            log(_line(row))
            if save is not None:
                save(out)
        leak, _, _ = generate(pipe, *items[0], steps=ctx.steps, cfg=ctx.cfg)
        out["uncached_again_identical"] = bool(np.array_equal(leak, reference[0]))
        if batch > 1:  # batching changes the float rounding only: the batched uncached images against the reference
            _, batched, _ = run_method(pipe, uncached(), ctx, items, counter, batch)
            out["batched_uncached_psnr_min"] = float(np.min(np.minimum(psnr(batched, reference), 200.0)))
    return out


def _line(row: dict[str, Any]) -> str:
    head = f"cfg {row['cfg']:g} | {row['family']}: {row['label']} | {row['status']}"
    if "psnr" not in row:
        return f"{head} | {row.get('error', '')}"
    return (f"{head} | MACs {row['mac_fraction']:.3f} ({row['mac_min']:.3f}-{row['mac_max']:.3f}) | "
            f"PSNR {row['psnr']:.2f} | SSIM {row['ssim']:.4f} | acc {row.get('task_acc', float('nan')):.3f} | "
            f"{row['run_seconds']:.0f}s")


def time_methods(pipe: Any, methods: Sequence[Method], ctx: Context, items: Sequence[tuple[str, int]], *,
                 compiled: bool, rounds: int = 2) -> dict[str, Any]:
    """Median seconds per image of each method (after one warm-up image), rounds rotating the order; ratios to
    the uncached pipeline of the same run. ``compiled``: each method's transformer is ``torch.compile``d."""
    original = pipe.transformer
    times: dict[str, list[float]] = {m.name: [] for m in methods}
    errors: dict[str, str] = {}
    for r in range(rounds):
        for method in methods[r % len(methods):] + methods[:r % len(methods)]:
            if method.name in errors:
                continue
            handle, enabled = None, False
            try:
                with quiet():
                    handle = method.enable(pipe, ctx)
                    enabled = True
                    if compiled:
                        torch._dynamo.reset()
                        pipe.transformer = torch.compile(original, fullgraph=method.fullgraph)
                    generate(pipe, *items[0], steps=method.steps or ctx.steps, cfg=ctx.cfg)  # warm-up
                    for prompt, seed in items:
                        times[method.name].append(generate(pipe, prompt, seed, steps=method.steps or ctx.steps,
                                                           cfg=ctx.cfg)[2])
            except Exception as error:
                errors[method.name] = f"{type(error).__name__}: {error}"[:400]
            finally:
                pipe.transformer = original
                if enabled:
                    with quiet():
                        method.disable(pipe, handle)
    base = float(np.median(times[methods[0].name])) if times[methods[0].name] else float("nan")
    return {name: ({"seconds": float(np.median(v)), "ratio": float(np.median(v)) / base} if v else
                   {"error": errors.get(name, "not timed")}) for name, v in times.items()}


def _timing_methods(methods: Sequence[Method], rows: Sequence[dict[str, Any]], budget: float) -> list[Method]:
    """Uncached, then per family its best setting at ``budget`` (as in the tables)."""
    chosen = {row["family"] + ": " + row["label"] for row in best_per_family(rows, budget).values()}
    return [uncached()] + [m for m in methods if m.name in chosen]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEMO_FLUX, help="FluxPipeline folder (default: the demo DiT)")
    parser.add_argument("--num-prompts", type=int, default=64, help="evaluation prompts (deepcache eval's, held out)")
    parser.add_argument("--first-prompt", type=int, default=0,
                        help="skip this many of eval's prompts (e.g. 16 --num-prompts 48: prompts that did not choose "
                             "the settings in an earlier run on the first 16)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per prompt")
    parser.add_argument("--calibration-prompts", type=int, default=8, help="disjoint prompts for calibrations")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--cfg", type=float, default=4.0, help="true_cfg_scale when CFG is on")
    parser.add_argument("--cfg-modes", default="on,off", help="comma list of on/off")
    parser.add_argument("--timing-pairs", type=int, default=3, help="pairs timed per method (0: no timing)")
    parser.add_argument("--compile", action="store_true", help="also time compiled transformers")
    parser.add_argument("--timing-from", type=Path, help="no quality run: time the per-family best settings at 33 %% "
                        "MACs of this earlier report (its rows are copied)")
    parser.add_argument("--quick", action="store_true", help="a few methods only (the test's subset)")
    parser.add_argument("--only", help="comma list: run only methods whose 'family: label' starts with one of these, "
                        "in this order (uncached always, first)")
    parser.add_argument("--timing-only", action="store_true", help="no quality run: time every (--only) method")
    parser.add_argument("--no-classifier", action="store_true", help="skip task accuracy / Fréchet")
    parser.add_argument("--batch", type=int, default=16, help="images per call for methods that do not decide per image")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--merge", type=Path, nargs="+", help="combine these JSON results instead of running")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path, help="Pareto plot PNG (MAC fraction vs PSNR)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")
    if args.merge:
        report = merge([json.loads(p.read_text()) for p in args.merge])
    else:
        report = run(args)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    print("\n".join(line for mode in report["modes"] for line in failures(mode)))
    for mode in report["modes"]:
        print(budget_table(mode, BUDGETS) + "\n\n" + timing_table(mode) + "\n\n" + equal_mac_table(mode) + "\n")
    print(goal_table(report["modes"]))
    if args.plot:
        pareto_plot(report["modes"]).save(args.plot)
    return 0


def merge(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Reports of runs split by guidance and by method: one mode per guidance, rows in order, one row per setting (a
    later ok row, a rerun, replaces the earlier row of the same setting in place, keeping a failure's error under
    ``replaces``); each run's timings kept apart under ``timing_runs`` (their ratios are to that run's own uncached
    pipeline)."""
    modes: dict[float, dict[str, Any]] = {}
    for part in parts:
        for mode in part["modes"]:
            timing = {k: mode.pop(k) for k in ("timing_eager", "timing_compiled") if k in mode}
            merged = modes.setdefault(mode["cfg"], {**mode, "rows": [], "timing_runs": []})
            # an earlier merged report brings its timing runs along
            merged["timing_runs"] += [t for t in mode.get("timing_runs", []) if t not in merged["timing_runs"]]
            index = {(r["family"], r["label"]): i for i, r in enumerate(merged["rows"])}
            for row in mode["rows"]:
                key = (row["family"], row["label"])
                if key not in index:
                    merged["rows"].append(row)
                elif row.get("status") == "ok":
                    earlier = merged["rows"][index[key]]
                    failed = {"replaces": earlier.get("error")} if earlier.get("status") != "ok" else {}
                    merged["rows"][index[key]] = {**row, **failed}
            if timing:
                merged["timing_runs"].append(timing)
    return {**parts[0], "modes": sorted(modes.values(), key=lambda m: -m["cfg"])}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from DeepCache.tools.prompts import calibration_prompts, embedded_prompts

    pipe = load_pipe(args.model)
    prompts = embedded_prompts(args.first_prompt + args.num_prompts)[args.first_prompt:]
    calibration = calibration_prompts(embedded=True, count=args.calibration_prompts,
                                      exclude=embedded_prompts(max(64, args.first_prompt + args.num_prompts)))
    items = [(p, 1000 * s + k) for s in range(args.seeds) for k, p in enumerate(prompts, start=args.first_prompt)]
    classifier = None
    if not args.no_classifier:
        from DeepCache.tools.demo_model import EMBEDDED_CLASSIFIER
        from DeepCache.tools.demo_model.classifier import load_classifier

        classifier = load_classifier(EMBEDDED_CLASSIFIER)
    report: dict[str, Any] = {"model": str(args.model), "prompts": len(prompts), "first_prompt": args.first_prompt,
                              "seeds": args.seeds, "steps": args.steps, "calibration_prompts": calibration,
                              "torch": torch.__version__, "modes": []}
    table = count_table(pipe)
    methods = catalogue(table, args.steps, quick=args.quick)
    if args.only:
        wanted = tuple(args.only.split(","))
        order = {m.name: next((i for i, w in enumerate(wanted) if m.name.startswith(w)), -1) for m in methods}
        methods = sorted((m for m in methods if m.family == "uncached" or order[m.name] >= 0), key=lambda m: order[m.name])

    def save(partial: dict[str, Any]) -> None:
        if args.json:
            args.json.write_text(json.dumps({**report, "modes": report["modes"] + [partial]}, indent=1) + "\n")

    earlier = {m["cfg"]: m for m in json.loads(args.timing_from.read_text())["modes"]} if args.timing_from else {}
    for mode in args.cfg_modes.split(","):
        ctx = Context(args.steps, args.cfg if mode == "on" else 1.0, calibration)
        if args.timing_only:
            result = {"cfg": ctx.cfg, "rows": []}
        elif args.timing_from:
            result = {key: value for key, value in earlier[ctx.cfg].items() if not key.startswith("timing")}
        else:
            result = evaluate_mode(pipe, methods, ctx, items, classifier, batch=args.batch, save=save)
        if args.timing_pairs:
            chosen = methods if args.timing_only else _timing_methods(methods, result["rows"], 1 / 3)
            timed = items[:args.timing_pairs]
            result["timing_eager"] = time_methods(pipe, chosen, ctx, timed, compiled=False)
            if args.compile:
                result["timing_compiled"] = time_methods(pipe, chosen, ctx, timed, compiled=True, rounds=1)
        report["modes"].append(result)
    return report


if __name__ == "__main__":
    sys.exit(main())
