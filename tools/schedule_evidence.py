"""Evidence for the quality-aware schedules (issue 11) on the embedded demo model: docs/schedules.md.

For budgets K = ceil(25/N), N = 3, 4, 5, compares against the uncached images (PSNR/SSIM, held-out prompts):
uniform (interval N), non-uniform (interval N, center 8, pow 1.4), calibrated (``helper.calibrate(K)`` on a
separate calibration set) and adaptive (cap 2N, threshold bisected on the calibration set to <= K full steps
on average). Also measures which signal predicts the reuse error best. Offline, CPU, ~2-4 minutes:

    python tools/schedule_evidence.py --out docs/schedules.json --markdown /tmp/schedules.md
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from importlib.resources import files
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from DeepCache import CacheParams, DeepCacheSDHelper, engine  # noqa: E402
from DeepCache.tools.prompts import embedded_prompts  # noqa: E402
from DeepCache.tools.metrics import psnr, ssim  # noqa: E402

STEPS, GUIDANCE = 25, 4.0


def load():
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(files("DeepCache") / "assets" / "demo-model", local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images(pipe, prompts, seeds, helper=None, params=None) -> tuple[np.ndarray, list[int]]:
    """One image per prompt (batch 1: adaptive decisions are per image); and the full steps of each."""
    out, fulls = [], []
    if helper is not None:
        helper.params = params
        helper.enable()
    try:
        with torch.no_grad():
            for prompt, seed in zip(prompts, seeds):
                result = pipe(prompt, num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="np",
                              generator=torch.Generator().manual_seed(seed))
                out.append(result.images[0])
                fulls.append(sum(helper.last_steps) if helper is not None else STEPS)
    finally:
        if helper is not None:
            helper.disable()
    return np.stack(out).astype(np.float64), fulls


def adaptive_threshold(pipe, helper, prompts, seeds, cap: int, budget: int, branch: int) -> float:
    """The smallest threshold (bisection in log space) whose average full steps on ``prompts`` is <= budget."""
    lo, hi = 1e-4, 10.0
    for _ in range(12):
        mid = math.sqrt(lo * hi)
        params = CacheParams(cache_interval=cap, cache_branch_id=branch, skip_mode="adaptive", threshold=mid)
        _, fulls = images(pipe, prompts, seeds, helper, params)
        if np.mean(fulls) <= budget:
            hi = mid
        else:
            lo = mid
    return hi


def signal_study(pipe, prompts, seeds, branch: int) -> dict[str, float]:
    """Which cheap signal predicts the reuse error (relative L1 of the cached feature vs the true one)?"""
    unet = pipe.unet
    layout_modules = engine.unet_modules(unet)
    from DeepCache.engine.unet.layout import Action, retrieval_action, retrieval_plan

    plan = retrieval_plan(engine.unet_layout(unet), branch)
    first = next(m for k, m in layout_modules if retrieval_action(plan, k) is not Action.RUN)
    boundary = engine.boundary_module(unet, branch)
    rows = {"skip": [], "input": [], "error": []}
    for prompt, seed in zip(prompts, seeds):
        rec = {"skip": [], "input": [], "boundary": []}
        hooks = [
            first.register_forward_pre_hook(lambda m, a, kw: rec["skip"].append((a[0] if a else kw["hidden_states"]).clone()), with_kwargs=True),
            unet.register_forward_pre_hook(lambda m, a, kw: rec["input"].append((a[0] if a else kw["sample"]).clone()), with_kwargs=True),
            boundary.register_forward_hook(lambda m, a, o: rec["boundary"].append((o[0] if isinstance(o, tuple) else o).clone())),
        ]
        try:
            with torch.no_grad():
                pipe(prompt, num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="latent",
                     generator=torch.Generator().manual_seed(seed))
        finally:
            for h in hooks:
                h.remove()
        for a in range(STEPS):
            for k in range(a + 1, min(a + 6, STEPS)):
                rows["skip"].append(engine.relative_l1(rec["skip"][k], rec["skip"][a]))
                rows["input"].append(engine.relative_l1(rec["input"][k], rec["input"][a]))
                rows["error"].append(engine.relative_l1(rec["boundary"][k], rec["boundary"][a]))

    def spearman(x, y):
        rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
        return float(np.corrcoef(rx, ry)[0, 1])

    return {
        "spearman_skip_feature": spearman(rows["skip"], rows["error"]),
        "spearman_unet_input": spearman(rows["input"], rows["error"]),
        "pearson_skip_feature": float(np.corrcoef(rows["skip"], rows["error"])[0, 1]),
        "pearson_unet_input": float(np.corrcoef(rows["input"], rows["error"])[0, 1]),
        "pairs": len(rows["error"]),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--branch", type=int, default=0)
    parser.add_argument("--calibration", type=int, default=8, help="calibration prompts")
    parser.add_argument("--held-out", type=int, default=16, help="held-out prompts")
    parser.add_argument("--intervals", default="3,4,5")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    start = time.perf_counter()
    pipe = load()
    prompts = embedded_prompts(args.calibration + args.held_out, seed=0)
    calib, held = prompts[: args.calibration], prompts[args.calibration :]
    calib_seeds = list(range(args.calibration))
    held_seeds = [1000 + i for i in range(args.held_out)]
    helper = DeepCacheSDHelper(pipe=pipe)
    reference, _ = images(pipe, held, held_seeds)
    rows = []
    for n in (int(x) for x in args.intervals.split(",")):
        k = math.ceil(STEPS / n)
        helper.set_params(cache_branch_id=args.branch)
        calibrated = helper.calibrate(
            k, prompt=calib, num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="latent",
            generator=[torch.Generator().manual_seed(s) for s in calib_seeds],
        )
        threshold = adaptive_threshold(pipe, helper, calib, calib_seeds, 2 * n, k, args.branch)
        candidates = {
            "uniform": CacheParams(cache_interval=n, cache_branch_id=args.branch),
            "non-uniform": CacheParams(cache_interval=n, cache_branch_id=args.branch, skip_mode="non-uniform", center=8),
            "calibrated": calibrated,
            "adaptive": CacheParams(cache_interval=2 * n, cache_branch_id=args.branch, skip_mode="adaptive", threshold=threshold),
        }
        for name, params in candidates.items():
            got, fulls = images(pipe, held, held_seeds, helper, params)
            row = {
                "N": n, "K": k, "schedule": name, "full_steps_mean": float(np.mean(fulls)),
                "psnr": float(np.mean(psnr(got, reference))), "ssim": float(np.mean(ssim(got, reference))),
                "params": json.loads(params.to_json()),
            }
            rows.append(row)
            print(json.dumps({k2: v for k2, v in row.items() if k2 != "params"}), flush=True)
    study = signal_study(pipe, calib, calib_seeds, args.branch)
    print(json.dumps(study), flush=True)
    result = {"steps": STEPS, "guidance": GUIDANCE, "branch": args.branch, "rows": rows, "signal_study": study,
              "seconds": time.perf_counter() - start, "torch": torch.__version__}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown:
        lines = ["| N | K | schedule | full steps (mean) | PSNR dB | SSIM |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['N']} | {r['K']} | {r['schedule']} | {r['full_steps_mean']:.2f} | {r['psnr']:.2f} | {r['ssim']:.4f} |" for r in rows]
        args.markdown.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
