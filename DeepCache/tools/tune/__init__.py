"""``deepcache tune``: the fastest DeepCache setting that keeps your quality bound, on your pipeline and prompts.

For every interval N (``--intervals``, default 2-6) and branch (``--branches``, default 0, 1, 2) it has candidates
with the same budget of K = ceil(n / N) full steps in an n-evaluation generation:

* ``uniform``: a full step every N evaluations;
* ``non-uniform``: the paper's schedule (Eq. 7) with K full steps, centred at 30 % of the generation (its 15 of 50);
* ``adaptive``: cap 2N, with the smallest threshold (a short bisection) that keeps the mean full steps on the
  calibration prompts at K or fewer;
* ``linear``: uniform with ``forecast="linear"`` at weight 1, at N <= 3 only (farther full steps make the straight
  line overshoot: on the embedded model +9.5 dB over uniform at N = 3, worse from N = 4 on);

and, at every K from the largest interval's budget to the smallest's (25 steps: K = 5..13, also the K no interval
gives), the calibrated ones, from one uncached recording of the calibration prompts shared by every branch and K:

* ``calibrated``: the K full steps :meth:`DeepCacheSDHelper.calibrate` picks (reuse errors, then the exact
  programme);
* ``forecast``: the calibrated forecast, what ``helper.calibrate(K, forecast=True)`` picks: K full steps and a
  weight per step for ``forecast="linear"`` (retrieval steps extrapolate the cached feature from the last two full
  steps instead of reusing it): its forecast errors measured once per branch, then its closed-loop choice on the
  calibration prompts (``tune/calibrated.py``'s ``forecast_choice``, the one call site of the library's choice).

Held out: the prompts are split into calibration prompts (calibration and the adaptive search only) and judging
prompts (every candidate's quality and speed); none is in both. Each candidate is judged on the judging prompts,
scored against the uncached images (PSNR, SSIM), never on the prompts its calibration used.

Only candidates that can win are run. A candidate's speedup is trusted up to its FLOP-ideal one, known before it
runs (from its number of full steps), so ``tune`` goes from the highest bound down (the candidates that cost nothing
to build first) and prunes every candidate whose bound is below the best credible speedup of one that meets the
quality bound: it is never built, run or timed, and its row says ``pruned``. Each other candidate generates the
judging prompts once (its quality and one timing, after a warm-up; only the pipeline call is timed); the
contenders, the candidates that meet the bound and whose bound reaches the best, are timed again with the
original, the order rotating, until each has ``--repeats`` timings (default 3 on a CPU, where a shared machine's
load changes from call to call; 1 on CUDA); the median counts. If that lowers the best, the candidates it brings
back in reach are run too. A progress bar on stderr says which stage runs.

``tune`` decides on evidence: every measured speedup is printed beside its FLOP-ideal one (the denoiser's and the
VAE's FLOPs the schedule saves); a measured speedup more than 10 % above that bound is noise: ``tune`` warns, and
ranks that candidate at its bound. It prints every candidate, then the fastest that meets ``--min-psnr`` and/or ``--min-ssim``
as a ``helper.set_params(...)`` line; it writes that setting as ``CacheParams`` JSON (``--save``) and a
speed-vs-PSNR plot of the judged candidates with their Pareto front, the choice labelled as the printed line
(``--plot``). When nothing meets the bound it says what the best candidate reached and exits with status 2.
Adaptive schedules decide per batch: they are tuned and measured at ``--batch-size``.

A diffusion-transformer pipeline (``--model`` folder: PixArt, Sana, SD3, Flux, ...) is searched the same way, through
its kind (:mod:`DeepCache.tools.kinds`): branches ``0..N//2`` of its N blocks, FLOPs counted block by block, its
calibration recorded on the transformer (each CFG branch replayed on its own); every kind, the calibrated forecast
included.

Example::

    $ deepcache tune --min-psnr 30          # embedded model: 25 steps, 6 judging + 4 calibration prompts
    $ deepcache tune --model ./my-sd-pipeline --min-psnr 28 --min-ssim 0.9 --prompt "a cat" --prompt "a dog"
    $ deepcache tune --min-psnr 35 --intervals 2,3 --branches 0 --kinds uniform,calibrated --threads 1
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..cli_common import (add_device_options, add_generation_arguments, add_json_option, add_model_option,
                          add_prompt_options, add_table_options, add_threads_option, apply_threads,
                          pipeline_from_args, positive_int, quiet_third_party, register)
from ..kinds import denoiser_name, kind_of
from ..pipelines import is_demo_pipeline, model_name
from ..prompts import PromptItem, calibration_prompts, prompt_seeds
from ..quality import COLUMNS as EVAL_COLUMNS
from ..report import Column, render_table, write_json
from ..settings import Setting
from .choice import NOISE_MARGIN, bound_text, choose, credible_speedup, full_step_budget, pareto_front, \
    search_threshold, unmet_bound
from .calibrated import FORECAST_MAX_GAP, LINEAR_MAX_INTERVAL
from .denoiser import kinds_for
from .pareto import KIND_STYLE, chosen_label, pareto_plot, plot_series
from .search import DEFAULT_BRANCHES, DEFAULT_INTERVALS, KINDS, Candidate, PromptSplit, TuneConfig, TuneResult, tune

__all__ = ["KIND_STYLE", "KINDS", "Candidate", "PromptSplit", "TuneConfig", "TuneResult", "choose", "credible_speedup", "full_step_budget",
           "pareto_front", "pareto_plot", "plot_series", "search_threshold", "tune", "unmet_bound"]

#: The bound when neither ``--min-psnr`` nor ``--min-ssim`` is given.
DEFAULT_MIN_PSNR = 30.0
EVAL_PROMPTS, CALIBRATION_PROMPTS = 6, 4
#: Timed repeats when ``--repeats`` is not given: on a CPU (noisy: shared cores, frequency changes) three, whose
#: median discards one disturbed call; on CUDA one (synchronized timings repeat within a few per cent).
CPU_REPEATS, CUDA_REPEATS = 3, 1


def header(result: TuneResult) -> str:
    """One line: model, steps, prompts, guidance, batch, repeats, threads, device."""
    m = result.meta
    return (f"{model_name(m)}; {m['steps']} {m['scheduler']} steps ({m['evaluations']} {denoiser_name(m.get('family'))} "
            "evaluations), "
            f"{len(m['prompts'])} judging + {len(m['calibration_prompts'])} calibration prompts (disjoint), guidance "
            f"{m['guidance']}, batch {m['batch_size']}, {m['judged']} candidates judged and {m['pruned']} pruned, "
            f"contenders' median of {m['repeats']} repeat(s), {m['torch_threads']} CPU thread(s), {m['device']} "
            f"{m['dtype']}")


def noise_warning(result: TuneResult) -> str | None:
    """The warning when some measured speedups beat their FLOP bound by more than 10 % (``None`` if none do)."""
    noisy = result.noisy
    if not noisy:
        return None
    worst = max(noisy, key=lambda r: r["speedup"] / r["ideal_speedup"])
    return (f"deepcache tune: warning: {len(noisy)} of {len(result.judged)} measured speedups beat their FLOP "
            f"bound by more than {NOISE_MARGIN * 100:.0f} % (e.g. {worst['kind']} {worst['setting']}: {worst['speedup']:.2f}x "
            f"measured, FLOP-ideal {worst['ideal_speedup']:.2f}x): the timings are noisy, and those candidates are "
            f"ranked at their bound. For figures to trust, run on a quiet machine, with more --repeats (now "
            f"{result.meta['repeats']}) or --threads 1.")


# -- output ----------------------------------------------------------------------------------
def _yes(value: Any) -> str:
    return "yes" if value else ""


_EVAL_COLUMNS = {column.key: column for column in EVAL_COLUMNS}  # the same cells as in `deepcache eval`
COLUMNS: tuple[Column, ...] = (
    Column("kind", "kind"),
    Column("interval", "budget N", align="right"),
    Column("budget", "K", align="right"),
    Column("branch", "B", align="right"),
    Column("full_steps", "full steps", ".1f", align="right"),
    Column("status", "run", lambda v: "pruned" if v == "pruned" else ""),
    Column("timings", "timings", align="right"),
    _EVAL_COLUMNS["seconds"],
    _EVAL_COLUMNS["speedup"],
    Column("ideal_speedup", "FLOP-ideal", ".2f", align="right"),
    Column("beats_bound", "noise", lambda v: "> bound" if v else ""),
    _EVAL_COLUMNS["psnr"],
    _EVAL_COLUMNS["ssim"],
    Column("meets", "meets", _yes),
    Column("pareto", "Pareto", _yes),
    Column("setting", "setting"),
)


def format_table(rows: Sequence[dict[str, Any]], style: str = "markdown") -> str:
    return render_table(COLUMNS, rows, style=style, drop_empty=True)


def recommendation(row: dict[str, Any], save: Path | None) -> str:
    """How to use the chosen setting: the ``set_params`` line, and how to load the saved JSON."""
    setting = Setting(**row["params"])
    ideal = f" (FLOP-ideal {row['ideal_speedup']:.2f}x)" if row["ideal_speedup"] is not None else ""
    lines = [
        f"fastest setting that meets it: {chosen_label(row)}: {row['speedup']:.2f}x measured{ideal}, "
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
    add_model_option(parser, "local folder or hub id of a U-Net (SD/SDXL) or diffusion-transformer (PixArt, Sana, SD3, "
                     "Flux, ...) pipeline (default: the embedded demo model, offline)")
    parser.add_argument("--min-psnr", type=float, metavar="DB",
                        help=f"quality bound: mean PSNR vs the uncached images, dB (default {DEFAULT_MIN_PSNR:g} when "
                        "--min-ssim is not given either)")
    parser.add_argument("--min-ssim", type=float, metavar="SSIM", help="quality bound: mean SSIM vs the uncached images")
    parser.add_argument("--intervals", type=_int_list(2), default=DEFAULT_INTERVALS, metavar="N,N,...",
                        help="intervals N >= 2; each sets the budget K = ceil(steps / N) (default 2,3,4,5,6)")
    branches = parser.add_mutually_exclusive_group()
    branches.add_argument("--branches", type=_int_list(0), default=DEFAULT_BRANCHES, metavar="B,B,...",
                          help="cache_branch_id values (default 0,1,2)")
    branches.add_argument("--all-branches", action="store_true", help="every valid branch of the denoiser (a "
                          "transformer of N blocks: 0..N//2)")
    parser.add_argument("--kinds", type=_kinds, metavar="KIND,...",
                        help=f"schedules to try (default {','.join(KINDS)})")
    add_prompt_options(parser, default_count=EVAL_PROMPTS)
    parser.add_argument("--calibration-prompt", action="append", metavar="PROMPT",
                        help="a calibration prompt (repeatable; never one of the judging prompts); default: see "
                        "--num-calibration-prompts")
    parser.add_argument("--num-calibration-prompts", type=positive_int, default=CALIBRATION_PROMPTS,
                        help="how many default calibration prompts, none of them judged (default "
                        f"{CALIBRATION_PROMPTS})")
    add_generation_arguments(parser, default_repeats=None, repeats_default_help=(
        f"{CPU_REPEATS} on a CPU, where a shared machine's load changes from call to call and the median of "
        f"{CPU_REPEATS} discards a disturbed one; {CUDA_REPEATS} on CUDA, whose synchronized timings repeat within a "
        "few per cent; only the contenders and the original are timed more than once"))
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
        repeats = args.repeats or (CUDA_REPEATS if pipe.device.type == "cuda" else CPU_REPEATS)
        kinds = kinds_for(args.kinds)
        config = TuneConfig(args.intervals, branches, kinds, args.steps, args.guidance, repeats,
                            args.batch_size or (16 if embedded else 1))
        _check_branches(pipe, branches)
        items = [PromptItem(p, s) for p, s in zip(prompts, prompt_seeds(prompts, args.seed))]
        calibration_items = [PromptItem(p, s) for p, s in zip(cal_prompts, prompt_seeds(cal_prompts, args.seed + 1000))]
        split = PromptSplit(tuple(calibration_items), tuple(items))
        result = tune(pipe, config, split, min_psnr=min_psnr, min_ssim=min_ssim, progress=not args.no_progress)
    print(f"deepcache tune: {header(result)}")
    print(format_table(result.rows, args.table))
    warning = noise_warning(result)
    if warning is not None:
        print(warning, file=sys.stderr)
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    pareto_plot(result).save(args.plot)
    print(f"saved the speed-vs-PSNR plot of the {len(result.judged)} judged candidates to {args.plot}")
    if args.json is not None:
        print(f"wrote {write_json(args.json, result.to_json())}")
    print(f"bound: {bound_text(min_psnr, min_ssim)}")
    params = result.chosen_params
    if result.chosen is None or params is None:
        raise unmet_bound(result.judged, min_psnr, min_ssim)
    args.save.parent.mkdir(parents=True, exist_ok=True)
    args.save.write_text(params.to_json() + "\n", encoding="utf-8")
    print(recommendation(result.chosen, args.save))
    print(f"wrote {args.save}")
    return 0


def _num_branches(pipe: Any) -> int:
    from ...helper import DeepCacheSDHelper

    return DeepCacheSDHelper(pipe=pipe).num_branches()


def _check_branches(pipe: Any, branches: Sequence[int]) -> None:
    valid = _num_branches(pipe)
    bad = [b for b in branches if b >= valid]
    if bad:
        raise ValueError(f"--branches {','.join(map(str, bad))}: valid ids for this {denoiser_name(kind_of(pipe).family)} "
                         f"are 0..{valid - 1}.")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    """Register ``deepcache tune``."""
    return register(subparsers, "tune", help="find the fastest DeepCache setting that keeps a PSNR/SSIM bound; "
                    "print it, save it as JSON, plot speed vs PSNR", module_doc=__doc__, add_arguments=add_arguments,
                    run=run, epilog=EPILOG)


#: The end of ``deepcache tune --help``: the kinds, then how it decides.
EPILOG = (
    "Kinds (--kinds), each with the budget K = ceil(steps / N) full steps of interval N: uniform (a full step every N); "
    "non-uniform (the paper's schedule, densest at 30 % of the steps); adaptive (cap 2N, the smallest threshold "
    "keeping K full steps on average on the calibration prompts); linear (uniform with "
    f"forecast=\"linear\" at weight 1, at N <= {LINEAR_MAX_INTERVAL} only: farther apart the straight line "
    "overshoots); and at every K between the intervals' budgets: calibrated (the K full steps calibrate() picks "
    "on the calibration prompts); forecast (the calibrated forecast of calibrate(K, forecast=True): K full steps and "
    "a weight per step for forecast=\"linear\", retrieval steps extrapolating the cached feature from the last two "
    f"full steps; forecasts at most {FORECAST_MAX_GAP} steps past a full step). "
    "Held out: calibration and the adaptive search see only the calibration prompts; every candidate is judged on "
    "the other prompts. "
    "Only candidates that can win run: a candidate whose FLOP-ideal speedup is below the best credible speedup of "
    "one that meets the bound is pruned (never built, run or timed); the others are judged once (quality and one "
    "timing), and only the contenders (they meet the bound and their FLOP-ideal speedup reaches the best) are timed "
    "--repeats times with the original, the order rotating; the median counts. "
    f"Every measured speedup is printed beside its FLOP-ideal one; a measured speedup more than "
    f"{NOISE_MARGIN * 100:.0f} % above that bound is noise: it is marked, tune warns, and the candidate is ranked at "
    "its bound."
)
