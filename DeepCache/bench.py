"""``deepcache bench``: time DeepCache against the original pipeline on full-size models.

Reproduces the table the diffusers documentation publishes for DeepCache (Stable Diffusion v2.1,
50 DDIM steps, resolutions 512/768/1024 × batch sizes 8/4/1, the original pipeline and DeepCache at
``(I=3, B=0)``, ``(I=5, B=0)``, ``(I=5, B=1)``), with speedups, peak GPU memory, per-step times and
the FLOP-ideal speedup. Built-in models are full size with random weights (timing does not depend
on the weight values, so nothing is downloaded); text encoding is excluded (random prompt
embeddings of the right shape are passed), and what is timed is the pipeline call end to end:
the U-Net denoising loop plus the VAE decode.

Method: for each (resolution, batch) shape, every scenario (the baseline and each variant) is
warmed up once, then the scenarios are run ``repeats`` times *interleaved* (the order rotates every
round) and the median is reported; on CUDA the timed region is bracketed by
``torch.cuda.synchronize()`` and peak memory is reset before every call.

Example::

    $ deepcache bench --preset docs-table --device cuda --out results.json --markdown table.md
    $ deepcache bench --preset docs-table --device cpu --tiny --steps 10 --repeats 1
    $ deepcache bench --model sdxl --resolution 1024 --batch-size 1 --variant 3,0 --flops-only

or from Python::

    >>> from DeepCache.bench import BenchConfig, Variant, run_benchmark
    >>> cfg = BenchConfig(model="sd15", resolutions=(512,), batch_sizes=(1,), variants=(Variant(3, 0),),
    ...                   steps=4, scheduler="ddim", repeats=1, warmup_steps=2, tiny=True, device="cpu")
    >>> [s.label for s in cfg.scenarios()]
    ['64x64 b1 original', '64x64 b1 I=3, B=0']
    >>> report = run_benchmark(cfg, progress=False)
    >>> [(r.variant, r.pattern) for r in report.results]
    [('original', 'FFFF'), ('I=3, B=0', 'FrrF')]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import platform
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch

from .bench_flops import StepFlops, count_unet_step_flops, count_vae_decode_flops, ideal_speedup_pattern, \
    ideal_speedup_uniform
from .bench_models import BUILTIN_MODELS, SCHEDULERS, BuiltPipeline, build_meta_unet, build_meta_vae, \
    build_pipeline, load_config, make_inputs, tiny_config
from .schedule import SKIP_MODES, CacheParams, schedule_pattern

SCHEMA_VERSION = 1

#: ``--compile`` modes (``auto``: ``reduce-overhead``, i.e. CUDA graphs, on CUDA; ``default`` on CPU).
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

#: What the benchmark times, stated in every output.
TIMED = "pipeline call end to end: U-Net denoising loop + VAE decode (text encoding excluded: random prompt embeddings)"

#: With ``--tiny``, nominal resolutions are divided by this (so CI runs in seconds).
TINY_RESOLUTION_DIVISOR = 8

DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16,
                                  "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}


# ---------------------------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """One DeepCache setting: interval ``I``, branch ``B`` and schedule (``uniform``/``non-uniform``).

    >>> Variant.parse("5,1").label, Variant.parse("5,1,non-uniform").label
    ('I=5, B=1', 'I=5, B=1, non-uniform')
    """

    cache_interval: int
    cache_branch_id: int
    skip_mode: str = "uniform"

    def __post_init__(self) -> None:
        if self.skip_mode == "custom":
            raise ValueError('--variant supports skip_mode "uniform" or "non-uniform" ("custom" needs full_steps).')
        self.params()  # validates interval, branch and mode with the library's own checks

    def params(self) -> CacheParams:
        """The :class:`DeepCache.schedule.CacheParams` of this variant."""
        return CacheParams(cache_interval=self.cache_interval, cache_branch_id=self.cache_branch_id,
                           skip_mode=self.skip_mode)

    def params_for(self, steps: int) -> CacheParams:
        """The parameters used for a ``steps``-step run (non-uniform: ``center`` clamped to ``steps - 1``)."""
        if self.skip_mode == "non-uniform":
            return CacheParams(cache_interval=self.cache_interval, cache_branch_id=self.cache_branch_id,
                               skip_mode=self.skip_mode, center=min(15, steps - 1))
        return self.params()

    @property
    def label(self) -> str:
        base = f"I={self.cache_interval}, B={self.cache_branch_id}"
        return base if self.skip_mode == "uniform" else f"{base}, {self.skip_mode}"

    @classmethod
    def parse(cls, text: str) -> "Variant":
        """Parse ``"I,B"`` or ``"I,B,MODE"`` (e.g. ``"3,0"``, ``"5,1,non-uniform"``)."""
        parts = [p.strip() for p in str(text).split(",")]
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"malformed variant {text!r}: expected INTERVAL,BRANCH[,MODE], e.g. 3,0 or 5,1,non-uniform.")
        try:
            interval, branch = int(parts[0]), int(parts[1])
        except ValueError:
            raise ValueError(f"malformed variant {text!r}: INTERVAL and BRANCH must be integers, e.g. 3,0.") from None
        mode = parts[2] if len(parts) == 3 else "uniform"
        if mode not in SKIP_MODES or mode == "custom":
            raise ValueError(f"malformed variant {text!r}: MODE must be uniform or non-uniform, got {mode!r}.")
        return cls(interval, branch, mode)


@dataclass(frozen=True)
class Scenario:
    """One timed configuration: a shape and a variant (``None`` = the original pipeline)."""

    height: int
    width: int
    batch_size: int
    variant: Variant | None = None
    compiled: bool = False  # the U-Net runs under torch.compile (BenchConfig.compile)

    @property
    def label(self) -> str:
        name = self.variant.label if self.variant else "original"
        return f"{self.height}x{self.width} b{self.batch_size} {'compiled ' if self.compiled else ''}{name}"


@dataclass(frozen=True)
class BenchConfig:
    """Everything that defines a benchmark run (the CLI fills it from flags and ``--preset``).

    ``resolutions`` are nominal sizes (``512`` or ``(768, 512)`` as height, width); with ``tiny``
    they are divided by :data:`TINY_RESOLUTION_DIVISOR`. ``device``/``dtype`` may be ``"auto"``
    (CUDA and float16 when available, else CPU and float32).
    """

    model: str = "sd21"
    resolutions: tuple[int | tuple[int, int], ...] = (512,)
    batch_sizes: tuple[int, ...] = (1,)
    variants: tuple[Variant, ...] = (Variant(3, 0),)
    steps: int = 50
    scheduler: str = "default"
    dtype: str = "auto"
    device: str = "auto"
    guidance_scale: float = 7.5
    repeats: int = 3
    warmup_steps: int = 10
    tiny: bool = False
    seed: int = 0
    threads: int | None = None  # CPU threads for torch (None = torch's default)
    count_flops: bool = True
    preset: str | None = None
    # torch.compile mode for the extra compiled columns (None = eager only; "auto" = reduce-overhead on
    # CUDA, default on CPU); see COMPILE_MODES and docs/compile.md
    compile: str | None = None

    def __post_init__(self) -> None:
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise ValueError(f"unknown compile mode {self.compile!r}; choose one of {', '.join(COMPILE_MODES)}.")
        if not self.resolutions or not self.batch_sizes:
            raise ValueError("need at least one resolution and one batch size.")
        if any(int(b) < 1 for b in self.batch_sizes):
            raise ValueError(f"batch sizes must be >= 1, got {list(self.batch_sizes)}.")
        for name, value, low in (("steps", self.steps, 1), ("repeats", self.repeats, 1), ("warmup_steps", self.warmup_steps, 0)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads must be an integer >= 1, got {self.threads!r}.")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(SCHEDULERS)}.")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose auto, float16, bfloat16 or float32.")
        if self.tiny and self.model not in BUILTIN_MODELS:
            raise ValueError(f"--tiny needs a built-in model ({', '.join(BUILTIN_MODELS)}), got {self.model!r}.")
        for hw in self.shapes_hw():
            if hw[0] % 8 or hw[1] % 8 or min(hw) < 8:
                what = f"nominal resolution / {TINY_RESOLUTION_DIVISOR} with --tiny" if self.tiny else "resolution"
                raise ValueError(f"{what} must be a positive multiple of 8 (the VAE downsamples 8x), got {hw[0]}x{hw[1]}.")

    def shapes_hw(self) -> list[tuple[int, int]]:
        """The (height, width) pairs actually run, in order."""
        out = []
        for r in self.resolutions:
            h, w = (r, r) if isinstance(r, int) else (int(r[0]), int(r[1]))
            if self.tiny:
                h, w = h // TINY_RESOLUTION_DIVISOR, w // TINY_RESOLUTION_DIVISOR
            out.append((h, w))
        return out

    def shapes(self) -> list[tuple[int, int, int]]:
        """(height, width, batch) in run order: resolutions outer, batch sizes inner (the docs' row order)."""
        return [(h, w, int(b)) for (h, w) in self.shapes_hw() for b in self.batch_sizes]

    def scenarios(self) -> list[Scenario]:
        """The grid: every shape × (original, then each variant) [× (eager, compiled) with ``compile``]."""
        runs: list[Variant | None] = [None, *self.variants]
        modes = (False, True) if self.compile else (False,)
        return [Scenario(h, w, b, v, c) for (h, w, b) in self.shapes() for c in modes for v in runs]


PRESETS: dict[str, dict[str, Any]] = {
    # The diffusers documentation's table: SD2.1, 50 DDIM steps, 512/768/1024 x 8/4/1.
    "docs-table": {
        "model": "sd21",
        "resolutions": (512, 768, 1024),
        "batch_sizes": (8, 4, 1),
        "variants": (Variant(3, 0), Variant(5, 0), Variant(5, 1)),
        "steps": 50,
        "scheduler": "ddim",
    },
}


def preset_config(name: str, **overrides: Any) -> BenchConfig:
    """The :class:`BenchConfig` of a preset, with ``overrides`` applied.

    >>> preset_config("docs-table").shapes()[:4]
    [(512, 512, 8), (512, 512, 4), (512, 512, 1), (768, 768, 8)]
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}.")
    return BenchConfig(**{**PRESETS[name], "preset": name, **overrides})


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------
@dataclass
class ScenarioResult:
    """Measured and derived numbers for one scenario (one row of the detailed table / JSON)."""

    model: str
    height: int
    width: int
    batch_size: int
    variant: str  # "original" or the variant label
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


@dataclass
class BenchReport:
    """A whole run: settings, environment and one :class:`ScenarioResult` per scenario."""

    settings: dict[str, Any]
    env: dict[str, Any]
    results: list[ScenarioResult] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "tool": "deepcache bench", "settings": self.settings,
                "env": self.env, "results": [asdict(r) for r in self.results]}


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but torch sees no CUDA device.")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}; use cpu, cuda or cuda:N.")
    return dev


def _resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


def environment(device: torch.device, dtype: torch.dtype, pipe: Any | None = None) -> dict[str, Any]:
    """The versions, card and attention backend a result depends on."""
    import diffusers

    try:
        import transformers
        tf_version: str | None = transformers.__version__
    except Exception:  # noqa: BLE001 - optional for the benchmark
        tf_version = None
    from . import __version__

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": tf_version,
        "deepcache": __version__,
        "device": str(device),
        "gpu_name": None,
        "cuda": torch.version.cuda,
        "cpu_threads": torch.get_num_threads(),
        "dtype": str(dtype).replace("torch.", ""),
        "attention_backend": None,
        "sdpa_kernels_enabled": None,
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if device.type == "cuda":
        env["gpu_name"] = torch.cuda.get_device_name(device)
        env["sdpa_kernels_enabled"] = {
            "flash": torch.backends.cuda.flash_sdp_enabled(),
            "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
            "math": torch.backends.cuda.math_sdp_enabled(),
        }
    if pipe is not None:
        procs = sorted({type(p).__name__ for p in pipe.unet.attn_processors.values()})
        sdpa = any(name.endswith("2_0") for name in procs)
        env["attention_backend"] = ("torch SDPA (" if sdpa else "") + ", ".join(procs) + (")" if sdpa else "")
    return env


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
class _StepTimer:
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
    seconds: float
    step_ms: list[float]
    pattern: tuple[bool, ...]
    peak: int | None


def _median(values: Sequence[float]) -> float | None:
    return float(statistics.median(values)) if values else None


class _Progress:
    """tqdm on stderr when available (and wanted), else nothing."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar: Any = None
        if enabled:
            try:
                from tqdm.auto import tqdm
                self.bar = tqdm(total=total, file=sys.stderr, desc="deepcache bench", unit="call", dynamic_ncols=True)
            except Exception:  # noqa: BLE001 - progress is cosmetic
                self.bar = None

    def update(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _FlopCache:
    """FLOP counts per shape on meta-device copies of the U-Net and VAE (shapes only, no compute).

    Counts are taken at batch 1 and scaled: every counted op of the U-Net and the VAE decoder is
    per sample, so FLOPs are exactly linear in the batch (``tests/test_bench.py`` checks this).
    """

    def __init__(self, unet_config: Any, vae_config: Any) -> None:
        self.unet = build_meta_unet(unet_config)
        self.vae = build_meta_vae(vae_config)
        self._steps: dict[tuple[int, int, int], StepFlops] = {}  # (latent h, latent w, branch) at batch 1
        self._vae: dict[tuple[int, int], int] = {}  # (latent h, latent w) at batch 1

    def step(self, unet_batch: int, lh: int, lw: int, branch: int) -> StepFlops:
        key = (lh, lw, branch)
        if key not in self._steps:
            self._steps[key] = count_unet_step_flops(self.unet, batch=1, latent_height=lh,
                                                     latent_width=lw, cache_branch_id=branch)
        one = self._steps[key]
        return StepFlops(full=one.full * unet_batch, retrieval=one.retrieval * unet_batch)

    def vae_decode(self, batch: int, lh: int, lw: int) -> int:
        key = (lh, lw)
        if key not in self._vae:
            self._vae[key] = count_vae_decode_flops(self.vae, batch=1, latent_height=lh, latent_width=lw)
        return self._vae[key] * batch


def _settings(cfg: BenchConfig, built_name: str, source: str, weights: str, device: torch.device,
              dtype: torch.dtype) -> dict[str, Any]:
    s = asdict(cfg)
    s["variants"] = [asdict(v) | {"label": v.label} for v in cfg.variants]
    s["resolutions"] = [list(r) if isinstance(r, tuple) else r for r in cfg.resolutions]
    s["batch_sizes"] = list(cfg.batch_sizes)
    s.update({
        "model_name": built_name,
        "model_source": source,
        "weights": weights,
        "timed": TIMED,
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


def _unet_batch(pipe: Any, batch: int, guidance_scale: float) -> int:
    cfg_on = guidance_scale > 1 and getattr(pipe.unet.config, "time_cond_proj_dim", None) is None
    return 2 * batch if cfg_on else batch


def _overhead(peak: int | None, base_peak: int | None) -> float | None:
    """``(peak - base_peak) / base_peak``; None when either is unknown (CPU)."""
    if peak is None or not base_peak:
        return None
    return (peak - base_peak) / base_peak


def _make_result(built: BuiltPipeline, cfg: BenchConfig, sc: Scenario, samples: list[_Sample],
                 base: ScenarioResult | None, flops: _FlopCache | None, *, compile_mode: str | None = None,
                 warmup_seconds: float | None = None, graphs_compiled: int | None = None,
                 recompiles_timed: int | None = None, cbase: ScenarioResult | None = None) -> ScenarioResult:
    if any(len(s.step_ms) != len(s.pattern) for s in samples):
        print(f"deepcache bench: warning: {sc.label}: timed {[len(s.step_ms) for s in samples]} U-Net calls but the "
              f"helper reported {[len(s.pattern) for s in samples]} steps; per-step medians skip those runs.",
              file=sys.stderr)
    seconds_all = [s.seconds for s in samples]
    med = float(statistics.median(seconds_all))
    pattern = samples[-1].pattern
    full_ms = [ms for s in samples if len(s.step_ms) == len(s.pattern) for ms, p in zip(s.step_ms, s.pattern, strict=True) if p]
    retr_ms = [ms for s in samples if len(s.step_ms) == len(s.pattern) for ms, p in zip(s.step_ms, s.pattern, strict=True) if not p]
    peaks = [s.peak for s in samples if s.peak is not None]
    peak = max(peaks) if peaks else None
    v = sc.variant
    r = ScenarioResult(
        model=built.name, height=sc.height, width=sc.width, batch_size=sc.batch_size,
        variant=v.label if v else "original", cache_interval=v.cache_interval if v else None,
        cache_branch_id=v.cache_branch_id if v else None, skip_mode=v.skip_mode if v else None,
        steps=cfg.steps, seconds=med, seconds_all=seconds_all,
        speedup=(base.seconds / med) if base is not None else 1.0,
        peak_memory_bytes=peak,
        memory_overhead=_overhead(peak, base.peak_memory_bytes if base is not None else peak),
        unet_calls=len(pattern), full_steps=sum(pattern), retrieval_steps=len(pattern) - sum(pattern),
        pattern="".join("F" if p else "r" for p in pattern),
        step_ms_full=_median(full_ms), step_ms_retrieval=_median(retr_ms),
        flops_full_step=None, flops_retrieval_step=None, flop_ratio=None, flops_vae_decode=None,
        ideal_speedup=None, ideal_speedup_unet=None, ideal_speedup_uniform=None, achieved_fraction=None,
    )
    if flops is not None and pattern:
        scale = built.pipe.vae_scale_factor
        lh, lw = sc.height // scale, sc.width // scale
        ub = _unet_batch(built.pipe, sc.batch_size, cfg.guidance_scale)
        step = flops.step(ub, lh, lw, v.cache_branch_id if v else 0)
        vae = flops.vae_decode(sc.batch_size, lh, lw)
        r.flops_full_step = step.full
        r.flops_vae_decode = vae
        if v is None:
            r.flops_retrieval_step, r.flop_ratio = None, None
            r.ideal_speedup = r.ideal_speedup_unet = r.ideal_speedup_uniform = 1.0
        else:
            r.flops_retrieval_step, r.flop_ratio = step.retrieval, step.ratio
            r.ideal_speedup = ideal_speedup_pattern(pattern, step.full, step.retrieval, vae)
            r.ideal_speedup_unet = ideal_speedup_pattern(pattern, step.full, step.retrieval)
            if v.skip_mode == "uniform":
                r.ideal_speedup_uniform = ideal_speedup_uniform(v.cache_interval, step.ratio)
        r.achieved_fraction = r.speedup / r.ideal_speedup
    r.compile_mode, r.warmup_seconds = compile_mode, warmup_seconds
    r.graphs_compiled, r.recompiles_timed = graphs_compiled, recompiles_timed
    if sc.compiled:
        r.speedup_vs_compiled = (cbase.seconds / med) if cbase is not None else 1.0
        if r.ideal_speedup:
            r.achieved_fraction_compiled = r.speedup_vs_compiled / r.ideal_speedup
    return r


def _graph_count() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _compile_unet(unet: torch.nn.Module, mode: str, n_graphs: int) -> torch.nn.Module:
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
    from . import DeepCacheSDHelper

    device = _resolve_device(cfg.device)
    dtype = _resolve_dtype(cfg.dtype, device)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    built = build_pipeline(cfg.model, device=device, dtype=dtype, scheduler=cfg.scheduler, tiny=cfg.tiny)
    pipe = built.pipe
    report = BenchReport(_settings(cfg, built.name, built.source, built.weights, device, dtype),
                         environment(device, dtype, pipe))
    flops = _FlopCache(pipe.unet.config, pipe.vae.config) if cfg.count_flops else None
    helper = DeepCacheSDHelper(pipe=pipe)
    timer = _StepTimer(pipe.unet, device)
    runs: list[Variant | None] = [None, *cfg.variants]
    cuda = device.type == "cuda"
    compile_mode = None if cfg.compile is None else (
        ("reduce-overhead" if cuda else "default") if cfg.compile == "auto" else cfg.compile)
    report.settings["compile_mode"] = compile_mode
    eager_unet, compiled_unet = pipe.unet, None
    if compile_mode is not None:
        branches = {v.cache_branch_id for v in cfg.variants}
        compiled_unet = _compile_unet(eager_unet, compile_mode, len(cfg.shapes()) * (1 + 2 * len(branches)))
    kinds = (False, True) if compiled_unet is not None else (False,)
    total = len(cfg.shapes()) * len(runs) * len(kinds) * ((1 if cfg.warmup_steps else 0) + cfg.repeats)
    bar = _Progress(total, progress)

    def call(sc: Scenario, inputs: dict[str, torch.Tensor], steps: int) -> _Sample:
        gen = torch.Generator(device).manual_seed(cfg.seed)
        pipe.unet = compiled_unet if sc.compiled else eager_unet
        if sc.variant is not None:
            v = sc.variant
            p = v.params_for(steps)
            helper.set_params(cache_interval=p.cache_interval, cache_branch_id=p.cache_branch_id,
                              skip_mode=p.skip_mode, center=p.center)
            helper.enable()
        try:
            timer.start()
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # random weights may overflow in the image cast
                pipe(**inputs, height=sc.height, width=sc.width, num_inference_steps=steps,
                     guidance_scale=cfg.guidance_scale, generator=gen, output_type="np")
            if cuda:
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - t0
            peak = int(torch.cuda.max_memory_allocated(device)) if cuda else None
            step_ms = timer.step_ms()
        finally:
            if sc.variant is not None:
                helper.disable()
        pattern = tuple(helper.last_steps) if sc.variant is not None else (True,) * len(step_ms)
        return _Sample(seconds, step_ms, pattern, peak)

    try:
        for (h, w, b) in cfg.shapes():
            scenarios = [Scenario(h, w, b, v, c) for c in kinds for v in runs]
            inputs = make_inputs(built, batch_size=b, device=device, dtype=dtype, seed=cfg.seed)
            warm: dict[Scenario, tuple[float, int]] = {}  # seconds and graphs compiled by the warm-up call
            if cfg.warmup_steps:
                for sc in scenarios:
                    g0, t0 = _graph_count(), time.perf_counter()
                    call(sc, inputs, cfg.warmup_steps)
                    warm[sc] = (time.perf_counter() - t0, _graph_count() - g0)
                    bar.update(f"warm-up {sc.label}")
            samples: dict[Scenario, list[_Sample]] = {sc: [] for sc in scenarios}
            recompiles: dict[Scenario, int] = {sc: 0 for sc in scenarios}
            for rep in range(cfg.repeats):
                k = rep % len(scenarios)  # rotate the order every round: no scenario always runs first
                for sc in scenarios[k:] + scenarios[:k]:
                    g0 = _graph_count()
                    samples[sc].append(call(sc, inputs, cfg.steps))
                    recompiles[sc] += _graph_count() - g0
                    bar.update(sc.label)
            base: ScenarioResult | None = None
            cbase: ScenarioResult | None = None
            for sc in scenarios:
                extra: dict[str, Any] = {}
                if compile_mode is not None:
                    ws, wg = warm.get(sc, (None, None))
                    extra = dict(compile_mode=compile_mode if sc.compiled else None, warmup_seconds=ws,
                                 graphs_compiled=wg, recompiles_timed=recompiles[sc], cbase=cbase)
                res = _make_result(built, cfg, sc, samples[sc], base, flops, **extra)
                if sc.variant is None and not sc.compiled:
                    base = res
                if sc.variant is None and sc.compiled:
                    cbase = res
                    res.speedup_vs_compiled = 1.0
                    res.achieved_fraction_compiled = 1.0
                report.results.append(res)
                if on_result is not None:
                    on_result(res)
            del inputs
    finally:
        pipe.unet = eager_unet
        bar.close()
        timer.remove()
    return report


def flops_report(cfg: BenchConfig) -> BenchReport:
    """FLOP counts and ideal speedups for every scenario, without building or timing the real model.

    Counts run on the ``meta`` device, so full-size SDXL takes seconds on a CPU. Needs a built-in
    model (or a local model folder, whose configs are read).
    """
    if cfg.model in BUILTIN_MODELS:
        conf = load_config(cfg.model)
        if cfg.tiny:
            conf = tiny_config(conf)
        unet_cfg, vae_cfg, name = conf["unet"], conf["vae"], cfg.model + ("-tiny" if cfg.tiny else "")
    else:
        import diffusers

        unet_cfg = diffusers.UNet2DConditionModel.load_config(cfg.model, subfolder="unet")
        vae_cfg = diffusers.AutoencoderKL.load_config(cfg.model, subfolder="vae")
        name = cfg.model
    counter = _FlopCache(unet_cfg, vae_cfg)
    scale = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    device = torch.device("meta")
    settings = _settings(cfg, name, "builtin config" if cfg.model in BUILTIN_MODELS else cfg.model, "n/a (FLOPs only)",
                         device, torch.float32)
    settings["timed"] = "nothing: FLOP counts only"
    settings["flops_only"] = True
    report = BenchReport(settings, environment(device, torch.float32))
    cfg_on = cfg.guidance_scale > 1 and unet_cfg.get("time_cond_proj_dim") is None
    for sc in cfg.scenarios():
        lh, lw = sc.height // scale, sc.width // scale
        ub = 2 * sc.batch_size if cfg_on else sc.batch_size
        v = sc.variant
        step = counter.step(ub, lh, lw, v.cache_branch_id if v else 0)
        vae = counter.vae_decode(sc.batch_size, lh, lw)
        pattern = schedule_pattern(v.params_for(cfg.steps), cfg.steps) if v else (True,) * cfg.steps
        report.results.append(ScenarioResult(
            model=name, height=sc.height, width=sc.width, batch_size=sc.batch_size,
            variant=v.label if v else "original", cache_interval=v.cache_interval if v else None,
            cache_branch_id=v.cache_branch_id if v else None, skip_mode=v.skip_mode if v else None,
            steps=cfg.steps, seconds=math.nan, seconds_all=[], speedup=math.nan, peak_memory_bytes=None,
            memory_overhead=None, unet_calls=len(pattern), full_steps=sum(pattern),
            retrieval_steps=len(pattern) - sum(pattern), pattern="".join("F" if p else "r" for p in pattern),
            step_ms_full=None, step_ms_retrieval=None, flops_full_step=step.full,
            flops_retrieval_step=step.retrieval if v else None, flop_ratio=step.ratio if v else None,
            flops_vae_decode=vae,
            ideal_speedup=ideal_speedup_pattern(pattern, step.full, step.retrieval, vae) if v else 1.0,
            ideal_speedup_unet=ideal_speedup_pattern(pattern, step.full, step.retrieval) if v else 1.0,
            ideal_speedup_uniform=ideal_speedup_uniform(v.cache_interval, step.ratio)
            if (v and v.skip_mode == "uniform") else (None if v else 1.0),
            achieved_fraction=None,
        ))
    return report


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------
def _fmt_s(x: float) -> str:
    if math.isnan(x):
        return "n/a"
    return f"{x:.4g}" if x >= 10 else f"{x:.3f}"


def _fmt(x: float | None, spec: str, suffix: str = "") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return format(x, spec) + suffix


def _header_lines(report: BenchReport) -> list[str]:
    s, e = report.settings, report.env
    card = e.get("gpu_name") or f"CPU ({e.get('cpu_threads')} thread{'s' if e.get('cpu_threads') != 1 else ''})"
    lines = [
        f"Model: {s['model_name']} ({s['weights']} weights, {s['model_source']}); {s['steps']} steps, "
        f"scheduler {s['scheduler']}, guidance {s['guidance_scale']}; {s['dtype']} on {card}.",
        f"Timed: {s['timed']}; median of {s['repeats']} interleaved repeats after a {s['warmup_steps']}-step warm-up per scenario.",
        f"torch {e['torch']}, diffusers {e['diffusers']}, DeepCache {e['deepcache']}, attention: {e.get('attention_backend') or 'n/a'}; {e['date_utc']}.",
    ]
    if s.get("tiny"):
        lines.append(f"TINY models (CI smoke test): resolutions are the nominal ones / {TINY_RESOLUTION_DIVISOR}; "
                     "these timings say nothing about real models.")
    if s["weights"] == "random":
        lines.append("Random weights: timing is identical to trained weights (same kernels, same shapes); nothing was downloaded.")
    return lines


def markdown_table(report: BenchReport) -> str:
    """The documented layout: rows resolution × batch, columns original and each variant "s (x×)"."""
    labels: list[str] = []
    for r in report.results:
        if r.variant != "original" and r.variant not in labels:
            labels.append(r.variant)
    compiled = any(r.compile_mode for r in report.results)
    head = "| Resolution | Batch size | Original | " + " | ".join(f"DeepCache ({lab})" for lab in labels) + " |"
    if compiled:  # speedups stay relative to the eager original; compiled DeepCache also vs the compiled original
        head += " Compiled original | " + " | ".join(f"Compiled DeepCache ({lab})" for lab in labels) + " |"
    sep = "|" + "---|" * (3 + len(labels) + ((1 + len(labels)) if compiled else 0))
    rows: dict[tuple[int, int, int], dict[tuple[bool, str], ScenarioResult]] = {}
    for r in report.results:
        rows.setdefault((r.height, r.width, r.batch_size), {})[(bool(r.compile_mode), r.variant)] = r
    lines = [head, sep]
    for (h, w, b), by in rows.items():
        res = str(h) if h == w else f"{h}x{w}"
        cells: list[str] = []
        for kind in ((False, True) if compiled else (False,)):
            base = by.get((kind, "original"))
            if kind:
                cells.append(f"{_fmt_s(base.seconds)} ({base.speedup:.2f}×)" if base else "n/a")
            else:
                cells.append(_fmt_s(base.seconds) if base else "n/a")
            for lab in labels:
                cell = by.get((kind, lab))
                if cell is None:
                    cells.append("n/a")
                elif math.isnan(cell.seconds):
                    cells.append(f"ideal {cell.ideal_speedup:.2f}×" if cell.ideal_speedup else "n/a")
                elif kind and cell.speedup_vs_compiled is not None:
                    cells.append(f"{_fmt_s(cell.seconds)} ({cell.speedup:.2f}×; {cell.speedup_vs_compiled:.2f}× vs compiled)")
                else:
                    cells.append(f"{_fmt_s(cell.seconds)} ({cell.speedup:.2f}×)")
        lines.append(f"| {res} | {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_compile(report: BenchReport) -> str:
    """``--compile`` rows: compile + warm-up time, graph counts, speedups vs the compiled original."""
    head = ("| Res | Batch | Variant | Mode | Compile + warm-up s | Graphs compiled | Recompiles (timed) | Seconds | "
            "Speedup vs eager original | Speedup vs compiled original | Ideal (FLOPs, e2e) | Achieved vs compiled | "
            "Full step ms | Retrieval step ms |")
    lines = [head, "|" + "---|" * 14]
    for r in report.results:
        if not r.compile_mode:
            continue
        res = str(r.height) if r.height == r.width else f"{r.height}x{r.width}"
        lines.append("| " + " | ".join([
            res, str(r.batch_size), r.variant, r.compile_mode, _fmt(r.warmup_seconds, ".1f"),
            _fmt(r.graphs_compiled, "d"), _fmt(r.recompiles_timed, "d"), _fmt_s(r.seconds), _fmt(r.speedup, ".2f", "×"),
            _fmt(r.speedup_vs_compiled, ".2f", "×"), _fmt(r.ideal_speedup, ".2f", "×"),
            _fmt(r.achieved_fraction_compiled * 100 if r.achieved_fraction_compiled is not None else None, ".0f", " %"),
            _fmt(r.step_ms_full, ".1f"), _fmt(r.step_ms_retrieval, ".1f"),
        ]) + " |")
    return "\n".join(lines)


def markdown_details(report: BenchReport) -> str:
    """One row per scenario: time, speedup, FLOP-ideal speedup and achieved fraction, step times, memory."""
    head = ("| Res | Batch | Variant | Seconds | Speedup | Ideal (FLOPs, e2e) | Achieved | Ideal U-Net N/(1+(N-1)f) | f | "
            "Full step ms | Retrieval step ms | Peak GiB | Mem overhead |")
    lines = [head, "|" + "---|" * 13]
    for r in report.results:
        res = str(r.height) if r.height == r.width else f"{r.height}x{r.width}"
        lines.append("| " + " | ".join([
            res, str(r.batch_size), ("compiled " if r.compile_mode else "") + r.variant, _fmt_s(r.seconds),
            _fmt(r.speedup, ".2f", "×"),
            _fmt(r.ideal_speedup, ".2f", "×"), _fmt(r.achieved_fraction * 100 if r.achieved_fraction is not None else None, ".0f", " %"),
            _fmt(r.ideal_speedup_uniform, ".2f", "×"), _fmt(r.flop_ratio, ".3f"),
            _fmt(r.step_ms_full, ".1f"), _fmt(r.step_ms_retrieval, ".1f"),
            _fmt(r.peak_memory_bytes / 2**30 if r.peak_memory_bytes is not None else None, ".2f"),
            _fmt(r.memory_overhead * 100 if r.memory_overhead is not None else None, "+.1f", " %"),
        ]) + " |")
    return "\n".join(lines)


def markdown_flops(report: BenchReport) -> str:
    """FLOP counts per scenario (``--flops-only``): step FLOPs, ratio, VAE decode and the ideal speedups."""
    head = ("| Res | Batch | Variant | Full / retrieval steps | Full step TFLOPs | Retrieval step TFLOPs | f | "
            "VAE decode TFLOPs | Ideal e2e | Ideal U-Net loop | N/(1+(N-1)f) |")
    lines = [head, "|" + "---|" * 11]
    for r in report.results:
        res = str(r.height) if r.height == r.width else f"{r.height}x{r.width}"
        tf = (lambda x: _fmt(x / 1e12 if x is not None else None, ".4f"))
        lines.append("| " + " | ".join([
            res, str(r.batch_size), r.variant, f"{r.full_steps} / {r.retrieval_steps}", tf(r.flops_full_step),
            tf(r.flops_retrieval_step), _fmt(r.flop_ratio, ".4f"), tf(r.flops_vae_decode),
            _fmt(r.ideal_speedup, ".3f", "×"), _fmt(r.ideal_speedup_unet, ".3f", "×"), _fmt(r.ideal_speedup_uniform, ".3f", "×"),
        ]) + " |")
    return "\n".join(lines)


def render_markdown(report: BenchReport) -> str:
    """Header lines, the documented-layout table and the detailed table (or the FLOP table)."""
    if report.settings.get("flops_only"):
        s = report.settings
        head = (f"- FLOPs only (nothing timed): {s['model_name']}, {s['steps']} steps (step pattern from DeepCache.schedule, one U-Net evaluation per step), "
                f"guidance {s['guidance_scale']} (U-Net batch = 2 x batch); counted on the meta device with "
                f"torch.utils.flop_counter (matmuls, convolutions, attention); torch {report.env['torch']}, "
                f"diffusers {report.env['diffusers']}.")
        return "\n\n".join([head, markdown_table(report), markdown_flops(report)]) + "\n"
    parts = ["\n".join(f"- {x}" for x in _header_lines(report)), markdown_table(report), markdown_details(report),
             "Ideal (FLOPs, e2e) = (n·F + V) / (n_full·F + n_retr·R + V) for this run's step pattern, with F/R the "
             "full/retrieval U-Net step FLOPs and V the VAE decode (torch.utils.flop_counter, attention included); "
             "Achieved = speedup / ideal."]
    if any(r.compile_mode for r in report.results):
        parts += [markdown_compile(report),
                  "Compiled rows: torch.compile(pipe.unet, mode=..., fullgraph=True, dynamic=False); DeepCache's step "
                  "decision runs outside the graphs (two graphs per shape and branch). Compile + warm-up s is the "
                  "scenario's first (warm-up) call; timed calls come after it."]
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def _split_list(values: Iterable[str] | None) -> list[str]:
    out: list[str] = []
    for v in values or []:
        out.extend(p.strip() for p in str(v).split(",") if p.strip())
    return out


def _parse_resolution(text: str) -> int | tuple[int, int]:
    try:
        if "x" in text.lower():
            h, w = text.lower().split("x")
            return (int(h), int(w))
        return int(text)
    except ValueError:
        raise ValueError(f"malformed resolution {text!r}: use 512 or HEIGHTxWIDTH like 768x512.") from None


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """Merge CLI flags over ``--preset`` over the defaults into a validated :class:`BenchConfig`."""
    values: dict[str, Any] = dict(PRESETS[args.preset]) if args.preset else {}
    if args.preset and args.preset not in PRESETS:
        raise ValueError(f"unknown preset {args.preset!r}; choose one of {', '.join(PRESETS)}.")
    if args.model is not None:
        values["model"] = args.model
    if args.resolution:
        values["resolutions"] = tuple(_parse_resolution(x) for x in _split_list(args.resolution))
    if args.batch_size:
        try:
            values["batch_sizes"] = tuple(int(x) for x in _split_list(args.batch_size))
        except ValueError:
            raise ValueError(f"malformed --batch-size {args.batch_size!r}: use integers like 8,4,1.") from None
    if args.variant:
        values["variants"] = tuple(Variant.parse(v) for v in args.variant)
    for key in ("steps", "scheduler", "dtype", "device", "guidance_scale", "repeats", "warmup_steps", "seed", "threads"):
        val = getattr(args, key)
        if val is not None:
            values[key] = val
    values["tiny"] = bool(args.tiny)
    values["compile"] = args.compile
    values["count_flops"] = not args.no_flops
    values["preset"] = args.preset
    return BenchConfig(**values)


_DESCRIPTION = ("Time DeepCache against the original pipeline, full-size models with random weights (or --model PATH). "
                f"Timed: {TIMED}.")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``deepcache bench`` on a ``subparsers`` object (see :mod:`DeepCache.cli`)."""
    p = subparsers.add_parser(
        "bench", help="time DeepCache vs the original pipeline (full-size models, random weights)",
        description=_DESCRIPTION,
    )
    _add_arguments(p)
    p.set_defaults(func=_run_cli)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), help="docs-table: SD2.1, 50 DDIM steps, 512/768/1024 x 8/4/1, "
                   "variants 3,0 5,0 5,1 (other flags override its values)")
    p.add_argument("--model", help=f"{', '.join(BUILTIN_MODELS)} (full size, random weights) or a local pipeline folder / hub id "
                   "(default sd21)")
    p.add_argument("--resolution", action="append", metavar="RES", help="512, or HxW; repeat or comma-separate (default 512)")
    p.add_argument("--batch-size", action="append", metavar="B", help="repeat or comma-separate (default 1)")
    p.add_argument("--variant", action="append", metavar="I,B[,MODE]",
                   help="DeepCache setting: interval, branch, optional schedule uniform|non-uniform (paper's center 15, "
                   "or steps-1 if fewer steps); repeatable (default 3,0)")
    p.add_argument("--steps", type=int, help="inference steps (default 50)")
    p.add_argument("--scheduler", choices=sorted(SCHEDULERS), help="default: the model's own scheduler")
    p.add_argument("--dtype", choices=["auto", *DTYPES], help="auto: float16 on CUDA, float32 on CPU")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--guidance-scale", type=float, help="classifier-free guidance scale (default 7.5; > 1 doubles the U-Net batch)")
    p.add_argument("--repeats", type=int, help="timed repeats per scenario, median reported (default 3)")
    p.add_argument("--warmup-steps", type=int, help="steps of the one warm-up call per scenario (default 10; 0 = none)")
    p.add_argument("--seed", type=int, help="seed of the random prompt embeddings and latents (default 0)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's own; 1 is fastest on a busy machine)")
    p.add_argument("--tiny", action="store_true", help=f"tiny models of the same structure, resolutions / {TINY_RESOLUTION_DIVISOR} (CI smoke test)")
    p.add_argument("--compile", nargs="?", const="auto", choices=COMPILE_MODES, metavar="MODE",
                   help="also time the compiled U-Net (compiled original and compiled DeepCache columns, compile time "
                   "reported separately); MODE: auto (reduce-overhead on CUDA, default on CPU), "
                   + ", ".join(COMPILE_MODES[1:]))
    p.add_argument("--flops-only", action="store_true", help="count FLOPs and ideal speedups only (meta device; no timing)")
    p.add_argument("--no-flops", action="store_true", help="skip FLOP counting")
    p.add_argument("--out", metavar="PATH", help="write the JSON report here")
    p.add_argument("--markdown", metavar="PATH", help="write the markdown tables here")
    p.add_argument("--jsonl", action="store_true", help="print each result as a JSON line on stdout as soon as it is done")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _clean(obj: Any) -> Any:
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _run_cli(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        print(f"deepcache bench: error: {exc}", file=sys.stderr)
        return 2

    def emit(res: ScenarioResult) -> None:
        if args.jsonl:
            print(json.dumps(_clean(asdict(res))), flush=True)

    try:
        if args.flops_only:
            report = flops_report(cfg)
            for res in report.results:
                emit(res)
        else:
            report = run_benchmark(cfg, progress=not args.no_progress, on_result=emit)
    except ValueError as exc:
        print(f"deepcache bench: error: {exc}", file=sys.stderr)
        return 2
    text = render_markdown(report)
    print(text, flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(_clean(report.to_json()), f, indent=1)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(text)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m DeepCache.bench ...``: the same as ``deepcache bench ...``."""
    parser = argparse.ArgumentParser(prog="python -m DeepCache.bench", description=_DESCRIPTION)
    _add_arguments(parser)
    return _run_cli(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
