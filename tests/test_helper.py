"""The drop-in API: lifecycle, validation, restoration, and the original's bugs as regressions."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    HeunDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
)

from DeepCache import DeepCacheSDHelper
from DeepCache.schedules.schedule import format_pattern

from .reference import OriginalRule
from .tiny import prompt_kwargs, run, tiny_sd_pipe, tiny_sd_unet, tiny_sdxl_unet, unet_inputs, unet_loop


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd_pipe()


@pytest.fixture(scope="module")
def baseline(pipe):
    return run(pipe)


def _module_state(unet):
    """Everything a patch could leave behind: instance attributes and hook dicts of every module."""
    state = {}
    for name, module in unet.named_modules():
        hooks = tuple(
            len(getattr(module, attr))
            for attr in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs")
        )
        state[name] = (tuple(sorted(module.__dict__)), hooks)
    return state


# -- drop-in contract --------------------------------------------------------------------------------


def test_readme_snippet_works_and_disable_restores_bit_identical(pipe, baseline) -> None:
    cls, before = type(pipe), _module_state(pipe.unet)
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, cache_branch_id=0)
    helper.enable()
    assert isinstance(pipe, cls) and type(pipe).__name__ == cls.__name__
    cached = run(pipe)
    assert format_pattern(helper.last_steps) == "FrrFrrFrrF"
    helper.disable()
    assert not torch.equal(cached, baseline)
    assert type(pipe) is cls
    assert _module_state(pipe.unet) == before
    assert torch.equal(run(pipe), baseline)


def test_same_call_twice_gives_the_same_image(pipe) -> None:
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, cache_branch_id=1)
    with helper:
        first, second = run(pipe, seed=3), run(pipe, seed=3)
    assert torch.equal(first, second)


def test_an_enabled_pipeline_keeps_its_call_signature_name_and_doc(pipe) -> None:
    """Code that inspects ``pipe.__call__`` (which keywords does it take?) sees the same answer enabled or not: the
    tools choose true CFG that way, and ran a Flux pipeline without it while a helper was enabled."""
    import inspect

    original = type(pipe).__call__
    before = inspect.signature(pipe.__call__)
    with DeepCacheSDHelper(pipe=pipe):
        assert type(pipe).__call__ is not original  # the generation subclass is in place
        assert inspect.signature(pipe.__call__) == before and "guidance_scale" in before.parameters
        assert inspect.signature(type(pipe).__call__) == inspect.signature(original)
        assert (type(pipe).__call__.__name__, type(pipe).__call__.__doc__) == ("__call__", original.__doc__)
    assert type(pipe).__call__ is original


def test_context_manager_leaves_an_enabled_helper_enabled(pipe) -> None:
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.enable()
    with helper:
        assert helper.enabled
    assert helper.enabled
    helper.disable()
    with helper:
        assert helper.enabled
    assert not helper.enabled


def test_enable_twice_and_disable_twice_are_harmless(pipe, baseline) -> None:
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=2)
    helper.enable()
    helper.enable()
    once = run(pipe)
    helper.disable()
    helper.disable()
    assert torch.equal(run(pipe), baseline)
    with DeepCacheSDHelper(pipe=pipe) as other:
        other.set_params(cache_interval=2)
        assert torch.equal(run(pipe), once)


def test_disable_before_enable_is_a_no_op(pipe, baseline) -> None:
    DeepCacheSDHelper(pipe=pipe).disable()
    DeepCacheSDHelper().disable()
    assert torch.equal(run(pipe), baseline)


def test_set_params_while_enabled_applies_to_the_next_call(pipe) -> None:
    helper = DeepCacheSDHelper(pipe=pipe)
    with helper:
        helper.set_params(cache_interval=2)
        run(pipe)
        assert format_pattern(helper.last_steps) == "FrFrFrFrFr"
        helper.set_params(cache_interval=4, cache_branch_id=2)
        run(pipe)
        assert format_pattern(helper.last_steps) == "FrrrFrrrFr"


def test_defaults_match_the_original() -> None:
    helper = DeepCacheSDHelper()
    assert (helper.params.cache_interval, helper.params.cache_branch_id, helper.params.skip_mode) == (1, 0, "uniform")


# -- validation --------------------------------------------------------------------------------------


def test_branch_out_of_range_names_the_valid_range(pipe) -> None:
    helper = DeepCacheSDHelper(pipe=pipe)
    with pytest.raises(ValueError, match=r"valid ids are 0\.\.11"):
        helper.set_params(cache_interval=3, cache_branch_id=12)
    sdxl = DeepCacheSDHelper(pipe=tiny_sdxl_unet())
    with pytest.raises(ValueError, match=r"valid ids are 0\.\.8"):
        sdxl.set_params(cache_branch_id=9)


def test_out_of_range_branch_set_before_the_pipe_is_known_fails_at_enable(pipe) -> None:
    helper = DeepCacheSDHelper()
    helper.set_params(cache_interval=3, cache_branch_id=40)
    with pytest.raises(ValueError, match=r"0\.\.11"):
        helper.enable(pipe=pipe)
    assert not helper.enabled


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"cache_interval": 0}, "cache_interval"),
        ({"skip_mode": "nonuniform"}, "skip_mode must be one of"),
        ({"cache_branch_id": -1}, "cache_branch_id"),
    ],
)
def test_bad_parameters_raise_value_error(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        DeepCacheSDHelper().set_params(**kwargs)


def test_enable_without_a_pipe_says_how_to_fix() -> None:
    with pytest.raises(ValueError, match=r"DeepCacheSDHelper\(pipe=pipe\)"):
        DeepCacheSDHelper().enable()


def test_unsupported_objects_are_rejected_clearly() -> None:
    class TransformerPipe:
        transformer = torch.nn.Linear(1, 1)

        def __call__(self):
            pass

    class PriorPipe:
        prior = torch.nn.Linear(1, 1)

        def __call__(self):
            pass

    with pytest.raises(TypeError, match="cannot cache a Linear.*supported transformers are SD3Transformer2DModel"):
        DeepCacheSDHelper(pipe=TransformerPipe())
    with pytest.raises(TypeError, match="has no `unet` or `transformer` \\(it has a `prior` instead\\)"):
        DeepCacheSDHelper(pipe=PriorPipe())
    with pytest.raises(TypeError, match="supported U-Nets are UNet2DConditionModel"):
        DeepCacheSDHelper(pipe=torch.nn.Linear(2, 2))


def test_two_helpers_on_one_pipeline_is_an_error(pipe) -> None:
    first = DeepCacheSDHelper(pipe=pipe)
    with first:
        with pytest.raises(RuntimeError, match="already has an enabled DeepCacheSDHelper"):
            DeepCacheSDHelper(pipe=pipe).enable()


# -- every call is a fresh generation (the original's bugs) -----------------------------------------------


def test_img2img_after_txt2img_equals_a_fresh_img2img(pipe) -> None:
    image = torch.rand(1, 3, 32, 32)
    kwargs = dict(image=image, strength=0.7, num_inference_steps=10, output_type="latent", guidance_scale=5.0)

    def img2img_call(p):
        return p(generator=torch.Generator().manual_seed(0), **kwargs, **prompt_kwargs()).images

    fresh_pipe = StableDiffusionImg2ImgPipeline.from_pipe(tiny_sd_pipe())
    fresh_pipe.set_progress_bar_config(disable=True)
    with DeepCacheSDHelper(pipe=fresh_pipe) as helper:
        helper.set_params(cache_interval=3, cache_branch_id=0)
        fresh = img2img_call(fresh_pipe)
        assert format_pattern(helper.last_steps) == "FrrFrrF"  # starts with a full step at strength 0.7

    img2img = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    img2img.set_progress_bar_config(disable=True)
    with DeepCacheSDHelper(pipe=pipe) as a, DeepCacheSDHelper(pipe=img2img) as b:
        a.set_params(cache_interval=3, cache_branch_id=0)
        b.set_params(cache_interval=3, cache_branch_id=0)
        run(pipe, steps=8)
        assert torch.equal(img2img_call(img2img), fresh)


def test_a_unet_shared_with_a_pipeline_without_helper_runs_uncached_there(pipe) -> None:
    other = StableDiffusionPipeline.from_pipe(pipe)
    other.set_progress_bar_config(disable=True)
    expected = run(other, seed=5)
    with DeepCacheSDHelper(pipe=pipe) as helper:
        helper.set_params(cache_interval=3)
        run(pipe)
        assert torch.equal(run(other, seed=5), expected)


def test_batch_size_change_between_calls(pipe) -> None:
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3)
    with helper:
        run(pipe, batch=1)
        two = run(pipe, batch=2)
        one = run(pipe, batch=1)
    with helper:
        assert torch.equal(run(pipe, batch=1), one)
    assert two.shape[0] == 2


def test_batch_change_inside_a_generation_forces_a_full_step() -> None:
    unet = tiny_sd_unet()
    helper = DeepCacheSDHelper(pipe=unet)
    helper.set_params(cache_interval=4)
    x2, kw2 = unet_inputs(unet, batch=2)
    x1, kw1 = unet_inputs(unet, batch=1)
    with helper, torch.no_grad():
        helper.reset_states()
        unet(x2, 10, **kw2)
        unet(x2, 9, **kw2)
        unet(x1, 8, **kw1)  # would be a retrieval step, but the cached feature has another shape
        unet(x1, 7, **kw1)
    assert format_pattern(helper.last_steps) == "FrFr"


def test_an_exception_in_a_call_does_not_leak_into_the_next(pipe) -> None:
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3)

    def boom(p, i, t, kwargs):
        if i == 4:
            raise KeyboardInterrupt("user pressed Ctrl-C")
        return kwargs

    with helper:
        fresh = run(pipe)
        with pytest.raises(KeyboardInterrupt):
            run(pipe, callback_on_step_end=boom)
        assert torch.equal(run(pipe), fresh)


def test_interrupt_then_next_call_is_fresh(pipe) -> None:
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3)

    def stop(p, i, t, kwargs):
        if i == 4:
            p._interrupt = True
        return kwargs

    with helper:
        fresh = run(pipe)
        run(pipe, callback_on_step_end=stop)
        assert len(helper.last_steps) == 5
        assert torch.equal(run(pipe), fresh)


def test_heun_counts_unet_evaluations() -> None:
    pipe = tiny_sd_pipe(scheduler=HeunDiscreteScheduler())
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3)
    with helper:
        out = run(pipe, steps=5)
    assert torch.isfinite(out).all()
    # Heun evaluates the U-Net 2N-1 times for N steps; the interval counts evaluations.
    assert format_pattern(helper.last_steps) == "FrrFrrFrr"


@pytest.mark.parametrize(
    "make_t",
    [
        lambda: 500,
        lambda: 500.0,
        lambda: torch.tensor(500),
        lambda: torch.tensor([500]),
        lambda: torch.tensor([500, 400]),
    ],
    ids=["int", "float", "0d", "1elem", "per-sample"],
)
@pytest.mark.parametrize("keyword", [False, True], ids=["positional", "keyword"])
def test_any_timestep_form_works(make_t, keyword: bool) -> None:
    unet = tiny_sd_unet()
    x, kwargs = unet_inputs(unet, batch=2)
    helper = DeepCacheSDHelper(pipe=unet)
    helper.set_params(cache_interval=2, cache_branch_id=1)
    with torch.no_grad():
        reference = OriginalRule(unet, 2, 1)
        expected = [unet(x, make_t(), **kwargs).sample for _ in range(3)]
        reference.remove()
        with helper:
            helper.reset_states()
            if keyword:
                got = [unet(sample=x, timestep=make_t(), **kwargs).sample for _ in range(3)]
            else:
                got = [unet(x, make_t(), **kwargs).sample for _ in range(3)]
    assert format_pattern(helper.last_steps) == "FrF"
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_bare_unet_reset_starts_a_new_generation() -> None:
    unet = tiny_sd_unet()
    helper = DeepCacheSDHelper(pipe=unet)
    helper.set_params(cache_interval=3)
    with helper:
        helper.reset_states()
        first = unet_loop(unet, steps=5)
        assert format_pattern(helper.last_steps) == "FrrFr"
        helper.reset_states()
        assert torch.equal(unet_loop(unet, steps=5), first)
        # without a reset the counter runs on (documented): 5 more evaluations continue the pattern
        unet_loop(unet, steps=5)
        assert format_pattern(helper.last_steps) == "FrrFrrFrrF"


def test_non_uniform_on_a_bare_unet_needs_the_step_count() -> None:
    unet = tiny_sd_unet()
    helper = DeepCacheSDHelper(pipe=unet)
    helper.set_params(cache_interval=3, skip_mode="non-uniform", center=2)
    with helper:
        helper.reset_states()
        with pytest.raises(ValueError, match="num_inference_steps"):
            unet_loop(unet, steps=5)
        helper.reset_states(num_inference_steps=7)
        unet_loop(unet, steps=7)
        assert format_pattern(helper.last_steps) == "FrFrrrF"  # full steps (0, 2, 6)


def test_non_uniform_in_a_pipeline_reads_the_step_count(pipe) -> None:
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, skip_mode="non-uniform", center=4)
    with helper:
        run(pipe, steps=10)
    assert len(helper.last_steps) == 10 and sum(helper.last_steps) == 4 and helper.last_steps[0]


def test_the_pipeline_unet_can_be_swapped_while_enabled() -> None:
    pipe = tiny_sd_pipe()
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3)
    with helper:
        run(pipe)
        old = pipe.unet
        pipe.unet = tiny_sd_unet(seed=7)
        cached = run(pipe)
        assert format_pattern(helper.last_steps) == "FrrFrrFrrF"
    assert _module_state(old) == _module_state(tiny_sd_unet())
    assert not torch.equal(cached, run(pipe))


# -- memory -----------------------------------------------------------------------------------------


def test_cache_holds_one_feature_map_and_is_freed_after_a_call(pipe) -> None:
    unet = tiny_sd_unet()
    helper = DeepCacheSDHelper(pipe=unet)
    x, kwargs = unet_inputs(unet, batch=2)
    with helper, torch.no_grad():
        for branch, channels, size in [(0, 8, 16), (2, 8, 16), (3, 8, 8), (11, 16, 2)]:
            helper.set_params(cache_interval=3, cache_branch_id=branch)
            helper.reset_states()
            unet(x, 10, **kwargs)
            # the hidden state entering the up layer that consumes skip `branch`, fp32, batch 2
            assert helper.cache_bytes() == 2 * channels * size * size * 4, branch
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3)
    with helper:
        run(pipe)
        assert helper.cache_bytes() == 0


def test_inference_mode_works(pipe) -> None:
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, cache_branch_id=1)
    with helper:
        expected = run(pipe)
        with torch.inference_mode():
            assert torch.equal(run(pipe), expected)


def test_freeu_in_place_scaling_does_not_corrupt_the_cache() -> None:
    # FreeU scales the hidden state entering the two deepest up blocks *in place*; a cache that hands out
    # its own tensor gets scaled again at every retrieval step. Reference: the original rule with copies.
    pipe = tiny_sd_pipe()
    pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    branch = 7  # its cached feature enters up block 1, where FreeU is active
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, cache_branch_id=branch)
    reference = OriginalRule(pipe.unet, 3, branch, copy=True)
    try:
        expected = run(pipe)
    finally:
        reference.remove()
    with helper:
        first = run(pipe)
        second = run(pipe)
    assert torch.equal(first, expected) and torch.equal(second, expected)


@pytest.mark.parametrize("offload_first", [True, False], ids=["offload-then-enable", "enable-then-offload"])
def test_model_cpu_offload_across_repeated_calls(offload_first: bool) -> None:
    # The original distorted every image after the first with enable_model_cpu_offload(): its state
    # survived the offload hooks that diffusers re-applies at the end of each call.
    reference_pipe = tiny_sd_pipe()
    with DeepCacheSDHelper(pipe=reference_pipe) as helper:
        helper.set_params(cache_interval=3, cache_branch_id=1)
        expected = run(reference_pipe)
    pipe = tiny_sd_pipe()
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, cache_branch_id=1)
    if offload_first:
        pipe.enable_model_cpu_offload(device="cpu")
        helper.enable()
    else:
        helper.enable()
        pipe.enable_model_cpu_offload(device="cpu")
    outputs = [run(pipe) for _ in range(3)]
    assert all(torch.equal(out, expected) for out in outputs)
    helper.disable()
    assert torch.equal(run(pipe), run(tiny_sd_pipe()))
