"""The held-out choice of ``helper.calibrate(K, forecast=True)``: a forecast is returned only when it beat calibrated
reuse on calibration samples it was not fitted on; otherwise the calibrated reuse schedule (``forecast=None``).

Fitting a forecast (the caps' closed-loop choice and the refinement of :mod:`DeepCache.schedules.forecast_calibration`) and
judging it on the same prompts overfits them: on other prompts such a forecast lost up to 3.9 dB against calibrated
reuse (issue 25). The replay and every closed-loop run already process the whole calibration batch at once, and
they are scored per sample (:func:`~DeepCache.schedules.forecast_calibration.sample_l1`,
:func:`~DeepCache.schedules.closed_loop.latent_errors`), so fitting on part of the batch is an average over those
samples with no extra replay; each closed-loop run scores every sample at once.

The rule (:func:`choose`):

1. Split the ``S`` samples of the calibration batch (prompts x images per prompt) into folds
   (:func:`~DeepCache.schedules.forecast_refine.kfold`: 4 interleaved folds for ``S >= 4``, leave one out for 2-3).
2. For each fold, on the other folds' samples only: the calibrated reuse schedule, the closed-loop candidate whose
   per-sample gains over it have the largest lower bound, mean - 2 standard errors (``"fitted"``), its closed-loop refinement (``"refined"``), and both with every weight halved (``", shrunk"``,
   toward reuse). Score each on the fold's samples: gain = 10 x (reuse - option) latent error (dB).
3. Each option's held-out gains (one per sample) go to :func:`~DeepCache.schedules.forecast_refine.held_out_verdict`: with 4
   or more samples a clear majority by a sign test (p <= 0.15: 6 of 8, 5 of 6, 4 of 4) and a mean gain above twice
   its standard error; with 1-3 samples every gain must reach 3 dB (and a warning says few samples are risky);
   ties are reuse. :func:`~DeepCache.schedules.forecast_refine.pick` keeps the accepted option with the largest lower bound
   (mean - 2 standard errors of its held-out gains).
4. The kept option is fitted again on all the samples and returned; none accepted: calibrated reuse.

With one sample there is nothing to hold out: only ``"fitted"`` is judged, on that sample itself, and it must gain
3 dB. Cost: per fold, the closed-loop candidates and the refinement's runs (about ``folds + 1`` times the cost of
choosing on all samples at once); no extra replay.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from .closed_loop import closed_loop_sample_errors, recorded
from .forecast_calibration import MAX_GAP, MAX_SPAN, ForecastErrors, candidate_params, forecast_errors
from .forecast_refine import MIN_HELD_OUT, Verdict, as_forecast, held_out_verdict, kfold, lower_bound, pick, refine, \
    shrink
from .params import CacheParams

#: The options judged on held-out samples, simplest first (the first of equal gains wins); the shrink factor.
OPTIONS = ("fitted", "fitted, shrunk", "refined", "refined, shrunk")
SHRINK = 0.5


@dataclass
class Choice:
    """What :func:`choose` decided: the parameters, the option kept (``"reuse"`` or one of ``OPTIONS``), each
    option's held-out gains (dB, one per sample) and verdict, and the closed-loop runs it cost."""

    params: CacheParams
    option: str
    gains: dict[str, np.ndarray] = field(default_factory=dict)
    verdicts: dict[str, Verdict] = field(default_factory=dict)
    runs: int = 0


def fit_options(score: Callable[[CacheParams], np.ndarray], measured: ForecastErrors, num_full: int,
                train: Sequence[int], refined: bool = True) -> dict[str, CacheParams]:
    """The reuse schedule and each of ``OPTIONS`` fitted on the samples ``train`` only: ``score(params)`` is the
    per-sample latent error of a closed-loop run (lower is better), of which only ``train`` is looked at.

    ``"fitted"`` is the closed-loop candidate whose per-sample gains over reuse have the largest lower bound
    (:func:`~DeepCache.schedules.forecast_refine.lower_bound`: mean - 2 standard errors; reuse itself scores 0 and wins ties),
    not the largest mean: on the demo model the best mean was often a candidate that gained much on most samples and
    lost 10-20 dB on one, and it generalized worst."""
    train = list(train)
    sub = measured.subset(train)
    mean = lambda p: float(score(p)[train].mean())  # noqa: E731
    candidates = candidate_params(sub, num_full)
    gains = [10.0 * (score(candidates[0])[train] - score(p)[train]) for p in candidates]  # reuse: all 0
    best = max(range(len(candidates)), key=lambda i: (lower_bound(gains[i]), -i))
    fitted = as_forecast(candidates[best], measured.num_steps)
    options = {"reuse": candidates[0], "fitted": fitted, "fitted, shrunk": shrink(fitted, SHRINK)}
    if refined:
        best, _, _ = refine(mean, fitted, mean(fitted))
        options.update({"refined": best, "refined, shrunk": shrink(best, SHRINK)})
    return options


def choose(pipeline: Any, unet: nn.Module, measured: ForecastErrors, num_full: int, reference: torch.Tensor,
           rewind: Callable[[], None], call_kwargs: dict) -> Choice:
    """The held-out choice (module docstring) among closed-loop runs of ``pipeline(**call_kwargs)`` with the same
    noise (``rewind``), scored per sample against ``reference`` (the uncached final latents)."""
    samples = measured.samples
    if samples != reference.shape[0]:
        raise ValueError(f"the replay measured {samples} samples, the call has {reference.shape[0]}.")
    cache: dict[CacheParams, np.ndarray] = {}

    def score(params: CacheParams) -> np.ndarray:
        if params not in cache:
            cache[params] = closed_loop_sample_errors(pipeline, unet, [params], reference, rewind, call_kwargs)[0]
        return cache[params]

    if samples < MIN_HELD_OUT:
        warnings.warn(
            f"calibrate(..., forecast=True) on {samples} calibration sample(s): too few to check a forecast on "
            f"samples it was not fitted on; calibrated reuse is kept unless the forecast gains at least 3 dB on every "
            f"{'held-out ' if samples > 1 else ''}sample. Calibrate on {MIN_HELD_OUT} or more prompts (or images per "
            f"prompt) for a safer choice.", stacklevel=3)
    folds = kfold(samples)
    names = OPTIONS if folds else OPTIONS[:1]
    gains = {name: np.full(samples, np.nan) for name in names}
    everyone = list(range(samples))
    for held in folds or [everyone]:
        train = [s for s in everyone if s not in held] or everyone
        options = fit_options(score, measured, num_full, train, refined=bool(folds))
        for name in names:
            gains[name][held] = 10.0 * (score(options["reuse"])[held] - score(options[name])[held])
    verdicts = {name: held_out_verdict(gains[name]) for name in names}
    best = pick([verdicts[name] for name in names])
    reuse = measured.reuse_params(num_full)
    if best is None:
        return Choice(reuse, "reuse", gains, verdicts, len(cache))
    option = names[best]
    params = fit_options(score, measured, num_full, everyone, refined="refined" in option)[option]
    if not any(params.forecast_weights):
        return Choice(reuse, "reuse", gains, verdicts, len(cache))
    return Choice(params, option, gains, verdicts, len(cache))


def calibrate_forecast(pipeline: Any, unet: nn.Module, branch: int, num_full: int, max_gap: int | None = MAX_GAP,
                       max_span: int = MAX_SPAN, **call_kwargs: Any) -> tuple[CacheParams, dict]:
    """The calibrated forecast (:mod:`DeepCache.schedules.forecast_calibration`, chosen as in this module's docstring): the
    parameters and what was measured (``measured``, ``choice``)."""
    with recorded(pipeline, unet, call_kwargs) as (rec, reference, rewind):
        n = rec.num_steps
        if isinstance(num_full, bool) or not isinstance(num_full, int) or not 1 <= num_full <= n:
            raise ValueError(f"num_full_steps must be an integer in [1, {n}] for a {n}-step generation, "
                             f"got {num_full!r}.")
        measured = forecast_errors(unet, rec, branch, max_gap=max_gap, max_span=max_span, samples=reference.shape[0])
        choice = choose(pipeline, unet, measured, num_full, reference, rewind, call_kwargs)
    return choice.params, {"measured": measured, "choice": choice}
