"""``deepcache bench``: time DeepCache against the original pipeline on full-size models.

Reproduces the table the diffusers documentation publishes for DeepCache (Stable Diffusion v2.1,
50 DDIM steps, resolutions 512/768/1024 × batch sizes 8/4/1, the original pipeline and DeepCache at
``(I=3, B=0)``, ``(I=5, B=0)``, ``(I=5, B=1)``), with speedups, peak GPU memory, per-step times and
the FLOP-ideal speedup. Built-in models are full size with random weights (timing does not depend
on the weight values, so nothing is downloaded); text encoding is excluded (random prompt
embeddings of the right shape are passed), and what is timed is the pipeline call end to end:
the denoising loop (U-Net or transformer) plus the VAE decode.

This module is the command line; the work is done in :mod:`DeepCache.tools.bench.scenarios` (what runs),
:mod:`DeepCache.tools.bench.models` (building the models), :mod:`DeepCache.tools.bench.timing` (timing),
:mod:`DeepCache.tools.bench.flops` (FLOP counts) and :mod:`DeepCache.tools.bench.results` (results and tables).

Example::

    $ deepcache bench --preset docs-table --device cuda --json results.json --markdown table.md
    $ deepcache bench --preset docs-table --device cpu --tiny --steps 10 --repeats 1
    $ deepcache bench --model sdxl --resolution 1024 --batch-size 1 --variant 3,0 --flops-only
    $ python -m DeepCache.tools.bench ...        # the same as deepcache bench ...

or from Python::

    >>> from DeepCache.tools.bench import BenchConfig, Setting, run_benchmark
    >>> cfg = BenchConfig(model="sd15", resolutions=(512,), batch_sizes=(1,), variants=(Setting(3, 0),),
    ...                   steps=4, scheduler="ddim", repeats=1, warmup_steps=2, tiny=True, device="cpu")
    >>> [s.label for s in cfg.scenarios()]
    ['64x64 b1 original', '64x64 b1 I=3, B=0']
    >>> report = run_benchmark(cfg, progress=False)
    >>> [(r.variant, r.pattern) for r in report.results]
    [('original', 'FFFF'), ('I=3, B=0', 'FrrF')]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

from .flops import flops_report
from .models import BUILTIN_MODELS, SCHEDULERS
from .results import TIMED_TEMPLATE, BenchReport, ScenarioResult
from .tables import markdown_details, markdown_table, render_markdown
from .scenarios import COMPILE_MODES, PRESETS, TINY_RESOLUTION_DIVISOR, BenchConfig, Scenario, preset_config
from .timing import run_benchmark
from ..cli_common import (
    add_device_options,
    add_json_option,
    add_model_option,
    add_threads_option,
    add_variant_option,
    register,
    standalone,
)
from ..report import json_line, write_json
from ..settings import Setting

__all__ = [
    "BenchConfig", "BenchReport", "PRESETS", "Scenario", "ScenarioResult", "Setting", "Variant", "add_parser",
    "config_from_args", "flops_report", "main", "markdown_details", "markdown_table", "preset_config",
    "render_markdown", "run_benchmark",
]

#: Former name of :class:`DeepCache.tools.settings.Setting` (``Variant(3, 0)``, ``Variant.parse("5,1")`` still work).
Variant = Setting

_DESCRIPTION = ("Time DeepCache against the original pipeline, full-size models with random weights (or --model PATH). "
                f"Timed: {TIMED_TEMPLATE.format('U-Net or transformer')}.")


def _split_list(values: Iterable[str] | None) -> list[str]:
    out: list[str] = []
    for v in values or []:
        out.extend(p.strip() for p in str(v).split(",") if p.strip())
    return out


def _parse_resolution(text: str) -> int | tuple[int, int]:
    try:
        if "x" in text.lower():
            h, w = text.lower().split("x")
            return (int(h), int(w))
        return int(text)
    except ValueError:
        raise ValueError(f"malformed resolution {text!r}: use 512 or HEIGHTxWIDTH like 768x512.") from None


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """Merge CLI flags over ``--preset`` over the defaults into a validated :class:`BenchConfig`."""
    values: dict[str, Any] = {}
    if args.model is not None:
        values["model"] = args.model
    if args.resolution:
        values["resolutions"] = tuple(_parse_resolution(x) for x in _split_list(args.resolution))
    if args.batch_size:
        try:
            values["batch_sizes"] = tuple(int(x) for x in _split_list(args.batch_size))
        except ValueError:
            raise ValueError(f"malformed --batch-size {args.batch_size!r}: use integers like 8,4,1.") from None
    if args.variant:
        values["variants"] = tuple(args.variant)
    for key in ("steps", "scheduler", "dtype", "device", "guidance_scale", "repeats", "warmup_steps", "seed", "threads"):
        val = getattr(args, key)
        if val is not None:
            values[key] = val
    return preset_config(args.preset, tiny=bool(args.tiny), compile=args.compile, count_flops=not args.no_flops,
                         **values)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``deepcache bench`` (and ``python -m DeepCache.tools.bench``)."""
    p.add_argument("--preset", choices=sorted(PRESETS), help="docs-table: SD2.1, 50 DDIM steps, 512/768/1024 x 8/4/1, "
                   "variants 3,0 5,0 5,1 (other flags override its values)")
    add_model_option(p, f"{', '.join(BUILTIN_MODELS)} (full size, random weights) or a local pipeline folder / hub id "
                     "(default sd21)")
    p.add_argument("--resolution", action="append", metavar="RES", help="512, or HxW; repeat or comma-separate (default 512)")
    p.add_argument("--batch-size", action="append", metavar="B", help="repeat or comma-separate (default 1)")
    add_variant_option(p, default_help="3,0")
    p.add_argument("--steps", type=int, help="inference steps (default 50)")
    p.add_argument("--scheduler", choices=sorted(SCHEDULERS), help="default: the model's own scheduler")
    add_device_options(p)
    p.add_argument("--guidance-scale", type=float, help="classifier-free guidance scale (default 7.5; > 1 doubles "
                   "the denoiser's batch)")
    p.add_argument("--repeats", type=int, help="timed repeats per scenario, median reported (default 3)")
    p.add_argument("--warmup-steps", type=int, help="steps of the one warm-up call per scenario (default 10; 0 = none)")
    p.add_argument("--seed", type=int, help="seed of the random prompt embeddings and latents (default 0)")
    add_threads_option(p)
    p.add_argument("--tiny", action="store_true", help=f"tiny models of the same structure, resolutions / {TINY_RESOLUTION_DIVISOR} (CI smoke test)")
    p.add_argument("--compile", nargs="?", const="auto", choices=COMPILE_MODES, metavar="MODE",
                   help="also time the compiled denoiser (compiled original and compiled DeepCache columns, compile time "
                   "reported separately); MODE: auto (reduce-overhead on CUDA, default on CPU), "
                   + ", ".join(COMPILE_MODES[1:]))
    p.add_argument("--flops-only", action="store_true", help="count FLOPs and ideal speedups only (meta device; no timing)")
    p.add_argument("--no-flops", action="store_true", help="skip FLOP counting")
    add_json_option(p, "--out")
    p.add_argument("--markdown", type=Path, metavar="PATH", help="write the markdown tables here")
    p.add_argument("--jsonl", action="store_true", help="print each result as a JSON line on stdout as soon as it is done")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def run(args: argparse.Namespace) -> int:
    """Run ``deepcache bench`` from parsed arguments; returns the exit status."""
    cfg = config_from_args(args)

    def emit(res: ScenarioResult) -> None:
        if args.jsonl:
            print(json_line(res), flush=True)

    if args.flops_only:
        report = flops_report(cfg)
        for res in report.results:
            emit(res)
    else:
        report = run_benchmark(cfg, progress=not args.no_progress, on_result=emit)
    text = render_markdown(report)
    print(text, flush=True)
    if args.json:
        write_json(args.json, report.to_json())
    if args.markdown:
        args.markdown.write_text(text, encoding="utf-8")
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``deepcache bench`` on a ``subparsers`` object (see :mod:`DeepCache.tools.cli`)."""
    parser = register(subparsers, "bench", help="time DeepCache vs the original pipeline (full-size models, random "
                      "weights)", module_doc=None, add_arguments=add_arguments, run=run)
    parser.description = _DESCRIPTION
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m DeepCache.tools.bench ...``: the same as ``deepcache bench ...``."""
    return standalone("python -m DeepCache.tools.bench", _DESCRIPTION, add_arguments, run, argv, name="bench")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
