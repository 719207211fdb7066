"""The extra cost of a forecast retrieval step (issue 19) against a reuse one, on the embedded tiny SD U-Net (CPU).

A bare-U-Net generation with full steps 0 and 1 and then only retrieval steps (each forecast from the two), against
the same generation with ``forecast=None``; the two are timed interleaved, evaluation by evaluation, and the medians
compared. Prints one JSON line per (branch, batch) and a markdown table:

    python tools/forecast_overhead.py --repeats 30 --out /tmp/forecast-overhead.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from DeepCache import DeepCacheSDHelper  # noqa: E402
from DeepCache.pipelines import load_pipeline  # noqa: E402

RETRIEVALS = 8  # retrieval evaluations per generation


def generation_times(unet, helper, forecast, xs, ts, text) -> list[float]:
    """Seconds of each retrieval evaluation of one generation (full steps 0 and 1 first).

    The inputs change from step to step as in a 25-step run (a fresh latent, timesteps 40 apart): with nearly
    equal inputs the difference of two full steps' features would be denormal, which is slow on CPUs and not
    what a real run sees."""
    helper.set_params(skip_mode="custom", full_steps=[0, 1], cache_branch_id=helper.params.cache_branch_id,
                      forecast=forecast)
    times = []
    with helper, torch.no_grad():
        helper.reset_states()
        for k in range(2 + RETRIEVALS):
            start = time.perf_counter()
            unet(xs[k], ts[k], encoder_hidden_states=text)
            if k >= 2:
                times.append(time.perf_counter() - start)
        assert helper.last_steps == (True, True) + (False,) * RETRIEVALS
    return times


def measure(unet, branch: int, batch: int, repeats: int) -> dict:
    helper = DeepCacheSDHelper(pipe=unet)
    helper.set_params(cache_branch_id=branch)
    size = unet.config.sample_size
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(batch, unet.config.in_channels, size, size, generator=g) for _ in range(2 + RETRIEVALS)]
    text = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)
    ts = [torch.tensor(980 - 40 * k) for k in range(2 + RETRIEVALS)]
    for forecast in (None, "linear"):  # warm-up
        generation_times(unet, helper, forecast, xs, ts, text)
    samples: dict = {None: [], "linear": []}
    for i in range(repeats):
        order = (None, "linear") if i % 2 == 0 else ("linear", None)
        for forecast in order:
            samples[forecast] += generation_times(unet, helper, forecast, xs, ts, text)
    reuse, linear = statistics.median(samples[None]), statistics.median(samples["linear"])
    return {"branch": branch, "batch": batch, "evaluations": len(samples[None]), "reuse_ms": reuse * 1e3,
            "forecast_ms": linear * 1e3, "overhead_pct": (linear / reuse - 1) * 100}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--branches", default="0,1")
    parser.add_argument("--batches", default="2,8", help="U-Net batch sizes (2 = one prompt with CFG)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    unet = load_pipeline().unet
    rows = []
    for branch in (int(b) for b in args.branches.split(",")):
        for batch in (int(b) for b in args.batches.split(",")):
            rows.append(measure(unet, branch, batch, args.repeats))
            print(json.dumps(rows[-1]), flush=True)
    print("| branch | U-Net batch | reuse retrieval step ms | forecast retrieval step ms | overhead |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['branch']} | {r['batch']} | {r['reuse_ms']:.3f} | {r['forecast_ms']:.3f} | {r['overhead_pct']:+.1f} % |")
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "threads": args.threads, "torch": torch.__version__}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
