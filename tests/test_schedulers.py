"""Every common scheduler runs end to end with caching on and matches the original rule exactly.

The interval counts U-Net evaluations, so second-order schedulers (Heun, KDPM2) that evaluate the U-Net
twice per step follow the same pattern over their evaluations.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

from DeepCache import DeepCacheSDHelper
from DeepCache.schedules.schedule import CacheParams, schedule_pattern

from .reference import OriginalRule
from .tiny import run, tiny_sd_pipe

STEPS = 5

# diffusers' k-diffusion schedulers trip numpy 2 deprecations thousands of times per run; not ours to fix
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array_wrap__ must accept context:DeprecationWarning",
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning",
)

SCHEDULERS = {
    "DDIM": lambda: DDIMScheduler(steps_offset=1, clip_sample=False),
    "PNDM-PLMS": lambda: PNDMScheduler(skip_prk_steps=True, steps_offset=1),
    "Euler": lambda: EulerDiscreteScheduler(steps_offset=1),
    "EulerAncestral": lambda: EulerAncestralDiscreteScheduler(steps_offset=1),
    "DPMSolver++-Karras": lambda: DPMSolverMultistepScheduler(
        algorithm_type="dpmsolver++", use_karras_sigmas=True, steps_offset=1
    ),
    "UniPC": lambda: UniPCMultistepScheduler(steps_offset=1),
    "LCM": lambda: LCMScheduler(steps_offset=1),
    "Heun": lambda: HeunDiscreteScheduler(steps_offset=1),
    "KDPM2": lambda: KDPM2DiscreteScheduler(steps_offset=1),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_scheduler_end_to_end(name: str) -> None:
    pipe = tiny_sd_pipe(scheduler=SCHEDULERS[name]())
    baseline = run(pipe, steps=STEPS)
    reference = OriginalRule(pipe.unet, 3, 1)
    try:
        expected = run(pipe, steps=STEPS)
        evaluations = reference.step + 1
    finally:
        reference.remove()
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, cache_branch_id=1)
    with helper:
        cached = run(pipe, steps=STEPS)
        again = run(pipe, steps=STEPS)
    assert torch.isfinite(cached).all()
    assert helper.last_steps == schedule_pattern(CacheParams(cache_interval=3, cache_branch_id=1), evaluations)
    assert torch.equal(cached, expected) and torch.equal(again, cached)
    assert not torch.equal(cached, baseline)
    assert torch.equal(run(pipe, steps=STEPS), baseline)
