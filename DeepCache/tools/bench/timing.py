"""How ``deepcache bench`` times: warm-up, interleaved repeats, per-step times, peak memory, compiled U-Nets.

For each (resolution, batch) shape, every scenario (the original and each setting, eager and with
``--compile`` also compiled) is warmed up once, then the scenarios are run ``repeats`` times
*interleaved* (the order rotates every round: :func:`DeepCache.tools.runs.rotation`) and the median is reported.
Each call is timed by the tools' one timed call (:func:`DeepCache.tools.runs.timed`: only the pipeline call, between
``torch.cuda.synchronize()`` on CUDA); peak memory is reset before every call; per-step times come from CUDA events
(no extra sync) or ``perf_counter`` in U-Net forward hooks.

Example::

    >>> from DeepCache.tools.bench.scenarios import BenchConfig
    >>> from DeepCache.tools.bench.timing import run_benchmark
    >>> from DeepCache.tools.settings import Setting
    >>> cfg = BenchConfig(model="sd15", variants=(Setting(3, 0),), steps=4, scheduler="ddim", repeats=1,
    ...                   warmup_steps=0, tiny=True, device="cpu", count_flops=False)
    >>> [(r.variant, r.pattern) for r in run_benchmark(cfg, progress=False).results]
    [('original', 'FFFF'), ('I=3, B=0', 'FrrF')]
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .flops import scenario_flops
from .models import build_pipeline, make_inputs
from .results import BenchReport, ScenarioResult, Timing, report_settings
from .scenarios import BenchConfig, Scenario
from ..cli_common import Progress
from ..pipelines import resolve_device, resolve_dtype
from ..report import environment
from ..runs import rotation, timed
from ..settings import applied

__all__ = ["StepTimer", "compile_unet", "run_benchmark"]


class StepTimer:
    """Times every U-Net evaluation with forward pre/post hooks (CUDA events on GPU: no extra sync)."""

    def __init__(self, unet: torch.nn.Module, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._marks: list[tuple[Any, Any]] = []
        self._open: Any = None
        self._handles = [unet.register_forward_pre_hook(self._pre), unet.register_forward_hook(self._post)]

    def _now(self) -> Any:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    # compiler.disable: under torch.compile every Python frame in the call is a candidate for a graph
    @torch.compiler.disable
    def _pre(self, module: Any, args: Any) -> None:
        self._open = self._now()

    @torch.compiler.disable
    def _post(self, module: Any, args: Any, output: Any) -> None:
        self._marks.append((self._open, self._now()))

    def start(self) -> None:
        self._marks = []

    def step_ms(self) -> list[float]:
        """Milliseconds of each U-Net evaluation since :meth:`start` (call after synchronizing)."""
        if self.cuda:
            return [float(a.elapsed_time(b)) for a, b in self._marks]
        return [(b - a) * 1e3 for a, b in self._marks]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


@dataclass
class _Sample:
    """One timed pipeline call."""

    seconds: float
    step_ms: list[float]
    pattern: tuple[bool, ...]
    peak: int | None


def _median(values: Sequence[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def _timing(label: str, samples: Sequence[_Sample]) -> Timing:
    """Median seconds, per-step medians by step kind and peak memory of a scenario's samples."""
    complete = [s for s in samples if len(s.step_ms) == len(s.pattern)]
    if len(complete) < len(samples):
        print(f"deepcache bench: warning: {label}: timed {[len(s.step_ms) for s in samples]} U-Net calls but the "
              f"helper reported {[len(s.pattern) for s in samples]} steps; per-step medians skip those runs.",
              file=sys.stderr)
    by_kind: dict[bool, list[float]] = {True: [], False: []}
    for s in complete:
        for ms, full in zip(s.step_ms, s.pattern, strict=True):
            by_kind[full].append(ms)
    peaks = [s.peak for s in samples if s.peak is not None]
    return Timing(seconds_all=[s.seconds for s in samples], step_ms_full=_median(by_kind[True]),
                  step_ms_retrieval=_median(by_kind[False]), peak_memory_bytes=max(peaks) if peaks else None)


def graph_count() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def compile_unet(unet: torch.nn.Module, mode: str, n_graphs: int) -> torch.nn.Module:
    """``torch.compile`` the U-Net for the compiled columns: static shapes, one graph per step kind.

    DeepCache needs nothing special: its per-step decision runs in forward hooks outside the graphs,
    so the U-Net compiles to two graphs per shape and branch (full step, retrieval step).
    """
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):  # every (shape, branch, step kind) is a graph
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), n_graphs + 8))
    return torch.compile(unet, mode=mode, fullgraph=True, dynamic=False)


def run_benchmark(cfg: BenchConfig, *, progress: bool = True,
                  on_result: Callable[[ScenarioResult], None] | None = None) -> BenchReport:
    """Build the model, run every scenario of ``cfg`` and return the report.

    ``on_result`` is called with each :class:`ScenarioResult` as soon as its shape is done (the CLI
    prints it as a JSON line, so a run cut short still leaves what finished).
    """
    from ... import DeepCacheSDHelper

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    built = build_pipeline(cfg.model, device=device, dtype=dtype, scheduler=cfg.scheduler, tiny=cfg.tiny)
    pipe = built.pipe
    kind = built.kind  # U-Net or transformer: its denoiser, call keywords and FLOP counter
    report = BenchReport(report_settings(cfg, built.name, built.source, built.weights, device, dtype, kind.family),
                         environment(device, dtype, pipe))
    flops = kind.flop_counter() if cfg.count_flops else None
    helper = DeepCacheSDHelper(pipe=pipe)
    timer = StepTimer(kind.denoiser, device)
    cuda = device.type == "cuda"
    compile_mode = None if cfg.compile is None else (
        ("reduce-overhead" if cuda else "default") if cfg.compile == "auto" else cfg.compile)
    report.settings["compile_mode"] = compile_mode
    eager_unet, compiled_unet = kind.denoiser, None
    if compile_mode is not None:
        branches = {s.cache_branch_id for s in cfg.settings_run() if not s.is_baseline}
        compiled_unet = compile_unet(eager_unet, compile_mode, len(cfg.shapes()) * (1 + 2 * len(branches)))
    total = len(cfg.scenarios()) * ((1 if cfg.warmup_steps else 0) + cfg.repeats)
    bar = Progress(total, progress, desc="deepcache bench")

    def call(sc: Scenario, inputs: dict[str, torch.Tensor], steps: int) -> _Sample:
        gen = torch.Generator(device).manual_seed(cfg.seed)
        kind.denoiser = compiled_unet if sc.compiled else eager_unet
        with applied(helper, sc.setting, steps), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # random weights may overflow in the image cast
            timer.start()
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            _, seconds = timed(lambda: pipe(**inputs, height=sc.height, width=sc.width, num_inference_steps=steps,
                                            **kind.guidance_kwargs(cfg.guidance_scale), generator=gen,
                                            output_type="np"), device)
            peak = int(torch.cuda.max_memory_allocated(device)) if cuda else None
            step_ms = timer.step_ms()
        pattern = (True,) * len(step_ms) if sc.setting.is_baseline else tuple(helper.last_steps)
        return _Sample(seconds, step_ms, pattern, peak)

    try:
        for (h, w, b) in cfg.shapes():
            scenarios = cfg.shape_scenarios(h, w, b)
            inputs = make_inputs(built, batch_size=b, device=device, dtype=dtype, seed=cfg.seed)
            warm: dict[Scenario, tuple[float, int]] = {}  # seconds and graphs compiled by the warm-up call
            if cfg.warmup_steps:
                for sc in scenarios:
                    g0, t0 = graph_count(), time.perf_counter()
                    call(sc, inputs, cfg.warmup_steps)
                    warm[sc] = (time.perf_counter() - t0, graph_count() - g0)
                    bar.update(f"warm-up {sc.label}")
            samples: dict[Scenario, list[_Sample]] = {sc: [] for sc in scenarios}
            recompiles: dict[Scenario, int] = {sc: 0 for sc in scenarios}
            for rep in range(cfg.repeats):
                for sc in rotation(scenarios, rep):  # no scenario always runs first
                    g0 = graph_count()
                    samples[sc].append(call(sc, inputs, cfg.steps))
                    recompiles[sc] += graph_count() - g0
                    bar.update(sc.label)
            base: dict[bool, ScenarioResult] = {}  # the original pipeline, eager (False) and compiled (True)
            for sc in scenarios:
                timing = _timing(sc.label, samples[sc])
                if compile_mode is not None:
                    timing.compile_mode = compile_mode if sc.compiled else None
                    timing.warmup_seconds, timing.graphs_compiled = warm.get(sc, (None, None))
                    timing.recompiles_timed = recompiles[sc]
                pattern = samples[sc][-1].pattern
                res = ScenarioResult.new(built.name, cfg.steps, sc, pattern)
                if flops is not None and pattern:
                    res.add_flops(scenario_flops(flops, sc, pattern, cfg.guidance_scale))
                res.add_timing(timing, base.get(False), base.get(True), sc.compiled)
                if sc.setting.is_baseline:
                    base[sc.compiled] = res
                report.results.append(res)
                if on_result is not None:
                    on_result(res)
            del inputs
    finally:
        kind.denoiser = eager_unet
        bar.close()
        timer.remove()
    return report
