"""Calibrated forecast (``helper.calibrate(K, forecast=True)``): measure what forecasting would cost, choose the full
steps and a weight per U-Net evaluation, and check the choice in closed loop.

1. :func:`forecast_errors` replays the evaluations recorded by :func:`DeepCache.calibration.recording` through
   DeepCache with a :class:`~DeepCache.engine.forecast_feature.ForecastFeature`: for every full step ``a`` one full
   evaluation, then for every later step ``k`` the retrieval evaluation that reuses ``F_a`` and, for every earlier
   full step ``a'`` (at most ``max_span`` before ``a``), every ``k`` at most ``max_gap`` after ``a`` and every
   candidate weight, the retrieval evaluation that hands out ``F_a + w*(k-a)*(F_a - F_a')/(a - a')``. Each is judged like reuse in
   :func:`~DeepCache.calibration.reuse_errors`: the relative L1 error of the U-Net output times the scheduler's
   sensitivity at ``k`` (the latent error). Pairs and gaps outside the bounds are left to reuse.
2. :func:`~DeepCache.forecast.fit_weights` keeps the best weight per ``(a', a, k)`` (reuse wins ties) and
   :func:`~DeepCache.forecast.optimal_forecast_full_steps` the best full steps (exact DP over the last two).
3. The replay judges each step with the *recorded* inputs. In the real run a forecast's error reaches the next full
   steps' features, and so the next line (measured on the demo model: the one-step judgement over-trusts long
   forecasts from 4 full steps in 25 down). So :func:`calibrate_forecast` solves the DP for a few caps on the
   forecast coefficient ``w*(k-a)/(a-a')`` and runs each result, and the calibrated reuse schedule, once through
   the pipeline (closed loop, the same noise), keeping the one whose final latents are closest to the uncached
   ones. Reuse wins ties; when it wins, the result is the calibrated reuse schedule (``forecast=None``).
4. Over long gaps the replay cannot see what a weight does to the *next* full steps (measured on the demo model at
   5 full steps in 25: no forecast candidate beat reuse in closed loop, yet stepping *back* along the line after
   a long gap, a negative weight, damps the error that the next full steps inherit). So :func:`~DeepCache.forecast_refine.refine`
   goes on from the winner in closed loop: one weight per segment of at least ``REFINE_MIN_LENGTH`` retrieval steps,
   coordinate descent over ``SEGMENT_WEIGHTS``, ``REFINE_SWEEPS`` passes, a change kept only if it lowers the latent
   error by ``REFINE_MARGIN``. Cost: at most ``sweeps * segments * (len(grid) - 1)`` more pipeline runs (5 full
   steps of 25: 42; segments of 2-4 steps, as at 7 or more full steps of 25, are not refined: refining the one
   4-step segment at 7 full steps fitted the 8 calibration prompts and lost 0.9 dB on held-out ones).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree

from . import engine
from .calibration import Recording, _generators, _prev_sample, _sample, recording
from .forecast import CANDIDATE_WEIGHTS, fit_weights, optimal_forecast_full_steps, step_weights
from .forecast_refine import as_forecast, refine
from .params import CacheParams
from .schedule import optimal_full_steps

#: Default bounds of the replay: retrieval steps at most this many evaluations after their full step, and the
#: earlier full step of a line at most this many before the later one.
MAX_GAP, MAX_SPAN = 8, 4
#: Caps on the forecast coefficient w*(k-a)/(a-a') tried in closed loop (None: no cap).
COEFFICIENT_CAPS: tuple[float | None, ...] = (0.25, 0.5, None)


@dataclass
class ForecastErrors:
    """What one replay measured (solve it for any number of full steps with :meth:`params`)."""

    reuse: list[list[float]]  # reuse[a][k]
    errors: np.ndarray  # (n, n, n, len(candidates)): errors[a', a, k, j]
    candidates: tuple[float, ...]
    branch: int
    evaluations: tuple[int, int]  # (full, retrieval) U-Net evaluations the replay ran

    @property
    def num_steps(self) -> int:
        return len(self.reuse)

    def params(self, num_full: int, cap: float | None = None, full_steps: Sequence[int] | None = None) -> CacheParams:
        """The calibrated forecast for ``num_full`` full steps, with coefficients at most ``cap`` (None: any); with
        ``full_steps``, only the weights are fitted, for those steps."""
        n = self.num_steps
        errors = self.errors
        if cap is not None:
            p, a, k = np.meshgrid(np.arange(n), np.arange(n), np.arange(n), indexing="ij")
            span = np.where(a > p, (k - a) / np.maximum(a - p, 1), 0.0)  # (k-a)/(a-a') where a' < a
            allowed = np.asarray(self.candidates)[None, None, None, :] * span[..., None] <= cap + 1e-12
            errors = np.where(allowed, errors, math.inf)
        cost, weight = fit_weights(self.reuse, errors, self.candidates)
        steps = tuple(full_steps) if full_steps is not None else optimal_forecast_full_steps(self.reuse, cost, num_full)
        return CacheParams(skip_mode="custom", full_steps=steps, cache_branch_id=self.branch, forecast="linear",
                           forecast_weights=step_weights(steps, weight, n), forecast_weight=0.0)

    def reuse_params(self, num_full: int) -> CacheParams:
        """The calibrated reuse schedule for ``num_full`` full steps (what ``calibrate(K)`` returns)."""
        return CacheParams(skip_mode="custom", full_steps=optimal_full_steps(self.reuse, num_full), cache_branch_id=self.branch)


def _tree(fn: Callable[..., Any], *trees: Any) -> Any:
    return pytree.tree_map(lambda *xs: fn(*xs) if torch.is_tensor(xs[0]) and xs[0].is_floating_point() else xs[0], *trees)


def forecast_errors(unet: nn.Module, rec: Recording, branch: int, candidates: Sequence[float] = CANDIDATE_WEIGHTS,
                    max_gap: int | None = MAX_GAP, max_span: int = MAX_SPAN) -> ForecastErrors:
    """Replay ``rec`` and measure reuse and forecast errors (module docstring, step 1).

    Cost for ``n`` evaluations: ``n`` full evaluations, ``n(n-1)/2`` reuse retrievals (every gap, as
    :func:`~DeepCache.calibration.reuse_errors`) and about ``n*g*s*c`` forecast retrievals, with ``g = max_gap``,
    ``s = max_span`` and ``c`` the nonzero candidates (25 steps, defaults: 25 full and about 300 + 2,200 shallow
    evaluations).
    """
    n = len(rec.calls)
    scale = rec.sensitivity if len(rec.sensitivity) == n and all(map(math.isfinite, rec.sensitivity)) else [1.0] * n
    gap = n - 1 if max_gap is None else max(1, max_gap)
    weights = tuple(float(w) for w in candidates)
    reuse = [[0.0 if k == a else math.inf for k in range(n)] for a in range(n)]
    errors = np.full((n, n, n, len(weights)), math.inf)
    counts = [0, 0]
    lease = engine.acquire(unet)
    try:
        gen = lease.unet_patch.new_generation(
            CacheParams(skip_mode="custom", full_steps=(0,), cache_branch_id=branch, forecast="linear"))
        feature = gen.feature
        current = [0.0]
        feature.weight_at = lambda step: current[0]
        window: dict[int, Any] = {}  # F_p of the earlier full steps within max_span
        with engine.running(gen), torch.no_grad():
            for a in range(n):
                gen.reset()
                gen.step = 0
                args, kwargs = rec.calls[a]
                unet(*args, **kwargs)
                counts[0] += 1
                f_a = engine.tensors.clone(feature.value)
                window = {p: f for p, f in window.items() if p >= a - max_span}
                for k in range(a + 1, n):
                    current[0] = 0.0
                    out = _retrieve(unet, gen, rec, k)
                    reuse[a][k] = engine.relative_l1(out, rec.outputs[k]) * scale[k]
                    counts[1] += 1
                for p, f_p in window.items():
                    feature.difference = _tree(torch.sub, f_a, f_p)
                    feature.history = (p, a)
                    for k in range(a + 1, min(n, a + gap + 1)):
                        for j, w in enumerate(weights):
                            if w == 0.0:
                                errors[p, a, k, j] = reuse[a][k]
                                continue
                            current[0] = w
                            out = _retrieve(unet, gen, rec, k)
                            errors[p, a, k, j] = engine.relative_l1(out, rec.outputs[k]) * scale[k]
                            counts[1] += 1
                window[a] = f_a
    finally:
        lease.release()
    return ForecastErrors(reuse, errors, weights, branch, (counts[0], counts[1]))


def _retrieve(unet: nn.Module, gen: Any, rec: Recording, k: int) -> torch.Tensor:
    """Evaluation ``k`` of the recording as a retrieval step of ``gen`` (its clock set to ``k``)."""
    gen.step = k
    args, kwargs = rec.calls[k]
    out = _sample(unet(*args, **kwargs))
    if gen.steps[-1]:
        raise RuntimeError("calibration replay: a retrieval evaluation ran as a full step (the cache was not usable)")
    return out


# -- closed loop -----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _same_noise(call_kwargs: dict) -> Iterator[Callable[[], None]]:
    """Yield ``rewind()``, which puts the call's random state (its generators, else torch's global RNG) back to what
    it was on entry; on exit the state is what the first call left (as if the pipeline had run once)."""
    gens = _generators(call_kwargs)
    if gens:
        start = [g.get_state() for g in gens]
        save = lambda: [g.get_state() for g in gens]  # noqa: E731
        load = lambda states: [g.set_state(s) for g, s in zip(gens, states)]  # noqa: E731
    else:
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        save = lambda: (torch.get_rng_state(), torch.cuda.get_rng_state_all() if cuda else None)  # noqa: E731

        def load(state):
            torch.set_rng_state(state[0])
            if state[1] is not None:
                torch.cuda.set_rng_state_all(state[1])

        start = save()
    after: list = []

    def rewind() -> None:
        if not after:
            after.append(save())
        load(start)

    try:
        yield rewind
    finally:
        if after:
            load(after[0])


@contextlib.contextmanager
def _final_latents(scheduler: Any) -> Iterator[list[torch.Tensor]]:
    """Collect the output of every scheduler step; the last one is the call's final latents."""
    out: list[torch.Tensor] = []
    had = "step" in scheduler.__dict__
    inner = scheduler.step

    def step(*args: Any, **kwargs: Any) -> Any:
        result = inner(*args, **kwargs)
        out[:] = [_prev_sample(result).detach().float().clone()]
        return result

    scheduler.step = step
    try:
        yield out
    finally:
        if had:
            scheduler.step = inner
        else:
            del scheduler.step


def latent_error(latents: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over the batch of ``log10`` of each sample's mean squared error (lower is better; -PSNR/10 + const)."""
    mse = (latents.float() - reference.float()).pow(2).flatten(1).mean(1).clamp_min(1e-20)
    return float(mse.log10().mean())


def closed_loop_errors(pipeline: Any, unet: nn.Module, candidates: Sequence[CacheParams], reference: torch.Tensor,
                       rewind: Callable[[], None], call_kwargs: dict) -> list[float]:
    """Run the pipeline once per candidate (the same noise) and score its final latents against ``reference``."""
    scores = []
    lease = engine.acquire(unet)
    try:
        for params in candidates:
            rewind()
            gen = lease.unet_patch.new_generation(params)
            with _final_latents(pipeline.scheduler) as final, engine.running(gen), torch.no_grad():
                pipeline(**call_kwargs)
            scores.append(latent_error(final[-1], reference))
    finally:
        lease.release()
    return scores


def candidate_params(measured: ForecastErrors, num_full: int,
                     caps: Sequence[float | None] = COEFFICIENT_CAPS) -> list[CacheParams]:
    """The calibrated reuse schedule, then for each cap the calibrated forecast and the reuse schedule's full steps
    with forecast weights fitted for them (duplicates dropped)."""
    reuse = measured.reuse_params(num_full)
    candidates = [reuse]
    for cap in caps:
        for steps in (None, reuse.full_steps):
            params = measured.params(num_full, cap, steps)
            if params not in candidates and any(params.forecast_weights):
                candidates.append(params)
    return candidates


def choose(pipeline: Any, unet: nn.Module, measured: ForecastErrors, num_full: int, reference: torch.Tensor,
           rewind: Callable[[], None], call_kwargs: dict) -> tuple[CacheParams, list[CacheParams], list[float]]:
    """Run each of :func:`candidate_params` in closed loop, then :func:`refine` the best (module docstring, step 4);
    the result (reuse first, so it wins ties; ``forecast=None`` when no weight is left), all candidates, scores."""
    candidates = candidate_params(measured, num_full)
    scores = closed_loop_errors(pipeline, unet, candidates, reference, rewind, call_kwargs)
    best = min(range(len(candidates)), key=lambda i: (scores[i], i))

    def score(params: CacheParams) -> float:
        return closed_loop_errors(pipeline, unet, [params], reference, rewind, call_kwargs)[0]

    refined, _, _ = refine(score, as_forecast(candidates[best], measured.num_steps), scores[best])
    if not any(refined.forecast_weights):
        return candidates[0], candidates, scores
    return refined, candidates, scores


@contextlib.contextmanager
def recorded(pipeline: Any, unet: nn.Module, call_kwargs: dict) -> Iterator[tuple[Recording, torch.Tensor, Callable[[], None]]]:
    """Run the call once uncached under :func:`~DeepCache.calibration.recording`; yield the recording, its final
    latents and ``rewind()`` (the same noise again for closed-loop runs inside the block)."""
    with warnings.catch_warnings(), _same_noise(call_kwargs) as rewind:
        warnings.simplefilter("ignore", engine.DeepCacheWarning)  # uncached on purpose
        with recording(pipeline, unet) as rec, _final_latents(pipeline.scheduler) as final:
            pipeline(**call_kwargs)
        if len(rec.calls) < 2:
            raise ValueError("calibration saw fewer than two U-Net evaluations: pass num_inference_steps >= 2.")
        yield rec, final[-1], rewind


def calibrate_forecast(pipeline: Any, unet: nn.Module, branch: int, num_full: int, max_gap: int | None = MAX_GAP,
                       max_span: int = MAX_SPAN, **call_kwargs: Any) -> tuple[CacheParams, dict]:
    """The calibrated forecast (module docstring): the chosen parameters and what was measured."""
    with recorded(pipeline, unet, call_kwargs) as (rec, reference, rewind):
        n = len(rec.calls)
        if isinstance(num_full, bool) or not isinstance(num_full, int) or not 1 <= num_full <= n:
            raise ValueError(f"num_full_steps must be an integer in [1, {n}] for a {n}-evaluation generation, "
                             f"got {num_full!r}.")
        measured = forecast_errors(unet, rec, branch, max_gap=max_gap, max_span=max_span)
        best, candidates, scores = choose(pipeline, unet, measured, num_full, reference, rewind, call_kwargs)
    return best, {"measured": measured, "candidates": candidates, "scores": scores}
