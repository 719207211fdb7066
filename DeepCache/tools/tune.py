"""``deepcache tune``: the fastest DeepCache setting that keeps your quality bound, on your pipeline and prompts.

For every interval N (``--intervals``, default 2-6) and branch (``--branches``, default 0, 1, 2) it builds four
candidates with the same budget of K = ceil(n / N) full steps in an n-evaluation generation:

* ``uniform``: a full step every N evaluations;
* ``non-uniform``: the paper's schedule (Eq. 7) with K full steps, centred at 30 % of the generation (its 15 of 50);
* ``calibrated``: the K full steps :meth:`DeepCacheSDHelper.calibrate` picks on the calibration prompts (the reuse
  errors are measured once per branch, gaps up to twice the largest N, and the exact programme solved for each K);
* ``adaptive``: cap 2N, with the smallest threshold (a short bisection) that keeps the mean full steps on the
  calibration prompts at K or fewer.

The calibration prompts are never evaluated. Each candidate then generates the evaluation prompts (the same
seeds and batches; timed after a warm-up) and is scored against the uncached images (PSNR, SSIM). ``tune`` prints
every candidate, then the fastest (measured time; the FLOP-ideal speedup beside it) that meets ``--min-psnr``
and/or ``--min-ssim`` as a ``helper.set_params(...)`` line; it writes that setting as ``CacheParams`` JSON
(``--save``) and a speed-vs-PSNR plot of all candidates with their Pareto front (``--plot``). When nothing meets
the bound it says what the best candidate reached and exits with status 2. Adaptive schedules decide per batch:
they are tuned and measured at ``--batch-size``.

Example::

    $ deepcache tune --min-psnr 30          # embedded model: 25 steps, 6 + 4 prompts, 60 candidates
    $ deepcache tune --model ./my-sd-pipeline --min-psnr 28 --min-ssim 0.9 --prompt "a cat" --prompt "a dog"
    $ deepcache tune --min-psnr 35 --intervals 2,3 --branches 0 --kinds uniform,calibrated --threads 1
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import calibration
from .cli_common import (Progress, add_device_options, add_json_option, add_model_option, add_prompt_options,
                         add_table_options, add_threads_option, apply_threads, positive_int, quiet_third_party, register)
from .evaluate import COLUMNS as EVAL_COLUMNS
from .evaluate import (DEFAULT_GUIDANCE, DEFAULT_STEPS, SettingRun, add_generation_arguments, fidelity, generate,
                       model_name, pipeline_device, pipeline_from_args, run_meta, run_settings)
from .pipelines import is_demo_pipeline
from .plot import PALETTE, Series, scatter_plot
from .prompts import calibration_prompts, prompt_seeds
from .report import Column, environment, json_document, render_table, write_json
from ..schedule import CacheParams, optimal_full_steps
from .settings import Setting

__all__ = ["KINDS", "Candidate", "TuneConfig", "TuneResult", "choose", "full_step_budget", "pareto_front",
           "search_threshold", "tune", "unmet_bound"]

KINDS: tuple[str, ...] = ("uniform", "non-uniform", "calibrated", "adaptive")
DEFAULT_INTERVALS: tuple[int, ...] = (2, 3, 4, 5, 6)
DEFAULT_BRANCHES: tuple[int, ...] = (0, 1, 2)
#: The bound when neither ``--min-psnr`` nor ``--min-ssim`` is given.
DEFAULT_MIN_PSNR = 30.0
EVAL_PROMPTS, CALIBRATION_PROMPTS = 6, 4
#: Where the non-uniform schedule is densest, as a share of the generation (the paper: step 15 of 50).
NON_UNIFORM_CENTER = 0.3
#: The adaptive threshold's bisection: bracket (log space) and rounds.
THRESHOLD_BRACKET, THRESHOLD_ROUNDS = (1e-3, 1.0), 6


# -- pure parts ------------------------------------------------------------------------------
def full_step_budget(evaluations: int, interval: int) -> int:
    """K = ceil(n / N): the full steps of a uniform interval ``N`` in an ``n``-evaluation generation.

    >>> full_step_budget(25, 3), full_step_budget(25, 5), full_step_budget(25, 6)
    (9, 5, 5)
    """
    return -(-evaluations // interval)


def search_threshold(full_steps_at: Callable[[float], float], budget: float, *,
                     bracket: tuple[float, float] = THRESHOLD_BRACKET, rounds: int = THRESHOLD_ROUNDS) -> float:
    """The smallest adaptive threshold found whose mean full steps (``full_steps_at(t)``) is at most ``budget``.

    A bisection in log space over ``bracket`` (thresholds rounded to 3 significant digits, so that the printed
    value is the one measured); the answer is always a threshold that was measured to keep the budget (the
    upper end grows tenfold until one does).

    >>> search_threshold(lambda t: 25 * (1 - t), 9)  # full steps fall as the threshold grows
    0.65
    """
    lo, hi = bracket
    measured: dict[float, float] = {}

    def keeps(t: float) -> bool:
        if t not in measured:
            measured[t] = full_steps_at(t)
        return measured[t] <= budget

    for _ in range(rounds):
        mid = float(f"{math.sqrt(lo * hi):.3g}")
        if not lo < mid < hi:
            break
        if keeps(mid):
            hi = mid
        else:
            lo = mid
    while not keeps(hi):
        if hi > 1e6:
            raise ValueError(f"no adaptive threshold up to {hi:g} keeps the mean full steps at {budget} or fewer.")
        lo, hi = hi, hi * 10
    return hi


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats in both speed and quality (higher is better in both).

    >>> pareto_front([(1.5, 40.0), (2.0, 35.0), (1.8, 30.0), (3.0, 28.0)])
    [0, 1, 3]
    """
    order = sorted(range(len(points)), key=lambda k: (-points[k][0], -points[k][1]))
    front, best = [], -math.inf
    for k in order:
        if points[k][1] > best:
            front.append(k)
            best = points[k][1]
    return sorted(front)


def meets(row: dict[str, Any], min_psnr: float | None, min_ssim: float | None) -> bool:
    """Whether a row's PSNR and SSIM keep the bounds that are set."""
    return (min_psnr is None or row["psnr"] >= min_psnr) and (min_ssim is None or row["ssim"] >= min_ssim)


def bound_text(min_psnr: float | None, min_ssim: float | None) -> str:
    """``PSNR >= 30 dB and SSIM >= 0.9``."""
    parts = ([f"PSNR >= {min_psnr:g} dB"] if min_psnr is not None else []) + (
        [f"SSIM >= {min_ssim:g}"] if min_ssim is not None else [])
    return " and ".join(parts)


def choose(rows: Sequence[dict[str, Any]], min_psnr: float | None, min_ssim: float | None) -> dict[str, Any] | None:
    """The fastest candidate row (measured speedup; then PSNR) that meets the bound; ``None`` if none does."""
    ok = [r for r in rows if meets(r, min_psnr, min_ssim)]
    return max(ok, key=lambda r: (r["speedup"], r["psnr"])) if ok else None


def unmet_bound(rows: Sequence[dict[str, Any]], min_psnr: float | None, min_ssim: float | None) -> ValueError:
    """The error when no candidate row meets the bound: what the best ones reached, and what to try."""
    best_psnr = max(rows, key=lambda r: r["psnr"])
    best_ssim = max(rows, key=lambda r: r["ssim"])
    return ValueError(
        f"no candidate meets {bound_text(min_psnr, min_ssim)} (only the uncached pipeline does): the best PSNR "
        f"reached is {best_psnr['psnr']:.2f} dB ({best_psnr['kind']} {best_psnr['setting']}), the best SSIM "
        f"{best_ssim['ssim']:.4f} ({best_ssim['kind']} {best_ssim['setting']}). Lower the bound, or search closer "
        "to the original: --intervals 2 and deeper --branches (or --all-branches)."
    )


# -- the search ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Candidate:
    """One setting tried: its kind, the interval N whose budget K = ceil(n / N) it keeps, and the setting."""

    kind: str
    interval: int
    budget: int
    setting: Setting


@dataclasses.dataclass(frozen=True)
class TuneConfig:
    """What ``tune`` searches and how each candidate generates."""

    intervals: tuple[int, ...] = DEFAULT_INTERVALS
    branches: tuple[int, ...] = DEFAULT_BRANCHES
    kinds: tuple[str, ...] = KINDS
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    repeats: int = 1
    batch_size: int = 16

    def __post_init__(self) -> None:
        unknown = sorted(set(self.kinds) - set(KINDS))
        if unknown or not self.kinds:
            raise ValueError(f"unknown kind(s) {unknown}; choose from {', '.join(KINDS)}.")
        if not self.intervals or min(self.intervals) < 2:
            raise ValueError(f"intervals must be integers >= 2 (1 is the uncached pipeline), got {list(self.intervals)}.")
        if not self.branches or min(self.branches) < 0:
            raise ValueError(f"branches must be integers >= 0, got {list(self.branches)}.")


@dataclasses.dataclass
class TuneResult:
    """Every candidate's row (the original first), the chosen row (``None`` if nothing meets the bound), meta."""

    rows: list[dict[str, Any]]
    chosen: dict[str, Any] | None
    meta: dict[str, Any]
    env: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def candidates(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["kind"] != "original"]

    @property
    def chosen_params(self) -> CacheParams | None:
        """The chosen setting as plain ``CacheParams`` (what ``--save`` writes)."""
        return None if self.chosen is None else CacheParams(**self.chosen["params"])

    def to_json(self) -> dict[str, Any]:
        return json_document("deepcache tune", meta=self.meta, env=self.env, rows=self.rows, chosen=self.chosen)

    def header(self) -> str:
        m = self.meta
        return (f"{model_name(m)}; {m['steps']} {m['scheduler']} steps ({m['evaluations']} U-Net evaluations), "
                f"{len(m['prompts'])} evaluation + {len(m['calibration_prompts'])} calibration prompts, guidance "
                f"{m['guidance']}, batch {m['batch_size']}, {m['torch_threads']} CPU thread(s), {m['device']} {m['dtype']}")


def count_evaluations(pipe: Any, prompt: str, seed: int, steps: int, guidance: float) -> int:
    """U-Net evaluations of one uncached generation (``steps`` for DDIM, about twice that for Heun)."""
    calls = 0

    def count(*_: Any) -> None:
        nonlocal calls
        calls += 1

    handle = pipe.unet.register_forward_pre_hook(count)
    try:
        with torch.no_grad():
            pipe(prompt, generator=torch.Generator().manual_seed(seed), num_inference_steps=steps,
                 guidance_scale=guidance, output_type="latent")
    finally:
        handle.remove()
    return calls


def mean_full_steps(patterns: Sequence[Sequence[bool]], batch_sizes: Sequence[int]) -> float:
    """Full steps per image: each batch's count weighted by its images (an adaptive decision is per batch)."""
    return float(np.average([sum(p) for p in patterns], weights=batch_sizes))


def _batch_sizes(count: int, batch_size: int) -> list[int]:
    return [min(batch_size, count - first) for first in range(0, count, batch_size)]


class _Flops:
    """FLOP-ideal end-to-end speedups (U-Net steps and the VAE decode) of step patterns, per branch."""

    def __init__(self, pipe: Any, guidance: float) -> None:
        from .bench.flops import FlopCache
        from .bench.models import unet_batch

        self.counter: Any = None
        try:
            self.counter = FlopCache(pipe.unet.config, pipe.vae.config)
        except (AttributeError, TypeError, ValueError, KeyError, RuntimeError):  # not an SD-like U-Net and VAE
            return
        size = pipe.unet.config.sample_size
        self.latent = (size, size) if isinstance(size, int) else tuple(size)
        self.unet_batch = unet_batch(pipe.unet.config, 1, guidance)

    def ideal(self, branch: int, patterns: Sequence[Sequence[bool]]) -> float | None:
        from .bench.flops import ideal_speedup_pattern

        if self.counter is None or not patterns:
            return None
        step = self.counter.step(self.unet_batch, *self.latent, branch)
        vae = self.counter.vae_decode(1, *self.latent)
        return ideal_speedup_pattern([f for p in patterns for f in p], step.full, step.retrieval, vae * len(patterns))


def build_candidates(pipe: Any, config: TuneConfig, evaluations: int, cal_prompts: Sequence[str],
                     cal_seeds: Sequence[int], bar: Progress) -> list[Candidate]:
    """Every candidate: calibration (once per branch) and the adaptive thresholds run on the calibration prompts."""
    center = min(evaluations - 1, round(NON_UNIFORM_CENTER * evaluations))
    found: dict[Setting, Candidate] = {}  # one candidate per setting (N=5 and N=6 both give K=5 of 25)
    call = {"prompt": list(cal_prompts), "num_inference_steps": config.steps, "guidance_scale": config.guidance,
            "output_type": "latent"}
    for branch in config.branches:
        full_steps: dict[int, tuple[int, ...]] = {}
        if "calibrated" in config.kinds:
            errors = calibration.measure_reuse_errors(
                pipe, pipe.unet, branch, 2 * max(config.intervals),
                generator=[torch.Generator().manual_seed(s) for s in cal_seeds], **call)
            full_steps = {n: optimal_full_steps(errors, full_step_budget(len(errors), n)) for n in config.intervals}
            bar.update(f"calibrated B={branch}")
        for n in config.intervals:
            k = full_step_budget(evaluations, n)
            for kind in config.kinds:
                if kind == "uniform":
                    setting = Setting(n, branch)
                elif kind == "non-uniform":
                    setting = Setting(n, branch, "non-uniform", center=center)
                elif kind == "calibrated":
                    setting = Setting(1, branch, "custom", full_steps=full_steps[n])
                else:
                    setting = _adaptive(pipe, config, cal_prompts, cal_seeds, 2 * n, branch, k)
                    bar.update(f"adaptive {setting.label}")
                found.setdefault(setting, Candidate(kind, n, k, setting))
    return list(found.values())


def _adaptive(pipe: Any, config: TuneConfig, prompts: Sequence[str], seeds: Sequence[int], cap: int, branch: int,
              budget: int) -> Setting:
    """Cap ``cap`` and the smallest threshold that keeps ``budget`` full steps or fewer on the calibration prompts."""
    sizes = _batch_sizes(len(prompts), config.batch_size)

    def full_steps_at(threshold: float) -> float:
        patterns: list[tuple[bool, ...]] = []
        setting = Setting(cap, branch, "adaptive", threshold=threshold)
        generate(pipe, prompts, seeds, setting, config.steps, config.guidance, config.batch_size, patterns)
        return mean_full_steps(patterns, sizes)

    return Setting(cap, branch, "adaptive", threshold=search_threshold(full_steps_at, budget))


def tune(pipe: Any, config: TuneConfig, prompts: Sequence[str], seeds: Sequence[int], cal_prompts: Sequence[str],
         cal_seeds: Sequence[int], *, min_psnr: float | None, min_ssim: float | None,
         progress: bool = False) -> TuneResult:
    """Build, run and score every candidate; choose the fastest that meets the bound (``chosen=None`` if none)."""
    if set(prompts) & set(cal_prompts):
        raise ValueError("calibration and evaluation prompts must differ.")
    evaluations = count_evaluations(pipe, cal_prompts[0], cal_seeds[0], config.steps, config.guidance)
    per_branch = len(config.intervals) * ("adaptive" in config.kinds) + ("calibrated" in config.kinds)
    bar = Progress(len(config.branches) * (per_branch + len(config.kinds) * len(config.intervals)) + 1, progress,
                   desc="deepcache tune", unit="run")
    try:
        candidates = build_candidates(pipe, config, evaluations, cal_prompts, cal_seeds, bar)
        bar.set_total(len(config.branches) * per_branch + (1 + len(candidates)) * config.repeats)
        runs = run_settings(pipe, prompts, seeds, [c.setting for c in candidates], config.steps, config.guidance,
                            config.repeats, config.batch_size, on_run=lambda s: bar.update(s.label))
    finally:
        bar.close()
    rows = _rows(pipe, config, candidates, runs, evaluations, len(prompts))
    for row in rows[1:]:
        row["meets"] = meets(row, min_psnr, min_ssim)
    for k in pareto_front([(r["speedup"], r["psnr"]) for r in rows[1:]]):
        rows[1 + k]["pareto"] = True
    chosen = choose(rows[1:], min_psnr, min_ssim)
    meta = run_meta(
        pipe, config.steps, config.guidance, prompts, seeds, evaluations=evaluations,
        calibration_prompts=list(cal_prompts), calibration_seeds=list(cal_seeds), intervals=list(config.intervals),
        branches=list(config.branches), kinds=list(config.kinds), batch_size=config.batch_size,
        repeats=config.repeats, min_psnr=min_psnr, min_ssim=min_ssim)
    return TuneResult(rows, chosen, meta, environment(*pipeline_device(pipe), pipe))


def _rows(pipe: Any, config: TuneConfig, candidates: Sequence[Candidate], runs: Sequence[SettingRun],
          evaluations: int, num_prompts: int) -> list[dict[str, Any]]:
    baseline, by_setting = runs[0], {run.setting: run for run in runs}
    flops = _Flops(pipe, config.guidance)
    sizes = _batch_sizes(num_prompts, config.batch_size)
    rows: list[dict[str, Any]] = [{
        "kind": "original", "interval": 1, "budget": evaluations, "branch": None, "setting": baseline.setting.label,
        "params": None, "full_steps": float(evaluations), "seconds": baseline.median_seconds, "speedup": 1.0,
        "ideal_speedup": 1.0, "psnr": math.inf, "ssim": 1.0, "meets": None, "pareto": None,
    }]
    for c in candidates:
        run = by_setting[c.setting]
        rows.append({
            "kind": c.kind, "interval": c.interval, "budget": c.budget, "branch": c.setting.cache_branch_id,
            "setting": c.setting.label, "params": c.setting.for_steps(config.steps).helper_kwargs(),
            "full_steps": mean_full_steps(run.patterns, sizes), "seconds": run.median_seconds,
            "speedup": baseline.median_seconds / run.median_seconds,
            "ideal_speedup": flops.ideal(c.setting.cache_branch_id, run.patterns),
            **fidelity(run.images, baseline.images), "meets": None, "pareto": False,
        })
    return rows


# -- output ----------------------------------------------------------------------------------
def _yes(value: Any) -> str:
    return "yes" if value else ""


_EVAL_COLUMNS = {column.key: column for column in EVAL_COLUMNS}  # the same cells as in `deepcache eval`
COLUMNS: tuple[Column, ...] = (
    Column("kind", "kind"),
    Column("interval", "N", align="right"),
    Column("budget", "K", align="right"),
    Column("branch", "B", align="right"),
    Column("full_steps", "full steps", ".1f", align="right"),
    _EVAL_COLUMNS["seconds"],
    _EVAL_COLUMNS["speedup"],
    Column("ideal_speedup", "FLOP-ideal", ".2f", align="right"),
    _EVAL_COLUMNS["psnr"],
    _EVAL_COLUMNS["ssim"],
    Column("meets", "meets", _yes),
    Column("pareto", "Pareto", _yes),
    Column("setting", "setting"),
)


def format_table(rows: Sequence[dict[str, Any]], style: str = "markdown") -> str:
    return render_table(COLUMNS, rows, style=style, drop_empty=True)


def pareto_plot(result: TuneResult) -> Any:
    """Measured speedup vs PSNR of every candidate, by kind; the Pareto front, the bound and the choice."""
    rows = result.candidates
    series = [Series(kind, [(r["speedup"], r["psnr"]) for r in rows if r["kind"] == kind], PALETTE[k])
              for k, kind in enumerate(KINDS) if any(r["kind"] == kind for r in rows)]
    m = result.meta
    marked = None
    if result.chosen is not None:
        c = result.chosen
        marked = ((c["speedup"], c["psnr"]), f"chosen: {c['kind']} N={c['interval']} B={c['branch']}")
    return scatter_plot(
        series, x_label="measured speedup over the uncached pipeline", y_label="PSNR dB vs uncached",
        title=f"deepcache tune: {model_name(m)}, {m['steps']} steps, "
        f"{len(m['prompts'])} prompts",
        line=[(r["speedup"], r["psnr"]) for r in rows if r["pareto"]],
        hline=(m["min_psnr"], f"bound {m['min_psnr']:g} dB") if m["min_psnr"] is not None else None, marked=marked)


def recommendation(row: dict[str, Any], save: Path | None) -> str:
    """How to use the chosen setting: the ``set_params`` line, and how to load the saved JSON."""
    setting = Setting(**row["params"])
    ideal = f" (FLOP-ideal {row['ideal_speedup']:.2f}x)" if row["ideal_speedup"] is not None else ""
    lines = [
        f"fastest setting that meets it: {row['kind']} {row['setting']}: {row['speedup']:.2f}x measured{ideal}, "
        f"PSNR {row['psnr']:.2f} dB, SSIM {row['ssim']:.4f}, {row['full_steps']:.1f} full steps",
        f"    {setting.set_params_call()}",
    ]
    if save is not None:
        lines += ["or load the saved parameters:", f"    helper.params = CacheParams.from_json(open({str(save)!r}).read())"]
    return "\n".join(lines)


# -- command line ----------------------------------------------------------------------------
def _int_list(minimum: int) -> Callable[[str], tuple[int, ...]]:
    """argparse type: integers >= ``minimum`` separated by commas."""

    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected integers separated by commas, e.g. 2,3,4, got {text!r}") from None
        if not values or min(values) < minimum:
            raise argparse.ArgumentTypeError(f"expected integers >= {minimum} separated by commas, got {text!r}")
        return values

    return parse


def _kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(f"unknown kind(s) {unknown}; choose from {','.join(KINDS)}")
    return kinds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``deepcache tune``."""
    add_model_option(parser, "local folder or hub id of an SD/SDXL pipeline (default: the embedded demo model, offline)")
    parser.add_argument("--min-psnr", type=float, metavar="DB",
                        help=f"quality bound: mean PSNR vs the uncached images, dB (default {DEFAULT_MIN_PSNR:g} when "
                        "--min-ssim is not given either)")
    parser.add_argument("--min-ssim", type=float, metavar="SSIM", help="quality bound: mean SSIM vs the uncached images")
    parser.add_argument("--intervals", type=_int_list(2), default=DEFAULT_INTERVALS, metavar="N,N,...",
                        help="intervals N >= 2; each sets the budget K = ceil(steps / N) (default 2,3,4,5,6)")
    branches = parser.add_mutually_exclusive_group()
    branches.add_argument("--branches", type=_int_list(0), default=DEFAULT_BRANCHES, metavar="B,B,...",
                          help="cache_branch_id values (default 0,1,2)")
    branches.add_argument("--all-branches", action="store_true", help="every valid branch of the U-Net")
    parser.add_argument("--kinds", type=_kinds, default=KINDS, metavar="KIND,...",
                        help=f"schedules to try (default {','.join(KINDS)})")
    add_prompt_options(parser, default_count=EVAL_PROMPTS)
    parser.add_argument("--calibration-prompt", action="append", metavar="PROMPT",
                        help="a calibration prompt (repeatable; never one of the evaluation prompts); default: see "
                        "--num-calibration-prompts")
    parser.add_argument("--num-calibration-prompts", type=positive_int, default=CALIBRATION_PROMPTS,
                        help="how many default calibration prompts, none of them evaluated (default "
                        f"{CALIBRATION_PROMPTS})")
    add_generation_arguments(parser)
    parser.add_argument("--batch-size", type=positive_int,
                        help="images per pipeline call (default: 16 on the embedded model, 1 otherwise); adaptive "
                        "schedules decide per batch, so they are tuned and measured at this size")
    add_device_options(parser, default_device="cpu")
    add_threads_option(parser, default_help="1 on the embedded model, whose tiny layers gain nothing from threads; "
                       "torch's own otherwise")
    parser.add_argument("--save", type=Path, default=Path("deepcache-params.json"), metavar="PATH",
                        help="where to write the chosen setting as CacheParams JSON (default ./deepcache-params.json)")
    parser.add_argument("--plot", type=Path, default=Path("deepcache-tune.png"), metavar="PATH",
                        help="where to save the speed-vs-PSNR Pareto plot, PNG (default ./deepcache-tune.png)")
    add_json_option(parser)
    add_table_options(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def run(args: argparse.Namespace) -> int:
    min_psnr, min_ssim = args.min_psnr, args.min_ssim
    if min_psnr is None and min_ssim is None:
        min_psnr = DEFAULT_MIN_PSNR
    apply_threads(args.threads or (1 if args.model is None else None))  # the tiny demo model: threads only cost
    with quiet_third_party(not args.verbose):
        pipe, prompts = pipeline_from_args(args)
        embedded = is_demo_pipeline(pipe)
        cal_prompts = calibration_prompts(embedded=embedded, count=args.num_calibration_prompts, seed=args.seed,
                                          exclude=prompts, given=args.calibration_prompt)
        branches = tuple(range(_num_branches(pipe))) if args.all_branches else args.branches
        config = TuneConfig(args.intervals, branches, args.kinds, args.steps, args.guidance, args.repeats,
                            args.batch_size or (16 if embedded else 1))
        _check_branches(pipe, branches)
        result = tune(pipe, config, prompts, prompt_seeds(prompts, args.seed), cal_prompts,
                      prompt_seeds(cal_prompts, args.seed + 1000), min_psnr=min_psnr, min_ssim=min_ssim,
                      progress=not args.no_progress)
    print(f"deepcache tune: {result.header()}")
    print(format_table(result.rows, args.table))
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    pareto_plot(result).save(args.plot)
    print(f"saved the speed-vs-PSNR plot of {len(result.candidates)} candidates to {args.plot}")
    if args.json is not None:
        print(f"wrote {write_json(args.json, result.to_json())}")
    print(f"bound: {bound_text(min_psnr, min_ssim)}")
    params = result.chosen_params
    if result.chosen is None or params is None:
        raise unmet_bound(result.candidates, min_psnr, min_ssim)
    args.save.parent.mkdir(parents=True, exist_ok=True)
    args.save.write_text(params.to_json() + "\n", encoding="utf-8")
    print(recommendation(result.chosen, args.save))
    print(f"wrote {args.save}")
    return 0


def _num_branches(pipe: Any) -> int:
    from ..helper import DeepCacheSDHelper

    return DeepCacheSDHelper(pipe=pipe).num_branches()


def _check_branches(pipe: Any, branches: Sequence[int]) -> None:
    valid = _num_branches(pipe)
    bad = [b for b in branches if b >= valid]
    if bad:
        raise ValueError(f"--branches {','.join(map(str, bad))}: valid ids for this U-Net are 0..{valid - 1}.")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    """Register ``deepcache tune``."""
    return register(subparsers, "tune", help="find the fastest DeepCache setting that keeps a PSNR/SSIM bound; "
                    "print it, save it as JSON, plot speed vs PSNR", module_doc=__doc__, add_arguments=add_arguments,
                    run=run)


if __name__ == "__main__":  # pragma: no cover
    import sys

    from .cli_common import standalone

    sys.exit(standalone("deepcache tune", __doc__, add_arguments, run, name="tune"))
