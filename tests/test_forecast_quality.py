"""The calibrated forecast beats calibrated reuse at the same number of full steps, on the embedded demo model.

Guards the gain measured in docs/schedules.md (16 held-out prompts, 25 DDIM steps, guidance 4, branch 0: calibrated
forecast - calibrated reuse = +5.7 dB at N = 3) with a margin: >= 3 dB at N = 3 on 8 held-out prompts never used for
calibration (both calibrated on the same 8 prompts). About 30-60 s on 2 shared CPU cores.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from DeepCache import DeepCacheSDHelper
from DeepCache.tools.metrics import psnr
from DeepCache.tools.prompts import embedded_prompts

from .embedded import GUIDANCE, STEPS, demo_pipeline, images, needs_model

INTERVAL, MARGIN_DB = 3, 3.0

pytestmark = needs_model


@pytest.mark.slow
def test_calibrated_forecast_beats_calibrated_reuse_at_interval_3() -> None:
    pipe = demo_pipeline()
    prompts = embedded_prompts(16, seed=0)
    calibration, held_out = prompts[:8], prompts[8:]
    reference = images(pipe, held_out)
    helper = DeepCacheSDHelper(pipe=pipe)
    budget = -(-STEPS // INTERVAL)
    results = {}
    for forecast in (False, True):
        params = helper.calibrate(
            budget, forecast=forecast, prompt=calibration, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
            output_type="latent", generator=[torch.Generator().manual_seed(i) for i in range(len(calibration))],
        )
        assert helper.params == params and len(params.full_steps) == budget and params.full_steps[0] == 0
        results[forecast] = (params, float(np.mean(psnr(images(pipe, held_out, helper, params), reference))))
    (reuse, reuse_db), (forecast, forecast_db) = results[False], results[True]
    assert forecast.forecast == "linear" and len(forecast.forecast_weights) == STEPS
    assert all(forecast.forecast_weights[k] == 0.0 for k in forecast.full_steps)
    assert forecast_db >= reuse_db + MARGIN_DB, (forecast_db, reuse_db, forecast)
