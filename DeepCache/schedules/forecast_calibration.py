"""Calibrated forecast (``helper.calibrate(K, forecast=True)``): measure what forecasting would cost, choose the full
steps and a weight per U-Net evaluation, and check the choice in closed loop.

1. :func:`forecast_errors` replays the evaluations recorded by :func:`DeepCache.schedules.calibration.recording` through
   DeepCache with a :class:`~DeepCache.engine.forecast_feature.ForecastFeature`: for every full step ``a`` one full
   evaluation, then for every later step ``k`` the retrieval evaluation that reuses ``F_a`` and, for every earlier
   full step ``a'`` (at most ``max_span`` before ``a``), every ``k`` at most ``max_gap`` after ``a`` and every
   candidate weight, the retrieval evaluation that hands out ``F_a + w*(k-a)*(F_a - F_a')/(a - a')``. Each is judged like reuse in
   :func:`~DeepCache.schedules.calibration.reuse_errors`: the relative L1 error of the U-Net output times the scheduler's
   sensitivity at ``k`` (the latent error). Pairs and gaps outside the bounds are left to reuse.
2. :func:`~DeepCache.schedules.forecast.fit_weights` keeps the best weight per ``(a', a, k)`` (reuse wins ties) and
   :func:`~DeepCache.schedules.forecast.optimal_forecast_full_steps` the best full steps (exact DP over the last two).
3. The replay judges each step with the *recorded* inputs. In the real run a forecast's error reaches the next full
   steps' features, and so the next line (measured on the demo model: the one-step judgement over-trusts long
   forecasts from 4 full steps in 25 down). So :func:`candidate_params` solves the DP for a few caps on the
   forecast coefficient ``w*(k-a)/(a-a')``, and each candidate runs once through the pipeline
   (:func:`closed_loop_sample_errors`: closed loop, the same noise), scored per sample by its final latents'
   distance to the uncached ones.
4. Over long gaps the replay cannot see what a weight does to the *next* full steps (stepping *back* along the line
   after a long gap, a negative weight, can damp the error that the next full steps inherit), so
   :func:`~DeepCache.schedules.forecast_refine.refine` can go on from the best candidate in closed loop: one weight per segment
   of at least ``REFINE_MIN_LENGTH`` retrieval steps, coordinate descent over ``SEGMENT_WEIGHTS``.
5. Steps 3 and 4 fitted on the calibration prompts and judged on the same prompts overfit them (issue 25: up to
   3.9 dB worse than calibrated reuse on other prompts). Every measurement here is therefore kept per sample of the
   calibration batch (:attr:`ForecastErrors.sample_errors`, :meth:`ForecastErrors.subset`), and
   :mod:`DeepCache.schedules.forecast_heldout` fits a ladder of options on some samples and judges them on the others
   (k-fold): the replay's forecast at the calibrated reuse steps with its weights shrunk (x0.25 .. x1), then step 4
   from it, keeping a forecast only when it clearly beat calibrated reuse on samples it was not fitted on
   (:func:`~DeepCache.schedules.forecast_refine.held_out_verdict`, climbed by
   :func:`~DeepCache.schedules.forecast_refine.climb`); otherwise calibrated reuse (``forecast=None``). Step 3's
   capped candidates (:func:`candidate_params`) are not on that ladder: chosen among on the same samples, they
   generalized worse than the shrunk forecast at the reuse steps (issue 25).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree

from .. import engine
from .calibration import Recording, _generators, _prev_sample, _sample, recording
from .forecast import CANDIDATE_WEIGHTS, fit_weights, optimal_forecast_full_steps, step_weights
from .params import CacheParams
from .schedule import optimal_full_steps

#: Default bounds of the replay: retrieval steps at most this many evaluations after their full step, and the
#: earlier full step of a line at most this many before the later one.
MAX_GAP, MAX_SPAN = 8, 4
#: Caps on the forecast coefficient w*(k-a)/(a-a') tried in closed loop (None: no cap).
COEFFICIENT_CAPS: tuple[float | None, ...] = (0.25, 0.5, None)


@dataclass
class ForecastErrors:
    """What one replay measured (solve it for any number of full steps with :meth:`params`): the errors of each
    sample of the calibration batch, and their mean over the samples (``reuse``, ``errors``)."""

    reuse: list[list[float]]  # reuse[a][k], the mean over the samples
    errors: np.ndarray  # (n, n, n, len(candidates)): errors[a', a, k, j], the mean over the samples
    candidates: tuple[float, ...]
    branch: int
    evaluations: tuple[int, int]  # (full, retrieval) U-Net evaluations the replay ran
    sample_reuse: np.ndarray | None = None  # (samples, n, n): sample_reuse[s, a, k]
    sample_errors: np.ndarray | None = None  # (samples, n, n, n, len(candidates))
    sample_weight: np.ndarray | None = None  # (samples, n): mean |output| of sample s at step k

    @property
    def num_steps(self) -> int:
        return len(self.reuse)

    @property
    def samples(self) -> int:
        return 1 if self.sample_reuse is None else len(self.sample_reuse)

    def subset(self, samples: Sequence[int]) -> "ForecastErrors":
        """The same measurements over ``samples`` only (fit on part of the batch, no model run): each error pooled as
        the relative L1 of those samples together (weighted by their outputs' mean magnitude, so all samples give
        the batch's own relative L1, what :func:`~DeepCache.schedules.calibration.reuse_errors` measures)."""
        if self.sample_reuse is None or self.sample_errors is None:
            raise ValueError("these forecast errors were not measured per sample: pass samples= to forecast_errors.")
        idx = list(samples)
        if not idx:
            raise ValueError("subset() needs at least one sample.")
        reuse, errors, weight = self.sample_reuse[idx], self.sample_errors[idx], self.sample_weight[idx]
        return dataclasses.replace(self, reuse=_pooled(reuse, weight).tolist(), errors=_pooled(errors, weight),
                                   sample_reuse=reuse, sample_errors=errors, sample_weight=weight)

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


def _pooled(errors: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """``sum_s e[s] w[s, k] / sum_s w[s, k]`` over the first axis; ``k`` is the third axis of ``e[s]`` from the end
    but one (``errors[s, ..., k, j]`` or ``reuse[s, a, k]``)."""
    w = weight if errors.ndim == 3 else weight[..., None]  # reuse (s, a, k) or errors (s, p, a, k, j)
    w = w.reshape(w.shape[:1] + (1,) * (errors.ndim - w.ndim) + w.shape[1:])
    return (errors * w).sum(0) / w.sum(0)


def _tree(fn: Callable[..., Any], *trees: Any) -> Any:
    return pytree.tree_map(lambda *xs: fn(*xs) if torch.is_tensor(xs[0]) and xs[0].is_floating_point() else xs[0], *trees)


def forecast_errors(unet: nn.Module, rec: Recording, branch: int, candidates: Sequence[float] = CANDIDATE_WEIGHTS,
                    max_gap: int | None = MAX_GAP, max_span: int = MAX_SPAN, samples: int = 1) -> ForecastErrors:
    """Replay ``rec`` and measure reuse and forecast errors (module docstring, step 1), for each of ``samples``
    samples of the batch (:func:`sample_l1`; 1: the batch as one).

    Cost for ``n`` evaluations: ``n`` full evaluations, ``n(n-1)/2`` reuse retrievals (every gap, as
    :func:`~DeepCache.schedules.calibration.reuse_errors`) and about ``n*g*s*c`` forecast retrievals, with ``g = max_gap``,
    ``s = max_span`` and ``c`` the nonzero candidates (25 steps, defaults: 25 full and about 300 + 2,200 shallow
    evaluations).
    """
    n = len(rec.calls)
    scale = rec.sensitivity if len(rec.sensitivity) == n and all(map(math.isfinite, rec.sensitivity)) else [1.0] * n
    gap = n - 1 if max_gap is None else max(1, max_gap)
    weights = tuple(float(w) for w in candidates)
    reuse = np.full((samples, n, n), math.inf)
    reuse[:, np.arange(n), np.arange(n)] = 0.0
    errors = np.full((samples, n, n, n, len(weights)), math.inf)
    magnitude = np.stack([_sample_mean(out.abs(), samples) for out in rec.outputs[:n]], axis=1)
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
                    reuse[:, a, k] = sample_l1(out, rec.outputs[k], samples) * scale[k]
                    counts[1] += 1
                for p, f_p in window.items():
                    feature.difference = _tree(torch.sub, f_a, f_p)
                    feature.history = (p, a)
                    for k in range(a + 1, min(n, a + gap + 1)):
                        for j, w in enumerate(weights):
                            if w == 0.0:
                                errors[:, p, a, k, j] = reuse[:, a, k]
                                continue
                            current[0] = w
                            out = _retrieve(unet, gen, rec, k)
                            errors[:, p, a, k, j] = sample_l1(out, rec.outputs[k], samples) * scale[k]
                            counts[1] += 1
                window[a] = f_a
    finally:
        lease.release()
    return ForecastErrors(_pooled(reuse, magnitude).tolist(), _pooled(errors, magnitude), weights, branch,
                          (counts[0], counts[1]), reuse, errors, magnitude)


def sample_l1(x: torch.Tensor, reference: torch.Tensor, samples: int) -> np.ndarray:
    """The relative L1 error ``mean|x - reference| / mean|reference|`` of each of ``samples`` samples: row ``i`` of
    the U-Net batch belongs to sample ``i % samples`` (a CFG pipeline stacks the unconditional rows of every sample,
    then the conditional ones). One host read.

    >>> sample_l1(torch.tensor([[1.0], [2.0], [1.0], [4.0]]), torch.tensor([[1.0], [1.0], [1.0], [2.0]]), 2)
    array([0., 1.])
    """
    diff, ref = _sample_mean((x.float() - reference.float()).abs(), samples), _sample_mean(reference.abs(), samples)
    return diff / np.maximum(ref, 1e-12)


def _sample_mean(x: torch.Tensor, samples: int) -> np.ndarray:
    """The mean of ``x`` over the rows of each sample (row ``i``: sample ``i % samples``) and the other axes."""
    rows = x.shape[0]
    if samples < 1 or rows % samples:
        raise ValueError(f"a U-Net batch of {rows} rows does not split into {samples} samples.")
    return x.float().reshape(rows // samples, samples, -1).mean(dim=(0, 2)).double().cpu().numpy()


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


def latent_errors(latents: torch.Tensor, reference: torch.Tensor) -> np.ndarray:
    """``log10`` of each sample's mean squared error (lower is better; -PSNR/10 + const)."""
    mse = (latents.float() - reference.float()).pow(2).flatten(1).mean(1).clamp_min(1e-20)
    return mse.log10().double().cpu().numpy()


def latent_error(latents: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over the batch of :func:`latent_errors`."""
    return float(latent_errors(latents, reference).mean())


def closed_loop_errors(pipeline: Any, unet: nn.Module, candidates: Sequence[CacheParams], reference: torch.Tensor,
                       rewind: Callable[[], None], call_kwargs: dict) -> list[float]:
    """Run the pipeline once per candidate (the same noise) and score its final latents against ``reference``
    (the mean over the samples of :func:`closed_loop_sample_errors`)."""
    return [float(row.mean()) for row in closed_loop_sample_errors(pipeline, unet, candidates, reference, rewind,
                                                                     call_kwargs)]


def closed_loop_sample_errors(pipeline: Any, unet: nn.Module, candidates: Sequence[CacheParams], reference: torch.Tensor,
                              rewind: Callable[[], None], call_kwargs: dict) -> np.ndarray:
    """Run the pipeline once per candidate (the same noise): shape ``(candidates, samples)``, the
    :func:`latent_errors` of each candidate's final latents against ``reference``."""
    scores = []
    lease = engine.acquire(unet)
    try:
        for params in candidates:
            rewind()
            gen = lease.unet_patch.new_generation(params)
            with _final_latents(pipeline.scheduler) as final, engine.running(gen), torch.no_grad():
                pipeline(**call_kwargs)
            scores.append(latent_errors(final[-1], reference))
    finally:
        lease.release()
    return np.asarray(scores).reshape(len(candidates), -1)


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


@contextlib.contextmanager
def recorded(pipeline: Any, unet: nn.Module, call_kwargs: dict) -> Iterator[tuple[Recording, torch.Tensor, Callable[[], None]]]:
    """Run the call once uncached under :func:`~DeepCache.schedules.calibration.recording`; yield the recording, its final
    latents and ``rewind()`` (the same noise again for closed-loop runs inside the block)."""
    with warnings.catch_warnings(), _same_noise(call_kwargs) as rewind:
        warnings.simplefilter("ignore", engine.DeepCacheWarning)  # uncached on purpose
        with recording(pipeline, unet) as rec, _final_latents(pipeline.scheduler) as final:
            pipeline(**call_kwargs)
        if len(rec.calls) < 2:
            raise ValueError("calibration saw fewer than two U-Net evaluations: pass num_inference_steps >= 2.")
        yield rec, final[-1], rewind

