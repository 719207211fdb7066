"""What ``deepcache bench`` runs: a :class:`BenchConfig` (from flags or a preset) and its grid of scenarios.

A scenario is one shape (height, width, batch) and one :class:`~DeepCache.tools.settings.Setting` (the
original pipeline or a DeepCache setting), eager or compiled.

Example::

    >>> from DeepCache.tools.bench.scenarios import preset_config
    >>> cfg = preset_config("docs-table", tiny=True)
    >>> cfg.shapes()[:2], [s.label for s in cfg.scenarios()[:2]]
    ([(64, 64, 8), (64, 64, 4)], ['64x64 b8 original', '64x64 b8 I=3, B=0'])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .models import BUILTIN_MODELS, SCHEDULERS
from ..pipelines import DTYPES
from ..settings import BASELINE, Setting, baseline_first

__all__ = ["COMPILE_MODES", "PRESETS", "TINY_RESOLUTION_DIVISOR", "BenchConfig", "Scenario", "preset_config"]

#: ``--compile`` modes (``auto``: ``reduce-overhead``, i.e. CUDA graphs, on CUDA; ``default`` on CPU).
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

#: With ``--tiny``, nominal resolutions are divided by this (so CI runs in seconds).
TINY_RESOLUTION_DIVISOR = 8


@dataclass(frozen=True)
class Scenario:
    """One timed configuration: a shape and a setting (:data:`~DeepCache.tools.settings.BASELINE`: the original)."""

    height: int
    width: int
    batch_size: int
    setting: Setting = BASELINE
    compiled: bool = False  # the U-Net runs under torch.compile (BenchConfig.compile)

    @property
    def label(self) -> str:
        return f"{self.height}x{self.width} b{self.batch_size} {'compiled ' if self.compiled else ''}{self.setting.label}"


@dataclass(frozen=True)
class BenchConfig:
    """Everything that defines a benchmark run (the CLI fills it from flags and ``--preset``).

    ``resolutions`` are nominal sizes (``512`` or ``(768, 512)`` as height, width); with ``tiny``
    they are divided by :data:`TINY_RESOLUTION_DIVISOR`. ``device``/``dtype`` may be ``"auto"``
    (CUDA and float16 when available, else CPU and float32). ``variants`` are the DeepCache settings
    timed against the original pipeline.
    """

    model: str = "sd21"
    resolutions: tuple[int | tuple[int, int], ...] = (512,)
    batch_sizes: tuple[int, ...] = (1,)
    variants: tuple[Setting, ...] = (Setting(3, 0),)
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
        object.__setattr__(self, "variants", tuple(Setting.of(v) for v in self.variants))
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

    def settings_run(self) -> list[Setting]:
        """The original pipeline, then each variant (a variant that never caches is the original: skipped)."""
        return baseline_first(self.variants)

    def shape_scenarios(self, height: int, width: int, batch: int) -> list[Scenario]:
        """One shape's scenarios: (original, then each variant) for eager [and then compiled]."""
        modes = (False, True) if self.compile else (False,)
        return [Scenario(height, width, batch, s, c) for c in modes for s in self.settings_run()]

    def scenarios(self) -> list[Scenario]:
        """The grid: every shape × (original, then each variant) [× (eager, compiled) with ``compile``]."""
        return [sc for shape in self.shapes() for sc in self.shape_scenarios(*shape)]


PRESETS: dict[str, dict[str, Any]] = {
    # The diffusers documentation's table: SD2.1, 50 DDIM steps, 512/768/1024 x 8/4/1.
    "docs-table": {
        "model": "sd21",
        "resolutions": (512, 768, 1024),
        "batch_sizes": (8, 4, 1),
        "variants": (Setting(3, 0), Setting(5, 0), Setting(5, 1)),
        "steps": 50,
        "scheduler": "ddim",
    },
}


def preset_config(name: str | None, **overrides: Any) -> BenchConfig:
    """The :class:`BenchConfig` of a preset (``None``: the defaults), with ``overrides`` applied.

    >>> preset_config("docs-table").shapes()[:4]
    [(512, 512, 8), (512, 512, 4), (512, 512, 1), (768, 768, 8)]
    """
    if name is not None and name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}.")
    return BenchConfig(**{**(PRESETS[name] if name else {}), "preset": name, **overrides})
