"""``deepcache generate``: many images from a prompts file, with DeepCache, resumable, on one or many processes.

Every item of the prompts file (``.txt``, ``.jsonl`` or ``.csv``) becomes ``OUT/<index>.png``, recorded in
``OUT/manifest.jsonl`` once the image is complete; ``OUT/settings.json`` records what decides the pixels. Run the
same command again after an interruption and it finishes the missing items (a re-run with other settings into the
same folder is refused). Under ``accelerate launch`` or ``torchrun`` the work is split across the processes (each on
its own GPU, or the CPU) and the images are the same bytes as one process makes.

Example::

    $ deepcache generate --prompts prompts.txt --out images/
    $ accelerate launch --num_processes 8 -m DeepCache generate --model ./sd-1.5 --prompts coco.csv --out coco/

Item ``i`` uses seed ``--seed + i`` unless it gives its own, drawn on the CPU (``torch.Generator``), so its noise
does not depend on the device, the batch or the process that makes it. Batches are formed over the whole item list
(batch ``j`` is items ``j*B`` to ``j*B+B-1``) and whole batches are dealt to the processes, so batch composition,
and with it every pixel, is the same for any process count; a batch with any unfinished item is run whole again on
resume, and only its unfinished images are written.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .cli_common import (
    Progress,
    add_device_options,
    add_model_option,
    add_threads_option,
    add_variant_option,
    apply_threads,
    positive_int,
    quiet_third_party,
    register,
)
from .distributed import ProcessInfo, barrier, global_batches, process_info, shard
from .image_store import ImageStore, read_records
from .kinds import PipelineKind, default_batch_size, kind_of, load_kind
from .pipelines import resolve_dtype
from .prompts import PROMPT_FILE_FORMATS, PromptItem, read_prompt_file, seeded_items
from .runs import DEFAULT_GUIDANCE, DEFAULT_STEPS
from ..schedules.params import CacheParams
from .settings import Setting, applied

__all__ = ["DEFAULT_SETTING", "STOP_AFTER_VARIABLE", "check_finished", "generate_items", "pending_batches",
           "run_settings_record", "setting_from_args"]

DEFAULT_SETTING = Setting(3, 0)
#: Test hook: a process that has written this many images exits at once (``os._exit``), as if killed.
STOP_AFTER_VARIABLE = "DEEPCACHE_GENERATE_STOP_AFTER"


# -- pure rules ------------------------------------------------------------------------------------------
def pending_batches(num_items: int, batch_size: int, finished: Sequence[int] | set[int]) -> list[list[int]]:
    """The global batches (``range(j*B, j*B+B)``) that hold an unfinished item, each whole, in order.

    >>> pending_batches(7, 3, {0, 1, 2, 4})
    [[3, 4, 5], [6]]
    """
    done = set(finished)
    return [batch for batch in global_batches(num_items, batch_size) if not done.issuperset(batch)]


def check_finished(items: Sequence[PromptItem], finished: Mapping[int, Mapping[str, Any]], folder: Path) -> None:
    """Raise ``ValueError`` if a finished record is not the item the prompts file now has at its index.

    Appending prompts to the file and re-running is fine; changing or removing one is not.
    """
    for index, record in sorted(finished.items()):
        if index >= len(items):
            raise ValueError(f"{folder} holds image {index} but the prompts file has only {len(items)} items; use "
                             "another --out or the prompts file it was made from.")
        item = items[index]
        saved = (record.get("prompt"), record.get("seed"), record.get("negative_prompt"))
        if saved != (item.prompt, item.seed, item.negative_prompt):
            raise ValueError(f"{folder} holds image {index} for prompt {saved[0]!r} (seed {saved[1]}), but the prompts "
                             f"file now gives {item.prompt!r} (seed {item.seed}) there; use another --out or the "
                             "prompts file it was made from.")


def run_settings_record(*, model: str | None, setting: Setting, steps: int, guidance: float, seed: int,
                        height: int | None, width: int | None, batch_size: int, dtype: torch.dtype) -> dict[str, Any]:
    """What ``settings.json`` records: everything that decides the pixels (threads and device do not go in, though
    on a CPU a different thread count may change the last bits).

    >>> record = run_settings_record(model=None, setting=Setting(3, 0), steps=25, guidance=4.0, seed=0, height=None,
    ...                              width=None, batch_size=16, dtype=torch.float32)
    >>> record["model"], record["setting"], record["dtype"]
    ('embedded demo model', 'I=3, B=0', 'float32')
    """
    if model is None:
        model_name = "embedded demo model"
    else:
        local = Path(model).expanduser()
        model_name = str(local.resolve()) if local.exists() else model
    return {"format": "deepcache.generate/1", "model": model_name, "setting": setting.label,
            "params": setting.helper_kwargs(), "steps": steps, "guidance_scale": guidance, "seed": seed,
            "height": height, "width": width, "batch_size": batch_size, "dtype": str(dtype).replace("torch.", "")}


def setting_from_args(variant: Setting | None, params: str | None) -> Setting:
    """``--variant`` or ``--params`` (a ``CacheParams.to_json()`` file, or a variant string), else the default."""
    if variant is not None and params is not None:
        raise ValueError("give either --variant or --params, not both.")
    if params is None:
        return variant or DEFAULT_SETTING
    path = Path(params).expanduser()
    if path.is_file():
        return Setting.of(CacheParams.from_json(path.read_text(encoding="utf-8")))
    if path.suffix.lower() == ".json":
        raise FileNotFoundError(f"no parameters file at {path} (--params takes a CacheParams.to_json() file).")
    return Setting.parse(params)


# -- generation ------------------------------------------------------------------------------------------
def generate_items(pipe: Any, items: Sequence[PromptItem], setting: Setting, *, steps: int, guidance: float,
                   height: int | None = None, width: int | None = None) -> list[Any]:
    """One PIL image per seeded item, in one pipeline call; each item's noise comes from its own CPU generator.
    ``pipe``: a pipeline or its kind (:mod:`DeepCache.tools.kinds`)."""
    from ..helper import DeepCacheSDHelper

    kind = kind_of(pipe)
    with applied(DeepCacheSDHelper(pipe=kind.pipe), setting, steps), torch.no_grad():
        images = kind.call([item.prompt for item in items], [int(item.seed) for item in items],  # type: ignore[arg-type]
                           steps=steps, guidance=guidance, negative_prompts=[item.negative_prompt for item in items],
                           output_type="pil", height=height, width=width)
    return list(images)


def _stop_after() -> int | None:
    value = os.environ.get(STOP_AFTER_VARIABLE)
    return int(value) if value else None


def _count_finished(store: ImageStore, pending: set[int]) -> int:
    """How many of ``pending`` any process has recorded (in the parts: the merged manifest is written at the end)."""
    return len(pending.intersection(r["index"] for path in store.manifest_files()[1:] for r in read_records(path)))


def run_job(args: argparse.Namespace, info: ProcessInfo) -> int:
    """Plan, check, generate this process's share, merge; returns the exit status."""
    setting = setting_from_args(args.variant, args.params)
    items = seeded_items(read_prompt_file(args.prompts), args.seed)
    dtype = resolve_dtype(args.dtype, info.device)
    batch_size = args.batch_size or default_batch_size(args.model)
    wanted = run_settings_record(model=args.model, setting=setting, steps=args.steps, guidance=args.guidance,
                                 seed=args.seed, height=args.height, width=args.width, batch_size=batch_size,
                                 dtype=dtype)
    store = ImageStore(args.out, len(items), info.rank, info.world_size)
    # Every process reads the same files before anyone writes (barrier below), so they all plan the same batches
    # and raise the same errors; nothing is written before the pipeline has loaded.
    started = store.check_settings(wanted)
    finished = store.finished()
    check_finished(items, finished, store.folder)
    batches = pending_batches(len(items), batch_size, set(finished))
    pending = {i for batch in batches for i in batch if i not in finished}
    mine = shard(batches, info.rank, info.world_size)
    with quiet_third_party(not args.verbose):
        pipe = load_kind(args.model, info.device, dtype)
        if info.is_main:
            embeddings = pipe.describe().get("prompt_embeddings")
            print(f"deepcache generate: {len(items)} items, {len(finished)} already in {store.folder}, {len(pending)} "
                  f"to make in {len(batches)} batches of up to {batch_size} on {info.world_size} process(es); "
                  f"{setting.label}, {args.steps} steps" + (f"; prompt embeddings: {embeddings}" if embeddings else ""),
                  flush=True)
        barrier(info)
        if info.is_main and not started:
            store.write_settings(wanted)
        store.start(finished)
        elapsed = _generate(args, info, pipe, store, items, mine, set(finished), pending, setting)
    if info.is_main:
        done = store.merge()
        rate = f", {len(pending) / elapsed:.2f} images/s" if pending and elapsed > 0 else ""
        print(f"deepcache generate: {len(pending)} new image(s) in {elapsed:.1f} s{rate}; {len(done)} of {len(items)} "
              f"in {store.folder / 'manifest.jsonl'}", flush=True)
        if len(done) < len(items):
            raise ValueError(f"{len(items) - len(done)} item(s) are missing from {store.folder} after the run; run "
                             "the command again.")
    return 0


def _generate(args: argparse.Namespace, info: ProcessInfo, pipe: PipelineKind, store: ImageStore, items: Sequence[PromptItem],
              mine: Sequence[Sequence[int]], finished: set[int], pending: set[int], setting: Setting) -> float:
    """Make and save this process's batches; wait for every process; the seconds from here to the last one's end."""
    bar = Progress(len(pending), info.is_main and not args.no_progress, desc="deepcache generate", unit="image")
    stop_after, written = _stop_after(), 0
    start = counted = time.perf_counter()
    for batch in mine:
        batch_start = time.perf_counter()
        images = generate_items(pipe, [items[i] for i in batch], setting, steps=args.steps, guidance=args.guidance,
                                height=args.height, width=args.width)
        seconds = (time.perf_counter() - batch_start) / len(batch)
        for index, image in zip(batch, images):
            if index in finished:
                continue  # made by an earlier run (its batch is run whole so that every pixel is the same)
            item = items[index]
            store.save(index, image, {"prompt": item.prompt, "seed": item.seed, "negative_prompt": item.negative_prompt,
                                      "setting": setting.label, "seconds": round(seconds, 4)})
            written += 1
            if stop_after is not None and written >= stop_after:
                os._exit(75)  # test hook: as if killed here
        if info.is_main and not info.distributed:
            bar.update_to(written)
        elif info.is_main and time.perf_counter() - counted >= 1.0:  # what every process finished, once a second
            bar.update_to(_count_finished(store, pending))
            counted = time.perf_counter()
    barrier(info)
    bar.update_to(len(pending))
    bar.close()
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> int:
    apply_threads(args.threads)
    info = process_info(args.device)
    return run_job(args, info)


#: The end of ``deepcache generate --help``.
EPILOG = (
    "Run the same command again to resume: finished images are kept, missing or partial ones are made; other "
    "settings into the same --out are refused. Many processes (each on cuda:<local rank>, or the CPU), same images "
    "as one process: `accelerate launch --num_processes N -m DeepCache generate ...` or `torchrun --nproc_per_node N "
    "-m DeepCache generate ...`; multi-node with accelerate's --num_machines/--machine_rank/--main_process_ip and "
    "--out on a shared filesystem. CPU only: `CUDA_VISIBLE_DEVICES= accelerate launch --multi_gpu --num_processes N "
    "--num_machines 1 --mixed_precision no --dynamo_backend no -m DeepCache generate ... --threads 1` "
    "(`accelerate launch --cpu` starts one process)."
)


# -- command line ----------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``deepcache generate``."""
    formats = "; ".join(f"{k}: {v}" for k, v in PROMPT_FILE_FORMATS.items())
    parser.add_argument("--prompts", type=Path, required=True, metavar="FILE", help=f"the prompts: {formats}")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="output folder: <index>.png, manifest.jsonl, settings.json; re-run to resume")
    add_model_option(parser, "local diffusers SD/SDXL or diffusion-transformer pipeline folder, or embedded-dit (the "
                     "shipped tiny Flux DiT, offline) (default: the embedded demo model, offline)")
    add_variant_option(parser, default_help=DEFAULT_SETTING.label.replace("I=", "").replace(" B=", ""),
                       repeatable=False)
    parser.add_argument("--params", metavar="JSON", help="DeepCache parameters saved by CacheParams.to_json() (e.g. "
                        "by deepcache tune), or a --variant string")
    parser.add_argument("--steps", type=positive_int, default=DEFAULT_STEPS,
                        help=f"denoising steps (default {DEFAULT_STEPS})")
    parser.add_argument("--guidance-scale", "--guidance", dest="guidance", type=float, default=DEFAULT_GUIDANCE,
                        help=f"classifier-free guidance scale (default {DEFAULT_GUIDANCE})")
    parser.add_argument("--seed", type=int, default=0,
                        help="item i uses seed SEED+i unless the prompts file gives its own (default 0)")
    parser.add_argument("--batch-size", type=positive_int,
                        help="images per pipeline call (default 16 on the embedded model, 1 otherwise); recorded, "
                        "since batching may change the last bits of a CPU result")
    parser.add_argument("--height", type=positive_int, help="image height (default: the model's)")
    parser.add_argument("--width", type=positive_int, help="image width (default: the model's)")
    add_device_options(parser)
    add_threads_option(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument("--verbose", action="store_true",
                        help="also show the warnings and loading bars of diffusers and transformers")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    """Register ``deepcache generate``."""
    return register(subparsers, "generate", help="many images from a prompts file, resumable, on one or many "
                    "processes (accelerate launch / torchrun)", module_doc=__doc__, add_arguments=add_arguments,
                    run=run, epilog=EPILOG)
