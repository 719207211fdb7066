"""How much can a linear forecast gain at all, for a given budget? An upper bound on the embedded demo model.

Issue 19 asks calibrated forecast to beat calibrated reuse by >= 1 dB at N = 5 and 6 (K = 5 full steps of 25). The
calibration (``DeepCache/schedules/forecast_calibration.py``) kept reuse there. This script asks whether *any* weights of the
forecast ``F_a + w*(k-a)*(F_a - F_a')/(a - a')`` on the calibrated reuse full steps would have done better: one
weight per segment between full steps (K - 1 free weights; the first segment has a single full step and reuses),
chosen by coordinate descent in closed loop (each trial runs the pipeline, the same noise, and scores its final
latents against the uncached ones, as the calibration's closed-loop check does), ``--sweeps`` passes over the
segments, every weight of ``--grid`` tried per segment. Fitted twice:

- on the calibration prompts (what a calibration with a closed loop over all the weights could find), and
- on the held-out prompts themselves (cheating on purpose: the best these weights can do on the evaluation set).

Both are then scored like ``tools/forecast_evidence.py`` (PSNR of the held-out images against their uncached
images). Offline, CPU, ~10-20 min per budget on a 2-core machine:

    python tools/forecast_headroom.py --num-full 5 --out docs/forecast-headroom.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from DeepCache import CacheParams, DeepCacheSDHelper  # noqa: E402
from DeepCache.schedules import closed_loop  # noqa: E402
from DeepCache.schedules.calibration import reuse_errors  # noqa: E402
from DeepCache.schedules.schedule import optimal_full_steps  # noqa: E402
from DeepCache.tools.metrics import psnr  # noqa: E402
from DeepCache.tools.prompts import embedded_prompts  # noqa: E402
from schedule_evidence import GUIDANCE, STEPS, images, load  # noqa: E402

GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)


def segment_params(steps: Sequence[int], segment_weights: Sequence[float], branch: int, n: int = STEPS) -> CacheParams:
    """Full steps ``steps`` with weight ``segment_weights[i]`` on every retrieval step after ``steps[i]``."""
    weights = [0.0] * n
    for i, a in enumerate(steps):
        end = steps[i + 1] if i + 1 < len(steps) else n
        for k in range(a + 1, end):
            weights[k] = float(segment_weights[i])
    return CacheParams(skip_mode="custom", full_steps=tuple(steps), cache_branch_id=branch, forecast="linear",
                       forecast_weights=tuple(weights), forecast_weight=0.0)


def descend(score: Callable[[CacheParams], float], steps: Sequence[int], branch: int, grid: Sequence[float],
            sweeps: int) -> tuple[list[float], float, float, int]:
    """Coordinate descent over the segment weights (segment 0 stays 0): weights, reuse score, best score, trials."""
    weights = [0.0] * len(steps)
    base = best = score(segment_params(steps, weights, branch))
    trials = 1
    for _ in range(sweeps):
        for i in range(1, len(steps)):
            for w in grid:
                if w == weights[i]:
                    continue
                trial = weights[:i] + [w] + weights[i + 1 :]
                got = score(segment_params(steps, trial, branch))
                trials += 1
                if got < best - 1e-4:
                    best, weights = got, trial
    return weights, base, best, trials


def latent_call(prompts: list[str], seeds: list[int]) -> dict:
    return dict(prompt=prompts, num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="latent",
                generator=[torch.Generator().manual_seed(s) for s in seeds])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--branch", type=int, default=0)
    parser.add_argument("--num-full", type=int, default=5, help="full steps K of the 25")
    parser.add_argument("--steps", help="full steps to use (comma-separated) instead of the calibrated reuse ones")
    parser.add_argument("--calibration", type=int, default=8, help="calibration prompts")
    parser.add_argument("--held-out", type=int, default=16, help="held-out prompts")
    parser.add_argument("--grid", default=",".join(map(str, GRID)), help="weights tried per segment")
    parser.add_argument("--sweeps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    grid = [float(x) for x in args.grid.split(",")]
    pipe = load()
    prompts = embedded_prompts(args.calibration + args.held_out, seed=0)  # the sets of tools/forecast_evidence.py
    calib, held = prompts[: args.calibration], prompts[args.calibration :]
    calib_seeds, held_seeds = list(range(args.calibration)), [1000 + i for i in range(args.held_out)]
    helper = DeepCacheSDHelper(pipe=pipe)
    reference, _ = images(pipe, held, held_seeds)

    def held_out_psnr(params: CacheParams) -> float:
        got, _ = images(pipe, held, held_seeds, helper, params)
        helper.disable()
        return float(np.mean(psnr(got, reference)))

    fits = {}
    for name, (fit_prompts, fit_seeds) in {"calibration": (calib, calib_seeds), "held-out": (held, held_seeds)}.items():
        call = latent_call(fit_prompts, fit_seeds)
        with closed_loop.recorded(pipe, pipe.unet, call) as (rec, final, rewind):
            if args.steps:
                steps = tuple(int(x) for x in args.steps.split(","))
            elif name == "calibration":  # the calibrated reuse steps, as helper.calibrate(K) chooses them
                steps = optimal_full_steps(reuse_errors(pipe.unet, rec, args.branch), args.num_full)
            # (the held-out fit, second, keeps those steps: only the weights are fitted on the evaluation set)

            def score(params: CacheParams) -> float:
                return closed_loop.closed_loop_errors(pipe, pipe.unet, [params], final, rewind, call)[0]

            weights, base, best, trials = descend(score, steps, args.branch, grid, args.sweeps)
        fits[name] = {"segment_weights": weights, "latent_log10_mse_reuse": base, "latent_log10_mse_forecast": best,
                      "trials": trials}
        print(json.dumps({"fit_on": name, "steps": steps, **fits[name]}), flush=True)
    rows = [{"schedule": "calibrated reuse", "psnr": held_out_psnr(segment_params(steps, [0.0] * len(steps), args.branch))}]
    for name, fit in fits.items():
        params = segment_params(steps, fit["segment_weights"], args.branch)
        rows.append({"schedule": f"forecast, weights fitted on the {name} prompts", "psnr": held_out_psnr(params),
                     "segment_weights": fit["segment_weights"]})
    for row in rows:
        row["delta_db"] = row["psnr"] - rows[0]["psnr"]
        print(json.dumps(row), flush=True)
    result = {"steps": STEPS, "guidance": GUIDANCE, "branch": args.branch, "num_full": args.num_full,
              "full_steps": list(steps), "grid": grid, "sweeps": args.sweeps, "fits": fits, "rows": rows,
              "seconds": time.perf_counter() - start, "torch": torch.__version__}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
