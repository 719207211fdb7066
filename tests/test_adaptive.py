"""Quality-aware schedules at run time: ``helper.calibrate`` and ``skip_mode="adaptive"`` (pure parts: test_schedule)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

from DeepCache import CacheParams, DeepCacheSDHelper
from DeepCache.schedules.schedule import format_pattern, schedule_pattern

from . import tiny_pipelines as tp
from .tiny import prompt_kwargs, run, tiny_sd_pipe, tiny_sdxl_pipe

STEPS = 12


def _custom_from(steps: tuple[bool, ...], branch: int) -> dict:
    return dict(skip_mode="custom", full_steps=[i for i, full in enumerate(steps) if full], cache_branch_id=branch)


@pytest.mark.parametrize("make", [tiny_sd_pipe, tiny_sdxl_pipe], ids=["sd", "sdxl"])
def test_adaptive_decisions_rerun_as_custom_steps_bit_identically_at_every_branch(make) -> None:
    pipe = make()
    helper = DeepCacheSDHelper(pipe=pipe)
    mixed = 0
    for branch in range(helper.num_branches()):
        # random weights: the skip feature moves by ~0.5-1.2 (relative L1) one step after a full step
        helper.set_params(cache_interval=4, cache_branch_id=branch, skip_mode="adaptive", threshold=1.0)
        with helper:
            adaptive = run(pipe, steps=STEPS)
            decisions = helper.last_steps
        assert len(decisions) == STEPS and decisions[0]
        assert "rrrr" not in format_pattern(decisions)  # the cap: at most 3 retrieval steps in a row
        mixed += 0 < sum(decisions) < STEPS and format_pattern(decisions) != "FrrrFrrrFrrr"
        helper.set_params(cache_interval=1, **_custom_from(decisions, branch))
        with helper:
            assert torch.equal(run(pipe, steps=STEPS), adaptive), branch
            assert helper.last_steps == decisions
    assert mixed >= helper.num_branches() // 2, "the threshold decides: not all full, not the cap's pattern"


def test_threshold_zero_is_all_full_steps_and_a_huge_one_is_the_uniform_pattern_of_the_cap() -> None:
    pipe = tiny_sd_pipe()
    baseline = run(pipe, steps=STEPS)
    helper = DeepCacheSDHelper(pipe=pipe)
    with helper:
        for branch in range(helper.num_branches()):
            helper.set_params(cache_interval=3, cache_branch_id=branch, skip_mode="adaptive", threshold=0.0)
            assert torch.equal(run(pipe, steps=STEPS), baseline), branch
            assert helper.last_steps == (True,) * STEPS
        for cap in range(1, STEPS + 2):  # every cap a 12-step run can tell apart, and one beyond
            helper.set_params(cache_interval=cap, cache_branch_id=1, skip_mode="adaptive", threshold=1e30)
            capped = run(pipe, steps=STEPS)
            assert helper.last_steps == schedule_pattern(CacheParams(cache_interval=cap), STEPS), cap
            helper.set_params(cache_interval=cap, cache_branch_id=1)
            assert torch.equal(run(pipe, steps=STEPS), capped), cap


def test_adaptive_with_a_controlnet_reruns_bit_identically() -> None:
    pipe = tp.sd_controlnet_pipe(num_controlnets=2)
    kwargs = dict(image=[tp.image(), tp.image(seed=3)], controlnet_conditioning_scale=[1.0, 0.5])
    helper = DeepCacheSDHelper(pipe=pipe)
    with helper:
        helper.set_params(cache_interval=4, cache_branch_id=2, skip_mode="adaptive", threshold=1.0)
        adaptive = run(pipe, steps=STEPS, **kwargs)
        decisions = helper.last_steps
        helper.set_params(**_custom_from(decisions, 2))
        assert torch.equal(run(pipe, steps=STEPS, **kwargs), adaptive)
    assert 0 < sum(decisions) < STEPS


def test_adaptive_under_torch_compile_says_what_to_do_instead() -> None:
    torch._dynamo.reset()
    pipe = tiny_sd_pipe()
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, skip_mode="adaptive", threshold=0.05)
    pipe.unet = torch.compile(pipe.unet, backend=CompileCounterWithBackend("aot_eager"), fullgraph=True)
    try:
        with helper, pytest.raises(Exception, match=r'skip_mode="adaptive".*skip_mode="custom"'):
            run(pipe, steps=4)
    finally:
        torch._dynamo.reset()


def test_calibrate_picks_exactly_k_full_steps_and_sets_them(monkeypatch) -> None:
    pipe = tiny_sd_pipe()
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, cache_branch_id=1)
    call = dict(num_inference_steps=STEPS, guidance_scale=5.0, output_type="latent", **prompt_kwargs(batch=2))
    for k in range(1, STEPS + 1):  # every budget
        params = helper.calibrate(num_full_steps=k, generator=torch.Generator().manual_seed(0), **call)
        assert params.skip_mode == "custom" and params.cache_branch_id == 1
        assert len(params.full_steps) == k and params.full_steps[0] == 0 and max(params.full_steps) < STEPS
        assert helper.params == params and not helper.enabled  # set, and the enabled state left as it was
    # enabled: still enabled afterwards, and the calibration call itself ran uncached
    baseline = run(pipe, steps=STEPS)
    with helper:
        seen = []
        monkeypatch.setattr(helper, "disable", lambda original=helper.disable: (seen.append("off"), original())[1])
        params = helper.calibrate(num_full_steps=4, generator=torch.Generator().manual_seed(0), **call)
        assert helper.enabled and seen == ["off"]
        cached = run(pipe, steps=STEPS)
        assert format_pattern(helper.last_steps) == format_pattern(i in params.full_steps for i in range(STEPS))
    assert not torch.equal(cached, baseline)
    # a saved schedule loads back and gives the same images
    helper.params = CacheParams.from_json(params.to_json())
    with helper:
        assert torch.equal(run(pipe, steps=STEPS), cached)


def test_calibrate_needs_a_pipeline_and_a_sane_budget() -> None:
    from .tiny import tiny_sd_unet

    with pytest.raises(TypeError, match="create the helper with a pipeline"):
        DeepCacheSDHelper(pipe=tiny_sd_unet()).calibrate(3)
    pipe = tiny_sd_pipe()
    with pytest.raises(ValueError, match=r"num_full_steps must be an integer in \[1, 4\]"):
        DeepCacheSDHelper(pipe=pipe).calibrate(5, num_inference_steps=4, output_type="latent", **prompt_kwargs())
    with pytest.raises(TypeError, match="must be a CacheParams"):
        DeepCacheSDHelper(pipe=pipe).params = {"cache_interval": 3}
