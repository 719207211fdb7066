"""DeepCache under ``torch.compile``: two graphs per shape and branch, no recompiles, same images as eager.

The compiled region is the U-Net's ``forward`` body; the full/retrieval decision runs in the U-Net's
forward pre-hook, outside any graph (``torch.compiler.disable``). The wrapped modules read two values
that dynamo guards on cheaply: the patch's mode (full or retrieval) and the actions table of the branch
(one dict per branch, kept on the patch). So a given input shape and branch yields exactly two graphs.

Most tests use ``backend="aot_eager"`` (same dynamo graphs and guards as inductor, bit-exact with eager,
seconds to compile); one test uses real inductor (C++ codegen with gcc; ~30 s with a warm inductor
cache, ~2-3 min cold on 2 busy cores; set ``TORCHINDUCTOR_CACHE_DIR`` to a cached folder in CI).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

from DeepCache import DeepCacheSDHelper

from .tiny import run, tiny_sd_pipe, tiny_sd_unet, unet_inputs

STEPS = 6  # interval 3: pattern FrrFrr, both graphs used twice per call


def plain_unet(seed: int = 0):
    """``mini_unet`` without attention (fewer kernels: inductor compiles it in about half the time)."""
    return tiny_sd_unet(
        seed,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2D",
        sample_size=8,
    )


def mini_unet(seed: int = 0):
    """The smallest U-Net with the SD structure (attention, a downsampler, a mid block): 4 branches.

    Compiling it takes a fraction of the time of ``tiny_sd_unet`` (dynamo's time is per traced module).
    """
    return tiny_sd_unet(
        seed,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        sample_size=8,
    )


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _eager_deepcache(pipe, interval: int = 3, branch: int = 0, **kwargs) -> torch.Tensor:
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    with helper:
        return run(pipe, steps=STEPS, **kwargs)


def _module_state(unet):
    state = {}
    for name, module in unet.named_modules():
        hooks = tuple(len(getattr(module, a)) for a in ("_forward_hooks", "_forward_pre_hooks"))
        state[name] = (tuple(sorted(module.__dict__)), hooks)
    return state


def _convs(gm: torch.fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and "conv2d" in str(n.target))


# -- real inductor -------------------------------------------------------------------------------------


def test_inductor_two_graphs_no_recompiles_same_images() -> None:
    """Tolerance: fp32 inductor vs eager, max |diff| <= 1e-5 x max |eager| (measured 1.4e-6: inductor
    reorders reductions); DeepCache itself moves the latents by 2e-2 x max |eager|."""
    pipe = tiny_sd_pipe(plain_unet())
    baseline = run(pipe, steps=STEPS)
    eager = _eager_deepcache(pipe)
    counter = CompileCounterWithBackend("inductor")
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, cache_branch_id=0)
    helper.enable()
    pipe.unet = torch.compile(pipe.unet, backend=counter, fullgraph=True)
    first = run(pipe, steps=STEPS)
    assert counter.frame_count == 2  # the full step and the retrieval step
    with torch._dynamo.config.patch(error_on_recompile=True):
        later = [run(pipe, steps=STEPS) for _ in range(2)]
    assert counter.frame_count == 2
    assert helper.last_steps == (True, False, False, True, False, False)
    scale = eager.abs().max()
    for out in (first, *later):
        assert (out - eager).abs().max() <= 1e-5 * scale
    assert (eager - baseline).abs().max() > 1e-2 * scale  # the cache changes the result (1000x the tolerance)
    assert torch.equal(later[0], later[1])
    helper.disable()


# -- aot_eager: the same graphs and guards, bit-exact --------------------------------------------------


def test_graphs_are_a_full_and_a_shallow_one_bit_exact() -> None:
    pipe = tiny_sd_pipe(mini_unet())
    eager = _eager_deepcache(pipe)
    counter = CompileCounterWithBackend("aot_eager")
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, cache_branch_id=0)
    with helper:
        pipe.unet = torch.compile(pipe.unet, backend=counter, fullgraph=True)
        outs = [run(pipe, steps=STEPS) for _ in range(3)]
    assert counter.frame_count == 2
    assert all(torch.equal(out, eager) for out in outs)
    full, retrieval = counter.graphs
    assert _convs(retrieval) < _convs(full) / 3  # the retrieval graph holds only the shallow layers
    # The full graph also returns the cached feature; the retrieval graph takes it as an input.
    assert len(full.graph.output_node().args[0]) == 2 and len(retrieval.graph.output_node().args[0]) == 1
    # Placeholders of skipped modules (and the concatenations the blocks do with them) are dead code:
    # dead-code elimination, which inductor runs, removes every one of them.
    def empties(graph: torch.fx.Graph) -> int:
        return sum(1 for n in graph.nodes if n.op == "call_function" and ("empty" in str(n.target) or "full" in str(n.target)))

    graph = copy.deepcopy(retrieval.graph)
    assert empties(graph) > 0
    graph.eliminate_dead_code()
    assert empties(graph) == 0


def test_branch_change_compiles_two_graphs_once_and_resolution_change_at_most_two() -> None:
    pipe = tiny_sd_pipe(mini_unet())
    eager_b1 = _eager_deepcache(pipe, branch=1)
    eager_b0_small = _eager_deepcache(pipe, branch=0, height=48, width=48)
    counter = CompileCounterWithBackend("aot_eager")
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, cache_branch_id=0)
    helper.enable()
    pipe.unet = torch.compile(pipe.unet, backend=counter, fullgraph=True)
    b0 = run(pipe, steps=STEPS)
    assert counter.frame_count == 2
    helper.set_params(cache_interval=3, cache_branch_id=1)
    assert torch.equal(run(pipe, steps=STEPS), eager_b1)
    assert counter.frame_count == 4  # both graphs read the branch's actions table
    helper.set_params(cache_interval=3, cache_branch_id=0)
    with torch._dynamo.config.patch(error_on_recompile=True):  # both branches' graphs are kept
        assert torch.equal(run(pipe, steps=STEPS), b0)
        helper.set_params(cache_interval=5, cache_branch_id=1)  # the interval is outside the graphs
        run(pipe, steps=STEPS)
    assert helper.last_steps == (True, False, False, False, False, True)
    helper.set_params(cache_interval=3, cache_branch_id=0)
    small = run(pipe, steps=STEPS, height=48, width=48)
    assert counter.frame_count <= 6
    assert torch.equal(small, eager_b0_small)
    helper.disable()


def test_compile_before_enable_disable_restores_and_enable_again_reuses_graphs() -> None:
    pipe = tiny_sd_pipe(mini_unet())
    baseline = run(pipe, steps=STEPS)
    eager = _eager_deepcache(pipe)
    counter = CompileCounterWithBackend("aot_eager")
    pipe.unet = torch.compile(pipe.unet, backend=counter, fullgraph=True)
    before = _module_state(pipe.unet._orig_mod)
    helper = DeepCacheSDHelper(pipe=pipe)  # finds the U-Net inside the compiled wrapper
    helper.set_params(cache_interval=3, cache_branch_id=0)
    with helper:
        outs = [run(pipe, steps=STEPS) for _ in range(3)]
    assert counter.frame_count == 2
    assert all(torch.equal(out, eager) for out in outs)
    assert _module_state(pipe.unet._orig_mod) == before
    assert torch.equal(run(pipe, steps=STEPS), baseline)  # the plain U-Net, compiled once more
    assert counter.frame_count == 3
    with torch._dynamo.config.patch(error_on_recompile=True), helper:  # enabling again reuses all three graphs
        assert torch.equal(run(pipe, steps=STEPS), eager)
    assert torch.equal(run(pipe, steps=STEPS), baseline)


def test_bare_unet_compiled_with_reset_states() -> None:
    unet = mini_unet()
    latents, kwargs = unet_inputs(unet, batch=2)
    helper = DeepCacheSDHelper(pipe=unet)
    helper.set_params(cache_interval=3, cache_branch_id=0)

    @torch.no_grad()
    def loop(model) -> torch.Tensor:
        helper.reset_states()
        x = latents
        for t in torch.tensor([999, 800, 600, 400, 200, 0]):  # a Python int timestep would be a guard
            x = x - 0.1 * model(x, t, **kwargs).sample
        return x

    with helper:
        eager = loop(unet)
        counter = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(unet, backend=counter, fullgraph=True)
        outs = [loop(compiled) for _ in range(3)]
    assert counter.frame_count == 2
    assert all(torch.equal(out, eager) for out in outs)


class _ReusedOutputsBackend:
    """aot_eager, plus what CUDA graphs do to outputs: every replay overwrites the previous ones.

    (``mode="reduce-overhead"`` needs CUDA; this reproduces its output-lifetime rule on CPU by filling
    every tensor returned by any earlier call with NaN before each call.)
    """

    def __init__(self) -> None:
        self.handed_out: list[torch.Tensor] = []
        self.frame_count = 0

    def __call__(self, gm, example_inputs):
        self.frame_count += 1
        compiled = torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

        def replay(*args):
            for t in self.handed_out:
                t.fill_(float("nan"))
            self.handed_out.clear()
            outs = compiled(*args)
            self.handed_out.extend(o for o in outs if torch.is_tensor(o) and o.is_floating_point())
            return outs

        return replay


def test_cached_feature_survives_graph_replays() -> None:
    pipe = tiny_sd_pipe(mini_unet())
    eager = _eager_deepcache(pipe)
    backend = _ReusedOutputsBackend()
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, cache_branch_id=0)
    with helper:
        pipe.unet = torch.compile(pipe.unet, backend=backend, fullgraph=True)
        outs = [run(pipe, steps=STEPS) for _ in range(2)]
    assert backend.frame_count == 2
    assert all(torch.equal(out, eager) for out in outs)


# -- concurrent requests on one compiled U-Net ---------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::DeepCache.DeepCacheWarning")  # the uncached request is told so
def test_concurrent_requests_on_a_compiled_unet_equal_sequential_ones() -> None:
    """Each thread's evaluation state is per thread, and dynamo evaluates its guards in the calling thread:
    one compiled U-Net serves cached and uncached requests at once, with the same graphs as one thread."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from diffusers import DDIMScheduler

    shared = tiny_sd_pipe(mini_unet())
    counter = CompileCounterWithBackend("aot_eager")
    shared.unet = torch.compile(shared.unet, backend=counter, fullgraph=True)
    requests = [(3, 0), (2, 0), (None, 0), (4, 0)]

    def serve(request, barrier):
        interval, branch = request
        view = copy.copy(shared)
        view.scheduler = DDIMScheduler.from_config(shared.scheduler.config)
        helper = DeepCacheSDHelper(pipe=view)
        helper.set_params(cache_interval=interval or 1, cache_branch_id=branch)
        if interval is not None:
            helper.enable()
        try:
            step = (lambda p, i, t, kw: (barrier.wait(timeout=60), kw)[1]) if barrier else None
            return run(view, steps=STEPS, callback_on_step_end=step)
        finally:
            helper.disable()

    alone = [serve(r, None) for r in requests]
    assert counter.frame_count == 3  # full, retrieval, and the plain U-Net of the uncached request (run alone)
    for round_ in range(2):
        barrier = threading.Barrier(len(requests))
        with ThreadPoolExecutor(len(requests)) as pool:
            together = list(pool.map(lambda r: serve(r, barrier), requests))
        assert all(torch.equal(a, b) for a, b in zip(alone, together)), round_
        # beside cached requests, the uncached one runs through the installed wrappers with the mode off: one
        # more graph, once; nothing is compiled for concurrency itself
        assert counter.frame_count == 4, round_
    assert not torch.equal(alone[0], alone[2])
