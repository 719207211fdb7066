"""Closed loop: run a pipeline call again under candidate caching parameters, with the same noise, and score each
run's decoded images against the uncached call's, per sample of the batch.

The one-step judgement of a replay (:mod:`DeepCache.schedules.calibration`, :mod:`DeepCache.schedules.forecast_calibration`)
sees each retrieval step with the *recorded* inputs; in a real run a step's error reaches the next steps. What
``calibrate(K, forecast=True)`` finally decides on is therefore judged here: :func:`recorded` runs the call once
uncached (the recording, the reference it scores against and ``rewind()``, which puts the call's random state back), and
:func:`closed_loop_sample_errors` runs it again per candidate under DeepCache (a U-Net or a transformer: the
generation of the model's family), scored by :func:`log_mse` (log10 MSE per sample, lower is better).

What is scored (:func:`scored_call`, one rule for the recording and every run): the **decoded image** (or video)
of each sample, through the pipeline's own decode path: the call runs with ``output_type="pt"`` whatever output
the caller asked for (and without a safety checker, which would black out flagged images: :func:`_unchecked`), so
the score is ``-PSNR / 10`` of each sample against the uncached image (pixels in [0, 1]).
Final latents rank schedules differently from the images a user sees: on the tiny Flux DiT at K = 9 even spacing
beats the DP's steps on 4 of 8 calibration samples by latents, 7 of 8 by image PSNR (docs/schedules.md). A pipeline
that cannot decode in the call (its ``__call__`` takes no ``output_type``, or it has no ``vae``) is scored on its
final latents (the scheduler's last output) instead; :func:`scored_call` says which.

Example (what :func:`DeepCache.schedules.forecast_heldout.calibrate_forecast` does)::

    with recorded(pipe, pipe.unet, call) as (rec, final, rewind):
        scores = closed_loop_sample_errors(pipe, pipe.unet, [params_a, params_b], final, rewind, call)
"""

from __future__ import annotations

import contextlib
import inspect
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


def scored_call(pipeline: Any, call_kwargs: dict) -> tuple[dict, bool]:
    """The call the closed loop runs, and whether it scores decoded images (``output_type="pt"``: the pipeline's
    ``__call__`` takes ``output_type`` and it has a ``vae``) rather than final latents (the call unchanged).

    >>> class Latent:
    ...     def __call__(self, prompt): ...
    >>> class Decoding(Latent):
    ...     vae = object()
    ...     def __call__(self, prompt, output_type="pil"): ...
    >>> scored_call(Decoding(), {"prompt": "a", "output_type": "latent"}), scored_call(Latent(), {"prompt": "a"})
    (({'prompt': 'a', 'output_type': 'pt'}, True), ({'prompt': 'a'}, False))
    """
    try:
        takes = "output_type" in inspect.signature(pipeline.__call__).parameters
    except (TypeError, ValueError):  # no signature to read: leave the call alone
        takes = False
    if takes and getattr(pipeline, "vae", None) is not None:
        return {**call_kwargs, "output_type": "pt"}, True
    return dict(call_kwargs), False


@contextlib.contextmanager
def _unchecked(pipeline: Any) -> Iterator[None]:
    """The pipeline with its safety checker (Stable Diffusion and its variants) set aside for the block: the closed
    loop scores images, it shows them to no one, and a flagged image (blacked out: the reference's or a candidate's)
    would turn its sample's score into noise. Only the instance attribute changes (not the pipeline's config, so
    ``save_pretrained`` inside the block would still name the checker); it is put back on exit, whatever happens."""
    checker = getattr(pipeline, "__dict__", {}).get("safety_checker")
    if checker is None:
        yield
        return
    object.__setattr__(pipeline, "safety_checker", None)  # past DiffusionPipeline.__setattr__, which edits the config
    try:
        yield
    finally:
        object.__setattr__(pipeline, "safety_checker", checker)


def _output(pipeline: Any, call_kwargs: dict) -> torch.Tensor:
    """Run the call once (:func:`scored_call`; without the safety checker: :func:`_unchecked`); return what is
    scored: the decoded images (float, batch first) or the final latents."""
    call, decoded = scored_call(pipeline, call_kwargs)
    with _final_latents(pipeline.scheduler) as final, _unchecked(pipeline):
        out = pipeline(**call)
    if not decoded:
        return final[-1]
    images = out[0] if isinstance(out, (tuple, list)) else out.to_tuple()[0] if hasattr(out, "to_tuple") else out
    if not torch.is_tensor(images):
        raise TypeError(f"{type(pipeline).__name__}(output_type='pt') returned {type(images).__name__}, not a tensor: "
                        "the closed loop cannot score it; call calibrate() on a pipeline that decodes to tensors.")
    return images.detach().float().clone()


def log_mse(output: torch.Tensor, reference: torch.Tensor) -> np.ndarray:
    """``log10`` of each sample's mean squared error (lower is better; -PSNR/10 for images in [0, 1]); the
    closed loop's score of decoded images, or of latents where the pipeline cannot decode (:func:`scored_call`)."""
    mse = (output.float() - reference.float()).pow(2).flatten(1).mean(1).clamp_min(1e-20)
    return mse.log10().double().cpu().numpy()


def closed_loop_errors(pipeline: Any, unet: nn.Module, candidates: Sequence[CacheParams], reference: torch.Tensor,
                       rewind: Callable[[], None], call_kwargs: dict) -> list[float]:
    """Run the pipeline once per candidate (the same noise) and score its output against ``reference``
    (the mean over the samples of :func:`closed_loop_sample_errors`)."""
    return [float(row.mean()) for row in closed_loop_sample_errors(pipeline, unet, candidates, reference, rewind,
                                                                     call_kwargs)]


def closed_loop_sample_errors(pipeline: Any, unet: nn.Module, candidates: Sequence[CacheParams], reference: torch.Tensor,
                              rewind: Callable[[], None], call_kwargs: dict) -> np.ndarray:
    """Run the pipeline once per candidate (the same noise): shape ``(candidates, samples)``, the
    :func:`log_mse` of each candidate's decoded images (final latents where the pipeline cannot decode:
    :func:`scored_call`) against ``reference`` (:func:`recorded`'s, of the same call)."""
    scores = []
    lease = engine.acquire_all(unet, engine.extra_denoisers(pipeline))  # Wan 2.2: transformer_2 is cached too
    try:
        for params in candidates:
            rewind()
            with engine.running_call(lease, params), torch.no_grad():
                scores.append(log_mse(_output(pipeline, call_kwargs), reference))
    finally:
        lease.release()
    return np.asarray(scores).reshape(len(candidates), -1)


def memoized_scores(pipeline: Any, unet: nn.Module, reference: torch.Tensor, rewind: Callable[[], None],
                    call_kwargs: dict, cache: dict | None = None) -> Callable[[CacheParams], np.ndarray]:
    """``score(params)``: :func:`closed_loop_sample_errors` of one schedule, run once per distinct ``params``;
    ``cache`` (parameters -> per-sample scores) keeps the runs, so choices on the same call can share them."""
    cache = {} if cache is None else cache

    def score(params: CacheParams) -> np.ndarray:
        if params not in cache:
            cache[params] = closed_loop_sample_errors(pipeline, unet, [params], reference, rewind, call_kwargs)[0]
        return cache[params]
    return score


@contextlib.contextmanager
def recorded(pipeline: Any, unet: nn.Module, call_kwargs: dict) -> Iterator[tuple[Recording, torch.Tensor, Callable[[], None]]]:
    """Run the call once uncached under :func:`~DeepCache.schedules.calibration.recording`; yield the recording, the
    reference the closed loop scores against (the decoded images, batch first, or the final latents where the pipeline
    cannot decode: :func:`scored_call`) and ``rewind()`` (the same noise again for closed-loop runs inside the
    block)."""
    with warnings.catch_warnings(), _same_noise(call_kwargs) as rewind:
        warnings.simplefilter("ignore", engine.DeepCacheWarning)  # uncached on purpose
        with recording(pipeline, unet) as rec:
            reference = _output(pipeline, call_kwargs)
        require_steps(rec)
        yield rec, reference, rewind
