"""DeepCache composed with the rest of diffusers: offloading, VAE slicing, attention processors, FreeU,
callbacks, batching, classifier-free guidance variants and seeded generators.

Each check: caching changes the output, equals the original rule computed independently, a repeated
call gives the same image, and ``disable()`` restores the uncached output bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from accelerate.hooks import (
    AlignDevicesHook,
    add_hook_to_module,
    remove_hook_from_submodules,
)
from diffusers import EulerAncestralDiscreteScheduler
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from DeepCache import DeepCacheSDHelper
from DeepCache.schedules.schedule import format_pattern

from . import tiny_pipelines as tp
from .reference import OriginalRule
from .tiny import prompt_kwargs, run, tiny_sd_pipe

INTERVAL, BRANCH = 3, 1


def _check(pipe, call: Callable[[], torch.Tensor] | None = None, branch: int = BRANCH, copy: bool = False, **kwargs: Any):
    """Baseline, original-rule reference, cached (twice), restored; returns the cached output."""
    call = call or (lambda: run(pipe, steps=6, **kwargs))
    baseline = call()
    reference = OriginalRule(pipe.unet, INTERVAL, branch, copy=copy)
    try:
        expected = call()
    finally:
        reference.remove()
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=INTERVAL, cache_branch_id=branch)
    with helper:
        first, second = call(), call()
        assert format_pattern(helper.last_steps).startswith("Frr")
    assert torch.equal(first, expected) and torch.equal(second, first)
    assert not torch.equal(first, baseline)
    assert torch.equal(call(), baseline)
    return first


# -- offloading ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["offload-then-enable", "enable-then-offload"])
def test_model_cpu_offload(order: str) -> None:
    # On a CPU-only machine enable_model_cpu_offload(device="cpu") installs the real accelerate hooks
    # (they rewrite unet.forward and are re-applied by maybe_free_model_hooks after every call).
    pipe = tiny_sd_pipe()
    baseline = run(pipe)
    reference = OriginalRule(pipe.unet, INTERVAL, BRANCH)
    try:
        expected = run(pipe)
    finally:
        reference.remove()
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=INTERVAL, cache_branch_id=BRANCH)
    if order == "offload-then-enable":
        pipe.enable_model_cpu_offload(device="cpu")
        helper.enable()
    else:
        helper.enable()
        pipe.enable_model_cpu_offload(device="cpu")
    assert hasattr(pipe.unet, "_hf_hook")
    outputs = [run(pipe) for _ in range(3)]  # the original distorted every call after the first
    assert format_pattern(helper.last_steps) == "FrrFrrFrrF"
    helper.disable()
    assert all(torch.equal(out, expected) for out in outputs)
    assert torch.equal(run(pipe), baseline)
    pipe.remove_all_hooks()
    assert torch.equal(run(pipe), baseline)


def _hook_every_module(unet) -> None:
    for module in unet.modules():
        add_hook_to_module(module, AlignDevicesHook(execution_device="cpu", io_same_device=True), append=True)


@pytest.mark.parametrize("order", ["hooks-then-enable", "enable-then-hooks"])
def test_sequential_offload_hooks_on_every_module(order: str) -> None:
    # enable_sequential_cpu_offload() moves weights to the meta device between uses; accelerate cannot
    # do that with an execution device of "cpu" (it fails without DeepCache too), so on CPU we install
    # the same kind of accelerate hook on *every* module, our wrapped ones included, which is what
    # matters to DeepCache: every forward rewritten underneath or on top of its wrappers.
    pipe = tiny_sd_pipe()
    baseline = run(pipe)
    reference = OriginalRule(pipe.unet, INTERVAL, BRANCH)
    try:
        expected = run(pipe)
    finally:
        reference.remove()
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=INTERVAL, cache_branch_id=BRANCH)
    if order == "hooks-then-enable":
        _hook_every_module(pipe.unet)
        helper.enable()
    else:
        helper.enable()
        _hook_every_module(pipe.unet)
    outputs = [run(pipe) for _ in range(2)]
    helper.disable()
    assert all(torch.equal(out, expected) for out in outputs)
    assert torch.equal(run(pipe), baseline)
    remove_hook_from_submodules(pipe.unet)
    assert torch.equal(run(pipe), baseline)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="enable_sequential_cpu_offload needs an accelerator")
def test_real_sequential_cpu_offload_on_an_accelerator() -> None:
    pipe = tiny_sd_pipe()
    pipe.enable_sequential_cpu_offload()
    _check(pipe)


# -- pipeline features ------------------------------------------------------------------------------------


def test_vae_slicing() -> None:
    pipe = tiny_sd_pipe()
    pipe.vae.enable_slicing()
    _check(pipe, num_images_per_prompt=2, output_type="pt")


@pytest.mark.parametrize("processor", [AttnProcessor, AttnProcessor2_0], ids=lambda p: p.__name__)
def test_attention_processors(processor) -> None:
    pipe = tiny_sd_pipe()
    pipe.unet.set_attn_processor(processor())
    _check(pipe)


def test_freeu() -> None:
    # FreeU scales the features entering the two deepest up blocks in place (see also test_helper);
    # branch 7's cached feature enters up block 1, where FreeU is active.
    pipe = tiny_sd_pipe()
    pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    _check(pipe, branch=7, copy=True)
    _check(pipe, branch=1, copy=True)


def test_callback_on_step_end_that_edits_latents() -> None:
    def edit(p, i, t, kwargs):
        if i == 2:
            return {"latents": kwargs["latents"] * 0.9}
        return {}

    _check(tiny_sd_pipe(), callback_on_step_end=edit, callback_on_step_end_tensor_inputs=["latents"])


def test_num_images_per_prompt() -> None:
    out = _check(tiny_sd_pipe(), num_images_per_prompt=3)
    assert out.shape[0] == 3


def test_no_classifier_free_guidance() -> None:
    _check(tiny_sd_pipe(), guidance_scale=1.0)


def test_guidance_rescale() -> None:
    _check(tiny_sd_pipe(), guidance_rescale=0.7)


def test_generator_reproducibility_with_a_stochastic_sampler() -> None:
    pipe = tiny_sd_pipe(scheduler=EulerAncestralDiscreteScheduler(steps_offset=1))
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=INTERVAL, cache_branch_id=BRANCH)
    with helper:
        first, second, other = run(pipe, seed=4), run(pipe, seed=4), run(pipe, seed=5)
    assert torch.equal(first, second)
    assert not torch.equal(first, other)
    _check(pipe, seed=4)


@pytest.mark.parametrize(
    "make, branch",
    [(tp.animatediff_pipe, 7), (tp.text_to_video_pipe, 2)],
    ids=["AnimateDiffPipeline", "TextToVideoSDPipeline"],
)
def test_freeu_on_video_unets(make, branch: int) -> None:
    # the cached feature of `branch` enters up block 1, whose FreeU scaling works in place
    pipe = make()
    pipe.unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    kwargs = dict(num_frames=2, height=tp.IMAGE, width=tp.IMAGE, **prompt_kwargs())

    def call() -> torch.Tensor:
        return pipe(
            num_inference_steps=6, generator=torch.Generator().manual_seed(0), output_type="latent", **kwargs
        ).frames

    _check(pipe, call=call, branch=branch, copy=True)
