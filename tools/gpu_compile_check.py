"""Correctness check of compiled DeepCache on a GPU (issue 5): images, graph counts, recompiles.

Full-size model with random weights (nothing downloaded), text encoding skipped. Compares the latents of
eager DeepCache with DeepCache under ``torch.compile(pipe.unet, mode=MODE, fullgraph=True)`` (default
``reduce-overhead``: CUDA graphs), over three calls, and prints one JSON line per fact, so a time-out
still leaves what finished. Run on the GPU machine (see docs/compile.md):

    python3 tools/gpu_compile_check.py --model sd21 --resolution 512 --out $OUT/compile_check_sd21.json

CPU smoke test (tiny model, seconds to minutes):

    python tools/gpu_compile_check.py --model sd15 --tiny --device cpu --backend aot_eager --steps 6 --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from DeepCache import DeepCacheSDHelper  # noqa: E402
from DeepCache.tools.bench.models import build_pipeline, make_inputs  # noqa: E402
from DeepCache.schedules.schedule import format_pattern  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sd21")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--interval", type=int, default=3)
    p.add_argument("--branch", type=int, default=0)
    p.add_argument("--mode", default="reduce-overhead")
    p.add_argument("--device", default="cuda")
    p.add_argument("--backend", default="inductor", help="aot_eager: a fast CPU smoke test of the script itself")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--threads", type=int, help="CPU threads for torch (1 on a busy CPU)")
    p.add_argument("--out")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from torch._dynamo.utils import counters

    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    res = args.resolution // 8 if args.tiny else args.resolution
    built = build_pipeline(args.model, device=device, dtype=dtype, scheduler="ddim", tiny=args.tiny)
    pipe = built.pipe
    inputs = make_inputs(built, batch_size=1, device=device, dtype=dtype)
    facts: dict = {"model": args.model, "resolution": res, "dtype": str(dtype), "mode": args.mode,
                   "steps": args.steps, "interval": args.interval, "branch": args.branch}

    def emit(**kv) -> None:
        facts.update(kv)
        print(json.dumps(kv), flush=True)

    def call() -> torch.Tensor:
        out = pipe(**inputs, height=res, width=res, num_inference_steps=args.steps, guidance_scale=7.5,
                   generator=torch.Generator(device).manual_seed(0), output_type="latent").images
        return out.float().clone()

    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=args.interval, cache_branch_id=args.branch)
    with torch.no_grad():
        baseline = call()
        with helper:
            eager = call()
        emit(eager_pattern=format_pattern(helper.last_steps))
        mode = args.mode if args.backend == "inductor" else None
        pipe.unet = torch.compile(pipe.unet, backend=args.backend, mode=mode, fullgraph=True)
        with helper:
            outs = []
            for i in range(3):
                g0, t0 = counters["stats"]["unique_graphs"], time.perf_counter()
                outs.append(call())
                emit(call=i, seconds=round(time.perf_counter() - t0, 3), graphs=counters["stats"]["unique_graphs"] - g0)
        scale = eager.abs().max().item()
        diffs = [(o - eager).abs().max().item() / scale for o in outs]
        emit(max_rel_diff_vs_eager_deepcache=diffs, deepcache_vs_baseline_rel=(eager - baseline).abs().max().item() / scale,
             finite=all(bool(torch.isfinite(o).all()) for o in outs))
        plain = call()  # after disable: the plain U-Net, compiled once more
        emit(after_disable_rel_diff_vs_eager_baseline=(plain - baseline).abs().max().item() / scale)
    ok = facts["finite"] and max(diffs) < (5e-2 if dtype == torch.float16 else 1e-4)
    ok = ok and facts.get("graphs") == 0  # the third call compiled nothing
    emit(ok=bool(ok))
    if args.out:
        Path(args.out).write_text(json.dumps(facts, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
