"""``deepcache bench`` results: one :class:`ScenarioResult` per scenario, the :class:`BenchReport`, its tables.

A result is assembled in one place: :meth:`ScenarioResult.new` (what ran and its step pattern), then
:meth:`~ScenarioResult.add_flops` (counts and FLOP-ideal speedups) and :meth:`~ScenarioResult.add_timing`
(measured seconds, speedups, memory; ``--flops-only`` results have none). The tables are in
:mod:`DeepCache.tools.bench.tables`.

Example::

    >>> from DeepCache.tools.bench.results import ScenarioResult
    >>> from DeepCache.tools.bench.scenarios import Scenario
    >>> from DeepCache.tools.settings import Setting
    >>> r = ScenarioResult.new("sd21", 4, Scenario(512, 512, 1, Setting(3, 0)), (True, False, False, True))
    >>> r.variant, r.pattern, (r.full_steps, r.retrieval_steps), r.seconds
    ('I=3, B=0', 'FrrF', (2, 2), nan)
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch

from .scenarios import TINY_RESOLUTION_DIVISOR, BenchConfig, Scenario
from ..flops import PatternFlops
from ..kinds import denoiser_name
from ..report import json_document
from ...schedules.schedule import format_pattern

__all__ = ["TIMED", "TIMED_TEMPLATE", "BenchReport", "ScenarioResult", "Timing", "report_settings"]

#: What the benchmark times, stated in every output.
#: What ``bench`` times, ``{}`` the denoiser's name (:func:`DeepCache.tools.kinds.denoiser_name`).
TIMED_TEMPLATE = ("pipeline call end to end: {} denoising loop + VAE decode (text encoding excluded: random prompt "
                  "embeddings)")
TIMED = TIMED_TEMPLATE.format("U-Net")



@dataclass
class Timing:
    """What was measured for one scenario (``warmup_seconds`` and the graph counts only with ``--compile``)."""

    seconds_all: list[float]
    step_ms_full: float | None  # median U-Net time of a full step
    step_ms_retrieval: float | None
    peak_memory_bytes: int | None  # CUDA only
    compile_mode: str | None = None
    warmup_seconds: float | None = None
    graphs_compiled: int | None = None
    recompiles_timed: int | None = None

    @property
    def seconds(self) -> float:
        return float(statistics.median(self.seconds_all))


@dataclass
class ScenarioResult:
    """Measured and derived numbers for one scenario (one row of the detailed table / JSON)."""

    model: str
    height: int
    width: int
    batch_size: int
    variant: str  # "original" or the setting's label
    cache_interval: int | None
    cache_branch_id: int | None
    skip_mode: str | None
    steps: int
    seconds: float  # median over repeats
    seconds_all: list[float]
    speedup: float  # baseline median / this median, same run
    peak_memory_bytes: int | None  # CUDA only
    memory_overhead: float | None  # (peak - baseline peak) / baseline peak
    unet_calls: int
    full_steps: int
    retrieval_steps: int
    pattern: str  # "F" full / "r" retrieval per U-Net evaluation
    step_ms_full: float | None  # median U-Net time of a full step
    step_ms_retrieval: float | None
    flops_full_step: int | None
    flops_retrieval_step: int | None
    flop_ratio: float | None  # f = retrieval / full
    flops_vae_decode: int | None
    ideal_speedup: float | None  # end to end: U-Net steps of this pattern + VAE decode
    ideal_speedup_unet: float | None  # U-Net loop alone
    ideal_speedup_uniform: float | None  # N / (1 + (N-1) f), uniform schedules only
    achieved_fraction: float | None  # speedup / ideal_speedup
    # --compile only (None otherwise)
    compile_mode: str | None = None  # the torch.compile mode of this row (None = eager)
    warmup_seconds: float | None = None  # the scenario's warm-up call; compiled rows: compile + warm-up
    graphs_compiled: int | None = None  # graphs dynamo compiled during the warm-up call
    recompiles_timed: int | None = None  # graphs compiled during the timed calls (0 expected)
    speedup_vs_compiled: float | None = None  # compiled baseline median / this median (compiled rows)
    achieved_fraction_compiled: float | None = None  # speedup_vs_compiled / ideal_speedup

    @classmethod
    def new(cls, model: str, steps: int, scenario: Scenario, pattern: Sequence[bool]) -> ScenarioResult:
        """What ran (model, shape, setting) and its step pattern; every measured or counted number unset."""
        s = scenario.setting
        cached = not s.is_baseline
        return cls(
            model=model, height=scenario.height, width=scenario.width, batch_size=scenario.batch_size,
            variant=s.label, cache_interval=s.cache_interval if cached else None,
            cache_branch_id=s.cache_branch_id if cached else None, skip_mode=s.skip_mode if cached else None,
            steps=steps, seconds=math.nan, seconds_all=[], speedup=math.nan, peak_memory_bytes=None,
            memory_overhead=None, unet_calls=len(pattern), full_steps=sum(pattern),
            retrieval_steps=len(pattern) - sum(pattern), pattern=format_pattern(pattern),
            step_ms_full=None, step_ms_retrieval=None, flops_full_step=None, flops_retrieval_step=None,
            flop_ratio=None, flops_vae_decode=None, ideal_speedup=None, ideal_speedup_unet=None,
            ideal_speedup_uniform=None, achieved_fraction=None,
        )

    def add_flops(self, flops: PatternFlops) -> None:
        """FLOP counts and the FLOP-ideal speedups of this scenario's pattern."""
        self.flops_full_step, self.flops_retrieval_step = flops.full_step, flops.retrieval_step
        self.flop_ratio, self.flops_vae_decode = flops.ratio, flops.vae_decode
        self.ideal_speedup, self.ideal_speedup_unet = flops.ideal, flops.ideal_unet
        self.ideal_speedup_uniform = flops.ideal_uniform

    def add_timing(self, timing: Timing, base: ScenarioResult | None, compiled_base: ScenarioResult | None,
                   compiled: bool) -> None:
        """Measured numbers; speedups against ``base`` (the eager original; ``None``: this is it) and, for
        compiled rows, ``compiled_base`` (the compiled original; ``None``: this is it). Call after :meth:`add_flops`."""
        self.seconds, self.seconds_all = timing.seconds, list(timing.seconds_all)
        self.speedup = base.seconds / self.seconds if base is not None else 1.0
        self.peak_memory_bytes = timing.peak_memory_bytes
        self.memory_overhead = _overhead(timing.peak_memory_bytes,
                                         base.peak_memory_bytes if base is not None else timing.peak_memory_bytes)
        self.step_ms_full, self.step_ms_retrieval = timing.step_ms_full, timing.step_ms_retrieval
        self.compile_mode, self.warmup_seconds = timing.compile_mode, timing.warmup_seconds
        self.graphs_compiled, self.recompiles_timed = timing.graphs_compiled, timing.recompiles_timed
        if self.ideal_speedup:
            self.achieved_fraction = self.speedup / self.ideal_speedup
        if compiled:
            self.speedup_vs_compiled = compiled_base.seconds / self.seconds if compiled_base is not None else 1.0
            if self.ideal_speedup:
                self.achieved_fraction_compiled = self.speedup_vs_compiled / self.ideal_speedup


def _overhead(peak: int | None, base_peak: int | None) -> float | None:
    """``(peak - base_peak) / base_peak``; None when either is unknown (CPU)."""
    if peak is None or not base_peak:
        return None
    return (peak - base_peak) / base_peak


@dataclass
class BenchReport:
    """A whole run: settings, environment and one :class:`ScenarioResult` per scenario."""

    settings: dict[str, Any]
    env: dict[str, Any]
    results: list[ScenarioResult] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return json_document("deepcache bench", settings=self.settings, env=self.env,
                             results=[asdict(r) for r in self.results])


def report_settings(cfg: BenchConfig, model_name: str, source: str, weights: str, device: torch.device,
                    dtype: torch.dtype, family: str = "unet") -> dict[str, Any]:
    """The ``settings`` section of the report: the config, the model, its denoiser's family (``unet`` or
    ``transformer``: the tables name it) and what was timed."""
    s = asdict(cfg)
    s.update({
        "variants": [v.to_dict() for v in cfg.variants],
        "resolutions": [list(r) if isinstance(r, tuple) else r for r in cfg.resolutions],
        "batch_sizes": list(cfg.batch_sizes),
        "model_name": model_name,
        "model_source": source,
        "weights": weights,
        "denoiser": family,
        "timed": TIMED_TEMPLATE.format(denoiser_name(family)),
        "text_encoding": "excluded",
        "output_type": "np",
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "shapes_run": [list(x) for x in cfg.shapes()],
        "tiny_resolution_divisor": TINY_RESOLUTION_DIVISOR if cfg.tiny else None,
        "flops_only": False,
        "compile_mode": cfg.compile,  # run_benchmark replaces "auto" by the mode used
    })
    return s
