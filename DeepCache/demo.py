"""``deepcache demo``: DeepCache on the embedded tiny Stable Diffusion pipeline, offline, in seconds.

Generates a few prompts with the uncached pipeline and with DeepCache (I=3/B=0, I=5/B=0, I=3/B=1
by default), prints seconds, speedup and quality against the baseline (PSNR, SSIM, and for the
embedded model the share of prompt attributes the shipped classifier finds in the image), and
saves a side-by-side PNG: one row per setting, one column per prompt.

Example::

    $ deepcache demo                       # writes ./deepcache-demo.png
    $ deepcache demo --out grid.png --variant 3,0 --variant 4,2
    $ deepcache demo --model ./stable-diffusion-v1-5 --steps 25   # any local or hub SD/SDXL pipeline
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .evaluate import (
    GENERIC_PROMPTS,
    Generation,
    Setting,
    add_common_arguments,
    apply_threads,
    evaluate,
    format_table,
    is_embedded,
    load_pipeline,
)

DEMO_SETTINGS: tuple[Setting, ...] = (Setting(3, 0), Setting(5, 0), Setting(3, 1))
DEMO_PROMPTS: tuple[str, ...] = (
    "a large red circle on a blue background, top left",
    "a small yellow triangle on a black background, bottom right",
    "a large white square on a green background, top right",
    "a small blue circle on a yellow background, bottom left",
    "a large green triangle on a white background, bottom left",
    "a small black square on a red background, top right",
)


def _short_prompt(prompt: str) -> tuple[str, ...]:
    """Three short caption lines for a grid column, e.g. ('small yellow', 'triangle on black', 'bottom right')."""
    from .demo_model.data import parse_caption

    try:
        attrs = parse_caption(prompt)
    except ValueError:
        return prompt[:16], prompt[16:32], prompt[32:48]
    return f"{attrs.size} {attrs.colour}", f"{attrs.shape} on {attrs.background}", attrs.position


def compose_grid(
    generations: Sequence[Generation], rows: Sequence[dict[str, Any]], prompts: Sequence[str], cell: int = 96
) -> Any:
    """A PIL image: a header with the prompts, then one labelled row of images per setting."""
    from PIL import Image, ImageDraw

    label_width, header, pad = 150, 44, 4
    columns = len(prompts)
    grid = Image.new("RGB", (label_width + columns * (cell + pad), header + len(generations) * (cell + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for col, prompt in enumerate(prompts):
        x = label_width + col * (cell + pad)
        for line, text in enumerate(_short_prompt(prompt)):
            draw.text((x, 2 + 13 * line), text[: cell // 5], fill="black")
    for index, (gen, row) in enumerate(zip(generations, rows)):
        y = header + index * (cell + pad)
        draw.text((4, y + 4), gen.setting.label, fill="black")
        draw.text((4, y + 20), f"{row['seconds']:.2f} s  x{row['speedup']:.2f}", fill="black")
        if not gen.setting.is_baseline:
            draw.text((4, y + 36), f"PSNR {row['psnr']:.1f} dB", fill="black")
            draw.text((4, y + 52), f"SSIM {row['ssim']:.3f}", fill="black")
        if "task_accuracy" in row:
            draw.text((4, y + 68), f"task acc {row['task_accuracy']:.2f}", fill="black")
        for col, image in enumerate(gen.images):
            tile = Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8))
            resample = Image.Resampling.NEAREST if tile.width <= cell else Image.Resampling.LANCZOS
            grid.paste(tile.resize((cell, cell), resample), (label_width + col * (cell + pad), y))
    return grid


def main(args: argparse.Namespace) -> int:
    settings = list(args.variant) if args.variant else list(DEMO_SETTINGS)
    apply_threads(args)
    pipe = load_pipeline(args.model, args.device)
    if args.prompt:
        prompts = list(args.prompt)
    elif is_embedded(pipe):
        prompts = list(DEMO_PROMPTS[: args.num_prompts])
    else:
        prompts = list(GENERIC_PROMPTS[: args.num_prompts])
    seeds = [args.seed + k for k in range(len(prompts))]
    result, generations = evaluate(pipe, settings, prompts, seeds, args.steps, args.guidance, args.repeats)
    where = "embedded demo model (offline)" if result.meta["embedded"] else result.meta["model"]
    print(
        f"DeepCache demo: {where}; {args.steps} {result.meta['scheduler']} steps, {len(prompts)} prompts, "
        f"guidance {args.guidance}, {result.meta['torch_threads']} CPU threads"
    )
    for k, prompt in enumerate(prompts):
        print(f"  [{k}] seed {seeds[k]}: {prompt}")
    print(format_table(result.rows))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    compose_grid(generations, result.rows, prompts).save(out)
    print(f"saved side-by-side images to {out}")
    if args.json:
        args.json.write_text(result.to_json())
        print(f"wrote {args.json}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``deepcache demo``."""
    parser = subparsers.add_parser(
        "demo",
        help="run the embedded tiny SD pipeline with and without DeepCache; print a table, save a PNG",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    add_common_arguments(parser, default_prompts=len(DEMO_PROMPTS))
    parser.add_argument(
        "--out", default="deepcache-demo.png", help="where to save the side-by-side PNG (default ./deepcache-demo.png)"
    )
    parser.set_defaults(func=main, repeats=3)
