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

from DeepCache.engine.transformer import MIN_DIFFUSERS, _diffusers_version
from DeepCache import DeepCacheHelper

from .dit_reference import ReferenceBranch
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


def untouched(model) -> bool:
    return all("forward" not in m.__dict__ and not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


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


@pytest.mark.parametrize("name", NAMES)
def test_cached_pipeline_calls_equal_the_reference_and_disable_restores(name) -> None:
    pipe, kwargs = built(name)
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


def test_calibrate_says_it_does_not_calibrate_transformers_yet() -> None:
    pipe, kwargs = built("FluxPipeline")
    with pytest.raises(TypeError, match="does not calibrate transformers yet"):
        DeepCacheHelper(pipe=pipe).calibrate(2, **kwargs)
    assert all(untouched(m) for m in transformers(pipe))
