"""Calibrated forecast (``helper.calibrate(K, forecast=True)``): measure what forecasting would cost, choose the full
steps and a weight per step, and check the choice in closed loop.

1. :func:`forecast_errors` replays the evaluations recorded by :func:`DeepCache.schedules.calibration.recording` through
   DeepCache with a :class:`~DeepCache.engine.forecast_feature.ForecastFeature` (the reuse replay's
   :func:`~DeepCache.schedules.calibration.replaying`: each CFG branch of a transformer on its own, a U-Net as one):
   for every full step ``a`` one full evaluation, then for every later step ``k`` the retrieval evaluation that
   reuses ``F_a`` (a U-Net's deep feature, a transformer's middle residual) and, for every earlier full step ``a'``
   (at most ``max_span`` before ``a``), every ``k`` at most ``max_gap`` after ``a`` and every candidate weight, the
   retrieval evaluation that hands out ``F_a + w*(k-a)*(F_a - F_a')/(a - a')``. Each is judged like reuse in
   :func:`~DeepCache.schedules.calibration.reuse_errors`: the relative L1 error of the model output times the
   scheduler's sensitivity at ``k`` (the latent error), summed over the branches. Pairs and gaps outside the bounds
   are left to reuse.
2. :func:`~DeepCache.schedules.forecast.fit_weights` keeps the best weight per ``(a', a, k)`` (reuse wins ties) and
   :func:`~DeepCache.schedules.forecast.optimal_forecast_full_steps` the best full steps (exact DP over the last two).
3. The replay judges each step with the *recorded* inputs. In the real run a forecast's error reaches the next full
   steps' features, and so the next line (measured on the demo model: the one-step judgement over-trusts long
   forecasts from 4 full steps in 25 down). So :func:`candidate_params` solves the DP for a few caps on the
   forecast coefficient ``w*(k-a)/(a-a')``, and each candidate runs once through the pipeline
   (:func:`~DeepCache.schedules.closed_loop.closed_loop_sample_errors`: closed loop, the same noise), scored per
   sample by its decoded image's distance to the uncached one (:mod:`DeepCache.schedules.closed_loop`).
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

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree

from .. import engine
from .calibration import BranchReplay, Recording, replaying, step_scales
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
    CFG branch and sample of the calibration batch (``branch_*``: a U-Net has one branch), and their pooled sum
    (``reuse``, ``errors``: per branch the relative L1 of all samples together, summed over the branches, as
    :func:`~DeepCache.schedules.calibration.reuse_errors` measures). A step a branch does not run (Lumina2's uncond
    calls stop late) adds 0 there; a pair or gap outside the replay's bounds, or reaching across two transformers
    (Wan 2.2: the engine gives ``transformer_2`` a cache and a line of its own), is ``inf``."""

    reuse: list[list[float]]  # reuse[a][k], pooled
    errors: np.ndarray  # (n, n, n, len(candidates)): errors[a', a, k, j], pooled
    candidates: tuple[float, ...]
    branch: int
    evaluations: tuple[int, int]  # (full, retrieval) evaluations the replay ran
    branch_reuse: np.ndarray | None = None  # (branches, samples, n, n)
    branch_errors: np.ndarray | None = None  # (branches, samples, n, n, n, len(candidates))
    branch_weight: np.ndarray | None = None  # (branches, samples, n): mean |output| of sample s at step k

    @property
    def num_steps(self) -> int:
        return len(self.reuse)

    @property
    def samples(self) -> int:
        return 1 if self.branch_reuse is None else self.branch_reuse.shape[1]

    @property
    def sample_reuse(self) -> np.ndarray | None:
        """``(samples, n, n)``: each sample's reuse errors, summed over the branches."""
        return None if self.branch_reuse is None else self.branch_reuse.sum(0)

    @property
    def sample_errors(self) -> np.ndarray | None:
        """``(samples, n, n, n, len(candidates))``: each sample's forecast errors, summed over the branches."""
        return None if self.branch_errors is None else self.branch_errors.sum(0)

    def subset(self, samples: Sequence[int]) -> "ForecastErrors":
        """The same measurements over ``samples`` only (fit on part of the batch, no model run): per branch each
        error pooled as the relative L1 of those samples together (weighted by their outputs' mean magnitude), summed
        over the branches; all samples give the pooled errors themselves."""
        if self.branch_reuse is None or self.branch_errors is None or self.branch_weight is None:
            raise ValueError("these forecast errors were not measured per sample: pass samples= to forecast_errors.")
        idx = list(samples)
        if not idx:
            raise ValueError("subset() needs at least one sample.")
        reuse, errors, weight = self.branch_reuse[:, idx], self.branch_errors[:, idx], self.branch_weight[:, idx]
        return dataclasses.replace(self, reuse=_pooled(reuse, weight).tolist(), errors=_pooled(errors, weight),
                                   branch_reuse=reuse, branch_errors=errors, branch_weight=weight)

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
    """``sum_b sum_s e[b, s] w[b, s, k] / sum_s w[b, s, k]`` over the first two axes; ``k`` is the third axis of
    ``e[b, s]`` from the end but one (``errors[b, s, ..., k, j]`` or ``reuse[b, s, a, k]``)."""
    w = weight if errors.ndim == 4 else weight[..., None]  # reuse (b, s, a, k) or errors (b, s, p, a, k, j)
    w = w.reshape(w.shape[:2] + (1,) * (errors.ndim - w.ndim) + w.shape[2:])
    return ((errors * w).sum(1) / w.sum(1)).sum(0)


def _tree(fn: Callable[..., Any], *trees: Any) -> Any:
    return pytree.tree_map(lambda *xs: fn(*xs) if torch.is_tensor(xs[0]) and xs[0].is_floating_point() else xs[0], *trees)


def forecast_errors(unet: nn.Module, rec: Recording, branch: int, candidates: Sequence[float] = CANDIDATE_WEIGHTS,
                    max_gap: int | None = MAX_GAP, max_span: int = MAX_SPAN, samples: int = 1,
                    reuse_gap: int | None = None) -> ForecastErrors:
    """Replay ``rec`` and measure reuse and forecast errors (module docstring, step 1) of each CFG branch (a
    transformer may be evaluated once per branch and step; :func:`~DeepCache.schedules.calibration.replaying`), for
    each of ``samples`` samples of the batch (:func:`sample_l1`; 1: the batch as one).

    Cost per branch of ``n`` steps: ``n`` full evaluations, ``n(n-1)/2`` reuse retrievals (every gap, as
    :func:`~DeepCache.schedules.calibration.reuse_errors`) and about ``n*g*s*c`` forecast retrievals, with
    ``g = max_gap``, ``s = max_span`` and ``c`` the nonzero candidates (25 steps, defaults: 25 full and about
    300 + 2,200 shallow evaluations). ``reuse_gap`` bounds the reuse retrievals too (None: every gap); with
    ``max_span=0`` no forecast runs: the reuse errors of ``calibrate(K)``, per sample (its guard's k-fold splits
    them, :mod:`DeepCache.schedules.reuse_guard`).
    """
    n, scale = rec.num_steps, step_scales(rec)
    gap = n - 1 if max_gap is None else max(1, max_gap)
    reach = n - 1 if reuse_gap is None else max(1, reuse_gap)
    weights = tuple(float(w) for w in candidates)
    groups = rec.branch_calls()
    # a step a branch does not run adds nothing (0); within a branch, unmeasured pairs and gaps are inf
    reuse = np.zeros((len(groups), samples, n, n))
    errors = np.zeros((len(groups), samples, n, n, n, len(weights)))
    magnitude = np.ones((len(groups), samples, n))
    counts = [0, 0]
    params = CacheParams(skip_mode="custom", full_steps=(0,), cache_branch_id=branch, forecast="linear")
    with replaying(unet, rec, params) as replays:
        for b, replay in enumerate(replays):
            m = len(replay.calls)
            reuse[b, :, :m, :m] = math.inf
            reuse[b, :, np.arange(m), np.arange(m)] = 0.0
            errors[b, :, :m, :m, :m] = math.inf
            magnitude[b, :, :m] = np.stack([_sample_mean(replay.output(k).abs(), samples) for k in range(m)], axis=1)
            _replay_branch(replay, scale[:m], weights, (gap, reach), max_span, samples, reuse[b], errors[b], counts)
    return ForecastErrors(_pooled(reuse, magnitude).tolist(), _pooled(errors, magnitude), weights, branch,
                          (counts[0], counts[1]), reuse, errors, magnitude)


def _replay_branch(replay: BranchReplay, scale: Sequence[float], weights: tuple[float, ...], gaps: tuple[int, int],
                   max_span: int, samples: int, reuse: np.ndarray, errors: np.ndarray, counts: list[int]) -> None:
    """Fill ``reuse[s, a, k]`` and ``errors[s, a', a, k, j]`` of one branch (its generation forecasts: a
    :class:`~DeepCache.engine.forecast_feature.ForecastFeature` whose line and weight are set here); ``gaps``: the
    longest forecast and reuse gaps."""
    gap, reach = gaps
    m = len(replay.calls)
    current = [0.0]
    for gen in replay.gens:
        if gen is not None:
            gen.feature.weight_at = lambda step: current[0]
    window: dict[int, Any] = {}  # F_p of the earlier full steps within max_span (and the segment: same denoiser)

    def error(k: int, w: float) -> np.ndarray:
        current[0] = w
        counts[1] += 1
        return sample_l1(replay.retrieve(k), replay.output(k), samples) * scale[k]

    for a in range(m):
        replay.full(a)
        counts[0] += 1
        feature, segment = replay.generation(a).feature, replay.segment(a)
        f_a = engine.tensors.clone(feature.value)
        window = {p: f for p, f in window.items() if p >= max(a - max_span, segment.start)}
        for k in range(a + 1, min(segment.stop, a + reach + 1)):
            reuse[:, a, k] = error(k, 0.0)
        for p, f_p in window.items():
            feature.difference = _tree(torch.sub, f_a, f_p)
            feature.history = (p, a)
            for k in range(a + 1, min(segment.stop, a + gap + 1)):
                for j, w in enumerate(weights):
                    errors[:, p, a, k, j] = reuse[:, a, k] if w == 0.0 else error(k, w)
        window[a] = f_a


def sample_l1(x: torch.Tensor, reference: torch.Tensor, samples: int) -> np.ndarray:
    """The relative L1 error ``mean|x - reference| / mean|reference|`` of each of ``samples`` samples: row ``i`` of
    the model's batch belongs to sample ``i % samples`` (a batched CFG stacks the unconditional rows of every sample,
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
        raise ValueError(f"a model batch of {rows} rows does not split into {samples} samples.")
    return x.float().reshape(rows // samples, samples, -1).mean(dim=(0, 2)).double().cpu().numpy()


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
