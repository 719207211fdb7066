"""Measure the tiny Flux DiT demo model beside the U-Net demo model (the numbers in docs/demo.md).

1. Prompt following: the shipped classifier's per-attribute accuracy on ``deepcache eval``'s 64 default
   prompts (seed k for prompt k; held out of the DiT's training, not of the U-Net's), with and without CFG
   (true CFG with ``negative_prompt=""`` for Flux, ``guidance_scale`` for the U-Net), for both models.
2. DeepCache on the DiT: ``cache_interval=1`` must equal the uncached images exactly; PSNR against the uncached
   images for ``cache_interval`` 2, 3 x ``cache_branch_id`` 0, 1, 2 on the first 8 prompts (true CFG 4).

Example (about 3 minutes on a CPU)::

    $ python tools/measure_demo_dit.py --json docs/demo-dit.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from DeepCache import DeepCacheHelper  # noqa: E402
from DeepCache.tools.demo_model import ASSETS, EMBEDDED_CLASSIFIER, EMBEDDED_MODEL  # noqa: E402
from DeepCache.tools.demo_model.classifier import load_classifier  # noqa: E402
from DeepCache.tools.demo_model.data import ATTRIBUTE_CLASSES  # noqa: E402
from DeepCache.tools.demo_model import DIT_CALL_KWARGS as CALL_KWARGS  # noqa: E402
from DeepCache.tools.demo_model import DIT_DIR  # noqa: E402
from DeepCache.tools.metrics import psnr  # noqa: E402
from DeepCache.tools.prompts import embedded_prompts  # noqa: E402
from DeepCache.tools.scoring import classify, prompt_labels  # noqa: E402


def generate(pipe: Any, prompts: list[str], *, flux: bool, cfg: float, steps: int, batch: int = 16) -> np.ndarray:
    """Images (N, 32, 32, 3) in [0, 1]; prompt k uses seed k whatever the batching."""
    out = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        generators = [torch.Generator().manual_seed(start + k) for k in range(len(chunk))]
        if flux:
            guidance = {"negative_prompt": [""] * len(chunk), "true_cfg_scale": cfg} if cfg > 1 else {}
            kwargs = {**CALL_KWARGS, **guidance}
        else:
            kwargs = {"height": 32, "width": 32, "guidance_scale": cfg}
        result = pipe(chunk, num_inference_steps=steps, generator=generators, output_type="np", **kwargs)
        out.append(result.images)
    return np.concatenate(out).astype(np.float64)


def accuracies(classifier: torch.nn.Module, images: np.ndarray, prompts: list[str]) -> dict[str, float]:
    """Per-attribute accuracy, their mean (task acc) and the share of images with all five right."""
    predicted, _ = classify(classifier, images)
    hits = predicted == prompt_labels(prompts)
    row = {name: float(hits[:, i].mean()) for i, name in enumerate(ATTRIBUTE_CLASSES)}
    row["task"] = float(hits.mean())
    row["all"] = float(hits.all(axis=1).mean())
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dit", type=Path, default=ASSETS / DIT_DIR, help="FluxPipeline folder")
    parser.add_argument("--unet", type=Path, default=EMBEDDED_MODEL, help="StableDiffusionPipeline folder")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--cfg", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-unet", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from diffusers import FluxPipeline, StableDiffusionPipeline
    from diffusers.utils import logging

    logging.disable_progress_bar()
    prompts = embedded_prompts(args.num_prompts)
    classifier = load_classifier(EMBEDDED_CLASSIFIER)
    report: dict[str, Any] = {"prompts": len(prompts), "steps": args.steps, "cfg": args.cfg, "accuracy": {}}
    models = [("flux-dit", FluxPipeline, args.dit, True)]
    if not args.skip_unet:
        models.append(("unet", StableDiffusionPipeline, args.unet, False))
    flux_pipe = None
    for name, cls, path, flux in models:
        pipe = cls.from_pretrained(path, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        flux_pipe = pipe if flux else flux_pipe
        for cfg in (args.cfg, 1.0):
            started = time.monotonic()
            images = generate(pipe, prompts, flux=flux, cfg=cfg, steps=args.steps)
            row = accuracies(classifier, images, prompts) | {"seconds": time.monotonic() - started}
            report["accuracy"][f"{name} cfg {cfg:g}"] = row
            print(f"{name:8s} cfg {cfg:3g}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    few = prompts[:8]
    plain = generate(flux_pipe, few, flux=True, cfg=args.cfg, steps=args.steps)
    helper = DeepCacheHelper(pipe=flux_pipe)
    helper.set_params(cache_interval=1, cache_branch_id=0)
    with helper:
        report["interval_1_identical"] = bool(np.array_equal(generate(flux_pipe, few, flux=True, cfg=args.cfg,
                                                                       steps=args.steps), plain))
    print(f"interval 1 identical to uncached: {report['interval_1_identical']}")
    report["psnr"] = {}
    base_acc = accuracies(classifier, plain, few)["task"]
    for interval in (2, 3):
        for branch in (0, 1, 2):
            helper.set_params(cache_interval=interval, cache_branch_id=branch)
            with helper:
                cached = generate(flux_pipe, few, flux=True, cfg=args.cfg, steps=args.steps)
            value = float(np.mean(psnr(cached, plain)))
            acc = accuracies(classifier, cached, few)["task"]
            report["psnr"][f"I={interval}, B={branch}"] = {"psnr": value, "task": acc, "uncached_task": base_acc}
            print(f"I={interval}, B={branch}: PSNR {value:.2f} dB, task acc {acc:.3f} (uncached {base_acc:.3f})")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
