"""``deepcache demo``: DeepCache on the embedded tiny Stable Diffusion pipeline (or, with ``--model embedded-dit``,
the embedded tiny Flux DiT), offline, in seconds.

Generates a few prompts with the original pipeline and with DeepCache (I=3/B=0, I=5/B=0, I=3/B=1
by default), prints seconds, speedup and quality against the original (PSNR, SSIM, and for the
embedded model the share of prompt attributes the shipped classifier finds in the image), and
saves a side-by-side PNG: one row per setting, one column per prompt. The prompts are the first
ones ``deepcache eval`` uses; third-party warnings and loading bars are held back (``--verbose``
shows them).

Example::

    $ deepcache demo                       # writes ./deepcache-demo.png
    $ deepcache demo --out grid.png --variant 3,0 --variant 4,2
    $ deepcache demo --model embedded-dit  # the shipped tiny Flux DiT (true CFG), offline
    $ deepcache demo --model ./stable-diffusion-v1-5 --steps 25   # any local or hub SD/SDXL pipeline
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import numpy as np

from .cli_common import add_out_option, register
from .quality import add_common_arguments, evaluate_from_args, format_table, write_report
from .runs import SettingRun
from .settings import Setting

DEMO_SETTINGS: tuple[Setting, ...] = (Setting(3, 0), Setting(5, 0), Setting(3, 1))
DEMO_PROMPTS = 6
#: Timed repeats of the demo: three, so that one noisy call on a busy machine does not decide a speedup.
DEMO_REPEATS = 3


def _short_prompt(prompt: str) -> tuple[str, ...]:
    """Three short caption lines for a grid column, e.g. ('small yellow', 'triangle on black', 'bottom right')."""
    from .demo_model.data import parse_caption

    try:
        attrs = parse_caption(prompt)
    except ValueError:
        return prompt[:16], prompt[16:32], prompt[32:48]
    return f"{attrs.size} {attrs.colour}", f"{attrs.shape} on {attrs.background}", attrs.position


def compose_grid(
    runs: Sequence[SettingRun], rows: Sequence[dict[str, Any]], prompts: Sequence[str], cell: int = 96
) -> Any:
    """A PIL image: a header with the prompts, then one labelled row of images per setting."""
    from PIL import Image, ImageDraw

    label_width, header, pad = 150, 44, 4
    columns = len(prompts)
    grid = Image.new("RGB", (label_width + columns * (cell + pad), header + len(runs) * (cell + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for col, prompt in enumerate(prompts):
        x = label_width + col * (cell + pad)
        for line, text in enumerate(_short_prompt(prompt)):
            draw.text((x, 2 + 13 * line), text[: cell // 5], fill="black")
    for index, (run, row) in enumerate(zip(runs, rows)):
        y = header + index * (cell + pad)
        draw.text((4, y + 4), run.setting.label, fill="black")
        draw.text((4, y + 20), f"{row['seconds']:.2f} s  x{row['speedup']:.2f}", fill="black")
        if not run.setting.is_baseline:
            draw.text((4, y + 36), f"PSNR {row['psnr']:.1f} dB", fill="black")
            draw.text((4, y + 52), f"SSIM {row['ssim']:.3f}", fill="black")
        if "task_accuracy" in row:
            draw.text((4, y + 68), f"task acc {row['task_accuracy']:.2f}", fill="black")
        for col, image in enumerate(run.images if run.images is not None else ()):
            tile = Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8))
            resample = Image.Resampling.NEAREST if tile.width <= cell else Image.Resampling.LANCZOS
            grid.paste(tile.resize((cell, cell), resample), (label_width + col * (cell + pad), y))
    return grid


def run(args: argparse.Namespace) -> int:
    evaluated = evaluate_from_args(args, list(args.variant or DEMO_SETTINGS), keep_images=True)
    if evaluated is None:  # not the main process of a launched run
        return 0
    result, runs = evaluated
    print(f"DeepCache demo: {result.header()}")
    prompts, seeds = result.meta["prompts"], result.meta["seeds"]
    for k, prompt in enumerate(prompts):
        print(f"  [{k}] seed {seeds[k]}: {prompt}")
    print(format_table(result.rows, args.table))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    compose_grid(runs, result.rows, prompts).save(args.out)
    print(f"saved side-by-side images to {args.out}")
    write_report(result, args.json)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``deepcache demo``."""
    add_common_arguments(parser, default_prompts=DEMO_PROMPTS, default_variants="3,0 5,0 3,1",
                         default_repeats=DEMO_REPEATS)
    add_out_option(parser, default="deepcache-demo.png",
                   help="where to save the side-by-side PNG (default ./deepcache-demo.png)")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    """Register ``deepcache demo``."""
    return register(subparsers, "demo", help="run the embedded tiny SD pipeline with and without DeepCache; print "
                    "a table, save a PNG", module_doc=__doc__, add_arguments=add_arguments, run=run)
