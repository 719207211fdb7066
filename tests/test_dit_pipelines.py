"""DeepCache on tiny offline DiT pipelines (tests/tiny_dit_pipelines.py): Flux with true CFG (a cond and an uncond call
per step), SD3 / PixArt-Sigma / Sana (batched CFG), Wan 2.1, Wan 2.2 (``transformer_2`` takes over part-way),
CogView4, Qwen-Image, Lumina2 (the uncond call dropped late).

Every cached call equals the independent reference (tests/dit_reference.py) run inside the same pipeline: one
reference cache per transformer and conditioning tensor, steps counted per conditioning across transformers.
"""

from __future__ import annotations

import functools

import pytest
import torch

from DeepCache.engine.transformer.discovery import MIN_DIFFUSERS, _diffusers_version
from DeepCache import DeepCacheHelper

from .dit_reference import ReferenceBranch
from .tiny import untouched
from .tiny_dit_pipelines import TINY_DIT_PIPELINES, output_of

NAMES = sorted(TINY_DIT_PIPELINES)

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning"),
    pytest.mark.skipif(_diffusers_version() < MIN_DIFFUSERS, reason="DeepCache caches transformers with diffusers >= 0.35"),
]


@functools.lru_cache(maxsize=None)
def built(name: str):
    return TINY_DIT_PIPELINES[name]()


def transformers(pipe) -> list[torch.nn.Module]:
    return [m for m in (pipe.transformer, getattr(pipe, "transformer_2", None)) if m is not None]


def call(pipe, kwargs) -> torch.Tensor:
    with torch.no_grad():
        return output_of(pipe(**{**kwargs, "generator": torch.Generator().manual_seed(0)}))


def reference_call(pipe, kwargs, interval: int, branch: int) -> tuple[torch.Tensor, dict]:
    """The pipeline run with the reference cache swapped into its transformers' forward for one call."""
    counts: dict[int, int] = {}
    refs: dict[tuple[int, int], ReferenceBranch] = {}
    for model in transformers(pipe):
        original = model.forward

        def forward(*args, model=model, original=original, **kw):
            cond = next((v for k, v in kw.items() if k.startswith("encoder_hidden_states")), None)
            j = counts.get(id(cond), 0)
            counts[id(cond)] = j + 1
            ref = refs.setdefault((id(model), id(cond)), ReferenceBranch(model, branch, branch))
            run = lambda: original(*args, **kw)  # noqa: E731
            return ref.full(run) if j % interval == 0 or ref.residuals is None else ref.retrieve(run)

        model.forward = forward
    try:
        return call(pipe, kwargs), counts
    finally:
        for model in transformers(pipe):
            del model.forward


def controlnet_pipelines() -> dict:
    """Flux and SD3 ControlNet pipelines on the tiny transformers (a ControlNet residual is added after every block)."""
    import diffusers

    from .tiny_dit_pipelines import flux, sd3

    out = {}
    for name, base, cn_cls, cn_config in (
        ("FluxControlNetPipeline", flux, "FluxControlNetModel",
         dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
              num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])),
        ("StableDiffusion3ControlNetPipeline", sd3, "SD3ControlNetModel",
         dict(sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
              joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=16, out_channels=4,
              pos_embed_max_size=16)),
    ):
        pipe, kwargs = base()
        torch.manual_seed(1)
        controlnet = getattr(diffusers, cn_cls)(**cn_config).eval()
        components = {k: v for k, v in pipe.components.items()}
        cn_pipe = getattr(diffusers, name)(**components, controlnet=controlnet)
        cn_pipe.set_progress_bar_config(disable=True)
        kwargs = {k: v for k, v in kwargs.items() if k != "true_cfg_scale"}
        out[name] = (cn_pipe, {**kwargs, "control_image": torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(5))})
    return out


@pytest.mark.parametrize("name", NAMES + ["FluxControlNetPipeline", "StableDiffusion3ControlNetPipeline"])
def test_cached_pipeline_calls_equal_the_reference_and_disable_restores(name) -> None:
    pipe, kwargs = built(name) if name in TINY_DIT_PIPELINES else controlnet_pipelines()[name]
    plain = call(pipe, kwargs)
    helper = DeepCacheHelper(pipe=pipe)
    for interval, branch in ((1, 0), (2, 0), (2, 1), (3, 1)):
        helper.set_params(cache_interval=interval, cache_branch_id=branch)
        with helper:
            got = call(pipe, kwargs)
            steps = helper.last_steps
        want, counts = reference_call(pipe, kwargs, interval, branch)
        assert torch.equal(got, want), (interval, branch)
        assert torch.equal(got, plain) == (interval == 1)
        calls_of_first_branch = max(counts.values())
        assert len(steps) == calls_of_first_branch  # one entry per step, not per call
    assert all(untouched(m) for m in transformers(pipe))
    assert torch.equal(call(pipe, kwargs), plain)


def test_wan22_counts_steps_across_its_two_transformers() -> None:
    pipe, kwargs = built("WanPipeline2.2")
    helper = DeepCacheHelper(pipe=pipe)
    helper.set_params(skip_mode="custom", full_steps=[0, 3])  # counted per transformer, step 3 would be a retrieval
    seen = {id(m): 0 for m in transformers(pipe)}
    handles = [m.register_forward_pre_hook(lambda mod, a: seen.__setitem__(id(mod), seen[id(mod)] + 1))
               for m in transformers(pipe)]
    try:
        with helper:
            call(pipe, kwargs)
            steps = helper.last_steps
    finally:
        for h in handles:
            h.remove()
    assert all(seen.values())  # both transformers ran
    # steps 0-1 on transformer, 2-3 on transformer_2: step 2 has no cache there (full); step 3 is full by the schedule
    assert steps == (True, False, True, True)


def test_wan22_swapping_the_first_transformer_keeps_the_second_cached() -> None:
    from .tiny_dit_pipelines import _wan_transformer

    pipe, kwargs = built("WanPipeline2.2")
    helper = DeepCacheHelper(pipe=pipe)
    helper.set_params(cache_interval=2)
    old = pipe.transformer
    try:
        with helper:
            want = call(pipe, kwargs)
            pipe.transformer = _wan_transformer(0)  # the same weights, another module
            assert torch.equal(call(pipe, kwargs), want) and helper.last_steps == (True, False, True, False)
            assert untouched(old) and not untouched(pipe.transformer_2)
    finally:
        pipe.transformer = old
    assert all(untouched(m) for m in transformers(pipe))


@pytest.mark.parametrize("name", ["FluxPipeline", "StableDiffusion3Pipeline", "Lumina2Pipeline"])
def test_calibrated_reuse_errors_equal_the_reference_summed_over_cfg_branches(name) -> None:
    import math

    from DeepCache.schedules import calibration

    pipe, kwargs = built(name)
    model = pipe.transformer
    kwargs = {**kwargs, "generator": torch.Generator().manual_seed(0)}
    with calibration.recording(pipe, model) as rec, torch.no_grad():
        pipe(**kwargs)
    errors = calibration.reuse_errors(model, rec, branch=1)
    groups: dict = {}
    for i, (args, kw) in enumerate(rec.calls):  # branches by the identity of the recorded conditioning
        cond = next(v for k, v in kw.items() if k.startswith("encoder_hidden_states"))
        groups.setdefault(id(cond), []).append(i)
    n = max(len(g) for g in groups.values())
    assert len(groups) == (1 if name == "StableDiffusion3Pipeline" else 2) and len(rec.sensitivity) == n
    for a in range(n):
        for k in range(n):
            want = 0.0 if k == a else math.inf
            for calls in groups.values():
                if k > a and k < len(calls):
                    ref = ReferenceBranch(model, 1, 1)
                    with torch.no_grad():
                        ref.full(lambda: model(*rec.calls[calls[a]][0], **rec.calls[calls[a]][1]))
                        out = output_of(ref.retrieve(lambda: model(*rec.calls[calls[k]][0], **rec.calls[calls[k]][1])))
                    target = rec.outputs[calls[k]]
                    e = float((out - target).abs().mean() / target.abs().mean()) * rec.sensitivity[k]
                    want = e if want == math.inf else want + e
            assert errors[a][k] == pytest.approx(want, rel=1e-5, abs=1e-9), (a, k)


def test_calibrate_on_a_transformer_pipeline_sets_a_custom_schedule() -> None:
    pipe, kwargs = built("FluxPipeline")
    helper = DeepCacheHelper(pipe=pipe)
    helper.set_params(cache_branch_id=1)
    params = helper.calibrate(2, **{**kwargs, "generator": torch.Generator().manual_seed(0)})
    assert params.skip_mode == "custom" and len(params.full_steps) == 2 and params.full_steps[0] == 0
    assert helper.params == params and not helper.enabled and all(untouched(m) for m in transformers(pipe))
    with helper:
        call(pipe, kwargs)
        assert helper.last_steps == tuple(j in params.full_steps for j in range(4))
@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, RuntimeError])
@pytest.mark.parametrize("at", [0, 3])  # the first call (full, cond), the fourth (step 1, uncond: a retrieval step)
def test_an_exception_inside_a_pipeline_call_leaves_the_next_call_exact(exc_type, at) -> None:
    pipe, kwargs = built("FluxPipeline")
    helper = DeepCacheHelper(pipe=pipe)
    helper.set_params(cache_interval=2, cache_branch_id=1)
    with helper:
        want = call(pipe, kwargs)
    seen = [0]

    def hook(module, args, kw):
        seen[0] += 1
        if seen[0] == at + 1:
            raise exc_type("raised inside a transformer call")

    handle = pipe.transformer.single_transformer_blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with helper:
            with pytest.raises(exc_type):
                call(pipe, kwargs)
            handle.remove()
            assert torch.equal(call(pipe, kwargs), want)
    finally:
        handle.remove()
    assert untouched(pipe.transformer)


def test_concurrent_requests_on_one_shared_transformer_are_each_exact() -> None:
    import copy
    import threading

    pipe, kwargs = built("FluxPipeline")
    helper = DeepCacheHelper(pipe=pipe)
    helper.set_params(cache_interval=2, cache_branch_id=1)
    seeds = (0, 1, 2, 3)

    def request(view, seed):
        with torch.no_grad():
            return output_of(view(**{**kwargs, "generator": torch.Generator().manual_seed(seed)}))

    with helper:
        want = {seed: request(pipe, seed) for seed in seeds}
        got: dict = {}
        views = {}
        for seed in seeds:  # a view per request with its own scheduler (diffusers' server-async pattern)
            views[seed] = copy.copy(pipe)
            views[seed].scheduler = copy.deepcopy(pipe.scheduler)
        threads = [threading.Thread(target=lambda s=seed: got.__setitem__(s, request(views[s], s))) for seed in seeds]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert all(torch.equal(got[s], want[s]) for s in seeds) and untouched(pipe.transformer)
