"""Evidence for the calibrated forecast (issue 19) on the embedded demo model: docs/schedules.md.

For budgets K = ceil(25/N), N = 2..8, at one branch: PSNR/SSIM of held-out prompts against their uncached images for
uniform reuse (interval N), calibrated reuse (``helper.calibrate(K)``) and calibrated forecast
(``helper.calibrate(K, forecast=True)``), all calibrated on one recording of a separate calibration set (measured
once, solved for every K, as ``deepcache tune`` does). Also the cost of each calibration stage. Offline, CPU:

    python tools/forecast_evidence.py --branch 0 --out docs/forecast-b0.json --markdown /tmp/forecast-b0.md

With ``--replay-cache FILE`` the replay's measurements are kept in (or loaded from) FILE, so a rerun after a change
to the choice costs only the closed-loop runs and the held-out images.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from DeepCache import CacheParams, DeepCacheSDHelper  # noqa: E402
from DeepCache import forecast_calibration as fc  # noqa: E402
from DeepCache.tools.metrics import psnr, ssim  # noqa: E402
from DeepCache.tools.prompts import embedded_prompts  # noqa: E402
from schedule_evidence import GUIDANCE, STEPS, images, load  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--branch", type=int, default=0)
    parser.add_argument("--calibration", type=int, default=8, help="calibration prompts")
    parser.add_argument("--held-out", type=int, default=16, help="held-out prompts")
    parser.add_argument("--intervals", default="2,3,4,5,6,7,8")
    parser.add_argument("--max-gap", type=int, default=fc.MAX_GAP)
    parser.add_argument("--max-span", type=int, default=fc.MAX_SPAN)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--replay-cache", type=Path,
                        help="pickle of the replay's measurements: loaded if it exists (same prompts, branch and bounds), "
                             "else written")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    pipe = load()
    prompts = embedded_prompts(args.calibration + args.held_out, seed=0)  # the sets of tools/schedule_evidence.py
    calib, held = prompts[: args.calibration], prompts[args.calibration :]
    held_seeds = [1000 + i for i in range(args.held_out)]
    helper = DeepCacheSDHelper(pipe=pipe)
    reference, _ = images(pipe, held, held_seeds)
    call = dict(prompt=calib, num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="latent",
                generator=[torch.Generator().manual_seed(s) for s in range(args.calibration)])
    rows, costs = [], {}
    t = time.perf_counter()
    with fc.recorded(pipe, pipe.unet, call) as (rec, final, rewind):
        costs["record_s"] = time.perf_counter() - t
        t = time.perf_counter()
        if args.replay_cache and args.replay_cache.exists():
            measured = pickle.loads(args.replay_cache.read_bytes())
        else:
            measured = fc.forecast_errors(pipe.unet, rec, args.branch, max_gap=args.max_gap, max_span=args.max_span)
            if args.replay_cache:
                args.replay_cache.write_bytes(pickle.dumps(measured))
        costs["replay_s"], costs["replay_evaluations"] = time.perf_counter() - t, measured.evaluations
        print(json.dumps(costs), flush=True)
        scored: dict = {}  # (K, schedule) -> the row's measurements: budgets shared by two N are run once
        for n in (int(x) for x in args.intervals.split(",")):
            k = math.ceil(STEPS / n)
            if (k, "calibrated forecast") not in scored:
                t = time.perf_counter()
                chosen, candidates, scores = fc.choose(pipe, pipe.unet, measured, k, final, rewind, call)
                scored[k, "choice"] = dict(closed_loop_scores=scores, chosen=candidates.index(chosen)
                                           if chosen in candidates else "refined", choose_s=time.perf_counter() - t)
            schedules = {
                "uniform": CacheParams(cache_interval=n, cache_branch_id=args.branch),
                "calibrated reuse": None,
                "calibrated forecast": None,
            }
            for name in schedules:
                if (k, name) not in scored:
                    params = schedules[name] or {"calibrated reuse": candidates[0], "calibrated forecast": chosen}[name]
                    got, fulls = images(pipe, held, held_seeds, helper, params)
                    result = {"full_steps_mean": float(np.mean(fulls)), "psnr": float(np.mean(psnr(got, reference))),
                              "ssim": float(np.mean(ssim(got, reference))), "params": json.loads(params.to_json())}
                    if name == "uniform":
                        rows.append({"N": n, "K": k, "schedule": name, **result})
                        print(json.dumps({key: v for key, v in rows[-1].items() if key != "params"}), flush=True)
                        continue
                    scored[k, name] = result
                row = {"N": n, "K": k, "schedule": name, **scored[k, name]}
                if name == "calibrated forecast":
                    row.update(scored[k, "choice"])
                rows.append(row)
                print(json.dumps({key: v for key, v in row.items() if key != "params"}), flush=True)
    result = {"steps": STEPS, "guidance": GUIDANCE, "branch": args.branch, "max_gap": args.max_gap,
              "max_span": args.max_span, "candidates": list(measured.candidates), "caps": list(fc.COEFFICIENT_CAPS),
              "costs": costs, "rows": rows, "seconds": time.perf_counter() - start, "torch": torch.__version__}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown:
        lines = ["| N | K | schedule | PSNR dB | SSIM |", "|---|---|---|---|---|"]
        lines += [f"| {r['N']} | {r['K']} | {r['schedule']} | {r['psnr']:.2f} | {r['ssim']:.4f} |" for r in rows]
        args.markdown.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
