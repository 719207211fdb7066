"""``deepcache eval``: quality and speed of DeepCache settings against the same pipeline uncached.

Same prompts, same seeds, same scheduler; each setting's images are compared with the original's:

* fidelity: PSNR and SSIM (:mod:`DeepCache.tools.metrics`); LPIPS only where the ``lpips`` package and
  its backbone weights are already on disk;
* embedded model: task accuracy (the shipped attribute classifier checks shape, colour, background,
  position and size against the prompt) and the Fréchet distance, in that classifier's feature
  space, to real renders of the same prompts;
* other models: CLIP score where CLIP weights are available locally (``--clip-model``).

Each setting is generated, timed and scored the way every tool does (:mod:`DeepCache.tools.runs`: only the pipeline
call is timed, repeats rotate the order, medians), and summarised in rows by :mod:`DeepCache.tools.quality`.
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
process gathers their scores. Images are scored one batch at a time as they are made, and dropped, so memory does not
grow with the number of prompts or settings and the scores do not depend on the number of processes. A setting's
seconds are the slowest process's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .cli_common import register
from .quality import add_common_arguments, evaluate_from_args, format_table, write_report
from .settings import Setting, setting_grid

#: What ``deepcache eval`` compares when no ``--variant`` is given.
EVAL_SETTINGS: tuple[Setting, ...] = (Setting(2, 0), Setting(3, 0), Setting(3, 1), Setting(5, 0))


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
