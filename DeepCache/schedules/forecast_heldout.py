"""The held-out choice of ``helper.calibrate(K, forecast=True)``: a forecast is returned only when it beat calibrated
reuse on calibration samples it was not fitted on; otherwise the calibrated reuse schedule (``forecast=None``).

Fitting a forecast (the caps' closed-loop choice and the refinement of :mod:`DeepCache.schedules.forecast_calibration`) and
judging it on the same prompts overfits them: on other prompts such a forecast lost up to 3.9 dB against calibrated
reuse (issue 25). The replay and every closed-loop run already process the whole calibration batch at once, and
they are scored per sample (:func:`~DeepCache.schedules.forecast_calibration.sample_l1`,
:func:`~DeepCache.schedules.closed_loop.log_mse`), so fitting on part of the batch is an average over those
samples with no extra replay; each closed-loop run scores every sample at once.

The rule (:func:`choose`), a *ladder* of options (``LADDER``, mildest first, fixed in advance):

1. Split the ``S`` samples of the calibration batch (prompts x images per prompt) into folds
   (:func:`~DeepCache.schedules.forecast_refine.kfold`: 4 interleaved folds for ``S >= 4``, leave one out for 2-3).
2. Each rung is a recipe fitted on the other folds' samples by the replay alone (no closed-loop selection): the
   replay's forecast at the calibrated reuse steps of those samples (``"reuse steps"``: the DP's fitted on them, or
   the evenly spread steps when the guard of ``calibrate(K)`` chose those on all samples,
   :mod:`DeepCache.schedules.reuse_guard`), its weights times a factor
   (``x0.25`` .. ``x1``: shrunk toward reuse); the last rung refines the boldest one in closed loop on the other
   folds (``"refined"``, :func:`~DeepCache.schedules.forecast_refine.refine`). Scored on the
   held-out fold against the calibrated reuse schedule of the same other folds: gain = 10 x (reuse - option)
   image error (dB: the PSNR gain of the decoded image, :mod:`DeepCache.schedules.closed_loop`), one per
   sample.
3. Climb the ladder (:func:`~DeepCache.schedules.forecast_refine.climb`): each rung's held-out gains go to
   :func:`~DeepCache.schedules.forecast_refine.held_out_verdict` (with 4 or more samples a clear majority by a sign test,
   p <= 0.15: 6 of 8, 5 of 6, 4 of 4, and a mean gain above twice its standard error, each gain capped at 3 dB
   for that test, losses in full; with 1-3 samples every
   gain must reach 3 dB, and a warning says few samples are risky); the climb stops at the first rung not
   accepted (a rung that equals reuse or an earlier rung on every fold is passed over), and of the accepted rungs
   the one with the largest mean held-out gain is kept. Testing in a fixed order and stopping at the first failure
   keeps the chance of accepting any rung that does not beat reuse at the level of a single test, however many
   rungs there are; so the boldest rung that still passes may be kept, not only the safest.
4. The kept rung is fitted again on all the samples and returned; none accepted: calibrated reuse.

With one sample there is nothing to hold out: the unrefined rungs are judged on that sample itself, each must gain
3 dB. Cost: per fold, one closed-loop run per rung climbed (and the refinement's runs if the climb reaches it), the
reuse run per fold, and no extra replay; a ladder that stops at its first rung costs 2 runs per fold.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from .closed_loop import memoized_scores, recorded
from .forecast_calibration import MAX_GAP, MAX_SPAN, ForecastErrors, forecast_errors
from .forecast_refine import MIN_HELD_OUT, Verdict, as_forecast, climb, fold_splits, held_out_verdict, refine, shrink
from .params import CacheParams
from .reuse_guard import guard


@dataclass(frozen=True)
class Rung:
    """One option of the ladder: the forecast fitted by the replay at the calibrated reuse steps (``steps="reuse"``)
    or at the forecast DP's steps (``"dp"``), coefficients capped at ``cap`` (None: any), weights times ``factor``;
    ``refined``: then refined in closed loop on the fitting samples."""

    steps: str
    factor: float
    cap: float | None = None
    refined: bool = False

    def __post_init__(self) -> None:
        if self.steps not in ("reuse", "dp"):
            raise ValueError(f"Rung steps must be 'reuse' (the calibrated reuse steps) or 'dp' (the forecast DP's "
                             f"steps), got {self.steps!r}.")

    @property
    def name(self) -> str:
        """What :class:`Choice` calls the rung.

        >>> Rung("reuse", 0.5).name, Rung("dp", 1.0, cap=0.25, refined=True).name
        ('reuse steps x0.5', 'DP steps x1, cap 0.25, refined')
        """
        cap = "" if self.cap is None else f", cap {self.cap:g}"
        return f"{'reuse' if self.steps == 'reuse' else 'DP'} steps x{self.factor:g}{cap}" + (", refined" if self.refined else "")


#: The ladder, mildest first (the order is part of the rule: the climb stops at the first rung not accepted). The
#: forecast DP's own steps are not on it: on the demo model (3 prompt sets, N = 3) rungs at those steps were accepted
#: as often and gained more on the calibration samples, but they were kept over the reuse-steps rungs and then
#: gained less on other prompts (+0.4 and +3.7 dB against +2.2 and +5.4 at the reuse steps); ``Rung("dp", ...)``
#: builds them for a ladder of your own (``choose(..., ladder=...)``).
LADDER: tuple[Rung, ...] = (Rung("reuse", 0.25), Rung("reuse", 0.5), Rung("reuse", 0.75), Rung("reuse", 1.0),
                            Rung("reuse", 1.0, refined=True))


@dataclass
class Choice:
    """What :func:`choose` decided: the parameters, the rung kept (``"reuse"`` or a :attr:`Rung.name`), the held-out
    gains (dB, one per sample) and verdict of each rung judged (in climbing order), and the closed-loop runs it
    cost (with ``choose(..., scores=)``: those it was handed too, the guard's in ``calibrate``)."""

    params: CacheParams
    option: str
    gains: dict[str, np.ndarray] = field(default_factory=dict)
    verdicts: dict[str, Verdict] = field(default_factory=dict)
    runs: int = 0


def reuse_schedule(measured: ForecastErrors, num_full: int, steps: Sequence[int] | None = None) -> CacheParams:
    """The calibrated reuse schedule: at ``steps`` (the guard's evenly spread steps), else the DP's on ``measured``."""
    params = measured.reuse_params(num_full)
    return params if steps is None else dataclasses.replace(params, full_steps=tuple(steps))


def fit_rung(score: Callable[[CacheParams], np.ndarray], measured: ForecastErrors, num_full: int, rung: Rung,
             train: Sequence[int], steps: Sequence[int] | None = None) -> tuple[CacheParams, CacheParams]:
    """The calibrated reuse schedule and ``rung``'s forecast, both fitted on the samples ``train`` only. Only a
    refined rung runs the pipeline: ``score(params)`` is the per-sample error of a closed-loop run (lower is
    better), of which only ``train`` is looked at. ``steps``: the reuse schedule's full steps are these (the guard
    of :mod:`DeepCache.schedules.reuse_guard` chose the evenly spread ones: fitted on no sample); None: the DP's,
    fitted on ``train``."""
    train = list(train)
    sub = measured.subset(train)
    reuse = reuse_schedule(sub, num_full, steps)
    fitted = sub.params(num_full, rung.cap, reuse.full_steps if rung.steps == "reuse" else None)
    params = shrink(as_forecast(fitted, measured.num_steps), rung.factor)
    if rung.refined:
        mean = lambda p: float(score(p)[train].mean())  # noqa: E731
        params, _, _ = refine(mean, params, mean(params))
    return reuse, params


def choose(pipeline: Any, unet: nn.Module, measured: ForecastErrors, num_full: int, reference: torch.Tensor,
           rewind: Callable[[], None], call_kwargs: dict, ladder: Sequence[Rung] = LADDER,
           steps: Sequence[int] | None = None, scores: dict | None = None) -> Choice:
    """The held-out choice (module docstring) among closed-loop runs of ``pipeline(**call_kwargs)`` with the same
    noise (``rewind``), scored per sample against ``reference`` (the uncached decoded images, or final latents:
    :func:`~DeepCache.schedules.closed_loop.recorded`). ``steps``: the
    calibrated reuse steps when the guard (:mod:`DeepCache.schedules.reuse_guard`) replaced the DP's by the evenly
    spread ones (every fold's reuse schedule and ``"reuse"`` rungs use them); None: the DP's, fitted per fold.
    ``scores``: closed-loop runs of this call already made (parameters -> per-sample scores; the guard's), reused
    and added to (``Choice.runs`` counts them all)."""
    samples = measured.samples
    if samples != reference.shape[0]:
        raise ValueError(f"the replay measured {samples} samples, the call has {reference.shape[0]}.")
    cache: dict[CacheParams, np.ndarray] = {} if scores is None else scores
    score = memoized_scores(pipeline, unet, reference, rewind, call_kwargs, cache)

    if samples < MIN_HELD_OUT:
        warnings.warn(
            f"calibrate(..., forecast=True) on {samples} calibration sample(s): too few to check a forecast on "
            f"samples it was not fitted on; calibrated reuse is kept unless the forecast gains at least 3 dB on every "
            f"{'held-out ' if samples > 1 else ''}sample. Calibrate on {MIN_HELD_OUT} or more prompts (or images per "
            f"prompt) for a safer choice.", stacklevel=3)
    everyone = list(range(samples))
    splits = fold_splits(samples)
    rungs = [r for r in ladder if samples > 1 or not r.refined]
    seen: list[list[CacheParams]] = [[] for _ in splits]  # per split: reuse and the rungs judged so far
    gains: dict[str, np.ndarray] = {}

    def judge(i: int) -> Verdict | None:
        fits = [fit_rung(score, measured, num_full, rungs[i], train, steps) for train, _ in splits]
        if all(p in seen[j] or not any(p.forecast_weights) for j, (_, p) in enumerate(fits)):
            return None  # nothing new: reuse or an earlier rung on every fold
        g = np.full(samples, np.nan)
        for j, ((reuse, p), (_, held)) in enumerate(zip(fits, splits)):
            g[held] = 10.0 * (score(reuse)[held] - score(p)[held])
            seen[j].append(p)
        gains[rungs[i].name] = g
        return held_out_verdict(g)

    best, judged = climb(judge, len(rungs))
    verdicts = {rungs[i].name: v for i, v in enumerate(judged) if v is not None}
    reuse = reuse_schedule(measured, num_full, steps)
    if best is None:
        return Choice(reuse, "reuse", gains, verdicts, len(cache))
    params = fit_rung(score, measured, num_full, rungs[best], everyone, steps)[1]
    if not any(params.forecast_weights):
        return Choice(reuse, "reuse", gains, verdicts, len(cache))
    return Choice(params, rungs[best].name, gains, verdicts, len(cache))


def calibrate_forecast(pipeline: Any, unet: nn.Module, branch: int, num_full: int, max_gap: int | None = MAX_GAP,
                       max_span: int = MAX_SPAN, **call_kwargs: Any) -> tuple[CacheParams, dict]:
    """The calibrated forecast (:mod:`DeepCache.schedules.forecast_calibration`, chosen as in this module's docstring): the
    parameters and what was measured (``measured``, ``guard``: the :class:`~DeepCache.schedules.reuse_guard.Guard` that
    chose the calibrated reuse steps the ladder builds on, ``choice``)."""
    with recorded(pipeline, unet, call_kwargs) as (rec, reference, rewind):
        n = rec.num_steps
        if isinstance(num_full, bool) or not isinstance(num_full, int) or not 1 <= num_full <= n:
            raise ValueError(f"num_full_steps must be an integer in [1, {n}] for a {n}-step generation, "
                             f"got {num_full!r}.")
        measured = forecast_errors(unet, rec, branch, max_gap=max_gap, max_span=max_span, samples=reference.shape[0])
        runs: dict = {}  # the guard's closed-loop runs, shared with the ladder (its folds run the same DPs)
        guarded = guard(pipeline, unet, measured, num_full, reference, rewind, call_kwargs, runs)
        choice = choose(pipeline, unet, measured, num_full, reference, rewind, call_kwargs,
                        steps=guarded.params.full_steps if guarded.switched else None, scores=runs)
    return choice.params, {"measured": measured, "guard": guarded, "choice": choice}
