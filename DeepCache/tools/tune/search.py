"""``deepcache tune``'s search: the candidates, their runs and their rows.

For every interval N and branch B it builds up to six candidates with the same budget of K = ceil(n / N) full steps
in an n-evaluation generation (``uniform``, ``non-uniform``, ``calibrated``, ``adaptive``, ``forecast``, ``linear``;
see the command's help; the calibrated ones in :mod:`.calibrated`), on the calibration prompts only. Then every candidate generates the evaluation prompts, timed and scored against the
uncached images by the tools' one layer (:func:`DeepCache.tools.runs.run_and_score`: only the pipeline call timed,
the order rotated between repeats, medians; each image scored as it is made and dropped, so memory does not grow with
the number of candidates or prompts). Each row carries the measured speedup and the FLOP-ideal one beside it.

Example::

    >>> Candidate("adaptive", 4, 7, Setting(8, 0, "adaptive", threshold=0.16)).setting.label
    'I=8, B=0, adaptive, threshold=0.16'
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch

from ...params import CacheParams
from ..cli_common import Progress
from ..flops import FlopCache, ideal_speedup_pattern, unet_batch
from ..pipelines import pipeline_device, run_meta
from ..prompts import PromptItem
from ..report import environment, json_document
from ..runs import DEFAULT_GUIDANCE, DEFAULT_STEPS, RunSpec, SettingRun, generate_batch, run_and_score
from ..scoring import Scorer
from ..settings import BASELINE, Setting
from .calibrated import CALIBRATED_KINDS, LINEAR_MAX_INTERVAL, calibrate_branch
from .choice import beats_bound, choose, full_step_budget, meets, pareto_front, search_threshold

__all__ = ["DEFAULT_BRANCHES", "DEFAULT_INTERVALS", "KINDS", "Candidate", "TuneConfig", "TuneResult", "tune"]

KINDS: tuple[str, ...] = ("uniform", "non-uniform", "calibrated", "adaptive", "forecast", "linear")
DEFAULT_INTERVALS: tuple[int, ...] = (2, 3, 4, 5, 6)
DEFAULT_BRANCHES: tuple[int, ...] = (0, 1, 2)
#: Where the non-uniform schedule is densest, as a share of the generation (the paper: step 15 of 50).
NON_UNIFORM_CENTER = 0.3


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
        return [r for r in self.rows if r["kind"] != "original"]

    @property
    def noisy(self) -> list[dict[str, Any]]:
        """The candidates measured faster than their FLOP bound allows (noise; see :func:`.choice.beats_bound`)."""
        return [r for r in self.candidates if r["beats_bound"]]

    @property
    def chosen_params(self) -> CacheParams | None:
        """The chosen setting as plain ``CacheParams`` (what ``--save`` writes)."""
        return None if self.chosen is None else CacheParams(**self.chosen["params"])

    def to_json(self) -> dict[str, Any]:
        return json_document("deepcache tune", meta=self.meta, env=self.env, rows=self.rows, chosen=self.chosen)


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


def build_candidates(pipe: Any, config: TuneConfig, evaluations: int, calibration_items: Sequence[PromptItem],
                     bar: Progress) -> list[Candidate]:
    """Every candidate: calibration (once per branch) and the adaptive thresholds run on the calibration prompts."""
    found: dict[Setting, Candidate] = {}  # one candidate per setting (N=5 and N=6 both give K=5 of 25)
    budgets = {n: full_step_budget(evaluations, n) for n in config.intervals}
    for branch in config.branches:
        call = {"prompt": [i.prompt for i in calibration_items], "num_inference_steps": config.steps,
                "guidance_scale": config.guidance, "output_type": "latent",
                "generator": [torch.Generator().manual_seed(int(i.seed)) for i in calibration_items]}  # type: ignore[arg-type]
        calibrated = calibrate_branch(pipe, branch, list(budgets.values()), config.kinds, call,
                                      2 * max(config.intervals))
        if calibrated:
            bar.update(f"calibrated B={branch}")
        for n in config.intervals:
            for kind in config.kinds:
                setting = candidate_setting(kind, n, branch, evaluations, calibrated)
                if setting is None and kind == "adaptive":
                    setting = _adaptive(pipe, config, calibration_items, 2 * n, branch, budgets[n])
                    bar.update(f"adaptive {setting.label}")
                if setting is not None:
                    found.setdefault(setting, Candidate(kind, n, budgets[n], setting))
    return list(found.values())


def candidate_setting(kind: str, interval: int, branch: int, evaluations: int,
                      calibrated: dict[str, dict[int, Setting]]) -> Setting | None:
    """The setting of a kind that needs no run of its own at interval N (budget K = ceil(n / N)); ``None`` for
    ``adaptive`` (searched on the calibration prompts) and for ``linear`` beyond :data:`LINEAR_MAX_INTERVAL`.

    >>> candidate_setting("linear", 3, 0, 25, {}).label, candidate_setting("linear", 4, 0, 25, {})
    ('I=3, B=0, forecast=linear', None)
    >>> candidate_setting("non-uniform", 5, 1, 25, {}).label
    'I=5, B=1, non-uniform, center=8'
    """
    if kind == "uniform":
        return Setting(interval, branch)
    if kind == "linear":
        return Setting(interval, branch, forecast="linear") if interval <= LINEAR_MAX_INTERVAL else None
    if kind == "non-uniform":
        center = min(evaluations - 1, round(NON_UNIFORM_CENTER * evaluations))
        return Setting(interval, branch, "non-uniform", center=center)
    if kind in CALIBRATED_KINDS:  # forecast: none where no forecast weight is nonzero (it would be reuse)
        return calibrated[kind].get(full_step_budget(evaluations, interval))
    return None


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


def tune(pipe: Any, config: TuneConfig, items: Sequence[PromptItem], calibration_items: Sequence[PromptItem], *,
         min_psnr: float | None, min_ssim: float | None, progress: bool = False) -> TuneResult:
    """Build, run and score every candidate; choose the fastest the evidence supports that meets the bound
    (:func:`.choice.choose`; ``chosen=None`` if none does)."""
    if {i.prompt for i in items} & {i.prompt for i in calibration_items}:
        raise ValueError("calibration and evaluation prompts must differ.")
    first = calibration_items[0]
    evaluations = count_evaluations(pipe, first.prompt, int(first.seed), config.steps, config.guidance)  # type: ignore[arg-type]
    per_branch = len(config.intervals) * ("adaptive" in config.kinds) + any(k in CALIBRATED_KINDS for k in config.kinds)
    batches = -(-len(items) // config.batch_size)
    bar = Progress(len(config.branches) * (per_branch + len(config.kinds) * len(config.intervals)) + 1, progress,
                   desc="deepcache tune", unit="run")
    try:
        candidates = build_candidates(pipe, config, evaluations, calibration_items, bar)
        bar.set_total(len(config.branches) * per_branch + (1 + len(candidates)) * config.repeats * batches)
        runs = run_and_score(pipe, items, [c.setting for c in candidates], Scorer(), config.spec,
                             on_run=lambda s: bar.update(s.label))
    finally:
        bar.close()
    rows = _candidate_rows(pipe, config, candidates, runs, evaluations)
    for row in rows[1:]:
        row["meets"] = meets(row, min_psnr, min_ssim)
    for k in pareto_front([(r["speedup"], r["psnr"]) for r in rows[1:]]):
        rows[1 + k]["pareto"] = True
    chosen = choose(rows[1:], min_psnr, min_ssim)
    prompts = [i.prompt for i in items]
    meta = run_meta(
        pipe, config.steps, config.guidance, prompts, [i.seed for i in items], evaluations=evaluations,  # type: ignore[misc]
        calibration_prompts=[i.prompt for i in calibration_items], calibration_seeds=[i.seed for i in calibration_items],
        intervals=list(config.intervals), branches=list(config.branches), kinds=list(config.kinds),
        batch_size=config.batch_size, repeats=config.repeats, min_psnr=min_psnr, min_ssim=min_ssim)
    return TuneResult(rows, chosen, meta, environment(*pipeline_device(pipe), pipe))


class _Flops:
    """FLOP-ideal end-to-end speedups (U-Net steps and the VAE decode) of a run's step patterns, per branch."""

    def __init__(self, pipe: Any, guidance: float) -> None:
        self.counter: FlopCache | None = None
        try:
            self.counter = FlopCache(pipe.unet.config, pipe.vae.config)
        except (AttributeError, TypeError, ValueError, KeyError, RuntimeError):  # not an SD-like U-Net and VAE
            return
        size = pipe.unet.config.sample_size
        self.latent = (size, size) if isinstance(size, int) else tuple(size)
        self.unet_batch = unet_batch(pipe.unet.config, 1, guidance)

    def ideal(self, branch: int, run: SettingRun) -> float | None:
        """Original FLOPs over this run's FLOPs, every batch's pattern weighted by its images."""
        if self.counter is None or not run.patterns:
            return None
        step = self.counter.step(self.unet_batch, *self.latent, branch)
        vae = self.counter.vae_decode(1, *self.latent)
        per_image = [f for p, n in zip(run.patterns, run.batch_sizes) for _ in range(n) for f in p]
        return ideal_speedup_pattern(per_image, step.full, step.retrieval, vae * sum(run.batch_sizes))


def _candidate_rows(pipe: Any, config: TuneConfig, candidates: Sequence[Candidate], runs: Sequence[SettingRun],
          evaluations: int) -> list[dict[str, Any]]:
    baseline, by_setting = runs[0], {run.setting: run for run in runs}
    flops = _Flops(pipe, config.guidance)
    rows: list[dict[str, Any]] = [{
        "kind": "original", "interval": 1, "budget": evaluations, "branch": None, "setting": BASELINE.label,
        "params": None, "full_steps": float(evaluations), "seconds": baseline.median_seconds,
        "seconds_all": baseline.seconds, "speedup": 1.0, "ideal_speedup": 1.0, "beats_bound": False,
        "psnr": math.inf, "ssim": 1.0, "meets": None, "pareto": None,
    }]
    for c in candidates:
        run = by_setting[c.setting]
        means = run.scores.means() if run.scores is not None else {"psnr": math.nan, "ssim": math.nan}
        row = {
            "kind": c.kind, "interval": c.interval, "budget": c.budget, "branch": c.setting.cache_branch_id,
            "setting": c.setting.label, "params": c.setting.for_steps(config.steps).helper_kwargs(),
            "full_steps": run.full_steps, "seconds": run.median_seconds, "seconds_all": run.seconds,
            "speedup": baseline.median_seconds / run.median_seconds,
            "ideal_speedup": flops.ideal(c.setting.cache_branch_id, run),
            "psnr": means["psnr"], "ssim": means["ssim"], "meets": None, "pareto": False,
        }
        row["beats_bound"] = beats_bound(row)
        rows.append(row)
    return rows
