"""``deepcache tune``'s calibrated candidates: one recording on the calibration prompts, solved for any branch and K.

The calibration prompts run once uncached (recorded; the denoiser's inputs, a U-Net's or a transformer's, do not
depend on the branch, so one recording serves every branch). Each branch's replay runs the first time a candidate of
that branch is built, and each budget K is solved only when its candidate can still win (:mod:`.plan`):

* ``calibrated``: the reuse errors (gaps up to ``reuse_gap``), then the exact programme for K: the full steps
  :meth:`DeepCacheSDHelper.calibrate` picks;
* ``forecast``: the forecast errors (:func:`DeepCache.schedules.forecast_calibration.forecast_errors`: forecasts at most
  :data:`FORECAST_MAX_GAP` evaluations past their full step, from full steps at most :data:`FORECAST_MAX_SPAN` apart;
  farther steps reuse), then the library's forecast choice for K (:func:`forecast_choice`, the one place it is
  made). ``None`` for a K where no forecast weight is left nonzero (it would be reuse).

Held out: everything here sees the calibration prompts only; every candidate is judged on the other prompts
(:class:`.search.PromptSplit` keeps the two sets disjoint).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ...schedules import calibration, closed_loop
from ...schedules import forecast_calibration as fc
from ...schedules import forecast_heldout
from ...schedules.params import CacheParams
from ...schedules.schedule import optimal_full_steps
from ..kinds import kind_of
from ..settings import Setting

__all__ = ["CALIBRATED_KINDS", "FORECAST_MAX_GAP", "FORECAST_MAX_SPAN", "LINEAR_MAX_INTERVAL", "Calibration",
           "forecast_choice", "reuse_within"]

#: The kinds whose settings come from the calibration recording.
CALIBRATED_KINDS: tuple[str, ...] = ("calibrated", "forecast")
#: The forecast replay's bounds (those of ``helper.calibrate(K, forecast=True)``).
FORECAST_MAX_GAP, FORECAST_MAX_SPAN = fc.MAX_GAP, fc.MAX_SPAN
#: ``linear`` (uniform, ``forecast="linear"``, weight 1) is tried at intervals up to this one only: on the embedded
#: model it gained 9.5 dB over uniform reuse at N = 3 and lost from N = 4 on (issue 19's table).
LINEAR_MAX_INTERVAL = 3


def reuse_within(errors: Sequence[Sequence[float]], max_gap: int) -> list[list[float]]:
    """Reuse errors with every gap longer than ``max_gap`` set to infinity (what a replay bounded there measures).

    >>> reuse_within([[0.0, 1.0, 2.0], [math.inf, 0.0, 1.0], [math.inf, math.inf, 0.0]], 1)
    [[0.0, 1.0, inf], [inf, 0.0, 1.0], [inf, inf, 0.0]]
    """
    return [[e if k - a <= max_gap else math.inf for k, e in enumerate(row)] for a, row in enumerate(errors)]


def forecast_choice(pipe: Any, measured: fc.ForecastErrors, budget: int, reference: torch.Tensor,
                    rewind: Callable[[], None], call: dict[str, Any]) -> CacheParams | None:
    """THE ONE CALL SITE of the library's forecast choice for ``deepcache tune``: the held-out rule of
    ``helper.calibrate(K, forecast=True)`` (:func:`DeepCache.schedules.forecast_heldout.choose`: options fitted on part of the
    calibration samples, judged on the others, a forecast kept only when it beat calibrated reuse there). ``None``
    when the rule keeps reuse (calibrated reuse is a candidate of its own). Whatever it picks is judged by tune on
    the judging prompts, never on the calibration prompts it was chosen on.
    """
    choice = forecast_heldout.choose(pipe, kind_of(pipe).denoiser, measured, budget, reference, rewind, call)
    return None if choice.option == "reuse" else choice.params


class Calibration:
    """The calibration prompts' one recording and what each branch and budget K gets from it, computed on demand.

    Use as a context manager (the recording and its noise are held until the end of the block). ``on_stage(text)``
    is told each expensive step before it runs (the progress display). ``runs`` counts the recordings (at most 1).
    """

    def __init__(self, pipe: Any, call: dict[str, Any], *, reuse_gap: int, forecast: bool,
                 on_stage: Callable[[str], None] = lambda text: None) -> None:
        self.pipe, self.call, self.reuse_gap, self.forecast = pipe, call, reuse_gap, forecast
        self.denoiser = kind_of(pipe).denoiser  # the U-Net or the transformer
        self.on_stage = on_stage
        self.runs = 0
        self._stack = contextlib.ExitStack()
        self._recorded: tuple[Any, torch.Tensor, Callable[[], None]] | None = None
        self._reuse: dict[int, list[list[float]]] = {}
        self._measured: dict[int, fc.ForecastErrors] = {}
        self._forecasts: dict[tuple[int, int], Setting | None] = {}

    def __enter__(self) -> Calibration:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()

    def _recording(self) -> tuple[Any, torch.Tensor, Callable[[], None]]:
        if self._recorded is None:
            self.on_stage("calibration: recording the uncached run")
            self._recorded = self._stack.enter_context(closed_loop.recorded(self.pipe, self.denoiser, self.call))
            self.runs += 1
        return self._recorded

    def _errors(self, branch: int) -> list[list[float]]:
        """The reuse errors of ``branch`` (from the forecast replay when forecasts are wanted: the same numbers)."""
        if branch not in self._reuse:
            rec = self._recording()[0]
            if self.forecast:
                self._reuse[branch] = reuse_within(self._forecast_errors(branch).reuse, self.reuse_gap)
            else:
                self.on_stage(f"calibration: reuse errors B={branch}")
                self._reuse[branch] = calibration.reuse_errors(self.denoiser, rec, branch, self.reuse_gap)
        return self._reuse[branch]

    def _forecast_errors(self, branch: int) -> fc.ForecastErrors:
        if branch not in self._measured:
            rec = self._recording()[0]
            self.on_stage(f"calibration: forecast replay B={branch}")
            samples = self._recording()[1].shape[0]  # per-sample errors: the held-out choice splits them
            self._measured[branch] = fc.forecast_errors(self.denoiser, rec, branch, max_gap=FORECAST_MAX_GAP,
                                                        max_span=FORECAST_MAX_SPAN, samples=samples)
        return self._measured[branch]

    def calibrated(self, branch: int, budget: int) -> Setting:
        """The K = ``budget`` full steps ``calibrate()`` picks at ``branch``."""
        return Setting(1, branch, "custom", full_steps=optimal_full_steps(self._errors(branch), budget))

    def forecast_setting(self, branch: int, budget: int) -> Setting | None:
        """The calibrated forecast with K = ``budget`` full steps at ``branch`` (:func:`forecast_choice`)."""
        key = (branch, budget)
        if key not in self._forecasts:
            measured = self._forecast_errors(branch)
            _, reference, rewind = self._recording()
            self.on_stage(f"calibration: forecast choice B={branch}, K={budget} (closed loop)")
            params = forecast_choice(self.pipe, measured, budget, reference, rewind, self.call)
            self._forecasts[key] = None if params is None else Setting.of(params)
        return self._forecasts[key]
