"""Eager overhead of the engine: the tiny CPU SD pipeline, cached (I=3, B=0), this checkout vs another, in one run.

Two worker processes, one per checkout (each imports its own ``DeepCache``), are asked in turn to time one cached
pipeline call; the order alternates every round, after a warm-up. Prints the median seconds per call of each and
the ratio new/old (< 1: the new code is faster)::

    python tools/engine_overhead.py                 # this checkout vs `git archive main`
    python tools/engine_overhead.py --old-ref HEAD~3 --rounds 40 --steps 20
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(steps: int) -> None:
    import torch

    torch.set_num_threads(1)
    sys.path.append(str(ROOT))  # tests.tiny: the same tiny pipeline for both checkouts
    from tests.tiny import prompt_kwargs, tiny_sd_pipe

    from DeepCache import DeepCacheSDHelper

    pipe = tiny_sd_pipe()
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, cache_branch_id=0)
    helper.enable()
    kwargs = prompt_kwargs()
    print("ready", flush=True)
    for _ in sys.stdin:
        start = time.perf_counter()
        pipe(num_inference_steps=steps, output_type="latent", generator=torch.Generator().manual_seed(0), **kwargs)
        print(time.perf_counter() - start, flush=True)


def _checkout(ref: str, into: Path) -> Path:
    data = subprocess.run(["git", "-C", str(ROOT), "archive", ref], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return into


def _start(code_root: Path, steps: int) -> subprocess.Popen:
    env = {"PYTHONPATH": str(code_root), "PATH": "/usr/bin:/bin", "DEEPCACHE_NAN_PLACEHOLDERS": "0"}
    import os

    env = {**os.environ, **env}
    proc = subprocess.Popen(
        [sys.executable, __file__, "--worker", "--steps", str(steps)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=code_root,
    )
    line = proc.stdout.readline().strip()
    if line != "ready":
        raise RuntimeError(f"the worker for {code_root} did not start (said {line!r})")
    return proc


def _time(proc: subprocess.Popen) -> float:
    proc.stdin.write("run\n")
    proc.stdin.flush()
    return float(proc.stdout.readline())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old-ref", default="main", help="git ref of the old code (default: main)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.steps)
        return
    with tempfile.TemporaryDirectory() as tmp:
        old = _start(_checkout(args.old_ref, Path(tmp)), args.steps)
        new = _start(ROOT, args.steps)
        times: dict[str, list[float]] = {"old": [], "new": []}
        for r in range(args.warmup + args.rounds):
            order = [("old", old), ("new", new)] if r % 2 == 0 else [("new", new), ("old", old)]
            for name, proc in order:
                seconds = _time(proc)
                if r >= args.warmup:
                    times[name].append(seconds)
        for proc in (old, new):
            proc.stdin.close()
            proc.wait(timeout=60)
    med = {name: statistics.median(values) for name, values in times.items()}
    print(f"tiny SD, CPU, 1 thread, cached I=3/B=0, {args.steps} steps, {args.rounds} interleaved rounds after {args.warmup} warm-up")
    print(f"old ({args.old_ref}): median {med['old'] * 1e3:.1f} ms/call")
    print(f"new (this checkout): median {med['new'] * 1e3:.1f} ms/call")
    print(f"ratio new/old: {med['new'] / med['old']:.3f}")


if __name__ == "__main__":
    main()
