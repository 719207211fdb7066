"""What runs at every step, and bit-exact equality with independent computations."""

from __future__ import annotations

import pytest
import torch

from DeepCache import DeepCacheSDHelper
from DeepCache.schedules.schedule import CacheParams, schedule_pattern

from .reference import LayerProbe, OriginalRule
from .tiny import run, tiny_sd_pipe, tiny_sd_unet, tiny_sdxl_pipe, tiny_sdxl_unet, unet_loop

LAYOUTS = {"sd": tiny_sd_unet, "sdxl": tiny_sdxl_unet}
STEPS = 6


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def unet(request):
    return LAYOUTS[request.param]()


def _expected_sets(probe: LayerProbe, unet, full: bool, branch: int) -> dict[str, set]:
    n = probe.num_branches
    top = n - 1 if full else branch
    attn_down, attn_up = set(), set()
    skip = 1
    for block in unet.down_blocks:
        for j in range(len(block.resnets)):
            if getattr(block, "attentions", None) is not None and skip <= top:
                attn_down.add(skip)
            skip += 1
        skip += 1 if block.downsamplers else 0
    skip = n - 1
    for block in unet.up_blocks:
        for j in range(len(block.resnets)):
            if getattr(block, "attentions", None) is not None and skip <= top:
                attn_up.add(skip)
            skip -= 1
    return {
        "down": set(range(1, top + 1)),
        "up": set(range(0, top + 1)),
        "mid": {0} if full else set(),
        "down_attn": attn_down,
        "up_attn": attn_up,
    }


@pytest.mark.parametrize("skip_mode", ["uniform", "non-uniform"])
def test_layers_that_run_at_every_step(unet, skip_mode: str) -> None:
    probe = LayerProbe(unet)
    helper = DeepCacheSDHelper(pipe=unet)
    extra = {"center": 3} if skip_mode == "non-uniform" else {}
    try:
        with helper:
            for interval in range(1, 6):
                for branch in range(helper.num_branches()):
                    helper.set_params(cache_interval=interval, cache_branch_id=branch, skip_mode=skip_mode, **extra)
                    helper.reset_states(num_inference_steps=STEPS)
                    probe.calls.clear()
                    unet_loop(unet, steps=STEPS)
                    params = CacheParams(cache_interval=interval, cache_branch_id=branch, skip_mode=skip_mode, **extra)
                    pattern = schedule_pattern(params, STEPS)
                    assert helper.last_steps == pattern
                    for k, (full, ran) in enumerate(zip(pattern, probe.calls)):
                        assert ran == _expected_sets(probe, unet, full, branch), (interval, branch, k)
    finally:
        probe.remove()


def test_interval_one_equals_unpatched_exactly(unet) -> None:
    baseline = unet_loop(unet)
    helper = DeepCacheSDHelper(pipe=unet)
    helper.set_params(cache_interval=1, cache_branch_id=0)
    with helper:
        helper.reset_states()
        assert torch.equal(unet_loop(unet), baseline)


@pytest.mark.parametrize("interval", [2, 3, 4, 5])
def test_bare_unet_equals_original_rule_for_every_branch(unet, interval: int) -> None:
    helper = DeepCacheSDHelper(pipe=unet)
    baseline = unet_loop(unet)
    for branch in range(helper.num_branches()):
        reference = OriginalRule(unet, interval, branch)
        try:
            expected = unet_loop(unet)
        finally:
            reference.remove()
        helper.set_params(cache_interval=interval, cache_branch_id=branch)
        with helper:
            helper.reset_states()
            got = unet_loop(unet)
        assert torch.equal(got, expected), (interval, branch)
        assert not torch.equal(got, baseline), "caching that changes nothing is a bug"


@pytest.mark.parametrize("make, sdxl", [(tiny_sd_pipe, False), (tiny_sdxl_pipe, True)], ids=["sd", "sdxl"])
def test_pipeline_equals_original_rule_for_every_branch(make, sdxl: bool) -> None:
    pipe = make()
    helper = DeepCacheSDHelper(pipe=pipe)
    for branch in range(helper.num_branches()):
        reference = OriginalRule(pipe.unet, 3, branch)
        try:
            expected = run(pipe, steps=6)
        finally:
            reference.remove()
        helper.set_params(cache_interval=3, cache_branch_id=branch)
        with helper:
            got = run(pipe, steps=6)
        assert torch.equal(got, expected), branch
