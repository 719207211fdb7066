"""The calibrated schedule beats the uniform interval at the same cost, on the embedded demo model.

Guards the gain measured in docs/schedules.md (16 held-out prompts, 25 DDIM steps, guidance 4, branch 0:
calibrated - uniform = +3.5 dB at N = 3 and +2.2 dB at N = 5) with a margin: >= 0.5 dB, on 6 held-out prompts
never used for calibration.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from DeepCache import CacheParams, DeepCacheSDHelper
from DeepCache.tools.metrics import psnr
from DeepCache.tools.prompts import embedded_prompts

from .embedded import GUIDANCE, STEPS, demo_pipeline, images, needs_model

MARGIN_DB = 0.5

pytestmark = needs_model


@pytest.fixture(scope="module")
def setup():
    pipe = demo_pipeline()
    prompts = embedded_prompts(10, seed=0)
    return pipe, prompts[:4], prompts[4:]


@pytest.mark.slow
@pytest.mark.parametrize("interval", [3, 5])
def test_calibrated_beats_uniform_at_the_same_number_of_full_steps(setup, interval: int) -> None:
    pipe, calibration, held_out = setup
    reference = images(pipe, held_out)
    helper = DeepCacheSDHelper(pipe=pipe)
    budget = -(-STEPS // interval)
    calibrated = helper.calibrate(
        budget, prompt=calibration, num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="latent",
        generator=[torch.Generator().manual_seed(i) for i in range(len(calibration))],
    )
    assert len(calibrated.full_steps) == budget and calibrated.full_steps[0] == 0
    uniform = float(np.mean(psnr(images(pipe, held_out, helper, CacheParams(cache_interval=interval)), reference)))
    tuned = float(np.mean(psnr(images(pipe, held_out, helper, calibrated), reference)))
    assert tuned >= uniform + MARGIN_DB, (interval, tuned, uniform, calibrated.full_steps)
