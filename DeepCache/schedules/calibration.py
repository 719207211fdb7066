"""Calibration plumbing: measure, on the user's own pipeline, what reusing each step's feature would cost.

:meth:`DeepCacheSDHelper.calibrate` runs the pipeline once uncached under :func:`recording`, which keeps every
U-Net evaluation's inputs and output and how strongly the scheduler's step reacts to the model output at that
evaluation. :func:`reuse_errors` then replays the recorded inputs through DeepCache itself (:func:`replaying`: a
:class:`BranchReplay` per CFG branch of a transformer, each step on the transformer that ran it (Wan 2.2), one for
a U-Net; the forecast replay of :mod:`DeepCache.schedules.forecast_calibration` runs in it too): for every candidate
full step ``a`` one full evaluation, then retrieval evaluations at the inputs of steps ``a+1, ...``, so
``errors[a][k]`` is the *latent* error of step ``k`` reusing the feature of step ``a`` (the relative L1 error of the
model output times the scheduler's sensitivity to it, summed over the branches). The choice of steps is the exact
dynamic programme :func:`~DeepCache.schedules.schedule.optimal_full_steps`.

Example (tiny random pipeline, offline)::

    >>> import torch
    >>> from DeepCache import DeepCacheSDHelper
    >>> from DeepCache.schedules.calibration import recording, reuse_errors
    >>> # helper.calibrate(num_full_steps=4, prompt=..., num_inference_steps=10) does all of this
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .. import engine
from .params import CacheParams


@dataclass
class Recording:
    """One uncached pipeline call: per evaluation, its inputs and output and the scheduler's sensitivity.

    A transformer's pipeline may evaluate it once per CFG branch and step (Flux true CFG, Wan): ``branches`` says
    which branch each evaluation belongs to (0, 1, ... in order of appearance; all 0 for a U-Net), and the recorded
    calls of one branch share one copy of its conditioning tensor (so a replay finds the branch by identity, as the
    engine does). A pipeline with more than one transformer (Wan 2.2: ``transformer_2`` takes over part-way) is
    recorded on all of them: ``denoisers`` says which one ran each evaluation (0: the pipeline's denoiser, ``i``:
    ``extras[i - 1]``), and a branch's step ``k`` is its ``k``-th evaluation on any of them (the engine's count)."""

    calls: list[tuple[tuple, dict]] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)
    sensitivity: list[float] = field(default_factory=list)  # |d step output| / |d model output|, per step call
    branches: list[int] = field(default_factory=list)
    denoisers: list[int] = field(default_factory=list)
    extras: list[nn.Module] = field(default_factory=list)  # the pipeline's other denoisers (Wan 2.2's transformer_2)

    def denoiser(self, i: int) -> int:
        """Which denoiser ran evaluation ``i`` (0: the pipeline's, ``j``: ``extras[j - 1]``)."""
        return self.denoisers[i] if i < len(self.denoisers) else 0

    def branch_calls(self) -> list[list[int]]:
        """The evaluation indices of each branch, in order: branch b's step k is evaluation ``[b][k]``."""
        groups: dict[int, list[int]] = {}
        for i in range(len(self.calls)):
            groups.setdefault(self.branches[i] if i < len(self.branches) else 0, []).append(i)
        return [groups[b] for b in sorted(groups)]

    @property
    def num_steps(self) -> int:
        """Steps of the longest branch (a U-Net: its evaluations)."""
        return max((len(g) for g in self.branch_calls()), default=0)


def _clone(value: Any, keep: list | None = None) -> Any:
    """A copy of ``value``'s tensors; a tensor found (by identity) in ``keep`` (pairs of original, copy) is
    replaced by its kept copy."""
    if torch.is_tensor(value):
        for original, copy_ in keep or ():
            if original is value:
                return copy_
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone(v, keep) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v, keep) for v in value)
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
    """Record the U-Net evaluations and the scheduler's sensitivity of the pipeline calls made inside (a pipeline
    with other transformers, Wan 2.2: their evaluations too, :attr:`Recording.denoisers`)."""
    rec = Recording(extras=engine.extra_denoisers(pipeline))
    scheduler = pipeline.scheduler
    had_step = "step" in scheduler.__dict__

    def step(model_output: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        try:
            rec.sensitivity.append(_sensitivity(scheduler, model_output, args, kwargs))
        except Exception:  # noqa: BLE001 - a scheduler that cannot be copied: weigh every step alike
            rec.sensitivity.append(math.nan)
        return type(scheduler).step(scheduler, model_output, *args, **kwargs)

    conditions: list[tuple[torch.Tensor, torch.Tensor]] = []  # (a branch's conditioning, its one copy)

    def recorder(denoiser: int, model: nn.Module) -> Callable[[nn.Module, tuple, dict], None]:
        read_conditioning = engine.conditioning_reader_of(model)

        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            branch = 0
            if read_conditioning is not None:
                cond = read_conditioning(args, kwargs)
                index = next((i for i, (c, _) in enumerate(conditions) if c is cond), None)
                if index is None and torch.is_tensor(cond):
                    conditions.append((cond, cond.detach().clone()))
                    index = len(conditions) - 1
                branch = index or 0
            rec.branches.append(branch)
            rec.denoisers.append(denoiser)
            rec.calls.append((_clone(args, conditions), _clone(kwargs, conditions)))

        return record

    handles = []
    for denoiser, model in enumerate([unet, *rec.extras]):
        handles += [
            model.register_forward_pre_hook(recorder(denoiser, model), with_kwargs=True),
            model.register_forward_hook(lambda m, a, kw, out: rec.outputs.append(_sample(out).detach().clone()),
                                        with_kwargs=True),
        ]
    scheduler.step = step
    try:
        yield rec
    finally:
        for handle in handles:
            handle.remove()
        if not had_step:
            del scheduler.step


def require_steps(rec: Recording) -> None:
    """Raise unless the recorded call ran at least two denoising steps (nothing to calibrate otherwise)."""
    if rec.num_steps < 2:
        raise ValueError("calibration saw fewer than two denoising steps: pass num_inference_steps >= 2.")


def step_scales(rec: Recording) -> list[float]:
    """The scheduler's sensitivity at each step (what turns a model output's relative error into a latent error);
    all 1.0 when some step's could not be measured."""
    n = rec.num_steps
    ok = len(rec.sensitivity) == n and all(map(math.isfinite, rec.sensitivity))
    return list(rec.sensitivity) if ok else [1.0] * n


@dataclass
class BranchReplay:
    """The recorded evaluations of one CFG branch (``calls[k]``: its step ``k``) replayed through DeepCache, each on
    the denoiser that ran it, in the branch's generation on that denoiser (``gens[d]``: on ``models[d]``; see
    :func:`replaying`). As in the engine, a denoiser's cache never reaches another's steps: a full step's feature
    serves the steps of its :meth:`segment` only (Wan 2.2: the first step of ``transformer_2`` is a full step)."""

    models: list[nn.Module]  # the pipeline's denoiser, then its extras (Wan 2.2: transformer, transformer_2)
    rec: Recording
    calls: list[int]
    gens: list[Any]  # per denoiser: the branch's generation on it (None: the branch never ran on it)

    def output(self, k: int) -> torch.Tensor:
        """The recorded (uncached) output of step ``k``."""
        return self.rec.outputs[self.calls[k]]

    def generation(self, k: int) -> Any:
        """The generation that runs step ``k`` (the branch's, on the denoiser that ran ``k``)."""
        return self.gens[self.rec.denoiser(self.calls[k])]

    def segment(self, a: int) -> range:
        """The steps around ``a`` that the denoiser of step ``a`` runs without another in between: those whose cached
        feature can come from ``a`` (those after it) or that can be the earlier full step of a forecast line."""
        same = lambda k: self.rec.denoiser(self.calls[k]) == self.rec.denoiser(self.calls[a])  # noqa: E731
        start, stop = a, a + 1
        while start > 0 and same(start - 1):
            start -= 1
        while stop < len(self.calls) and same(stop):
            stop += 1
        return range(start, stop)

    def full(self, a: int) -> None:
        """Forget the cache and run step ``a`` as a full step (its feature becomes the cached one)."""
        gen = self.generation(a)
        gen.reset()
        gen.step = a
        self._run(a)

    def retrieve(self, k: int) -> torch.Tensor:
        """Step ``k`` as a retrieval step of the last full step (the generation's clock set to ``k``)."""
        gen = self.generation(k)
        gen.step = k
        out = self._run(k)
        if gen.steps[-1]:
            raise RuntimeError("calibration replay: a retrieval evaluation ran as a full step (the cache was not usable)")
        return out

    def _run(self, k: int) -> torch.Tensor:
        args, kwargs = self.rec.calls[self.calls[k]]
        return _sample(self.models[self.rec.denoiser(self.calls[k])](*args, **kwargs))


@contextlib.contextmanager
def replaying(model: nn.Module, rec: Recording, params: CacheParams) -> Iterator[list[BranchReplay]]:
    """A call's generations of ``params`` on ``model`` and ``rec.extras`` in this thread, opened as for a pipeline
    call (:func:`DeepCache.engine.running_call`; concurrent requests are untouched), and a :class:`BranchReplay` per
    CFG branch of ``rec`` (a U-Net: one): where :func:`reuse_errors` and the forecast replay
    (:func:`DeepCache.schedules.forecast_calibration.forecast_errors`) run their evaluations."""
    lease = engine.acquire_all(model, rec.extras)
    try:
        with engine.running_call(lease, params) as gens, torch.no_grad():
            patches = [lease.unet_patch] + [extra.unet_patch for extra in lease.extras]
            yield [BranchReplay([model, *rec.extras], rec, calls, replay_generations(gens, patches, rec, calls))
                   for calls in rec.branch_calls()]
    finally:
        lease.release()


def reuse_errors(unet: nn.Module, rec: Recording, branch: int, max_gap: int | None = None) -> list[list[float]]:
    """``errors[a][k]``: the latent error of step ``k`` reusing the cached feature of full step ``a``, summed over
    the CFG branches a transformer was evaluated for (a U-Net: its evaluations are the steps); ``math.inf`` where
    another transformer runs a step in between (Wan 2.2: no step of ``transformer_2`` reuses a feature of
    ``transformer``; the engine runs its first step in full, so the dynamic programme must choose it).

    Replays the recorded inputs (:func:`replaying`): one full and up to ``max_gap`` retrieval evaluations per ``a``
    and branch (``None``: every later step).
    """
    n = rec.num_steps
    scale = step_scales(rec)
    gap = n - 1 if max_gap is None else max(1, max_gap)
    errors = [[math.inf] * n for _ in range(n)]
    blocked = set()  # (a, k): another denoiser runs between a and k (Wan 2.2): step k cannot reuse a, in any branch
    with replaying(unet, rec, CacheParams(skip_mode="custom", full_steps=(0,), cache_branch_id=branch)) as replays:
        for replay in replays:
            m = len(replay.calls)
            for a in range(m):
                errors[a][a] = 0.0
                replay.full(a)
                reach = replay.segment(a).stop
                blocked.update((a, k) for k in range(reach, m))
                for k in range(a + 1, min(reach, a + gap + 1)):
                    e = engine.relative_l1(replay.retrieve(k), replay.output(k)) * scale[k]
                    errors[a][k] = e if errors[a][k] == math.inf else errors[a][k] + e
    for a, k in blocked:
        errors[a][k] = math.inf
    return errors


def replay_generations(gens: list[Any], patches: list[Any], rec: Recording, calls: list[int]) -> list[Any]:
    """Per denoiser, the generation a replay of the branch with evaluations ``calls`` drives: ``gens[d]`` itself
    for a U-Net, the branch of its conditioning for a transformer (the recorded calls of a branch share one
    conditioning copy), None where the branch never ran on that denoiser."""
    out = []
    for d, (gen, patch) in enumerate(zip(gens, patches)):
        first = next((i for i in calls if rec.denoiser(i) == d), None)
        if first is not None and hasattr(gen, "branch"):
            gen = gen.branch(patch.conditioning(*rec.calls[first]))
        out.append(None if first is None else gen)
    return out
