"""The embedded demo model for the quality guards: where it lives, how it is loaded, one image call.

Shared by tests/test_schedule_quality.py and tests/test_forecast_quality.py (25 DDIM steps, guidance 4, the seeds
1000 + i of the held-out prompts).
"""

from __future__ import annotations

from importlib.resources import files
from typing import Any

import numpy as np
import pytest
import torch

MODEL = files("DeepCache") / "assets" / "demo-model"
STEPS, GUIDANCE = 25, 4.0

#: Skip a module's tests when the embedded model has not been built.
needs_model = pytest.mark.skipif(not (MODEL / "model_index.json").is_file(), reason="embedded demo model not built")


def demo_pipeline() -> Any:
    """The embedded text-to-image pipeline with a DDIM scheduler and no progress bar (no download)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(MODEL, local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images(pipe: Any, prompts: list[str], helper: Any = None, params: Any = None) -> np.ndarray:
    """The images of ``prompts`` (float64, HWC), uncached or with ``helper`` enabled at ``params`` for this call."""
    if helper is not None:
        helper.params = params
        helper.enable()
    try:
        with torch.no_grad():
            out = pipe(prompts, num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="np",
                       generator=[torch.Generator().manual_seed(1000 + i) for i in range(len(prompts))])
    finally:
        if helper is not None:
            helper.disable()
    return np.asarray(out.images, dtype=np.float64)
