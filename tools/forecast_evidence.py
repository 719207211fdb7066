"""Evidence for the calibrated forecast (issues 19, 25) on the embedded demo model: docs/schedules.md.

For budgets K = ceil(25/N), N = 2..8, at one branch and for each of several disjoint prompt sets: PSNR/SSIM of
held-out prompts against their uncached images for uniform reuse (interval N), calibrated reuse
(``helper.calibrate(K)``: the DP's steps, or the evenly spread ones where the guard of
:mod:`DeepCache.schedules.reuse_guard` chose them; to judge the guard, also the DP's own steps, "DP reuse
(unguarded)", and the evenly spread ones) and calibrated forecast (``helper.calibrate(K, forecast=True)``, the
held-out choice of :mod:`DeepCache.schedules.forecast_heldout`), all calibrated on one recording of the set's
calibration prompts (measured once, solved for every K, as ``deepcache tune`` does). Also the cost of each
calibration stage. Offline, CPU:

    python tools/forecast_evidence.py --branch 0 --prompt-seeds 1,2,3 --threads 1 --out docs/forecast-b0-sets.json

The prompt sets are disjoint: set ``i`` is the first ``calibration + held-out`` captions of
``embedded_prompts(720, seed=seeds[i])`` not in an earlier set (calibration first). ``--only SEED`` runs one set
of the list (the same prompts as in the full run; run sets in parallel, then ``--merge`` their JSON files). With
``--replay-cache DIR`` the replay's measurements are kept in (or loaded from) ``DIR/b{branch}-s{seed}.pkl``, so a
rerun after a change to the choice costs only the closed-loop runs and the held-out images.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from DeepCache.schedules import closed_loop  # noqa: E402
from DeepCache.schedules import forecast_calibration as fc
from DeepCache.schedules import forecast_heldout as fh
from DeepCache.schedules.reuse_guard import EVEN, guard  # noqa: E402
from DeepCache.tools.metrics import psnr, ssim  # noqa: E402
from DeepCache.tools.prompts import embedded_prompts  # noqa: E402
from schedule_evidence import GUIDANCE, STEPS, images, load  # noqa: E402

SCHEDULES = ("uniform", "calibrated reuse", "calibrated forecast")


def disjoint_sets(seeds: list[int], count: int) -> list[list[str]]:
    """``count`` prompts per seed, no prompt in two sets (a later seed skips the earlier sets' prompts)."""
    used: set[str] = set()
    sets = []
    for seed in seeds:
        got = [p for p in embedded_prompts(720, seed=seed) if p not in used][:count]
        used.update(got)
        sets.append(got)
    return sets


def run_set(pipe, seed: int, prompts: list[str], args) -> dict:
    calib, held = prompts[: args.calibration], prompts[args.calibration :]
    held_seeds = [1000 + i for i in range(len(held))]
    helper = DeepCacheSDHelper(pipe=pipe)
    reference, _ = images(pipe, held, held_seeds)
    call = dict(prompt=calib, num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="latent",
                generator=[torch.Generator().manual_seed(s) for s in range(len(calib))])
    rows, costs, scored = [], {}, {}
    cache = args.replay_cache / f"b{args.branch}-s{seed}.pkl" if args.replay_cache else None
    t = time.perf_counter()
    with closed_loop.recorded(pipe, pipe.unet, call) as (rec, final, rewind):
        costs["record_s"] = time.perf_counter() - t
        t = time.perf_counter()
        if cache and cache.exists():
            measured = pickle.loads(cache.read_bytes())
        else:
            measured = fc.forecast_errors(pipe.unet, rec, args.branch, max_gap=args.max_gap, max_span=args.max_span,
                                          samples=len(calib))
            if cache:
                cache.parent.mkdir(parents=True, exist_ok=True)
                cache.write_bytes(pickle.dumps(measured))
        costs["replay_s"], costs["replay_evaluations"] = time.perf_counter() - t, measured.evaluations
        print(json.dumps({"seed": seed, **costs}), flush=True)
        for n in (int(x) for x in args.intervals.split(",")):
            k = math.ceil(STEPS / n)
            if (k, "choice") not in scored:
                t = time.perf_counter()
                runs: dict = {}  # shared by the guard and the ladder, as in calibrate(K, forecast=True)
                guarded = guard(pipe, pipe.unet, measured, k, final, rewind, call, runs)
                scored[k, "guard"] = dict(
                    guard=guarded.option, guard_reason=guarded.reason, guard_runs=guarded.runs,
                    guard_s=time.perf_counter() - t, dp_steps=list(guarded.dp_steps),
                    even_steps=list(guarded.even_steps or ()),
                    guard_gains_db=None if guarded.gains is None else guarded.gains.tolist())
                t = time.perf_counter()
                choice = fh.choose(pipe, pipe.unet, measured, k, final, rewind, call,
                                   steps=guarded.params.full_steps if guarded.switched else None, scores=runs)
                scored[k, "choice"] = dict(
                    option=choice.option, closed_loop_runs=choice.runs, choose_s=time.perf_counter() - t,
                    verdicts={name: v.reason for name, v in choice.verdicts.items()},
                    held_out_gains_db={name: g.tolist() for name, g in choice.gains.items()})
                scored[k, "params"] = {"calibrated reuse": guarded.params, "calibrated forecast": choice.params,
                                       "DP reuse (unguarded)": measured.reuse_params(k),
                                       "evenly spread": dataclasses.replace(measured.reuse_params(k),
                                                                            full_steps=guarded.even_steps)}
            for name in SCHEDULES + ("evenly spread", "DP reuse (unguarded)"):
                key = (n if name == "uniform" else k, name)
                switched = scored[k, "guard"]["guard"] == EVEN
                same = {"DP reuse (unguarded)": None if switched else "calibrated reuse",
                        "evenly spread": "calibrated reuse" if switched else None}.get(name)
                if key not in scored and same and (k, same) in scored:  # the same schedule: not run twice
                    scored[key] = scored[k, same]
                if key not in scored:
                    params = CacheParams(cache_interval=n, cache_branch_id=args.branch) if name == "uniform" \
                        else scored[k, "params"][name]
                    got, fulls = images(pipe, held, held_seeds, helper, params)
                    per = psnr(got, reference)
                    scored[key] = {"full_steps_mean": float(np.mean(fulls)), "psnr": float(np.mean(per)),
                                   "psnr_per_prompt": per.tolist(), "ssim": float(np.mean(ssim(got, reference))),
                                   "params": json.loads(params.to_json())}
                row = {"seed": seed, "N": n, "K": k, "schedule": name, **scored[key]}
                if name == "calibrated forecast":
                    row.update(scored[k, "choice"])
                if name == "calibrated reuse":
                    row.update(scored[k, "guard"])
                rows.append(row)
                print(json.dumps({key2: v for key2, v in row.items() if key2 not in (
                    "params", "psnr_per_prompt", "held_out_gains_db", "guard_gains_db")}), flush=True)
    return {"seed": seed, "calibration": calib, "held_out": held, "costs": costs, "rows": rows}


def summary(sets: list[dict]) -> list[str]:
    """A markdown table: per set and N, uniform / reuse / forecast PSNR and forecast - reuse (mean, and the spread:
    the standard deviation over the held-out prompts of the per-prompt difference)."""
    lines = ["| seed | N | K | uniform | calibrated reuse | calibrated forecast | forecast − reuse (± sd over prompts) "
             "| kept | reuse steps (guard) | DP steps (unguarded) | evenly spread |",
             "|---|---|---|---:|---:|---:|---:|---|---|---:|---:|"]
    for s in sets:
        by = {(r["N"], r["schedule"]): r for r in s["rows"]}
        for n in sorted({r["N"] for r in s["rows"]}):
            u, r, f = (by[n, name] for name in SCHEDULES)
            d = np.asarray(f["psnr_per_prompt"]) - np.asarray(r["psnr_per_prompt"])
            dp = by.get((n, "DP reuse (unguarded)"), r)
            even = by.get((n, "evenly spread"))
            lines.append(f"| {s['seed']} | {n} | {r['K']} | {u['psnr']:.2f} | {r['psnr']:.2f} | {f['psnr']:.2f} | "
                         f"{d.mean():+.2f} ± {d.std(ddof=1):.2f} | {f['option']} | {r.get('guard', 'DP')} | "
                         f"{dp['psnr']:.2f} | {'-' if even is None else format(even['psnr'], '.2f')} |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--branch", type=int, default=0)
    parser.add_argument("--calibration", type=int, default=8, help="calibration prompts per set")
    parser.add_argument("--held-out", type=int, default=8, help="held-out prompts per set")
    parser.add_argument("--prompt-seeds", default="1,2,3", help="one disjoint prompt set per seed")
    parser.add_argument("--only", type=int, help="run only the set of this seed (of --prompt-seeds)")
    parser.add_argument("--intervals", default="2,3,4,5,6,7,8")
    parser.add_argument("--max-gap", type=int, default=fc.MAX_GAP)
    parser.add_argument("--max-span", type=int, default=fc.MAX_SPAN)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--replay-cache", type=Path, help="folder of the replays' measurements (loaded if there)")
    parser.add_argument("--merge", type=Path, nargs="*", help="merge these JSON results (their sets) into --out")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.merge:
        parts = [json.loads(p.read_text()) for p in args.merge]
        result = {**parts[0], "sets": [s for p in parts for s in p["sets"]], "seconds": sum(p["seconds"] for p in parts)}
    else:
        torch.set_num_threads(args.threads)
        seeds = [int(x) for x in args.prompt_seeds.split(",")]
        pipe = load()
        sets = [run_set(pipe, seed, prompts, args)
                for seed, prompts in zip(seeds, disjoint_sets(seeds, args.calibration + args.held_out))
                if args.only is None or seed == args.only]
        result = {"steps": STEPS, "guidance": GUIDANCE, "branch": args.branch, "max_gap": args.max_gap,
                  "max_span": args.max_span, "prompt_seeds": seeds, "calibration": args.calibration,
                  "held_out": args.held_out, "sets": sets, "seconds": time.perf_counter() - start,
                  "threads": args.threads, "torch": torch.__version__}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    table = "\n".join(summary(result["sets"])) + "\n"
    print(table)
    if args.markdown:
        args.markdown.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
