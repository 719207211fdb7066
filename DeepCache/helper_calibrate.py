"""``helper.calibrate``: choose the full steps (with ``forecast=True``, also a forecast weight per step) on the
user's own pipeline and calls, and set them on the helper.

:class:`CalibrateMixin` gives :class:`~DeepCache.helper.DeepCacheSDHelper` its :meth:`~CalibrateMixin.calibrate`.
The measuring lives elsewhere: the reuse errors in :mod:`DeepCache.schedules.calibration` (then the exact dynamic programme
:func:`~DeepCache.schedules.schedule.optimal_full_steps`), the forecast replay in
:mod:`DeepCache.schedules.forecast_calibration`, its closed-loop runs in :mod:`DeepCache.schedules.closed_loop` and the
held-out choice in :mod:`DeepCache.schedules.forecast_heldout`. U-Nets and transformers alike (a transformer's CFG
branches are replayed each on its own). This module runs one or the other with the helper disabled (and enabled
again if it was), and sets the result.

Example::

    params = helper.calibrate(num_full_steps=9, prompt=calibration_prompts, num_inference_steps=25)
    open("schedule.json", "w").write(params.to_json())   # later: helper.params = CacheParams.from_json(text)
"""

from __future__ import annotations

from typing import Any

from .attach import resolve
from .schedules.params import CacheParams
from .schedules.schedule import optimal_full_steps


class CalibrateMixin:
    """The calibration of :class:`~DeepCache.helper.DeepCacheSDHelper`, which provides what it uses: ``pipe``,
    ``params``, ``_params``, ``_lock``, ``enabled``, ``enable()`` and ``disable()``."""

    def calibrate(self, num_full_steps: int, *, max_gap: int | None = None, forecast: bool = False,
                  **call_kwargs: Any) -> CacheParams:
        """Pick the ``num_full_steps`` full steps that suit this pipeline and these calls best, and use them.

        Runs the pipeline once, uncached, with ``call_kwargs`` (prompt(s), ``num_inference_steps``,
        ``guidance_scale``, ``generator``...: the calls you will make; a list of prompts is a calibration set),
        then measures, for every full step ``a`` and later step ``k`` (at most ``max_gap`` apart), how far the
        latent of step ``k`` moves when it reuses the cached feature of step ``a`` of the current
        ``cache_branch_id`` (replaying the recorded U-Net inputs: one full and the retrieval evaluations per
        ``a``; about 2-4 pipeline calls' worth of U-Net work for branch 0 with every gap allowed). On a transformer
        the cached feature is the middle blocks' residual, and a pipeline that calls it once per CFG branch (Flux
        true CFG, Wan, Lumina2) has each branch replayed on its own, their errors summed per step (batched CFG,
        SD3: one call per step). Wan 2.2 is recorded and replayed on both transformers (each step on the one that ran
        it); as in a cached run, no step of ``transformer_2`` reuses a feature of ``transformer``, so its first step
        is always among the full steps (``ValueError`` if ``num_full_steps`` leaves no room for it). The full steps
        (step 0 included) that minimise the total error are chosen by an exact dynamic programme
        (:func:`~DeepCache.schedules.schedule.optimal_full_steps`). The enabled state is left as it was.

        With ``forecast=True`` retrieval steps may forecast the feature (``forecast="linear"``) instead: the replay
        also measures, for each pair of full steps ``a' < a`` (at most 4 apart), each step ``k`` at most ``max_gap``
        (default 8) after ``a`` and each candidate weight, the same error for ``F_a + w*(k-a)*(F_a - F_a')/(a-a')``;
        the full steps come from a DP over the last two full steps, with the best weight per evaluation (reuse,
        weight 0, wins ties). **The result is chosen on samples it was not fitted on**
        (:mod:`DeepCache.schedules.forecast_heldout`): the calibration batch (prompts x images per prompt) is split
        into 4 folds (leave one out for 2-3 samples). The options form a ladder, mildest first: the best weights for
        the calibrated reuse steps, times 0.25, 0.5, 0.75 and 1, then the last refined in closed loop (one weight
        per segment of at least 5 retrieval steps, possibly negative). For each fold each option is fitted on the
        other folds and run (closed loop, the same noise) against the calibrated reuse schedule of the same folds,
        scored on the held-out one. An option is accepted only if it gains on a clear majority of the held-out
        samples (one-sided sign test, p <= 0.15: 6 of 8, 5 of 6, all of 4) by more than twice the standard error of
        its gains (each gain capped at 3 dB for this test, losses in full); the ladder is climbed until the first
        option not accepted, and the accepted option with the largest mean gain is fitted again on all samples and
        returned (testing in a fixed order and stopping at the first failure keeps the risk of any wrong acceptance
        at that of one test). None accepted: the calibrated reuse schedule (``forecast=None``), so asking for a
        forecast is meant never to give worse images than not asking. With 1-3 samples a forecast is kept only if it
        gains at least 3 dB on every held-out sample (with one sample: on that sample, unrefined), and a
        ``UserWarning`` says that few prompts are risky: calibrate on 4 or more (8 recommended). Cost: about 10
        pipeline calls' worth of U-Net work for the replay (25 steps, branch 0; a transformer: per CFG branch),
        then per fold two closed-loop runs and one more per option climbed (plus up to 14 per long segment if the
        climb reaches the refinement). On a transformer each CFG branch's middle residual is forecast along its own
        line.

        Returns:
            ``CacheParams(skip_mode="custom", full_steps=..., cache_branch_id=...)``, also set on the helper (with
            ``forecast=True``: also ``forecast="linear"`` and ``forecast_weights``, one per evaluation, unless reuse
            won). ``params.to_json()`` saves it; ``helper.params = CacheParams.from_json(text)`` loads it.

        Example::

            params = helper.calibrate(num_full_steps=9, prompt=calibration_prompts, num_inference_steps=25)
        """
        from .schedules import calibration

        pipeline, unet = resolve(self.pipe)
        if pipeline is None:
            raise TypeError("calibrate() runs the pipeline: create the helper with a pipeline, not a bare U-Net.")
        if not isinstance(forecast, bool):
            raise ValueError(f"forecast must be True or False (calibrate a linear forecast, or reuse), got {forecast!r}.")
        branch = self._params.cache_branch_id
        with self._lock:
            was_enabled = self.enabled
            self.disable()
            try:
                if forecast:
                    from .schedules.forecast_calibration import MAX_GAP
                    from .schedules.forecast_heldout import calibrate_forecast

                    gap = MAX_GAP if max_gap is None else max_gap
                    params, _ = calibrate_forecast(pipeline, unet, branch, num_full_steps, max_gap=gap,
                                                   **call_kwargs)
                else:
                    errors = calibration.measure_reuse_errors(pipeline, unet, branch, max_gap, **call_kwargs)
                    params = CacheParams(
                        skip_mode="custom", full_steps=optimal_full_steps(errors, num_full_steps), cache_branch_id=branch
                    )
            finally:
                if was_enabled:
                    self.enable()
        self.params = params
        return params
