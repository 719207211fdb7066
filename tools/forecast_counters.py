"""The extra cost of a forecast retrieval step (issue 19) against a reuse one, counted rather than timed.

Companion to ``tools/forecast_overhead.py`` (wall-clock medians, which a shared machine moves by up to 10 %). Same
set-up: the embedded tiny SD U-Net on the CPU, one thread, a bare-U-Net generation with full steps 0 and 1 and then
only retrieval steps (each forecast from the two, weight 1), against the same generation with ``forecast=None``;
the inputs change from step to step as in a 25-step run. Each retrieval evaluation is measured on its own, so
start-up and full steps never enter a number:

* **instructions** -- user-space instructions executed (valgrind's callgrind, ``Ir``), which do not depend on what
  else the machine runs. Hardware counters (``perf stat -e instructions:u,cycles:u``) would be the fast way, but
  on a virtual machine without a PMU (this project's CPU machine: "PMU not available due to virtualization") they
  read ``<not supported>``; callgrind counts in software instead. Each evaluation runs inside a C callback
  (glibc's ``twalk`` calls back into Python through ctypes) and callgrind collects only inside it
  (``--collect-atstart=no --toggle-collect=trecurse``) and writes one profile per evaluation
  (``--dump-after=trecurse``), so the count is the evaluation's alone. With ``--cache-sim`` callgrind also
  simulates the caches and the table adds its *modelled* cycles (``Ir + 10 x L1 misses + 100 x LL misses``,
  kcachegrind's estimate; a model, not a measured cycle count).
* **page faults** -- the process's minor + major faults during the evaluation (``getrusage``: the kernel counters
  that ``perf stat -e page-faults`` reads), native run.
* **CPU time** and **wall time** -- the process's CPU time (what ``perf stat -e task-clock`` counts, less
  disturbed by other work than the wall clock) and ``perf_counter``, native run, variants interleaved generation
  by generation; medians, and the overhead's range over ``--blocks`` consecutive blocks of generations (its
  spread on this machine).

It also counts the pieces the forecast adds (item ``components`` of the JSON), on the live feature of a
generation: ``prepare`` of a retrieval step (weight, :func:`~DeepCache.schedules.forecast.coefficient`, the 0-d ``fill_``),
``handout`` (the ``addcmul``) against reuse's, and the bare ``torch.addcmul`` / ``fill_``.

Run (about an hour on this project's shared 2-core machine: under valgrind torch's import alone takes minutes and
an evaluation about 100 times as long as natively)::

    python tools/forecast_counters.py --cache-sim --out /tmp/forecast-counters.json

``--skip-callgrind`` runs the native part only (a minute). The script starts itself as the worker twice
(``--worker native``; ``--worker callgrind`` under valgrind) and prints a markdown table and the JSON.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from DeepCache import DeepCacheSDHelper  # noqa: E402
from DeepCache.engine.tensors import input_key  # noqa: E402

VARIANTS = (None, "linear")
NAMES = {None: "reuse", "linear": "forecast"}
MARKER = "trecurse"  # glibc's twalk calls its callback from trecurse (twalk itself tail-calls it)
COMPONENT_CALLS = 50  # calls per measured component (its count is divided by this)
COMPONENT_REPEATS = 3  # measurements per component (the median is reported: a garbage collection may fall in one)


# -- the marked region ------------------------------------------------------------------------------------------
class Marker:
    """Runs a function inside a C callback (``twalk`` on a one-node tree), the region callgrind collects."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        self._cb_type = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int, ctypes.c_int)
        cmp_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
        libc.tsearch.restype = ctypes.c_void_p
        libc.tsearch.argtypes = [ctypes.c_void_p, ctypes.c_void_p, cmp_type]
        libc.twalk.argtypes = [ctypes.c_void_p, self._cb_type]
        self._libc, self._root, self._key = libc, ctypes.c_void_p(), ctypes.c_int(0)
        self._cmp = cmp_type(lambda a, b: 0)
        libc.tsearch(ctypes.addressof(self._key), ctypes.byref(self._root), self._cmp)
        self._fn = self._result = self._error = None
        self._cb = self._cb_type(self._callback)  # one callback object for all calls: the same work each time

    def _callback(self, node, which, depth) -> None:
        if which == 3:  # a leaf: called once for a one-node tree
            try:
                self._result = self._fn()
            except BaseException as e:  # noqa: BLE001 - re-raised outside the C frame
                self._error = e

    def __call__(self, fn):
        self._fn, self._result, self._error = fn, None, None
        self._libc.twalk(self._root, self._cb)
        if self._error is not None:
            raise self._error
        return self._result


def _faults() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_minflt + r.ru_majflt


def native_probe(fn) -> dict:
    """Wall ns, process CPU ns and page faults of one call of ``fn``."""
    f0, c0, w0 = _faults(), time.process_time_ns(), time.perf_counter_ns()
    fn()
    w1, c1, f1 = time.perf_counter_ns(), time.process_time_ns(), _faults()
    return {"wall_ns": w1 - w0, "cpu_ns": c1 - c0, "faults": f1 - f0}


# -- the worker: generations, evaluation by evaluation -----------------------------------------------------------
def worker(args) -> None:
    from DeepCache.tools.pipelines import load_pipeline

    torch.set_num_threads(args.threads)
    callgrind = args.worker == "callgrind"
    marker = Marker() if callgrind else None
    records: list[dict] = []  # in order; under callgrind one profile dump per record

    def measure(label: dict, fn) -> None:
        if callgrind:
            marker(fn)
            records.append(label)
        else:
            records.append({**label, **native_probe(fn)})

    unet = load_pipeline().unet
    generations = args.cg_generations if callgrind else args.generations
    retrievals = args.cg_retrievals if callgrind else args.retrievals
    for branch in (int(b) for b in args.branches.split(",")):
        for batch in (int(b) for b in args.batches.split(",")):
            helper = DeepCacheSDHelper(pipe=unet)
            size = unet.config.sample_size
            g = torch.Generator().manual_seed(0)
            xs = [torch.randn(batch, unet.config.in_channels, size, size, generator=g) for _ in range(2 + retrievals)]
            text = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)
            ts = [torch.tensor(980 - 40 * k) for k in range(2 + retrievals)]
            config = {"branch": branch, "batch": batch}

            def generation(forecast, gen_index, measured=True):
                helper.set_params(skip_mode="custom", full_steps=[0, 1], cache_branch_id=branch, forecast=forecast)
                with helper, torch.no_grad():
                    helper.reset_states()
                    for k in range(2 + retrievals):
                        call = (lambda k=k: unet(xs[k], ts[k], encoder_hidden_states=text))
                        if k < 2 or not measured:
                            call()
                        else:
                            measure({**config, "what": "step", "variant": NAMES[forecast], "gen": gen_index, "k": k}, call)
                    assert helper.last_steps == (True, True) + (False,) * retrievals
                    return helper._lease.bare.feature  # the live cached feature (for the components)

            for forecast in VARIANTS:  # warm-up
                generation(forecast, -1, measured=False)
            features = {}
            for i in range(generations):
                for forecast in (VARIANTS if i % 2 == 0 else VARIANTS[::-1]):
                    features[forecast] = generation(forecast, i)
            components(measure, config, features, retrievals, unet)
    Path(args.manifest).write_text(json.dumps(records))


def components(measure, config: dict, features: dict, retrievals: int, unet) -> None:
    """The pieces a forecast retrieval step adds, each measured over COMPONENT_CALLS calls."""
    reuse, forecast = features[None], features["linear"]
    step = 2 + retrievals - 1  # a retrieval step of the generation (full steps 0 and 1)
    value = forecast.value[0] if isinstance(forecast.value, tuple) else forecast.value
    difference = forecast.difference[0] if isinstance(forecast.difference, tuple) else forecast.difference
    key = reuse.key
    coeff = forecast.coeff

    def repeat(fn):
        def run():
            for _ in range(COMPONENT_CALLS):
                fn()
        return run

    with torch.no_grad():
        pieces = {
            "empty": lambda: None,
            "reuse.usable": lambda: reuse.usable(key),
            "forecast.usable": lambda: forecast.usable(key),
            "reuse.prepare": lambda: reuse.prepare(step, False),
            "forecast.prepare": lambda: forecast.prepare(step, False),
            "reuse.handout": reuse.handout,
            "forecast.handout": forecast.handout,
            "torch.addcmul": lambda: torch.addcmul(value, difference, coeff),
            "coeff.fill_": lambda: coeff.fill_(0.5),
        }
        for name, fn in pieces.items():
            repeat(fn)()  # warm
            for _ in range(COMPONENT_REPEATS):
                measure({**config, "what": "component", "component": name, "shape": list(value.shape)}, repeat(fn))


# -- the driver ---------------------------------------------------------------------------------------------------
def _self_command(args, worker_kind: str, manifest: Path) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", worker_kind, "--manifest", str(manifest),
           "--branches", args.branches, "--batches", args.batches, "--threads", str(args.threads),
           "--generations", str(args.generations), "--retrievals", str(args.retrievals),
           "--cg-generations", str(args.cg_generations), "--cg-retrievals", str(args.cg_retrievals)]
    return cmd


def run_native(args, tmp: Path) -> list[dict]:
    manifest = tmp / "native.json"
    subprocess.run(_self_command(args, "native", manifest), check=True)
    return json.loads(manifest.read_text())


def _dump_counts(path: Path) -> dict:
    events = totals = None
    for line in path.read_text().splitlines():
        if line.startswith("events:"):
            events = line.split()[1:]
        elif line.startswith("totals:") or (line.startswith("summary:") and totals is None):
            totals = [int(v) for v in line.split()[1:]]
    counts = dict(zip(events, totals + [0] * (len(events) - len(totals))))
    if "I1mr" in counts:  # kcachegrind's cycle estimate
        l1 = counts["I1mr"] + counts["D1mr"] + counts["D1mw"]
        ll = counts["ILmr"] + counts["DLmr"] + counts["DLmw"]
        counts["CEst"] = counts["Ir"] + 10 * l1 + 100 * ll
    return counts


def run_callgrind(args, tmp: Path) -> list[dict]:
    manifest, out = tmp / "callgrind.json", tmp / "cg.out"
    cmd = ["valgrind", "--tool=callgrind", "--collect-atstart=no", f"--toggle-collect={MARKER}",
           f"--dump-after={MARKER}", f"--callgrind-out-file={out}", "--dump-instr=no", "--compress-strings=no"]
    if args.cache_sim:
        cmd.append("--cache-sim=yes")
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    subprocess.run(cmd + _self_command(args, "callgrind", manifest), check=True, env=env,
                   stderr=subprocess.DEVNULL if not args.verbose else None)
    records = json.loads(manifest.read_text())
    dumps = sorted(tmp.glob("cg.out.*"), key=lambda p: int(p.suffix[1:]))
    if len(dumps) != len(records):
        raise RuntimeError(f"callgrind wrote {len(dumps)} profiles for {len(records)} measured calls: the marker "
                           f"({MARKER}) is not what this glibc's twalk calls; see the module docstring.")
    for record, dump in zip(records, dumps):
        record.update(_dump_counts(dump))
        if record["Ir"] == 0:
            raise RuntimeError("callgrind collected nothing inside the marker: see the module docstring.")
    return records


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(native: list[dict], counted: list[dict] | None, blocks: int) -> dict:
    rows, parts = [], []
    configs = sorted({(r["branch"], r["batch"]) for r in native})
    for branch, batch in configs:
        row: dict = {"branch": branch, "batch": batch}
        steps = [r for r in native if r["what"] == "step" and (r["branch"], r["batch"]) == (branch, batch)]
        for name in NAMES.values():
            mine = [r for r in steps if r["variant"] == name]
            row[f"{name}_evaluations"] = len(mine)
            row[f"{name}_wall_ms"] = statistics.median(r["wall_ns"] for r in mine) / 1e6
            row[f"{name}_cpu_ms"] = statistics.median(r["cpu_ns"] for r in mine) / 1e6
            row[f"{name}_faults"] = statistics.fmean(r["faults"] for r in mine)
        for what in ("wall", "cpu"):
            row[f"{what}_overhead_pct"] = (row[f"forecast_{what}_ms"] / row[f"reuse_{what}_ms"] - 1) * 100
            gens = sorted({r["gen"] for r in steps})
            per_block = []
            for b in range(blocks):
                chosen = set(gens[b * len(gens) // blocks:(b + 1) * len(gens) // blocks])
                med = {n: statistics.median(r[f"{what}_ns"] for r in steps if r["variant"] == n and r["gen"] in chosen)
                       for n in NAMES.values()}
                per_block.append((med["forecast"] / med["reuse"] - 1) * 100)
            row[f"{what}_overhead_pct_blocks"] = per_block
        row["faults_extra"] = row["forecast_faults"] - row["reuse_faults"]
        if counted:
            csteps = [r for r in counted if r["what"] == "step" and (r["branch"], r["batch"]) == (branch, batch)]
            for event in [e for e in ("Ir", "CEst") if e in csteps[0]]:
                for name in NAMES.values():
                    values = [r[event] for r in csteps if r["variant"] == name]
                    m, sd = _mean_sd(values)
                    row[f"{name}_{event}"], row[f"{name}_{event}_sd"] = m, sd
                    row[f"{name}_{event}_median"], row[f"{name}_{event}_values"] = statistics.median(values), values
                row[f"{event}_extra"] = row[f"forecast_{event}"] - row[f"reuse_{event}"]
                row[f"{event}_extra_median"] = row[f"forecast_{event}_median"] - row[f"reuse_{event}_median"]
                row[f"{event}_overhead_pct"] = (row[f"forecast_{event}"] / row[f"reuse_{event}"] - 1) * 100
        rows.append(row)
        for source, records in (("native", native), ("callgrind", counted or [])):
            mine = [r for r in records if r["what"] == "component" and (r["branch"], r["batch"]) == (branch, batch)]
            for name in dict.fromkeys(r["component"] for r in mine):
                same = [r for r in mine if r["component"] == name]
                entry = {"branch": branch, "batch": batch, "component": name, "shape": same[0]["shape"],
                         "source": source}
                for field in ("wall_ns", "cpu_ns", "faults", "Ir", "CEst"):
                    if field in same[0]:
                        entry[field + "_per_call"] = statistics.median(r[field] for r in same) / COMPONENT_CALLS
                parts.append(entry)
    return {"rows": rows, "components": parts}


def table(summary: dict) -> str:
    rows = summary["rows"]
    has_ir = "reuse_Ir" in rows[0]
    has_cest = "reuse_CEst" in rows[0]
    head = ["branch", "U-Net batch"]
    if has_ir:
        head += ["instructions / step, reuse", "extra instr. / step: mean (median; sd of one step)", "instr. overhead"]
    if has_cest:
        head += ["modelled cycles overhead"]
    head += ["page faults / step (reuse, forecast)", "CPU ms reuse → forecast", "CPU overhead (blocks)",
             "wall ms reuse → forecast", "wall overhead (blocks)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["branch"]), str(r["batch"])]
        if has_ir:
            cells += [f"{r['reuse_Ir'] / 1e6:.2f} M",
                      f"{r['Ir_extra'] / 1e3:+.1f} k ({r['Ir_extra_median'] / 1e3:+.1f} k; "
                      f"{max(r['reuse_Ir_sd'], r['forecast_Ir_sd']) / 1e3:.1f} k)",
                      f"{r['Ir_overhead_pct']:+.2f} %"]
        if has_cest:
            cells += [f"{r['CEst_overhead_pct']:+.2f} %"]
        lo_c, hi_c = min(r["cpu_overhead_pct_blocks"]), max(r["cpu_overhead_pct_blocks"])
        lo_w, hi_w = min(r["wall_overhead_pct_blocks"]), max(r["wall_overhead_pct_blocks"])
        cells += [f"{r['reuse_faults']:.2f}, {r['forecast_faults']:.2f}",
                  f"{r['reuse_cpu_ms']:.3f} → {r['forecast_cpu_ms']:.3f}",
                  f"{r['cpu_overhead_pct']:+.1f} % ({lo_c:+.1f} … {hi_c:+.1f})",
                  f"{r['reuse_wall_ms']:.3f} → {r['forecast_wall_ms']:.3f}",
                  f"{r['wall_overhead_pct']:+.1f} % ({lo_w:+.1f} … {hi_w:+.1f})"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| branch | batch | component | source | per call |", "|---|---|---|---|---|"]
    for p in summary["components"]:
        value = (f"{p['Ir_per_call']:.0f} instr." if "Ir_per_call" in p
                 else f"{p['cpu_ns_per_call'] / 1e3:.2f} µs CPU, {p['faults_per_call']:.3f} faults")
        lines.append(f"| {p['branch']} | {p['batch']} | {p['component']} | {p['source']} | {value} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--branches", default="0,1")
    parser.add_argument("--batches", default="2,8", help="U-Net batch sizes (2 = one prompt with CFG)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--generations", type=int, default=40, help="native: generations per variant and setting")
    parser.add_argument("--retrievals", type=int, default=8, help="native: retrieval evaluations per generation")
    parser.add_argument("--cg-generations", type=int, default=4, help="callgrind: generations per variant and setting")
    parser.add_argument("--cg-retrievals", type=int, default=4, help="callgrind: retrieval evaluations per generation")
    parser.add_argument("--blocks", type=int, default=5, help="blocks of generations for the spread of the overhead")
    parser.add_argument("--cache-sim", action="store_true", help="callgrind simulates caches (modelled cycles; ~2x slower)")
    parser.add_argument("--skip-callgrind", action="store_true")
    parser.add_argument("--verbose", action="store_true", help="show valgrind's output")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--worker", choices=("native", "callgrind"), help=argparse.SUPPRESS)
    parser.add_argument("--manifest", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        native = run_native(args, tmp)
        counted = None if args.skip_callgrind else run_callgrind(args, tmp)
    summary = summarise(native, counted, args.blocks)
    summary.update({"threads": args.threads, "torch": torch.__version__, "generations": args.generations,
                    "retrievals": args.retrievals, "cg_generations": args.cg_generations,
                    "cg_retrievals": args.cg_retrievals, "cache_sim": args.cache_sim,
                    "cpu_capability": torch.backends.cpu.get_cpu_capability()})
    print(table(summary))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
