"""The lifecycle rule (DeepCache/engine/__init__.py): no exception wedges it.

Whatever is raised inside an evaluation -- ``Exception`` or ``BaseException`` -- in the U-Net, a ControlNet or a
transformer (Flux with true CFG), on a full or a retrieval step, in a cached pipeline call, an uncached ``from_pipe`` view or a bare-U-Net loop, in the
main thread or a worker: the next call completes and equals a fresh run, ``disable()`` returns, and nothing is
left wrapped. Every call that could hang runs in a thread joined with a timeout, so a wedge fails, not hangs.
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Callable

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusionControlNetPipeline, StableDiffusionPipeline

from DeepCache import DeepCacheSDHelper
from DeepCache.schedules.schedule import format_pattern

from . import tiny_pipelines as tp
from .tiny import prompt_kwargs, tiny_sd_pipe, tiny_sd_unet, unet_loop, untouched
from .tiny_dit_pipelines import flux
from .tiny_dits import TINY_DITS

STEPS = 4
INTERVAL = 3  # evaluation 0 is a full step, evaluation 1 a retrieval step
JOIN = 60.0


def in_thread(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a worker thread; return its result or re-raise what it raised. Fails if it does not end."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(JOIN)
    assert not thread.is_alive(), "the call did not end (a wedged lock?)"
    if "error" in box:
        raise box["error"]
    return box["result"]


FLUX_KWARGS = {k: v for k, v in flux()[1].items() if k not in ("generator", "num_inference_steps", "output_type")}


def call(pipe) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    if isinstance(pipe, FluxPipeline):  # true CFG: a cond and an uncond transformer call per step
        return pipe(num_inference_steps=STEPS, output_type="latent", generator=generator, **FLUX_KWARGS).images
    extra = {"image": tp.image()} if isinstance(pipe, StableDiffusionControlNetPipeline) else {}
    return pipe(num_inference_steps=STEPS, output_type="latent", generator=generator, **extra, **prompt_kwargs()).images


def make(module: str):
    return {"controlnet": tp.sd_controlnet_pipe, "transformer": lambda: flux()[0]}.get(module, tiny_sd_pipe)()


def bare(module: str) -> tuple[torch.nn.Module, Callable[[], torch.Tensor]]:
    """A bare model and a loop of STEPS evaluations on it."""
    if module == "transformer":
        model, inputs = TINY_DITS["FluxTransformer2DModel"]()

        def loop() -> torch.Tensor:
            with torch.no_grad():
                return torch.stack([model(**inputs(i))[0] for i in range(STEPS)])

        return model, loop
    unet = tiny_sd_unet()
    return unet, lambda: unet_loop(unet, steps=STEPS)


@functools.lru_cache(maxsize=None)
def reference(module: str, kind: str) -> torch.Tensor:
    """A fresh run: cached (pipeline, bare U-Net) or uncached (a from_pipe view), on fresh models."""
    if kind == "bare":
        model, loop = bare(module)
        helper = DeepCacheSDHelper(pipe=model)
        helper.set_params(cache_interval=INTERVAL)
        with helper:
            helper.reset_states()
            return loop()
    pipe = make(module)
    if kind == "view":
        return call(pipe)
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=INTERVAL)
    with helper:
        return call(pipe)


def raising(exc_type: type[BaseException], at: int) -> Callable:
    """A forward pre-hook that raises ``exc_type`` at its module's evaluation number ``at`` (0-based)."""
    seen = [0]

    def hook(module, args):
        seen[0] += 1
        if seen[0] == at + 1:
            raise exc_type("raised inside an evaluation")

    return hook


EXCEPTIONS = [KeyboardInterrupt, SystemExit, GeneratorExit, RuntimeError]
CASES = ([("unet", kind) for kind in ("pipeline", "view", "bare")] + [("controlnet", kind) for kind in ("pipeline", "view")]
         + [("transformer", kind) for kind in ("pipeline", "view", "bare")])


@pytest.mark.timeout(240)
@pytest.mark.filterwarnings("ignore::DeepCache.DeepCacheWarning")  # the from_pipe view is told it runs uncached
@pytest.mark.parametrize("thread", ["main", "worker"])
@pytest.mark.parametrize("step", ["full", "retrieval"])
@pytest.mark.parametrize("module, kind", CASES, ids=[f"{m}-{k}" for m, k in CASES])
@pytest.mark.parametrize("exc_type", EXCEPTIONS, ids=[e.__name__ for e in EXCEPTIONS])
def test_nothing_raised_inside_an_evaluation_wedges_the_lifecycle(exc_type, module, kind, step, thread) -> None:
    if kind == "bare":
        model, run = bare(module)
        target, nets = model, [model]
    else:
        pipe = make(module)
        denoiser = pipe.transformer if module == "transformer" else pipe.unet
        nets = [denoiser] + ([pipe.controlnet] if module == "controlnet" else [])
        target = pipe
        view = {"unet": StableDiffusionPipeline, "controlnet": StableDiffusionControlNetPipeline,
                "transformer": FluxPipeline}[module].from_pipe(pipe)
        run = (lambda: call(pipe)) if kind == "pipeline" else (lambda: call(view))  # noqa: E731
    helper = DeepCacheSDHelper(pipe=target)
    helper.set_params(cache_interval=INTERVAL)
    helper.enable()
    if kind == "bare":
        helper.reset_states()
    # runs on full and retrieval steps alike, in the U-Net, a ControlNet and a transformer (whose pipeline calls it
    # twice per step: evaluation 2 is step 1's first call, a retrieval step)
    where = nets[-1].x_embedder if module == "transformer" else nets[-1].conv_in
    retrieval = 2 if module == "transformer" and kind != "bare" else 1
    handle = where.register_forward_pre_hook(raising(exc_type, 0 if step == "full" else retrieval))
    try:
        with pytest.raises(exc_type):
            run() if thread == "main" else in_thread(run)
    finally:
        handle.remove()

    if kind == "bare":
        helper.reset_states()
    again = run() if thread == "main" else in_thread(run)
    assert torch.equal(again, reference(module, kind))
    if kind != "view":
        assert format_pattern(helper.last_steps) == "FrrF"
    if kind == "view":  # the U-Net still caches for its own pipeline
        assert torch.equal(in_thread(lambda: call(pipe)), reference(module, "pipeline"))
    in_thread(helper.disable)
    assert untouched(*nets)
    if kind != "bare":
        assert torch.equal(in_thread(lambda: call(pipe)), reference(module, "view"))  # uncached again, exactly


def test_enable_again_under_a_foreign_wrapper_does_not_wrap_a_second_time() -> None:
    from DeepCache.engine import boundary_module

    pipe = tiny_sd_pipe()
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=INTERVAL)
    helper.enable()
    boundary = boundary_module(pipe.unet, 0)
    ours = boundary.forward
    calls = []

    def foreign_forward(inner, *args, **kwargs):
        calls.append(1)
        return inner(*args, **kwargs)

    foreign = functools.update_wrapper(functools.partial(foreign_forward, ours), ours)
    boundary.forward = foreign  # someone wraps our wrapper (as accelerate's hooks do)
    helper.disable()
    assert boundary.__dict__["forward"] is foreign  # ours stays inside it, passing through
    helper.enable()
    assert boundary.__dict__["forward"] is foreign  # taken back as it is, not wrapped again
    assert torch.equal(call(pipe), reference("unet", "pipeline"))
    assert len(calls) == STEPS
    helper.disable()
    assert torch.equal(call(pipe), reference("unet", "view"))  # uncached: ours passes straight through


def test_enable_again_under_a_foreign_root_wrapper_does_not_nest_a_second_evaluation() -> None:
    from DeepCache.engine import wrappers

    pipe = tiny_sd_pipe()
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=INTERVAL)
    helper.enable()
    ours = pipe.unet.forward
    calls = []

    def foreign_forward(inner, *args, **kwargs):
        calls.append(1)
        return inner(*args, **kwargs)

    foreign = functools.update_wrapper(functools.partial(foreign_forward, ours), ours)
    pipe.unet.forward = foreign  # someone wraps our root wrapper
    helper.disable()
    assert pipe.unet.__dict__["forward"] is foreign  # ours stays inside it, passing through
    assert torch.equal(call(pipe), reference("unet", "view"))
    opened = []
    enter = wrappers.Patched._enter

    def counting_enter(self, *call):
        opened.append(1)
        return enter(self, *call)

    wrappers.Patched._enter = counting_enter
    try:
        helper.enable()
        assert pipe.unet.__dict__["forward"] is foreign  # taken back as it is, not wrapped again
        calls.clear()
        assert torch.equal(call(pipe), reference("unet", "pipeline"))
    finally:
        wrappers.Patched._enter = enter
    assert len(calls) == STEPS and len(opened) == STEPS  # one root wrapper per evaluation, not two
    helper.disable()
    del pipe.unet.forward
    assert untouched(pipe.unet)


def test_the_install_lock_runs_queued_releases_even_when_its_body_raises() -> None:
    from DeepCache.engine import lifecycle

    ran = []
    with pytest.raises(RuntimeError):
        with lifecycle.locked():
            lifecycle._QUEUE.append(lambda: ran.append(1))  # as a weakref callback does while the lock is held
            raise RuntimeError("inside")
    assert ran == [1] and not lifecycle._QUEUE
