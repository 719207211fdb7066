"""``deepcache tune``'s search: the candidates, which of them run, and their rows.

For every interval N and branch B it has up to six candidates with the same budget of K = ceil(n / N) full steps in
an n-evaluation generation (``uniform``, ``non-uniform``, ``adaptive``, ``linear``; see the command's help), and the
calibrated ones (``calibrated``, ``forecast``; :mod:`.calibrated`) at every K from the largest interval's budget to
the smallest's (25 steps, intervals 2-6: K = 5..13, also the K no interval gives). The prompts are split
(:class:`PromptSplit`): calibration and the adaptive threshold search see only the calibration prompts, and every
candidate is judged on the judging prompts, none of which any calibration used.

Which candidates are built, judged and timed is decided as they go (:mod:`.plan`): from the highest FLOP-ideal
bound down, a candidate whose bound is below the best credible speedup of one that meets the quality bound cannot
win and is pruned; each judged candidate generates the judging prompts once (:class:`.judge.Judge`: its scores and
one timing), and only the contenders get the other ``repeats``.

Example::

    >>> Candidate("adaptive", 4, 7, Setting(8, 0, "adaptive", threshold=0.16)).setting.label
    'I=8, B=0, adaptive, threshold=0.16'
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from ...schedules.params import CacheParams
from ...schedules.schedule import schedule_pattern
from ..cli_common import Progress
from ..kinds import kind_of
from ..pipelines import pipeline_device, run_meta
from ..prompts import PromptItem
from ..report import environment, json_document
from ..runs import DEFAULT_GUIDANCE, DEFAULT_STEPS, RunSpec, SettingRun, generate_batch
from ..settings import Setting
from .calibrated import CALIBRATED_KINDS, LINEAR_MAX_INTERVAL, Calibration
from .choice import choose, full_step_budget, meets, pareto_front, search_threshold
from .denoiser import KINDS, kinds_for, probe
from .judge import Judge
from .plan import Slot, best_credible, contenders, could_win, order
from .rows import Flops, baseline_row, judged_row, pruned_row, refresh_speedups

__all__ = ["DEFAULT_BRANCHES", "DEFAULT_INTERVALS", "KINDS", "Candidate", "PromptSplit", "TuneConfig", "TuneResult", "tune"]

DEFAULT_INTERVALS: tuple[int, ...] = (2, 3, 4, 5, 6)
DEFAULT_BRANCHES: tuple[int, ...] = (0, 1, 2)
#: Where the non-uniform schedule is densest, as a share of the generation (the paper: step 15 of 50).
NON_UNIFORM_CENTER = 0.3


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One setting tried: its kind, the interval N whose budget K = ceil(n / N) it keeps (``None`` for a K between
    two intervals' budgets), and the setting."""

    kind: str
    interval: int | None
    budget: int
    setting: Setting


@dataclasses.dataclass(frozen=True)
class PromptSplit:
    """tune's prompts: ``calibration`` (calibration and the adaptive threshold search) and ``judging`` (every
    candidate's quality and speed); no prompt is in both."""

    calibration: tuple[PromptItem, ...]
    judging: tuple[PromptItem, ...]

    def __post_init__(self) -> None:
        shared = {i.prompt for i in self.calibration} & {i.prompt for i in self.judging}
        if shared:
            raise ValueError(f"calibration and evaluation prompts must differ; both have {sorted(shared)[0]!r}.")
        if not self.calibration or not self.judging:
            raise ValueError("tune needs at least one calibration prompt and one judging prompt.")


@dataclasses.dataclass(frozen=True)
class TuneConfig:
    """What ``tune`` searches and how each candidate generates."""

    intervals: tuple[int, ...] = DEFAULT_INTERVALS
    branches: tuple[int, ...] = DEFAULT_BRANCHES
    kinds: tuple[str, ...] | None = None  # None: every kind (:func:`.denoiser.kinds_for`)
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    repeats: int = 1
    batch_size: int = 16

    def __post_init__(self) -> None:
        unknown = sorted(set(self.kinds or ()) - set(KINDS))
        if unknown or self.kinds == ():
            raise ValueError(f"unknown kind(s) {unknown}; choose from {', '.join(KINDS)}.")
        if not self.intervals or min(self.intervals) < 2:
            raise ValueError(f"intervals must be integers >= 2 (1 is the uncached pipeline), got {list(self.intervals)}.")
        if not self.branches or min(self.branches) < 0:
            raise ValueError(f"branches must be integers >= 0, got {list(self.branches)}.")

    @property
    def spec(self) -> RunSpec:
        return RunSpec(self.steps, self.guidance, self.repeats, self.batch_size)


@dataclasses.dataclass
class TuneResult:
    """Every candidate's row (the original first), the chosen row (``None`` if nothing meets the bound), meta."""

    rows: list[dict[str, Any]]
    chosen: dict[str, Any] | None
    meta: dict[str, Any]
    env: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def candidates(self) -> list[dict[str, Any]]:
        """Every candidate's row, pruned ones included."""
        return [r for r in self.rows if r["kind"] != "original"]

    @property
    def judged(self) -> list[dict[str, Any]]:
        """The candidates that ran (quality and speed measured); the others were pruned."""
        return [r for r in self.candidates if r["status"] != "pruned"]

    @property
    def noisy(self) -> list[dict[str, Any]]:
        """The candidates measured faster than their FLOP bound allows (noise; see :func:`.choice.beats_bound`)."""
        return [r for r in self.judged if r["beats_bound"]]

    @property
    def chosen_params(self) -> CacheParams | None:
        """The chosen setting as plain ``CacheParams`` (what ``--save`` writes)."""
        return None if self.chosen is None else CacheParams(**self.chosen["params"])

    def to_json(self) -> dict[str, Any]:
        return json_document("deepcache tune", meta=self.meta, env=self.env, rows=self.rows, chosen=self.chosen)


def calibrated_budgets(evaluations: int, intervals: Sequence[int]) -> dict[int, int | None]:
    """``{K: N}``: every budget from the largest interval's to the smallest's, with the smallest interval that
    gives it (``None`` for a K no interval gives).

    >>> calibrated_budgets(25, (3, 4, 5, 6))
    {5: 5, 6: None, 7: 4, 8: None, 9: 3}
    """
    by_budget: dict[int, int] = {}
    for n in sorted(intervals, reverse=True):
        by_budget[full_step_budget(evaluations, n)] = n
    return {k: by_budget.get(k) for k in range(min(by_budget), max(by_budget) + 1)}


def candidate_setting(kind: str, interval: int, branch: int, evaluations: int) -> Setting | None:
    """The setting of a kind that needs no calibration at interval N; ``None`` for ``linear`` beyond
    :data:`LINEAR_MAX_INTERVAL` and for the kinds built from calibration.

    >>> candidate_setting("linear", 3, 0, 25).label, candidate_setting("linear", 4, 0, 25)
    ('I=3, B=0, forecast=linear', None)
    >>> candidate_setting("non-uniform", 5, 1, 25).label
    'I=5, B=1, non-uniform, center=8'
    """
    if kind == "uniform":
        return Setting(interval, branch)
    if kind == "linear":
        return Setting(interval, branch, forecast="linear") if interval <= LINEAR_MAX_INTERVAL else None
    if kind == "non-uniform":
        center = min(evaluations - 1, round(NON_UNIFORM_CENTER * evaluations))
        return Setting(interval, branch, "non-uniform", center=center)
    return None


def slots(config: TuneConfig, evaluations: int, flops: Flops) -> list[Slot]:
    """Every candidate before it is built, with the bound on its speedup (:mod:`.plan`): a fixed schedule's
    FLOP-ideal speedup, K full steps' for the calibrated kinds, the cap's forced full steps' for ``adaptive``."""
    out = []
    for branch in config.branches:
        for kind in config.kinds or KINDS:
            if kind in CALIBRATED_KINDS:
                for budget, n in calibrated_budgets(evaluations, config.intervals).items():
                    out.append(Slot(kind, branch, n, budget, flops.of_full_steps(branch, budget, evaluations)))
                continue
            for n in config.intervals:
                fixed = Setting(2 * n, branch) if kind == "adaptive" else candidate_setting(kind, n, branch, evaluations)
                if fixed is not None:
                    full = sum(schedule_pattern(fixed.for_steps(evaluations), evaluations))
                    out.append(Slot(kind, branch, n, full_step_budget(evaluations, n),
                                    flops.of_full_steps(branch, full, evaluations)))
    return out


def _adaptive(pipe: Any, config: TuneConfig, items: Sequence[PromptItem], cap: int, branch: int,
              budget: int) -> Setting:
    """Cap ``cap`` and the smallest threshold that keeps ``budget`` full steps or fewer on the calibration prompts."""
    from ...helper import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=pipe)

    def full_steps_at(threshold: float) -> float:
        run = SettingRun(Setting(cap, branch, "adaptive", threshold=threshold), [])
        for first in range(0, len(items), config.batch_size):
            batch = items[first:first + config.batch_size]
            run.patterns.append(generate_batch(pipe, helper, run.setting, batch, config.spec)[2])
            run.batch_sizes.append(len(batch))
        return run.full_steps or 0.0

    return Setting(cap, branch, "adaptive", threshold=search_threshold(full_steps_at, budget))


def _build(slot: Slot, pipe: Any, config: TuneConfig, evaluations: int, split: PromptSplit, cal: Calibration,
           bar: Progress) -> Setting | None:
    """The slot's setting; the calibrated kinds and adaptive run on the calibration prompts only."""
    if slot.kind == "calibrated":
        return cal.calibrated(slot.branch, slot.budget)
    if slot.kind == "forecast":
        return cal.forecast_setting(slot.branch, slot.budget)
    if slot.kind == "adaptive":
        bar.stage(f"adaptive threshold search: cap {2 * slot.interval}, B={slot.branch}")  # type: ignore[operator]
        return _adaptive(pipe, config, split.calibration, 2 * slot.interval, slot.branch, slot.budget)  # type: ignore[operator]
    return candidate_setting(slot.kind, slot.interval, slot.branch, evaluations)  # type: ignore[arg-type]


def tune(pipe: Any, config: TuneConfig, split: PromptSplit, *, min_psnr: float | None, min_ssim: float | None,
         progress: bool = False) -> TuneResult:
    """Build, judge and time the candidates that can win (module docstring); choose the fastest the evidence
    supports that meets the bound (:func:`.choice.choose`; ``chosen=None`` if none does)."""
    config = dataclasses.replace(config, kinds=kinds_for(config.kinds))  # an unknown kind: clear error
    sample = probe(pipe, split.calibration[0], steps=config.steps, guidance=config.guidance)
    evaluations = sample.evaluations
    flops = Flops(pipe, config.guidance, (sample.height, sample.width))
    todo = order(slots(config, evaluations, flops))
    bar = Progress(len(todo), progress, desc="deepcache tune", unit="candidate")
    prompts, seeds = [i.prompt for i in split.calibration], [int(i.seed) for i in split.calibration]  # type: ignore[arg-type]
    call = kind_of(pipe).call_kwargs(prompts, seeds, steps=config.steps, guidance=config.guidance, output_type="latent")
    built: dict[Setting, Candidate] = {}
    rows: list[dict[str, Any]] = []
    runs: list[SettingRun] = []
    pruned: list[Slot] = []
    try:
        with Calibration(pipe, call, reuse_gap=2 * max(config.intervals), forecast="forecast" in (config.kinds or ()),
                         on_stage=bar.stage) as cal:
            bar.stage("judging: the uncached images of the judging prompts")
            judge = Judge(pipe, split.judging, config.spec)
            while todo:
                for slot in todo:
                    if not could_win(slot.bound, best_credible(rows, min_psnr, min_ssim)):
                        pruned.append(slot)
                        bar.update(f"pruned {slot.kind} K={slot.budget}, B={slot.branch}")
                        continue
                    setting = _build(slot, pipe, config, evaluations, split, cal, bar)
                    if setting is not None and setting not in built:
                        built[setting] = Candidate(slot.kind, slot.interval, slot.budget, setting)
                        bar.stage(f"judging {slot.kind} {setting.label}")
                        runs.append(judge.judge(setting))
                        rows.append(judged_row(slot.kind, slot.interval, slot.budget, runs[-1], config.steps, flops))
                        refresh_speedups(rows[-1:], runs[-1:], judge.baseline)
                        rows[-1]["meets"] = meets(rows[-1], min_psnr, min_ssim)
                    bar.update(f"{slot.kind} K={slot.budget}, B={slot.branch}")
                while short := [runs[k] for k in contenders(rows, min_psnr, min_ssim)
                                if len(runs[k].seconds) < config.repeats]:
                    bar.stage(f"timing {len(short)} contender(s) and the original, {config.repeats} repeats")
                    judge.retime(short, config.repeats)
                    refresh_speedups(rows, runs, judge.baseline)
                best = best_credible(rows, min_psnr, min_ssim)
                todo = [s for s in pruned if could_win(s.bound, best)]  # a slower median can bring some back
                pruned = [s for s in pruned if s not in todo]
            calibration_runs = cal.runs
    finally:
        bar.close()
    return _result(pipe, config, split, evaluations, judge, built, rows, pruned, min_psnr, min_ssim, calibration_runs)


def _result(pipe: Any, config: TuneConfig, split: PromptSplit, evaluations: int, judge: Judge,
            built: dict[Setting, Candidate], rows: list[dict[str, Any]], pruned: Sequence[Slot],
            min_psnr: float | None, min_ssim: float | None, calibration_runs: int) -> TuneResult:
    """The rows (original, then every candidate by branch, budget and kind, pruned ones too) and the choice."""
    for k in pareto_front([(r["speedup"], r["psnr"]) for r in rows]):
        rows[k]["pareto"] = True
    chosen = choose(rows, min_psnr, min_ssim)
    labels = {(c.kind, c.setting.cache_branch_id, c.budget): c.setting.label for c in built.values()}
    rows = rows + [pruned_row(s.kind, s.interval, s.budget, s.branch, s.bound, labels.get((s.kind, s.branch, s.budget)))
                   for s in pruned]
    rows.sort(key=lambda r: (r["branch"], -r["budget"], KINDS.index(r["kind"])))
    judging = split.judging
    meta = run_meta(
        pipe, config.steps, config.guidance, [i.prompt for i in judging], [i.seed for i in judging],  # type: ignore[misc]
        evaluations=evaluations, calibration_prompts=[i.prompt for i in split.calibration],
        calibration_seeds=[i.seed for i in split.calibration], intervals=list(config.intervals),
        branches=list(config.branches), kinds=list(config.kinds or ()), batch_size=config.batch_size,
        repeats=config.repeats, min_psnr=min_psnr, min_ssim=min_ssim, judged=len(rows) - len(pruned),
        pruned=len(pruned), calibration_runs=calibration_runs)
    return TuneResult([baseline_row(judge.baseline, evaluations), *rows], chosen, meta,
                      environment(*pipeline_device(pipe), pipe))
