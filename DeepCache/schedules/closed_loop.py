"""Closed loop: run a pipeline call again under candidate caching parameters, with the same noise, and score each
run's final latents against the uncached call's, per sample of the batch.

The one-step judgement of a replay (:mod:`DeepCache.schedules.calibration`, :mod:`DeepCache.schedules.forecast_calibration`)
sees each retrieval step with the *recorded* inputs; in a real run a step's error reaches the next steps. What
``calibrate(K, forecast=True)`` finally decides on is therefore judged here: :func:`recorded` runs the call once
uncached (the recording, its final latents and ``rewind()``, which puts the call's random state back), and
:func:`closed_loop_sample_errors` runs it again per candidate under DeepCache (a U-Net or a transformer: the
generation of the model's family), scored by :func:`latent_errors` (log10 MSE per sample, lower is better).

Example (what :func:`DeepCache.schedules.forecast_heldout.calibrate_forecast` does)::

    with recorded(pipe, pipe.unet, call) as (rec, final, rewind):
        scores = closed_loop_sample_errors(pipe, pipe.unet, [params_a, params_b], final, rewind, call)
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from .. import engine
from .calibration import Recording, _generators, _prev_sample, recording, require_steps
from .params import CacheParams


@contextlib.contextmanager
def _same_noise(call_kwargs: dict) -> Iterator[Callable[[], None]]:
    """Yield ``rewind()``, which puts the call's random state (its generators, else torch's global RNG) back to what
    it was on entry; on exit the state is what the first call left (as if the pipeline had run once)."""
    gens = _generators(call_kwargs)
    if gens:
        start = [g.get_state() for g in gens]
        save = lambda: [g.get_state() for g in gens]  # noqa: E731
        load = lambda states: [g.set_state(s) for g, s in zip(gens, states)]  # noqa: E731
    else:
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        save = lambda: (torch.get_rng_state(), torch.cuda.get_rng_state_all() if cuda else None)  # noqa: E731

        def load(state):
            torch.set_rng_state(state[0])
            if state[1] is not None:
                torch.cuda.set_rng_state_all(state[1])

        start = save()
    after: list = []

    def rewind() -> None:
        if not after:
            after.append(save())
        load(start)

    try:
        yield rewind
    finally:
        if after:
            load(after[0])


@contextlib.contextmanager
def _final_latents(scheduler: Any) -> Iterator[list[torch.Tensor]]:
    """Collect the output of every scheduler step; the last one is the call's final latents."""
    out: list[torch.Tensor] = []
    had = "step" in scheduler.__dict__
    inner = scheduler.step

    def step(*args: Any, **kwargs: Any) -> Any:
        result = inner(*args, **kwargs)
        out[:] = [_prev_sample(result).detach().float().clone()]
        return result

    scheduler.step = step
    try:
        yield out
    finally:
        if had:
            scheduler.step = inner
        else:
            del scheduler.step


def latent_errors(latents: torch.Tensor, reference: torch.Tensor) -> np.ndarray:
    """``log10`` of each sample's mean squared error (lower is better; -PSNR/10 + const)."""
    mse = (latents.float() - reference.float()).pow(2).flatten(1).mean(1).clamp_min(1e-20)
    return mse.log10().double().cpu().numpy()


def latent_error(latents: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over the batch of :func:`latent_errors`."""
    return float(latent_errors(latents, reference).mean())


def closed_loop_errors(pipeline: Any, unet: nn.Module, candidates: Sequence[CacheParams], reference: torch.Tensor,
                       rewind: Callable[[], None], call_kwargs: dict) -> list[float]:
    """Run the pipeline once per candidate (the same noise) and score its final latents against ``reference``
    (the mean over the samples of :func:`closed_loop_sample_errors`)."""
    return [float(row.mean()) for row in closed_loop_sample_errors(pipeline, unet, candidates, reference, rewind,
                                                                     call_kwargs)]


def closed_loop_sample_errors(pipeline: Any, unet: nn.Module, candidates: Sequence[CacheParams], reference: torch.Tensor,
                              rewind: Callable[[], None], call_kwargs: dict) -> np.ndarray:
    """Run the pipeline once per candidate (the same noise): shape ``(candidates, samples)``, the
    :func:`latent_errors` of each candidate's final latents against ``reference``."""
    scores = []
    lease = engine.acquire_all(unet, engine.extra_denoisers(pipeline))  # Wan 2.2: transformer_2 is cached too
    try:
        for params in candidates:
            rewind()
            with _final_latents(pipeline.scheduler) as final, engine.running_call(lease, params), torch.no_grad():
                pipeline(**call_kwargs)
            scores.append(latent_errors(final[-1], reference))
    finally:
        lease.release()
    return np.asarray(scores).reshape(len(candidates), -1)


@contextlib.contextmanager
def recorded(pipeline: Any, unet: nn.Module, call_kwargs: dict) -> Iterator[tuple[Recording, torch.Tensor, Callable[[], None]]]:
    """Run the call once uncached under :func:`~DeepCache.schedules.calibration.recording`; yield the recording, its final
    latents and ``rewind()`` (the same noise again for closed-loop runs inside the block)."""
    with warnings.catch_warnings(), _same_noise(call_kwargs) as rewind:
        warnings.simplefilter("ignore", engine.DeepCacheWarning)  # uncached on purpose
        with recording(pipeline, unet) as rec, _final_latents(pipeline.scheduler) as final:
            pipeline(**call_kwargs)
        require_steps(rec)
        yield rec, final[-1], rewind
