"""``helper.calibrate``: choose the full steps (with ``forecast=True``, also a forecast weight per step) on the
user's own pipeline and calls, and set them on the helper.

:class:`CalibrateMixin` gives :class:`~DeepCache.helper.DeepCacheSDHelper` its :meth:`~CalibrateMixin.calibrate`.
The measuring lives elsewhere: the reuse errors in :mod:`DeepCache.schedules.calibration` (then the exact dynamic programme
:func:`~DeepCache.schedules.schedule.optimal_full_steps`; measured per sample by the replay of
:mod:`DeepCache.schedules.forecast_calibration`, which also forecasts), the guard of those steps in
:mod:`DeepCache.schedules.reuse_guard`, the closed-loop runs in :mod:`DeepCache.schedules.closed_loop` and the
forecast's held-out choice in :mod:`DeepCache.schedules.forecast_heldout`. U-Nets and transformers alike (a
transformer's CFG branches are replayed each on its own). This module runs one or the other with the helper disabled
(and enabled again if it was), and sets the result.

Example::

    params = helper.calibrate(num_full_steps=9, prompt=calibration_prompts, num_inference_steps=25)
    open("schedule.json", "w").write(params.to_json())   # later: helper.params = CacheParams.from_json(text)
"""

from __future__ import annotations

from typing import Any

from .attach import resolve
from .schedules.params import CacheParams


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

        **The DP's choice is guarded** (:mod:`DeepCache.schedules.reuse_guard`): it minimises a one-step error, which
        can mispredict a real run's, so its steps are checked against the evenly spread schedule of the same
        ``num_full_steps`` (:func:`~DeepCache.schedules.schedule.even_full_steps`, the forced steps kept) in closed
        loop: the calibration call runs again with the same noise under each, scored per sample on its **decoded
        image** against the uncached call's (PSNR; the pipeline's own decode, the call run with ``output_type="pt"``
        whatever it asks for; a pipeline that cannot decode in the call, no ``output_type`` or no ``vae``, is scored
        on its final latents: :func:`~DeepCache.schedules.closed_loop.scored_call`). Split as for the forecast (4
        folds, leave one out for 2-3 samples), the DP is solved without each fold (from per-sample reuse errors of
        the same replay, no extra model run) and compared on the fold.
        The evenly spread steps are returned only if they gain on a clear majority of the samples (sign test, p <=
        0.15: 6 of 8, 5 of 6, all of 4) by more than twice the standard error of their gains (capped at 3 dB; with
        1-3 samples: at least 3 dB on each); otherwise the DP's. Equal schedules, or evenly spread steps needing a
        gap beyond ``max_gap``, run nothing. Cost: 2-5 pipeline calls more (one for the evenly spread steps, one
        per distinct DP of the folds). The decision is logged (``logging``, ``DeepCache.schedules.reuse_guard``,
        INFO: which won and why).

        With ``forecast=True`` retrieval steps may forecast the feature (``forecast="linear"``) instead: the replay
        also measures, for each pair of full steps ``a' < a`` (at most 4 apart), each step ``k`` at most ``max_gap``
        (default 8) after ``a`` and each candidate weight, the same error for ``F_a + w*(k-a)*(F_a - F_a')/(a-a')``;
        the full steps come from a DP over the last two full steps, with the best weight per evaluation (reuse,
        weight 0, wins ties). The calibrated reuse steps the options build on are the guarded ones (above; the
        guard's runs are shared). **The result is chosen on samples it was not fitted on**
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
        from .schedules.reuse_guard import calibrate_reuse

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
                    params = calibrate_reuse(pipeline, unet, branch, num_full_steps, max_gap, **call_kwargs).params
            finally:
                if was_enabled:
                    self.enable()
        self.params = params
        return params
