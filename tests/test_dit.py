"""DeepCache on diffusion transformers, on every supported class (tiny seeded models, tests/tiny_dits.py).

Each cached run is compared with the independent reference of tests/dit_reference.py (torch hooks and swapped
forwards, no engine code): every symmetric branch at intervals 1-3, every asymmetric split, CFG branches as separate
calls (one dropped mid-run), forecasts and adaptive schedules; interval 1 and an empty middle equal the uncached
model bit for bit; after ``disable()`` nothing is left on any module.
"""

from __future__ import annotations

import functools
import gc
import threading
import weakref

import pytest
import torch

from DeepCache.engine.transformer.discovery import MIN_DIFFUSERS, _diffusers_version
from DeepCache import CacheParams, DeepCacheHelper, DeepCacheSDHelper
from DeepCache.engine.transformer.layout import SUPPORTED_TRANSFORMERS

from .dit_reference import ReferenceBranch, block_lists
from .tiny import tiny_sd_unet, untouched
from .tiny_dits import TINY_DITS, sample_of

STEPS = 5
NAMES = sorted(TINY_DITS)

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning"),
    pytest.mark.skipif(_diffusers_version() < MIN_DIFFUSERS, reason="DeepCache caches transformers with diffusers >= 0.35"),
]


@functools.lru_cache(maxsize=None)
def built(name: str):
    model, inputs = TINY_DITS[name]()
    cond_key = next(k for k, v in inputs(0).items() if k.startswith("encoder_hidden_states") and torch.is_tensor(v))
    negative = inputs(0)[cond_key] * -0.5  # an unconditional branch: another tensor, made once
    return model, inputs, cond_key, negative


def num_blocks(model) -> int:
    return sum(len(blocks) for blocks in block_lists(model))


def run(model, inputs, cond_key, branches, steps=STEPS):
    """``branches``: per step, the conditioning tensors called at that step (in order). Returns the outputs."""
    outs = []
    with torch.no_grad():
        for i in range(steps):
            for cond in branches(i):
                outs.append(sample_of(model(**{**inputs(i), cond_key: cond})))
    return outs


def reference(model, inputs, cond_key, branches, full, front, back, coefficient=None, steps=STEPS):
    """The independent reference: one ReferenceBranch per conditioning tensor; ``full(j)``: is the branch's j-th
    evaluation a full step; ``coefficient(j, a, a_before)``: the forecast coefficient (None: reuse)."""
    refs: dict[int, tuple[ReferenceBranch, list[int]]] = {}
    outs = []
    with torch.no_grad():
        for i in range(steps):
            for cond in branches(i):
                ref, done = refs.setdefault(id(cond), (ReferenceBranch(model, front, back), []))
                j = len(done)
                call = lambda i=i, cond=cond: model(**{**inputs(i), cond_key: cond})  # noqa: E731
                if full(j):
                    out = ref.full(call)
                    ref.history = getattr(ref, "history", [])[-1:] + [(j, ref.residuals)]
                else:
                    if coefficient is not None and len(ref.history) == 2:
                        (a0, r0), (a1, r1) = ref.history
                        c = coefficient(j, a1, a0)
                        ref.residuals = [[None if x is None else x + c * (x - y) for x, y in zip(s1, s0)]
                                         for s1, s0 in zip(r1, r0)]
                    out = ref.retrieve(call)
                    ref.residuals = ref.history[-1][1]
                outs.append(sample_of(out))
                done.append(j)
    return outs


def cached(model, inputs, cond_key, branches, **params):
    helper = DeepCacheHelper(pipe=model)
    helper.set_params(**params)
    with helper:
        helper.reset_states(num_inference_steps=STEPS)
        outs = run(model, inputs, cond_key, branches)
        steps = helper.last_steps
    assert untouched(model)
    return outs, steps


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("name", NAMES)
def test_every_branch_and_interval_matches_the_reference_with_cfg_as_separate_calls(name) -> None:
    model, inputs, key, negative = built(name)
    positive = inputs(0)[key]
    cfg = lambda i: (positive, negative)  # noqa: E731 - cond and uncond calls per step, as Flux true CFG / Wan
    plain = run(model, inputs, key, cfg)
    n = num_blocks(model)
    for branch in range(n // 2 + 1):
        for interval in (1, 2, 3):
            got, steps = cached(model, inputs, key, cfg, cache_interval=interval, cache_branch_id=branch)
            assert steps == tuple(j % interval == 0 for j in range(STEPS))  # per branch, not per call
            if interval == 1:
                assert same(got, plain)
                continue
            want = reference(model, inputs, key, cfg, lambda j: j % interval == 0, branch, branch)
            assert same(got, want), (branch, interval)
            assert same(got, plain) == (2 * branch == n)  # an empty middle: retrieval steps run every block
    assert same(run(model, inputs, key, cfg), plain)  # after disable: the model as it was


@pytest.mark.parametrize("name", NAMES)
def test_every_asymmetric_split_matches_the_reference_and_an_empty_middle_is_a_full_step(name) -> None:
    model, inputs, key, _ = built(name)
    one = lambda i: (inputs(0)[key],)  # noqa: E731
    plain = run(model, inputs, key, one)
    n = num_blocks(model)
    for front in range(n + 1):
        for back in range(n + 1 - front):
            params = dict(cache_interval=2, front_blocks=front, back_blocks=back)
            if name == "HunyuanDiT2DModel" and front != back:
                with pytest.raises(ValueError, match="symmetric split"):
                    DeepCacheHelper(pipe=model).set_params(**params)
                continue
            got, _ = cached(model, inputs, key, one, **params)
            if front + back == n:  # nothing in the middle: a retrieval step is a full step, bit for bit
                assert same(got, plain), (front, back)
            else:
                assert same(got, reference(model, inputs, key, one, lambda j: j % 2 == 0, front, back)), (front, back)


@pytest.mark.parametrize("name", ["FluxTransformer2DModel", "Lumina2Transformer2DModel", "WanTransformer3DModel"])
def test_a_branch_that_stops_mid_run_keeps_the_other_branch_exact(name) -> None:
    model, inputs, key, negative = built(name)
    positive = inputs(0)[key]
    shrinking = lambda i: (positive, negative) if i < 3 else (positive,)  # noqa: E731 - Lumina2's cfg_trunc_ratio
    got, _ = cached(model, inputs, key, shrinking, cache_interval=2, cache_branch_id=1)
    assert same(got, reference(model, inputs, key, shrinking, lambda j: j % 2 == 0, 1, 1))


@pytest.mark.parametrize("name", ["FluxTransformer2DModel", "SD3Transformer2DModel", "HunyuanDiT2DModel"])
def test_a_linear_forecast_of_the_residual_matches_the_reference(name) -> None:
    model, inputs, key, _ = built(name)
    one = lambda i: (inputs(0)[key],)  # noqa: E731
    weights = (0.0, 0.7, 0.0, -0.3, 0.5)
    got, _ = cached(model, inputs, key, one, cache_interval=2, cache_branch_id=1, forecast="linear",
                    forecast_weights=weights)
    coefficient = lambda k, a, before: weights[k] * (k - a) / (a - before)  # noqa: E731
    want = reference(model, inputs, key, one, lambda j: j % 2 == 0, 1, 1, coefficient)
    assert all(torch.allclose(x, y, rtol=1e-5, atol=1e-6) for x, y in zip(got, want))
    reuse = reference(model, inputs, key, one, lambda j: j % 2 == 0, 1, 1)
    assert not same(got[3:], reuse[3:])  # the forecast changed the steps after the second full step


@pytest.mark.parametrize("name", ["FluxTransformer2DModel", "PixArtTransformer2DModel"])
def test_adaptive_equals_its_decisions_fixed_as_custom(name) -> None:
    model, inputs, key, _ = built(name)
    one = lambda i: (inputs(0)[key],)  # noqa: E731
    got, steps = cached(model, inputs, key, one, cache_interval=3, skip_mode="adaptive", threshold=10.0)
    assert steps == (True, False, False, True, False)  # a huge threshold: the interval cap decides
    custom, _ = cached(model, inputs, key, one, skip_mode="custom", full_steps=[i for i, f in enumerate(steps) if f])
    assert same(got, custom)
    got, steps = cached(model, inputs, key, one, cache_interval=3, skip_mode="adaptive", threshold=0.0)
    assert steps == (True,) * STEPS and same(got, run(model, inputs, key, one))


def test_custom_and_windowed_schedules_follow_each_branch() -> None:
    model, inputs, key, negative = built("FluxTransformer2DModel")
    cfg = lambda i: (inputs(0)[key], negative)  # noqa: E731
    for params, full in [
        (dict(skip_mode="custom", full_steps=[0, 3]), lambda j: j in (0, 3)),
        (dict(cache_interval=2, start_step=1, end_step=4), lambda j: j < 1 or j >= 4 or (j - 1) % 2 == 0),
        (dict(cache_interval=3, skip_mode="non-uniform", center=2), None),
    ]:
        got, steps = cached(model, inputs, key, cfg, cache_branch_id=1, **params)
        full = full or (lambda j, steps=steps: steps[j])
        assert steps == tuple(full(j) for j in range(STEPS))
        assert same(got, reference(model, inputs, key, cfg, full, 1, 1))


def test_bad_input_names_the_valid_choices() -> None:
    model, *_ = built("FluxTransformer2DModel")  # 4 blocks: branches 0..2
    helper = DeepCacheSDHelper(pipe=model)
    assert helper.num_branches() == 3
    with pytest.raises(ValueError, match=r"cache_branch_id must be in \[0, 2\]"):
        helper.set_params(cache_branch_id=3)
    with pytest.raises(ValueError, match="at most the 4 blocks"):
        helper.set_params(front_blocks=3, back_blocks=2)
    with pytest.raises(ValueError, match="go together"):
        helper.set_params(front_blocks=1)
    with pytest.raises(ValueError, match="integers >= 0"):
        helper.set_params(front_blocks=-1, back_blocks=0)
    with pytest.raises(ValueError, match="for a U-Net use cache_branch_id"):
        DeepCacheSDHelper(pipe=tiny_sd_unet()).set_params(front_blocks=1, back_blocks=1)
    from diffusers import DiTTransformer2DModel

    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=4, num_layers=2, sample_size=8)
    with pytest.raises(TypeError, match="cannot cache a DiTTransformer2DModel: .*supported transformers are " +
                       ", ".join(SUPPORTED_TRANSFORMERS)):
        DeepCacheHelper(pipe=dit)


def test_compiled_fullgraph_two_graphs_no_recompiles_equal_to_eager() -> None:
    from torch._dynamo.testing import CompileCounterWithBackend

    model, inputs, key, negative = built("FluxTransformer2DModel")
    cfg = lambda i: (inputs(0)[key], negative)  # noqa: E731
    helper = DeepCacheHelper(pipe=model)
    helper.set_params(cache_interval=3, cache_branch_id=1)
    eager, _ = cached(model, inputs, key, cfg, cache_interval=3, cache_branch_id=1)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    with helper:
        for params, equals_eager in ((dict(cache_interval=3), True), (dict(cache_interval=3), True),
                                     (dict(skip_mode="custom", full_steps=[0, 1, 4]), False)):
            helper.set_params(cache_branch_id=1, **params)
            helper.reset_states()
            got = run(compiled, inputs, key, cfg)
            assert same(got, eager) == equals_eager
    assert counter.frame_count == 2  # the full step and the retrieval step, for every schedule and call
    helper.set_params(cache_branch_id=1, cache_interval=2, forecast="linear", forecast_weight=0.5)
    with helper:
        for weight in (0.5, -0.25):
            helper.set_params(cache_branch_id=1, cache_interval=2, forecast="linear", forecast_weight=weight)
            helper.reset_states()
            run(compiled, inputs, key, cfg)
    assert counter.frame_count == 4  # the forecast's two graphs, whatever the weight
    torch._dynamo.reset()
    assert untouched(model)


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit, GeneratorExit, RuntimeError])
@pytest.mark.parametrize("step", [0, 1])  # raised in a full step, in a retrieval step
@pytest.mark.parametrize("thread", ["main", "worker"])
def test_nothing_raised_inside_a_block_wedges_the_transformer(exc_type, step, thread) -> None:
    model, inputs, key, negative = built("FluxTransformer2DModel")
    cfg = lambda i: (inputs(0)[key], negative)  # noqa: E731
    want, _ = cached(model, inputs, key, cfg, cache_interval=2, cache_branch_id=1)
    helper = DeepCacheHelper(pipe=model)
    helper.set_params(cache_interval=2, cache_branch_id=1)
    seen = [0]
    block = model.transformer_blocks[0]  # a front block: it runs on both kinds of step

    def hook(module, args, kwargs):
        seen[0] += 1
        if seen[0] == 2 * step + 1:
            raise exc_type("raised inside an evaluation")

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    box: dict = {}

    def attempt() -> None:
        try:
            helper.enable()
            helper.reset_states()
            run(model, inputs, key, cfg)
        except BaseException as exc:  # noqa: BLE001
            box["error"] = exc

    if thread == "main":
        attempt()
    else:
        worker = threading.Thread(target=attempt, daemon=True)
        worker.start()
        worker.join(60)
        assert not worker.is_alive()
    handle.remove()
    assert isinstance(box.get("error"), exc_type)
    helper.reset_states()
    assert same(run(model, inputs, key, cfg), want)  # the next generation completes and equals a fresh run
    closer = threading.Thread(target=helper.disable, daemon=True)
    closer.start()
    closer.join(60)
    assert not closer.is_alive() and untouched(model)


def test_concurrent_generations_on_one_transformer_are_each_exact() -> None:
    model, inputs, key, negative = built("PixArtTransformer2DModel")
    flavours = {"a": lambda i: (inputs(0)[key],), "b": lambda i: (negative,)}
    want = {k: cached(model, inputs, key, f, cache_interval=2, cache_branch_id=1)[0] for k, f in flavours.items()}
    from DeepCache import engine

    lease = engine.acquire(model)
    patch = lease.unet_patch
    params = CacheParams(cache_interval=2, cache_branch_id=1)
    got: dict = {}

    def worker(k: str) -> None:
        gen = patch.new_generation(params)
        with engine.running(gen):
            got[k] = run(model, inputs, key, flavours[k])

    threads = [threading.Thread(target=worker, args=(k,)) for k in flavours for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    lease.release()
    assert all(same(got[k], want[k]) for k in flavours) and untouched(model)


def test_a_dropped_helper_frees_the_transformer() -> None:
    model, inputs, key, _ = built("SanaTransformer2DModel")
    helper = DeepCacheHelper(pipe=model)
    helper.set_params(cache_interval=2)
    helper.enable()
    assert not untouched(model)
    ref = weakref.ref(helper)
    del helper
    gc.collect()
    assert ref() is None and untouched(model)


def test_cache_bytes_is_one_residual_per_stream_and_branch_freed_at_reset() -> None:
    model, inputs, key, negative = built("FluxTransformer2DModel")
    helper = DeepCacheHelper(pipe=model)
    helper.set_params(cache_interval=2, cache_branch_id=1)
    with helper, torch.no_grad():
        helper.reset_states()
        assert helper.cache_bytes() == 0
        for cond in (inputs(0)[key], negative):
            model(**{**inputs(0), key: cond})
        image, text = inputs(0)["hidden_states"], inputs(0)[key]
        width = model.inner_dim * 4  # float32 residuals of the inner width
        per_branch = sum(2 * x.shape[0] * x.shape[1] * width for x in (image, text))  # 2 segments (dual, single lists)
        assert helper.cache_bytes() == 2 * per_branch
        helper.reset_states()
        assert helper.cache_bytes() == 0


def test_inductor_compiles_two_graphs_close_to_eager() -> None:
    from torch._dynamo.testing import CompileCounterWithBackend

    model, inputs, key, negative = built("PixArtTransformer2DModel")
    one = lambda i: (inputs(0)[key],)  # noqa: E731
    eager, _ = cached(model, inputs, key, one, cache_interval=3, cache_branch_id=1)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    helper = DeepCacheHelper(pipe=model)
    helper.set_params(cache_interval=3, cache_branch_id=1)
    with helper:
        for _ in range(2):
            helper.reset_states()
            got = run(compiled, inputs, key, one)
    torch._dynamo.reset()
    assert counter.frame_count == 2
    scale = max(float(x.abs().max()) for x in eager)
    assert all(float((x - y).abs().max()) <= 1e-5 * scale for x, y in zip(got, eager))


def test_a_loop_that_makes_new_conditioning_every_call_runs_full_and_is_told_once() -> None:
    from DeepCache import DeepCacheWarning

    model, inputs, key, _ = built("WanTransformer3DModel")
    fresh = lambda i: (inputs(0)[key].clone(),)  # noqa: E731 - a new tensor at every call: steps cannot be told apart
    helper = DeepCacheHelper(pipe=model)
    helper.set_params(cache_interval=3)
    with helper, torch.no_grad(), pytest.warns(DeepCacheWarning, match="new conditioning tensor") as caught:
        helper.reset_states()
        got = [sample_of(model(**{**inputs(i), key: fresh(i)[0]})) for i in range(12)]
    assert len([w for w in caught if issubclass(w.category, DeepCacheWarning)]) == 1
    plain = [sample_of(model(**{**inputs(i), key: inputs(0)[key]})) for i in range(12)]
    assert same(got, plain)  # every step ran in full: never a wrong retrieval


def test_dropped_pipelines_and_helpers_free_the_transformer() -> None:
    from .tiny_dit_pipelines import TINY_DIT_PIPELINES

    pipe, kwargs = TINY_DIT_PIPELINES["FluxPipeline"]()
    helper = DeepCacheHelper(pipe=pipe)
    helper.set_params(cache_interval=2)
    helper.enable()
    with torch.no_grad():
        pipe(**kwargs)
    transformer = weakref.ref(pipe.transformer)
    helper_ref = weakref.ref(helper)
    del pipe, helper, kwargs
    gc.collect()
    assert transformer() is None and helper_ref() is None  # nothing of ours keeps them alive
