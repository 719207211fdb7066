"""``forecast="linear"`` in the engine (issue 19): exact against an independent reference on every pipeline family
it touches, weight 0 and ``forecast=None`` bit for bit the reuse rule, the memory it holds, adaptive mode, and
``torch.compile`` (two graphs, no recompiles, safe when graph outputs are overwritten)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

from DeepCache import DeepCacheSDHelper
from DeepCache.engine import boundary_module
from DeepCache.schedules.schedule import CacheParams

from . import tiny_pipelines as tp
from .reference import OriginalRule
from .test_compile import STEPS, _ReusedOutputsBackend, mini_unet
from .tiny import prompt_kwargs, run, tiny_sd_pipe, tiny_sd_unet, tiny_sdxl_pipe, unet_inputs

INTERVAL = 3  # FrrFrr: steps 1, 2 reuse (one full step so far), 4, 5 forecast from (0, 3)


class ForecastRule:
    """Test-only reference: the original rule (``OriginalRule``) plus a hook on the boundary module that, on a
    retrieval step ``k`` after full steps ``a' < a``, replaces the reused ``F_a`` by ``F_a + c*(F_a - F_a')`` with
    ``c = w_k*(k-a)/(a-a')``, computed here from the full steps' outputs it saw."""

    def __init__(self, unet, interval: int, branch: int, weight) -> None:
        self.rule = OriginalRule(unet, interval, branch)
        self.interval, self.weight = interval, weight if callable(weight) else (lambda k: weight)
        self.full: list[tuple[int, torch.Tensor]] = []
        self.handle = boundary_module(unet, branch).register_forward_hook(self._hook)

    def _hook(self, module, args, out):
        k = self.rule.step
        first = out[0] if isinstance(out, tuple) else out
        if k % self.interval == 0:
            self.full = (self.full + [(k, first.clone())])[-2:]
            return None
        if len(self.full) < 2:
            return None
        (before, f_before), (last, f_last) = self.full
        c = torch.tensor(float(self.weight(k)) * (k - last) / (last - before))
        forecast = torch.addcmul(f_last, f_last - f_before, c)
        return (forecast, *out[1:]) if isinstance(out, tuple) else forecast

    def remove(self) -> None:
        self.handle.remove()
        self.rule.remove()


def _pipe_output(pipe, kwargs, steps: int = 6) -> torch.Tensor:
    out = pipe(num_inference_steps=steps, generator=torch.Generator().manual_seed(0), **kwargs)
    return out.images if torch.is_tensor(out.images) else torch.from_numpy(out.images)


PIPES = {
    "sd-cfg-batch2": (lambda: tiny_sd_pipe(), lambda: dict(output_type="latent", guidance_scale=5.0, **prompt_kwargs(batch=2))),
    "sdxl": (lambda: tiny_sdxl_pipe(), lambda: dict(output_type="latent", guidance_scale=5.0, **prompt_kwargs(sdxl=True))),
    "controlnet": (tp.sd_controlnet_pipe, lambda: dict(output_type="latent", image=tp.image(), **prompt_kwargs())),
    "ddpm-unet2d": (tp.ddim_pipe, lambda: dict(batch_size=1, output_type="np")),
}


@pytest.mark.parametrize("name", sorted(PIPES))
def test_forecast_equals_the_reference_at_every_branch(name: str) -> None:
    build, kwargs = PIPES[name]
    pipe = build()
    helper = DeepCacheSDHelper(pipe=pipe)
    baseline = _pipe_output(pipe, kwargs())
    for branch in range(helper.num_branches()):
        reference = ForecastRule(pipe.unet, INTERVAL, branch, 0.75)
        try:
            expected = _pipe_output(pipe, kwargs())
        finally:
            reference.remove()
        helper.set_params(cache_interval=INTERVAL, cache_branch_id=branch, forecast="linear", forecast_weight=0.75)
        with helper:
            forecast = _pipe_output(pipe, kwargs())
        helper.set_params(cache_interval=INTERVAL, cache_branch_id=branch)
        with helper:
            reuse = _pipe_output(pipe, kwargs())
        assert not torch.isnan(forecast).any(), branch
        assert torch.equal(forecast, expected), branch
        assert not torch.equal(forecast, reuse), f"branch {branch}: a forecast that changes nothing is a bug"
        assert not torch.equal(forecast, baseline), branch
    assert torch.equal(_pipe_output(pipe, kwargs()), baseline)


@pytest.mark.parametrize("branch", range(12))
def test_forecast_none_and_weight_zero_are_the_original_rule_bit_for_bit(branch: int) -> None:
    pipe = tiny_sd_pipe()
    reference = OriginalRule(pipe.unet, INTERVAL, branch)
    try:
        expected = run(pipe, steps=6, batch=2)
    finally:
        reference.remove()
    helper = DeepCacheSDHelper(pipe=pipe)
    for extra in ({}, {"forecast": "linear", "forecast_weight": 0.0},
                  {"forecast": "linear", "forecast_weights": (0.0,) * 6, "forecast_weight": 0.0}):
        helper.set_params(cache_interval=INTERVAL, cache_branch_id=branch, **extra)
        with helper:
            assert torch.equal(run(pipe, steps=6, batch=2), expected), (branch, extra)


def test_the_formula_by_hand_on_a_bare_unet() -> None:
    """Step k's output equals the full U-Net whose boundary output is replaced by the formula written out."""
    unet = tiny_sd_unet()
    latents, kwargs = unet_inputs(unet, batch=2)
    xs = [latents * (1 - 0.1 * i) + 0.05 * i for i in range(7)]
    ts = [900, 760, 610, 480, 330, 200, 60]
    full_steps, weight = (0, 2, 3), 0.6
    for branch in (0, 5, 11):
        boundary = boundary_module(unet, branch)
        features = {}
        with torch.no_grad():
            for i in range(7):
                h = boundary.register_forward_hook(lambda m, a, o, i=i: features.__setitem__(i, (o[0] if isinstance(o, tuple) else o).clone()))
                unet(xs[i], ts[i], **kwargs)
                h.remove()
            helper = DeepCacheSDHelper(pipe=unet)
            helper.set_params(skip_mode="custom", full_steps=full_steps, cache_branch_id=branch, forecast="linear",
                              forecast_weight=weight)
            with helper:
                helper.reset_states()
                got = [unet(xs[i], ts[i], **kwargs).sample for i in range(7)]
                assert helper.last_steps == (True, False, True, True, False, False, False)
            for k in range(7):
                if k in full_steps:
                    continue
                if k == 1:  # one full step so far: reuse
                    by_hand = features[0]
                else:  # the line through full steps 2 and 3
                    by_hand = features[3] + weight * (k - 3) * (features[3] - features[2]) / (3 - 2)
                h = boundary.register_forward_hook(lambda m, a, o: (by_hand, *o[1:]) if isinstance(o, tuple) else by_hand)
                expected = unet(xs[k], ts[k], **kwargs).sample
                h.remove()
                assert torch.allclose(got[k], expected, rtol=0, atol=1e-5 * expected.abs().max().item()), (branch, k)
                if k > 1:
                    assert not torch.allclose(got[k], unet(xs[k], ts[k], **kwargs).sample, atol=1e-3), (branch, k)


def test_per_step_weights_are_used_step_by_step() -> None:
    pipe = tiny_sd_pipe()
    weights = (0.0, 0.0, 0.0, 0.0, 0.25, 1.5)
    reference = ForecastRule(pipe.unet, INTERVAL, 1, lambda k: weights[k])
    try:
        expected = run(pipe, steps=6)
    finally:
        reference.remove()
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(skip_mode="custom", full_steps=[0, 3], cache_branch_id=1, forecast="linear",
                      forecast_weights=weights)
    with helper:
        assert torch.equal(run(pipe, steps=6), expected)


def test_memory_is_one_more_feature_map_freed_with_the_generation() -> None:
    unet = tiny_sd_unet()
    latents, kwargs = unet_inputs(unet, batch=2)
    helper = DeepCacheSDHelper(pipe=unet)
    sizes = {}
    for forecast in (None, "linear"):
        helper.set_params(cache_interval=3, cache_branch_id=2, forecast=forecast)
        with helper, torch.no_grad():
            helper.reset_states()
            for i, t in enumerate((900, 700, 500, 300)):
                unet(latents, t, **kwargs)
            sizes[forecast] = helper.cache_bytes()
            helper.reset_states()
            assert helper.cache_bytes() == 0
    assert sizes[None] > 0 and sizes["linear"] == 2 * sizes[None]


def test_adaptive_mode_forecasts_and_equals_its_decisions_fixed() -> None:
    pipe = tiny_sd_pipe()
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=4, skip_mode="adaptive", threshold=10.0, forecast="linear", forecast_weight=0.5)
    with helper:
        adaptive = run(pipe, steps=8)
        steps = helper.last_steps
    assert steps == (True, False, False, True, False, False, False, True)  # the cap decides (as for reuse)
    helper.set_params(skip_mode="custom", full_steps=[i for i, f in enumerate(steps) if f], forecast="linear",
                      forecast_weight=0.5)
    with helper:
        fixed = run(pipe, steps=8)
    helper.set_params(cache_interval=4, skip_mode="adaptive", threshold=10.0)
    with helper:
        reuse = run(pipe, steps=8)
        assert helper.last_steps == steps
    assert torch.equal(adaptive, fixed) and not torch.equal(adaptive, reuse)


# -- torch.compile ---------------------------------------------------------------------------------------------


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _forecast_helper(pipe, weight: float = 0.75) -> DeepCacheSDHelper:
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, cache_branch_id=0, forecast="linear", forecast_weight=weight)
    return helper


def test_compiled_forecast_two_graphs_no_recompiles_bit_exact(fresh_dynamo) -> None:
    pipe = tiny_sd_pipe(mini_unet())
    with _forecast_helper(pipe):
        eager = run(pipe, steps=STEPS)
    counter = CompileCounterWithBackend("aot_eager")
    helper = _forecast_helper(pipe)
    with helper:
        pipe.unet = torch.compile(pipe.unet, backend=counter, fullgraph=True)
        first = run(pipe, steps=STEPS)
        assert counter.frame_count == 2  # full step, retrieval step (the same for reuse-so-far and forecast steps)
        with torch._dynamo.config.patch(error_on_recompile=True):
            later = [run(pipe, steps=STEPS) for _ in range(2)]
            helper.set_params(skip_mode="custom", full_steps=[0, 1, 4], forecast="linear", forecast_weights=(0, 0, 1, 2, 0, 0.5))
            other = run(pipe, steps=STEPS)  # other steps and weights: still no recompile
    assert counter.frame_count == 2
    assert all(torch.equal(out, eager) for out in (first, *later))
    helper.pipe = pipe
    pipe.unet = pipe.unet._orig_mod
    with helper:
        assert torch.equal(run(pipe, steps=STEPS), other)


def test_compiled_forecast_survives_overwritten_graph_outputs(fresh_dynamo) -> None:
    pipe = tiny_sd_pipe(mini_unet())
    with _forecast_helper(pipe):
        eager = run(pipe, steps=STEPS)
    backend = _ReusedOutputsBackend()
    with _forecast_helper(pipe):
        pipe.unet = torch.compile(pipe.unet, backend=backend, fullgraph=True)
        outs = [run(pipe, steps=STEPS) for _ in range(2)]
    assert backend.frame_count == 2
    assert all(torch.equal(out, eager) for out in outs)
