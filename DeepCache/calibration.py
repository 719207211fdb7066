"""Calibration plumbing: measure, on the user's own pipeline, what reusing each step's feature would cost.

:meth:`DeepCacheSDHelper.calibrate` runs the pipeline once uncached under :func:`recording`, which keeps every
U-Net evaluation's inputs and output and how strongly the scheduler's step reacts to the model output at that
evaluation. :func:`reuse_errors` then replays the recorded inputs through DeepCache itself: for every
candidate full step ``a`` one full evaluation, then retrieval evaluations at the inputs of steps ``a+1, ...``,
so ``errors[a][k]`` is the *latent* error of step ``k`` reusing the feature of step ``a`` (the relative L1
error of the U-Net output times the scheduler's sensitivity to it). The choice of steps is the exact dynamic
programme :func:`~DeepCache.schedule.optimal_full_steps`.

Example (tiny random pipeline, offline)::

    >>> import torch
    >>> from DeepCache import DeepCacheSDHelper
    >>> from DeepCache.calibration import recording, reuse_errors
    >>> # helper.calibrate(num_full_steps=4, prompt=..., num_inference_steps=10) does all of this
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from . import engine
from .params import CacheParams


@dataclass
class Recording:
    """One uncached pipeline call: per U-Net evaluation, its inputs and output and the scheduler's sensitivity."""

    calls: list[tuple[tuple, dict]] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)
    sensitivity: list[float] = field(default_factory=list)  # |d step output| / |d model output|, per step call


def _clone(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    return value


def _sample(output: Any) -> torch.Tensor:
    return output.sample if hasattr(output, "sample") else output[0]


def _prev_sample(output: Any) -> torch.Tensor:
    return output.prev_sample if hasattr(output, "prev_sample") else output[0]


def _generators(kwargs: dict) -> list[torch.Generator]:
    gen = kwargs.get("generator")
    gens = gen if isinstance(gen, (list, tuple)) else [gen]
    return [g for g in gens if isinstance(g, torch.Generator)]


def _sensitivity(scheduler: Any, model_output: torch.Tensor, args: tuple, kwargs: dict) -> float:
    """How much the step's output moves per unit of model output, measured on copies (steps are linear in it)."""
    gens = _generators(kwargs)
    states = [g.get_state() for g in gens]
    outs = []
    try:
        for scale in (1.0, 2.0):
            for g, state in zip(gens, states):
                g.set_state(state)  # the same noise for both probes: only the model output differs
            probe = copy.deepcopy(scheduler)
            outs.append(_prev_sample(type(scheduler).step(probe, model_output * scale, *args, **kwargs)).float())
    finally:
        for g, state in zip(gens, states):
            g.set_state(state)
    moved = (outs[1] - outs[0]).abs().mean()
    return float(moved / model_output.float().abs().mean().clamp_min(1e-12))


@contextlib.contextmanager
def recording(pipeline: Any, unet: nn.Module) -> Iterator[Recording]:
    """Record the U-Net evaluations and the scheduler's sensitivity of the pipeline calls made inside."""
    rec = Recording()
    scheduler = pipeline.scheduler
    had_step = "step" in scheduler.__dict__

    def step(model_output: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        try:
            rec.sensitivity.append(_sensitivity(scheduler, model_output, args, kwargs))
        except Exception:  # noqa: BLE001 - a scheduler that cannot be copied: weigh every step alike
            rec.sensitivity.append(math.nan)
        return type(scheduler).step(scheduler, model_output, *args, **kwargs)

    handles = [
        unet.register_forward_pre_hook(lambda m, a, kw: rec.calls.append((_clone(a), _clone(kw))), with_kwargs=True),
        unet.register_forward_hook(lambda m, a, kw, out: rec.outputs.append(_sample(out).detach().clone()), with_kwargs=True),
    ]
    scheduler.step = step
    try:
        yield rec
    finally:
        for handle in handles:
            handle.remove()
        if not had_step:
            del scheduler.step


def reuse_errors(unet: nn.Module, rec: Recording, branch: int, max_gap: int | None = None) -> list[list[float]]:
    """``errors[a][k]``: the latent error of evaluation ``k`` reusing the cached feature of full step ``a``.

    Replays the recorded inputs in a generation of this thread (concurrent requests on the same U-Net are
    untouched): one full and up to ``max_gap`` retrieval evaluations per ``a`` (``None``: every later step).
    """
    n = len(rec.calls)
    weights = rec.sensitivity if len(rec.sensitivity) == n and all(map(math.isfinite, rec.sensitivity)) else [1.0] * n
    gap = n - 1 if max_gap is None else max(1, max_gap)
    errors = [[math.inf] * n for _ in range(n)]
    lease = engine.acquire(unet)
    try:
        gen = lease.unet_patch.new_generation(CacheParams(skip_mode="custom", full_steps=(0,), cache_branch_id=branch))
        with engine.running(gen), torch.no_grad():
            for a in range(n):
                gen.reset()
                errors[a][a] = 0.0
                for k in range(a, min(n, a + gap + 1)):
                    args, kwargs = rec.calls[k]
                    out = _sample(unet(*args, **kwargs))
                    if k > a:
                        errors[a][k] = engine.relative_l1(out, rec.outputs[k]) * weights[k]
    finally:
        lease.release()
    return errors


def measure_reuse_errors(pipeline: Any, unet: nn.Module, branch: int, max_gap: int | None = None,
                         **call_kwargs: Any) -> list[list[float]]:
    """Run ``pipeline(**call_kwargs)`` once under :func:`recording`, then :func:`reuse_errors` at ``branch``.

    The U-Net must not be cached by this caller (the helper disables itself first). What
    :meth:`DeepCacheSDHelper.calibrate` measures before its dynamic programme; ``deepcache tune`` measures once
    per branch and solves for every budget.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", engine.DeepCacheWarning)  # uncached on purpose
        with recording(pipeline, unet) as rec:
            pipeline(**call_kwargs)
    if len(rec.calls) < 2:
        raise ValueError("calibration saw fewer than two U-Net evaluations: pass num_inference_steps >= 2.")
    return reuse_errors(unet, rec, branch, max_gap)
