"""The contenders of ``tools/dit_head_to_head.py``: each a :class:`Method` that switches one caching setting on a
``FluxPipeline`` and off again, as its own documentation says (nothing here changes how a method decides).

* ours: :class:`DeepCache.DeepCacheSDHelper` (uniform intervals x branches, uniform with ``forecast="linear"`` (with
  and without 3 full warm-up steps, as TaylorSeer's default), ``calibrate(K)`` and ``calibrate(K, forecast=True)`` on
  calibration prompts disjoint from the evaluation prompts, ``skip_mode="adaptive"`` with and without the forecast); every
  ``pipe(...)`` call is one generation (the helper starts each afresh);
* diffusers' hooks (``transformer.enable_cache(config)`` / ``disable_cache()``; the pipeline resets stateful hooks
  at the end of every call): FirstBlockCache, MagCache (ratios from ``calibrate=True`` runs on the calibration
  prompts), TaylorSeer (default, lite, intervals x orders);
* cache-dit (optional; ``cache_dit.enable_cache(pipe, ...)`` / ``disable_cache(pipe)``; it resets its context at every
  pipeline call): DBCache FnB0 dynamic, its static step masks, its TaylorSeer / FoCa / DMD calibrators, with
  ``enable_separate_cfg=True`` when true CFG makes two transformer calls per step;
* fewer steps, uncached.

Example::

    methods = catalogue(table, steps=28)
    handle = methods[1].enable(pipe, context)
    ...
    methods[1].disable(pipe, handle)
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from dit_h2h_core import CountTable, call_kwargs, quiet


@dataclass
class Context:
    """What enabling a method may need: the run's steps and guidance, calibration prompts, a per-run memo."""

    steps: int
    cfg: float
    calibration: list[str]
    memo: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    """One setting: ``enable(pipe, ctx) -> handle`` and ``disable(pipe, handle)``; ``steps`` overrides the run's."""

    family: str
    label: str
    enable: Callable[[Any, Context], Any]
    disable: Callable[[Any, Any], None]
    steps: int | None = None
    threshold: bool = False  # decides per image: report the per-prompt MAC spread
    fullgraph: bool = False  # torch.compile(pipe.transformer, fullgraph=...) for the compiled timing

    @property
    def name(self) -> str:
        return f"{self.family}: {self.label}"


def _none(pipe: Any, ctx: Context) -> None:
    return None


def _nothing(pipe: Any, handle: Any) -> None:
    return None


def uncached(steps: int | None = None) -> Method:
    label = "uncached" if steps is None else f"{steps} steps"
    return Method("uncached" if steps is None else "fewer steps", label, _none, _nothing, steps=steps, fullgraph=True)


# -- ours ------------------------------------------------------------------------------------------------------------
def _helper(pipe: Any, **params: Any) -> Any:
    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(**params)
    return helper


def _enabling(**params: Any) -> Callable[[Any, Context], Any]:
    """``enable(pipe, ctx)`` of a fixed setting: a helper with ``params``, enabled (the handle ``disable`` gets)."""
    def enable(pipe: Any, ctx: Context) -> Any:
        helper = _helper(pipe, **params)
        helper.enable()
        return helper
    return enable


def _calibration_call(ctx: Context) -> dict[str, Any]:
    generators = [torch.Generator().manual_seed(10_000 + i) for i in range(len(ctx.calibration))]
    return {**call_kwargs(list(ctx.calibration), ctx.cfg), "num_inference_steps": ctx.steps, "generator": generators}


def ours_uniform(interval: int, branch: int) -> Method:
    return Method("ours: uniform", f"I={interval} B={branch}",
                  _enabling(cache_interval=interval, cache_branch_id=branch), _disable_helper, fullgraph=True)


def ours_split(interval: int, front: int, back: int, forecast: bool = False) -> Method:
    """Uniform full steps with an asymmetric split (cache-dit's FnBn): a retrieval step runs the first ``front`` and
    the last ``back`` blocks around the cached (or, ``forecast``, extrapolated) middle residual."""
    enable = _enabling(cache_interval=interval, front_blocks=front, back_blocks=back,
                       forecast="linear" if forecast else None)
    family = "ours: split forecast" if forecast else "ours: split"
    return Method(family, f"I={interval} F{front}B{back}", enable, _disable_helper, fullgraph=True)


def ours_forecast(interval: int, branch: int, start_step: int = 0, end_step: int | None = None) -> Method:
    """Uniform full steps, retrieval steps forecast the middle residual along the line of the last two full steps
    (``forecast="linear"``); ``start_step`` full warm-up steps first (TaylorSeer's ``disable_cache_before_step``),
    full steps again from ``end_step`` on (e.g. 27 of 28: the last step, whose error goes straight to the image)."""
    enable = _enabling(cache_interval=interval, cache_branch_id=branch, forecast="linear", start_step=start_step,
                       end_step=end_step)
    label = f"I={interval} B={branch}" + (f" W={start_step}" if start_step else "")
    label += f" E={end_step}" if end_step is not None else ""
    return Method("ours: uniform forecast", label, enable, _disable_helper, fullgraph=True)


def ours_calibrated(full_steps: int, branch: int, forecast: bool = False) -> Method:
    def enable(pipe: Any, ctx: Context) -> Any:
        helper = _helper(pipe, cache_branch_id=branch)
        helper.calibrate(full_steps, forecast=forecast, **_calibration_call(ctx))
        helper.enable()
        return helper
    family = "ours: calibrated forecast" if forecast else "ours: calibrated"
    return Method(family, f"K={full_steps} B={branch}", enable, _disable_helper, fullgraph=True)


def ours_adaptive(threshold: float, cap: int, branch: int = 0, forecast: bool = False) -> Method:
    enable = _enabling(cache_interval=cap, cache_branch_id=branch, skip_mode="adaptive", threshold=threshold,
                       forecast="linear" if forecast else None)
    family = "ours: adaptive forecast" if forecast else "ours: adaptive"
    return Method(family, f"t={threshold:g} cap={cap} B={branch}", enable, _disable_helper, threshold=True,
                  fullgraph=True)


def _disable_helper(pipe: Any, helper: Any) -> None:
    helper.disable()


# -- diffusers hooks ---------------------------------------------------------------------------------------------------
def _diffusers(family: str, label: str, make: Callable[[Any, Context], Any], threshold: bool = False) -> Method:
    def enable(pipe: Any, ctx: Context) -> None:
        pipe.transformer.enable_cache(make(pipe, ctx))

    def disable(pipe: Any, handle: Any) -> None:
        pipe.transformer.disable_cache()
    return Method(family, label, enable, disable, threshold=threshold)


def first_block_cache(threshold: float) -> Method:
    def make(pipe: Any, ctx: Context) -> Any:
        from diffusers.hooks import FirstBlockCacheConfig

        return FirstBlockCacheConfig(threshold=threshold)
    return _diffusers("diffusers: FirstBlockCache", f"t={threshold:g}", make, threshold=True)


def parse_mag_ratios(printed: str) -> list[list[float]]:
    """The ratio lists MagCache's calibration prints (one per cache context and run).

    >>> parse_mag_ratios("Copy these values to MagCacheConfig(mag_ratios=...):\\n[1.0, 0.98]\\n")
    [[1.0, 0.98]]
    """
    return [ast.literal_eval(m) for m in re.findall(r"^\[[-0-9., e]+\]$", printed, flags=re.M)]


def mag_ratios(pipe: Any, ctx: Context) -> list[float]:
    """MagCache's ``calibrate=True`` runs on the calibration prompts (one call each); the mean of what it printed."""
    from diffusers.hooks import MagCacheConfig

    key = f"mag {ctx.cfg} {ctx.steps}"
    if key not in ctx.memo:
        pipe.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=ctx.steps))
        try:
            with quiet() as printed:
                for i, prompt in enumerate(ctx.calibration):
                    pipe(**call_kwargs(prompt, ctx.cfg), num_inference_steps=ctx.steps,
                         generator=torch.Generator().manual_seed(10_000 + i), output_type="latent")
        finally:
            pipe.transformer.disable_cache()
        lists = parse_mag_ratios(printed.getvalue())
        if not lists:
            raise RuntimeError("MagCache calibration printed no ratios")
        ctx.memo[key] = [float(sum(col) / len(col)) for col in zip(*lists)]
    return ctx.memo[key]


def mag_cache(threshold: float, max_skip_steps: int) -> Method:
    def make(pipe: Any, ctx: Context) -> Any:
        from diffusers.hooks import MagCacheConfig

        return MagCacheConfig(threshold=threshold, max_skip_steps=max_skip_steps, num_inference_steps=ctx.steps,
                              mag_ratios=mag_ratios(pipe, ctx))
    return _diffusers("diffusers: MagCache", f"t={threshold:g} K={max_skip_steps}", make, threshold=True)


def taylorseer(interval: int | None = None, order: int = 1, lite: bool = False) -> Method:
    def make(pipe: Any, ctx: Context) -> Any:
        from diffusers.hooks import TaylorSeerCacheConfig

        if interval is None:
            return TaylorSeerCacheConfig(use_lite_mode=lite)
        return TaylorSeerCacheConfig(cache_interval=interval, max_order=order, use_lite_mode=lite)
    family = "diffusers: TaylorSeer lite" if lite else "diffusers: TaylorSeer"
    label = "default (I=5, O=1)" if interval is None else f"I={interval} O={order}"
    return _diffusers(family, label, make)


# -- cache-dit --------------------------------------------------------------------------------------------------------
CALIBRATORS = ("taylorseer", "foca", "dmd")


def cache_dit_method(front: int, threshold: float, warmup: int, max_cached: int = -1, *, mask: str | None = None,
                     calibrator: str | None = None, order: int = 1) -> Method:
    def enable(pipe: Any, ctx: Context) -> None:
        import cache_dit

        config: dict[str, Any] = {"Fn_compute_blocks": front, "Bn_compute_blocks": 0,
                                  "residual_diff_threshold": threshold, "max_warmup_steps": warmup,
                                  "max_cached_steps": max_cached, "enable_separate_cfg": ctx.cfg > 1,
                                  "num_inference_steps": ctx.steps}
        if mask is not None:
            config |= {"steps_computation_mask": cache_dit.steps_mask(total_steps=ctx.steps, mask_policy=mask),
                       "steps_computation_policy": "static"}
        calibrators = {"taylorseer": lambda: cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=order),
                       "foca": cache_dit.FoCaCalibratorConfig, "dmd": cache_dit.DMDCalibratorConfig}
        extra = {} if calibrator is None else {"calibrator_config": calibrators[calibrator]()}
        cache_dit.enable_cache(pipe, cache_config=cache_dit.DBCacheConfig(**config), **extra)

    def disable(pipe: Any, handle: Any) -> None:
        import cache_dit

        cache_dit.disable_cache(pipe)
    if mask is not None:
        family, label = "cache-dit: static mask", f"{mask} F{front}B0"
    elif calibrator is not None:
        family = f"cache-dit: DBCache + {calibrator}"
        label = f"F{front}B0 t={threshold:g} W={warmup}" + (f" O={order}" if calibrator == "taylorseer" else "")
    else:
        family, label = f"cache-dit: DBCache F{front}B0", f"t={threshold:g} W={warmup} MC={max_cached}"
    return Method(family, label, enable, disable, threshold=mask is None)


# -- the catalogue ------------------------------------------------------------------------------------------------------
def full_steps_for(table: CountTable, steps: int, budget: float, branch: int) -> int:
    """The number of full steps whose MAC fraction is nearest ``budget`` at ``branch`` (a retrieval step costs
    the per-call MACs minus the skipped middle blocks)."""
    n = len(table.blocks)
    ratio = 1 - sum(table.blocks[branch:n - branch]) / table.per_call
    return max(1, min(steps, round(steps * (budget - ratio) / (1 - ratio))))


def catalogue(table: CountTable, steps: int, budgets: tuple[float, ...] = (0.5, 1 / 3, 0.25),
              quick: bool = False) -> list[Method]:
    """Every contender. ``quick``: the test's subset (ours uniform I=2 B=0, FirstBlockCache, one cache-dit)."""
    if quick:
        return [uncached(), ours_uniform(2, 0), first_block_cache(0.2), cache_dit_method(1, 0.2, 1)]
    methods = [uncached()] + [uncached(s) for s in (14, 9, 7)]
    methods += [ours_uniform(i, b) for b in (0, 1, 2) for i in (2, 3, 4)]
    methods += [ours_forecast(i, 0, w) for w in (0, 1, 2, 3) for i in (2, 3, 4, 5)] + [ours_forecast(2, 0, 26)]
    methods += [ours_forecast(i, 0, end_step=steps - 1) for i in (2, 3, 4)]  # the last step full
    methods += [ours_split(i, 1, 0, f) for f in (False, True) for i in (2, 3, 4)]
    methods += [ours_calibrated(full_steps_for(table, steps, x, b), b) for b in (0, 1) for x in budgets]
    methods += [ours_calibrated(full_steps_for(table, steps, 1 / 3, 0), 0, forecast=True)]
    methods += [ours_calibrated(13, 0)]  # 0.468 of the MACs: MagCache t=0.15's cost (13 full steps of 28)
    # all but 1-2 steps full (28 steps: 0.965 / 0.929 of the MACs): FirstBlockCache t=0.05's near-uncached point
    methods += [ours_calibrated(steps - 1, 0)] + [ours_calibrated(k, 0, forecast=True) for k in (steps - 1, steps - 2)]
    methods += [taylorseer()] + [taylorseer(i, 1) for i in (2, 3, 4)] + [taylorseer(3, 2)]
    methods += [taylorseer(lite=True)] + [taylorseer(i, 1, lite=True) for i in (2, 3, 4)]
    methods += [ours_adaptive(t, 6) for t in (0.01, 0.02, 0.03, 0.04, 0.045, 0.05, 0.1, 0.2, 0.4)]
    methods += [ours_adaptive(t, 6, forecast=True) for t in (0.01, 0.02, 0.03, 0.04, 0.045, 0.05, 0.1, 0.2, 0.4)]
    methods += [first_block_cache(t) for t in (0.05, 0.1, 0.2, 0.4)]
    methods += [mag_cache(t, k) for t, k in ((0.06, 3), (0.15, 5), (0.4, 10))]
    # cache-dit last: after cache_dit.disable_cache(pipe) diffusers' hooks failed on the same pipeline (docs/dit.md)
    methods += [cache_dit_method(1, 0.08, 0, mask=m) for m in ("slow", "medium", "fast", "ultra")]
    methods += [cache_dit_method(1, t, w) for t, w in ((0.08, 8), (0.12, 4), (0.24, 2), (0.5, 2))]
    methods += [cache_dit_method(4, 0.5, 2), cache_dit_method(8, 0.5, 2)]
    methods += [cache_dit_method(1, 0.24, 2, calibrator="taylorseer", order=o) for o in (1, 2)]
    methods += [cache_dit_method(1, 0.24, 2, calibrator=c) for c in ("foca", "dmd")]
    return methods
