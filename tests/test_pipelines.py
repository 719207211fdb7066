"""Every supported diffusers pipeline family on tiny random components (CPU, offline).

For each pipeline: caching changes the output (a cache that changes nothing is a bug), equals the original
DeepCache rule computed independently (``tests/reference.py``), follows the uniform schedule over the
U-Net evaluations the pipeline really makes, and ``disable()`` gives the uncached output back bit for bit.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    StableDiffusionXLImg2ImgPipeline,
    UNet1DModel,
    UNet2DConditionModel,
)

from DeepCache import DeepCacheSDHelper
from DeepCache.schedules.schedule import CacheParams, format_pattern, schedule_pattern

from . import support_matrix
from . import tiny_pipelines as tp
from .reference import OriginalRule
from .tiny import prompt_kwargs, tiny_sd_pipe, tiny_sd_unet, tiny_sdxl_pipe, unet_inputs

INTERVAL, BRANCH = 3, 1


@dataclass(frozen=True)
class Case:
    """One pipeline family: how to build it, what to pass, how many U-Net evaluations a call makes."""

    id: str
    build: Callable[[], Any]
    kwargs: Callable[[], dict] = field(default=lambda: prompt_kwargs())
    evals: int = 6
    steps: int = 6
    output_type: str = "latent"


def output(pipe, case: Case, seed: int = 0, **extra: Any) -> torch.Tensor:
    """One call's result as a tensor (latents where the pipeline can return them)."""
    result = pipe(
        num_inference_steps=case.steps,
        generator=torch.Generator().manual_seed(seed),
        output_type=case.output_type,
        **case.kwargs(),
        **extra,
    )
    value = result.frames if hasattr(result, "frames") else result.images
    return torch.from_numpy(value) if isinstance(value, np.ndarray) else value


def _ip_adapter_pipe():
    pipe = tiny_sd_pipe()
    tp.load_tiny_ip_adapter(pipe.unet)
    assert any(type(p).__name__.startswith("IPAdapter") for p in pipe.unet.attn_processors.values())
    return pipe


def _lora_pipe():
    pipe = tiny_sd_pipe()
    tp.add_tiny_lora(pipe.unet)
    assert any("lora_A" in name for name, _ in pipe.unet.named_modules())
    return pipe


def _ip_kwargs() -> dict:
    embeds = torch.randn(2, 1, tp.IMAGE_EMBED_DIM, generator=torch.Generator().manual_seed(11))  # negative, positive
    return dict(ip_adapter_image_embeds=[embeds], **prompt_kwargs())


CASES = [
    Case("StableDiffusionPipeline", tiny_sd_pipe),
    Case("StableDiffusionImg2ImgPipeline", tp.sd_img2img_pipe, lambda: dict(image=tp.image(), strength=0.7, **prompt_kwargs()), evals=4),
    Case(
        "StableDiffusionInpaintPipeline-9ch",
        tp.sd_inpaint_pipe,
        lambda: dict(image=tp.image(), mask_image=tp.mask(), **prompt_kwargs()),
    ),
    Case(
        "StableDiffusionInpaintPipeline-4ch",
        lambda: tp.sd_inpaint_pipe(channels=4),
        lambda: dict(image=tp.image(), mask_image=tp.mask(), strength=0.8, **prompt_kwargs()),
        evals=4,
    ),
    Case("StableDiffusionXLPipeline", tiny_sdxl_pipe, lambda: prompt_kwargs(sdxl=True)),
    Case(
        "StableDiffusionXLImg2ImgPipeline",
        tp.sdxl_img2img_pipe,
        lambda: dict(image=tp.image(), strength=0.7, **prompt_kwargs(sdxl=True)),
        evals=4,
    ),
    Case(
        "StableDiffusionXLInpaintPipeline",
        tp.sdxl_inpaint_pipe,
        lambda: dict(image=tp.image(), mask_image=tp.mask(), strength=1.0, **prompt_kwargs(sdxl=True)),
    ),
    Case(
        "StableDiffusionXLInpaintPipeline-9ch",
        lambda: tp.sdxl_inpaint_pipe(channels=9),
        lambda: dict(image=tp.image(), mask_image=tp.mask(), strength=1.0, **prompt_kwargs(sdxl=True)),
    ),
    Case("StableDiffusionControlNetPipeline", tp.sd_controlnet_pipe, lambda: dict(image=tp.image(), **prompt_kwargs())),
    Case(
        "StableDiffusionControlNetPipeline-multi",
        lambda: tp.sd_controlnet_pipe(num_controlnets=2),
        lambda: dict(image=[tp.image(), tp.image(seed=3)], controlnet_conditioning_scale=[1.0, 0.5], **prompt_kwargs()),
    ),
    Case(
        "StableDiffusionXLControlNetPipeline",
        tp.sdxl_controlnet_pipe,
        lambda: dict(image=tp.image(), **prompt_kwargs(sdxl=True)),
    ),
    Case(
        "StableDiffusionAdapterPipeline",
        tp.sd_adapter_pipe,
        lambda: dict(image=tp.image(), height=tp.IMAGE, width=tp.IMAGE, **prompt_kwargs()),
    ),
    Case("IP-Adapter", _ip_adapter_pipe, _ip_kwargs),
    Case("LoRA", _lora_pipe),
    Case(
        "StableVideoDiffusionPipeline",
        tp.svd_pipe,
        lambda: dict(image=tp.image(), height=tp.IMAGE, width=tp.IMAGE, num_frames=2, decode_chunk_size=2),
    ),
    Case("DDPMPipeline", tp.ddpm_pipe, lambda: dict(batch_size=1), output_type="np"),
    Case("DDIMPipeline", tp.ddim_pipe, lambda: dict(batch_size=1), output_type="np"),
    Case("LDMPipeline", tp.ldm_pipe, lambda: dict(batch_size=1), output_type="np"),
    Case(
        "TextToVideoSDPipeline",
        tp.text_to_video_pipe,
        lambda: dict(num_frames=2, height=tp.IMAGE, width=tp.IMAGE, **prompt_kwargs()),
    ),
    Case(
        "VideoToVideoSDPipeline",
        tp.video_to_video_pipe,
        lambda: dict(video=list(tp.image(batch=2)), strength=0.7, **prompt_kwargs()),
        evals=4,
    ),
    Case(
        "AnimateDiffPipeline",
        tp.animatediff_pipe,
        lambda: dict(num_frames=2, height=tp.IMAGE, width=tp.IMAGE, **prompt_kwargs()),
    ),
]


def _no_instance_forward(unet) -> bool:
    return not any("forward" in module.__dict__ for module in unet.modules())


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_pipeline(case: Case) -> None:
    """At every valid branch id: the uniform pattern over the evaluations the pipeline really makes, an output
    that differs from the uncached one and equals the original rule bit for bit (placeholders are NaN in the
    test-suite, so a consumed placeholder fails here), and ``disable()`` gives the uncached output back."""
    pipe = case.build()
    baseline = output(pipe, case)
    helper = DeepCacheSDHelper(pipe=pipe)
    pattern = format_pattern(schedule_pattern(CacheParams(cache_interval=INTERVAL), case.evals))
    assert helper.num_branches() == sum(len(block.resnets) for block in pipe.unet.up_blocks)
    for branch in range(helper.num_branches()):
        reference = OriginalRule(pipe.unet, INTERVAL, branch)
        try:
            expected = output(pipe, case)
        finally:
            reference.remove()
        helper.set_params(cache_interval=INTERVAL, cache_branch_id=branch)
        with helper:
            cached = output(pipe, case)
            steps = helper.last_steps
        assert format_pattern(steps) == pattern, branch
        assert not torch.isnan(cached).any(), f"branch {branch}: a placeholder reached the output"
        assert not torch.equal(cached, baseline), f"branch {branch}: caching that changes nothing is a bug"
        assert torch.equal(cached, expected), f"branch {branch}"
    assert _no_instance_forward(pipe.unet)
    assert torch.equal(output(pipe, case), baseline)


def _max_branch() -> int:
    return DeepCacheSDHelper(pipe=tiny_sd_unet()).num_branches() - 1


@pytest.mark.parametrize("branch", range(12))
def test_on_a_retrieval_step_only_the_residuals_it_consumes_matter(branch: int) -> None:
    # The U-Net adds ControlNet residuals to its skip connections and to the mid block's output. On a retrieval
    # step it consumes the residuals of skips 0..b; the mid residual only at the deepest branch, where the
    # cached feature is the mid block's output and the residual is added to it. What a partial ControlNet
    # relies on: everything else can be anything.
    unet = tiny_sd_unet()
    deepest = branch == _max_branch()
    x, kwargs = unet_inputs(unet, batch=2)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        skips = unet_skip_shapes(unet, x, kwargs)
        residuals = [torch.randn(shape, generator=g) for shape in skips]
        mid = torch.randn(skips[-1][0], 16, 2, 2, generator=g)
        helper = DeepCacheSDHelper(pipe=unet)
        helper.set_params(cache_interval=3, cache_branch_id=branch)
        outputs = {}
        with helper:
            for name, deep, mid_residual in [
                ("real", residuals, mid),
                ("deep-garbage", [r if i <= branch else torch.randn(r.shape, generator=g) * 1e3 for i, r in enumerate(residuals)], mid),
                ("mid-garbage", residuals, -mid),
                ("shallow-changed", [r + 1 if i == branch else r for i, r in enumerate(residuals)], mid),
            ]:
                helper.reset_states()
                unet(x, 900, down_block_additional_residuals=list(residuals), mid_block_additional_residual=mid, **kwargs)
                outputs[name] = unet(
                    x, 800, down_block_additional_residuals=list(deep), mid_block_additional_residual=mid_residual, **kwargs
                ).sample
                assert format_pattern(helper.last_steps) == "Fr"
    assert torch.equal(outputs["real"], outputs["deep-garbage"])
    assert torch.equal(outputs["real"], outputs["mid-garbage"]) is not deepest
    assert not torch.equal(outputs["real"], outputs["shallow-changed"])


def unet_skip_shapes(unet, x, kwargs) -> list[tuple[int, ...]]:
    """Shapes of the U-Net's skip connections (what a ControlNet's residuals must match)."""
    shapes: list[tuple[int, ...]] = []
    handles = [unet.conv_in.register_forward_hook(lambda m, a, out: shapes.append(tuple(out.shape)))]
    for block in unet.down_blocks:
        handles.append(block.register_forward_hook(lambda m, a, out: shapes.extend(tuple(t.shape) for t in out[1])))
    try:
        unet(x, 900, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return shapes


# -- SDXL base + refiner ----------------------------------------------------------------------------------


def _base(base, split: float = 0.6) -> torch.Tensor:
    return base(
        denoising_end=split,
        num_inference_steps=10,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        **prompt_kwargs(sdxl=True),
    ).images


def _refine(refiner, latents: torch.Tensor, split: float = 0.6) -> torch.Tensor:
    return refiner(
        image=latents,
        denoising_start=split,
        num_inference_steps=10,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        **prompt_kwargs(sdxl=True),
    ).images


def _with_rule(pipe, fn, *args):
    reference = OriginalRule(pipe.unet, INTERVAL, BRANCH)
    try:
        return fn(pipe, *args)
    finally:
        reference.remove()


@pytest.mark.parametrize("shared", [False, True], ids=["own-unet", "shared-unet"])
def test_sdxl_base_and_refiner(shared: bool) -> None:
    base = tiny_sdxl_pipe()
    if shared:  # one U-Net for both stages (one patch, two helpers)
        refiner = StableDiffusionXLImg2ImgPipeline.from_pipe(base)
    else:
        refiner = tp.sdxl_img2img_pipe(tp.tiny_refiner_unet(), refiner=True)
    refiner.set_progress_bar_config(disable=True)
    baseline_latents = _base(base)
    baseline = _refine(refiner, baseline_latents)
    # reference: the original rule restarted for each stage (each call is its own generation)
    expected_latents = _with_rule(base, _base)
    expected = _with_rule(refiner, _refine, expected_latents)

    with DeepCacheSDHelper(pipe=base) as a, DeepCacheSDHelper(pipe=refiner) as b:
        a.set_params(cache_interval=INTERVAL, cache_branch_id=BRANCH)
        b.set_params(cache_interval=INTERVAL, cache_branch_id=BRANCH)
        latents = _base(base)
        refined = _refine(refiner, latents)
        assert format_pattern(a.last_steps) == "FrrFrr"  # steps 0..5 of 10
        assert format_pattern(b.last_steps) == "FrrF"  # steps 6..9: a fresh generation
    assert torch.equal(latents, expected_latents) and torch.equal(refined, expected)
    assert not torch.equal(refined, baseline)
    # the refiner alone, given the same input, is cached the same way
    alone_expected = _with_rule(refiner, _refine, baseline_latents)
    with DeepCacheSDHelper(pipe=refiner) as b:
        b.set_params(cache_interval=INTERVAL, cache_branch_id=BRANCH)
        assert torch.equal(_refine(refiner, baseline_latents), alone_expected)
    assert _no_instance_forward(base.unet) and _no_instance_forward(refiner.unet)
    assert torch.equal(_base(base), baseline_latents) and torch.equal(_refine(refiner, baseline_latents), baseline)


# -- LoRA fused and unfused while enabled -------------------------------------------------------------------


def _reference(pipe, case: Case) -> torch.Tensor:
    reference = OriginalRule(pipe.unet, INTERVAL, BRANCH)
    try:
        return output(pipe, case)
    finally:
        reference.remove()


def test_fuse_and_unfuse_lora_while_enabled() -> None:
    case = Case("LoRA", _lora_pipe)
    pipe = case.build()
    unfused_expected = _reference(pipe, case)
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=INTERVAL, cache_branch_id=BRANCH)
    with helper:
        assert torch.equal(output(pipe, case), unfused_expected)
        pipe.fuse_lora(components=["unet"])
        fused_cached = output(pipe, case)
    fused_expected, fused_baseline = _reference(pipe, case), output(pipe, case)
    assert torch.equal(fused_cached, fused_expected)
    assert not torch.equal(fused_cached, fused_baseline)
    with helper:
        pipe.unfuse_lora(components=["unet"])
        unfused_cached = output(pipe, case)
    assert torch.equal(unfused_cached, _reference(pipe, case))
    assert _no_instance_forward(pipe.unet)


def test_lora_added_while_enabled_is_used() -> None:
    case = Case("LoRA-late", tiny_sd_pipe)
    pipe = case.build()
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=INTERVAL, cache_branch_id=BRANCH)
    with helper:
        before = output(pipe, case)
        tp.add_tiny_lora(pipe.unet)
        after = output(pipe, case)
    assert not torch.equal(before, after)
    assert torch.equal(after, _reference(pipe, case))


# -- U-Net classes beyond UNet2DConditionModel: which layers run at every step, for every branch ---------


def _unet2d_inputs(unet):
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 16, 16, generator=g), {}


def _svd_inputs(unet):
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 2, 8, 8, 8, generator=g), {
        "encoder_hidden_states": torch.randn(1, 1, tp.IMAGE_EMBED_DIM, generator=g),
        "added_time_ids": torch.randn(1, 3, generator=g),
    }


def _motion_inputs(unet):
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 4, 2, 16, 16, generator=g), {"encoder_hidden_states": torch.randn(2, 5, 8, generator=g)}


def _video_inputs(unet):
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 4, 2, 16, 16, generator=g), {"encoder_hidden_states": torch.randn(1, 5, 8, generator=g)}


UNETS = {
    "UNet2DModel": (tp.tiny_unet2d, _unet2d_inputs),
    "UNetSpatioTemporalConditionModel": (tp.tiny_svd_unet, _svd_inputs),
    "UNetMotionModel": (lambda: tp.animatediff_pipe().unet, _motion_inputs),
    "UNet3DConditionModel": (tp.tiny_unet3d, _video_inputs),
}


@torch.no_grad()
def _loop(unet, inputs, steps: int = 6) -> torch.Tensor:
    x, kwargs = inputs(unet)
    for t in torch.linspace(900, 100, steps):
        eps = unet(x, t, **kwargs).sample
        if eps.shape == x.shape:
            x = x - 0.1 * eps
        else:  # SVD: the conditioning latents ride along as extra channels (dim 2)
            c = eps.shape[2]
            x = torch.cat([x[:, :, :c] - 0.1 * eps, x[:, :, c:]], dim=2)
    return x


class _Probe:
    """Per U-Net call, the skip ids whose down/up layer modules (resnet, attention, motion module) computed."""

    def __init__(self, unet) -> None:
        self.calls: list[dict[str, set]] = []
        self.handles = [unet.register_forward_pre_hook(lambda m, a: self.calls.append({"down": set(), "up": set(), "mid": set()}))]
        skip = 1
        for block in unet.down_blocks:
            for j in range(len(block.resnets)):
                self._layer(block, j, "down", skip)
                skip += 1
            for sampler in block.downsamplers or []:
                self._leaf(sampler, "down", (skip, "sampler"))
                skip += 1
        self._leaf(unet.mid_block, "mid", 0)
        for block in unet.up_blocks:
            for j in range(len(block.resnets)):
                skip -= 1
                self._layer(block, j, "up", skip)
        self.num_branches = sum(len(block.resnets) for block in unet.up_blocks)

    def _layer(self, block, j: int, kind: str, skip: int) -> None:
        for name in ("resnets", "temp_convs", "attentions", "temp_attentions", "motion_modules"):
            modules = getattr(block, name, None)
            if modules is not None and j < len(modules):
                self._leaf(modules[j], kind, (skip, name))

    def _leaf(self, module, kind: str, tag) -> None:
        # a child with parameters: hooks on the wrapped module itself fire even when its forward is skipped
        leaf = next(m for m in module.modules() if m is not module and list(m.parameters(recurse=False)))
        self.handles.append(leaf.register_forward_pre_hook(lambda m, a: self.calls[-1][kind].add(tag)))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("name", sorted(UNETS))
def test_unet_class_layers_and_original_rule_for_every_branch(name: str) -> None:
    make, inputs = UNETS[name]
    unet = make()
    baseline = _loop(unet, inputs)
    probe = _Probe(unet)
    full_calls: dict[str, set] = {}
    helper = DeepCacheSDHelper(pipe=unet)
    try:
        probe.calls.clear()
        _loop(unet, inputs, steps=1)
        full_calls = probe.calls[0]
        for branch in range(helper.num_branches()):
            reference = OriginalRule(unet, INTERVAL, branch)
            try:
                expected = _loop(unet, inputs)
            finally:
                reference.remove()
            helper.set_params(cache_interval=INTERVAL, cache_branch_id=branch)
            probe.calls.clear()
            with helper:
                helper.reset_states()
                got = _loop(unet, inputs)
                assert format_pattern(helper.last_steps) == "FrrFrr"
            assert torch.equal(got, expected), branch
            assert not torch.equal(got, baseline), branch
            for k, ran in enumerate(probe.calls):
                if k % INTERVAL == 0:
                    assert ran == full_calls, (branch, k)
                else:  # down layers producing skips 1..b, up layers consuming 0..b, no mid block
                    assert ran["mid"] == set()
                    assert ran["down"] == {t for t in full_calls["down"] if 1 <= t[0] <= branch}, (branch, k)
                    assert ran["up"] == {t for t in full_calls["up"] if t[0] <= branch}, (branch, k)
    finally:
        probe.remove()
    assert helper.num_branches() == probe.num_branches
    assert _no_instance_forward(unet) and torch.equal(_loop(unet, inputs), baseline)


# -- what cannot be cached says so -----------------------------------------------------------------------------


def test_skip_sample_unet2d_is_rejected() -> None:
    unet = tp.tiny_unet2d(down_block_types=("SkipDownBlock2D",) * 3, up_block_types=("SkipUpBlock2D",) * 3)
    with pytest.raises(TypeError, match=r"down_blocks\[0\] is a SkipDownBlock2D.*not supported"):
        DeepCacheSDHelper(pipe=unet)


def test_k_diffusion_blocks_are_rejected() -> None:
    unet = UNet2DConditionModel(
        block_out_channels=(8, 8),
        layers_per_block=1,
        down_block_types=("KDownBlock2D", "KCrossAttnDownBlock2D"),
        up_block_types=("KCrossAttnUpBlock2D", "KUpBlock2D"),
        mid_block_type=None,
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=4,
        resnet_time_scale_shift="scale_shift",
        time_embedding_type="fourier",
        timestep_post_act="gelu",
        conv_in_kernel=1,
        conv_out_kernel=1,
    )
    with pytest.raises(TypeError, match=r"KDownBlock2D.*not supported"):
        DeepCacheSDHelper(pipe=unet)


def test_unet_without_mid_block_is_rejected() -> None:
    helper = DeepCacheSDHelper(pipe=tp.tiny_unet2d(mid_block_type=None))
    with pytest.raises(ValueError, match="needs a mid block"):
        helper.enable()


def test_other_unet_classes_name_the_supported_ones() -> None:
    unet = UNet1DModel(block_out_channels=(8, 8, 16))  # dance diffusion: not a supported U-Net
    with pytest.raises(TypeError, match="supported U-Nets are UNet2DConditionModel, UNet2DModel, "):
        DeepCacheSDHelper(pipe=unet)


def test_unsupported_pipeline_is_rejected_at_enable_not_ignored() -> None:
    pipe = tiny_sd_pipe()
    pipe.unet = tp.tiny_unet2d(down_block_types=("SkipDownBlock2D",) * 3, up_block_types=("SkipUpBlock2D",) * 3)
    with pytest.raises(TypeError, match="SkipDownBlock2D"):
        DeepCacheSDHelper(pipe=pipe).enable()


# -- README's support table is generated from tests/support_matrix.py and backed by real tests ----------------


def test_readme_support_matrix_is_up_to_date() -> None:
    text = support_matrix.README.read_text()
    assert support_matrix.readme_section(text) == support_matrix.section(), (
        "README's supported-pipelines table is stale: run `python -m tests.support_matrix`"
    )


def test_support_matrix_names_only_tests_that_exist_and_covers_every_case() -> None:
    ids = support_matrix.node_ids()
    files = sorted({node.split("::")[0] for node in ids})
    root = support_matrix.README.parent
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    collected = {line.strip() for line in result.stdout.splitlines() if "::" in line}
    assert collected, result.stdout + result.stderr
    assert [node for node in ids if not any(support_matrix.matches(node, c) for c in collected)] == []
    pipeline_tests = {node for node in collected if node.startswith("tests/test_pipelines.py::test_pipeline[")}
    scheduler_tests = {node for node in collected if node.startswith("tests/test_schedulers.py::")}
    composition_tests = {node for node in collected if node.startswith("tests/test_composition.py::")}
    unnamed = {c for c in pipeline_tests | scheduler_tests | composition_tests if not any(support_matrix.matches(n, c) for n in ids)}
    assert unnamed == set(), "a matrix test has no README row"


def _controlnet_probe(controlnet) -> tuple[list[dict[str, set]], list]:
    """Per ControlNet call: which down layers (by skip id) and the mid block computed."""
    calls: list[dict[str, set]] = []
    handles = [controlnet.register_forward_pre_hook(lambda m, a: calls.append({"down": set(), "mid": set()}))]

    def probe(leaf, kind, skip):
        handles.append(leaf.register_forward_pre_hook(lambda m, a: calls[-1][kind].add(skip)))

    skip = 1
    for block in controlnet.down_blocks:
        for resnet in block.resnets:
            probe(resnet.norm1, "down", skip)
            skip += 1
        for sampler in block.downsamplers or []:
            probe(sampler.conv, "down", skip)
            skip += 1
    probe(controlnet.mid_block.resnets[0].norm1, "mid", 0)
    return calls, handles


@pytest.mark.parametrize("branch", range(12))
@pytest.mark.parametrize("num_controlnets", [1, 2], ids=["single", "multi"])
def test_controlnet_runs_only_its_shallow_part_on_retrieval_steps(branch: int, num_controlnets: int) -> None:
    pipe = tp.sd_controlnet_pipe(num_controlnets=num_controlnets)
    images = [tp.image(seed=s) for s in range(num_controlnets)]
    kwargs = dict(image=images[0] if num_controlnets == 1 else images, **prompt_kwargs())
    case = Case("cn", lambda: pipe, lambda: kwargs, steps=7)
    nets = list(getattr(pipe.controlnet, "nets", [pipe.controlnet]))
    reference = OriginalRule(pipe.unet, 3, branch)
    try:
        expected = output(pipe, case)
    finally:
        reference.remove()
    probes = [_controlnet_probe(net) for net in nets]
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, cache_branch_id=branch)
    try:
        with helper:
            got = output(pipe, case)
            pattern = helper.last_steps
    finally:
        for _, handles in probes:
            for handle in handles:
                handle.remove()
    assert not torch.isnan(got).any()
    assert torch.equal(got, expected)  # bit-identical to the algorithm with a full ControlNet
    assert format_pattern(pattern) == "FrrFrrF"
    n = len(nets[0].controlnet_down_blocks)
    assert branch < n
    for calls, _ in probes:
        assert len(calls) == len(pattern)
        for full, ran in zip(pattern, calls):
            top = n - 1 if full else branch
            assert ran["down"] == set(range(1, top + 1))
            # the mid residual is consumed on a retrieval step only at the deepest branch
            assert ran["mid"] == ({0} if full or branch == n - 1 else set())
    for net in nets:
        assert _no_instance_forward(net)
    assert not helper.enabled
