"""Generate, time and score DeepCache settings the one way ``eval``, ``demo``, ``tune`` and ``bench`` all do.

* **One place for the defaults**: :data:`DEFAULT_STEPS` and :data:`DEFAULT_GUIDANCE`; :class:`RunSpec` holds how
  every setting of a run generates (steps, guidance, repeats, batch size).
* **One timed call**: :func:`timed` puts only the pipeline call inside the timer (CUDA synchronized on both sides);
  enabling the helper, converting and scoring the images happen outside it.
* **One order**: :func:`repeat_order` rotates the settings between repeats (and, after the original, between
  batches), so that no setting always runs first; reports give the median over the repeats.
* **One streaming scorer**: :func:`run_and_score` goes through the prompts one batch at a time; in each batch the
  original pipeline runs first (its images are the reference), then every setting, and each image is scored against
  the original's image of the same prompt (:class:`~DeepCache.tools.scoring.Scorer`) as soon as it is made, then
  dropped. Memory holds two batches of images, whatever the number of settings and prompts; per setting only the
  per-image scores (a few numbers an image), the seconds per repeat and each batch's step pattern are kept.

Example::

    >>> rotation(["original", "I=3, B=0", "I=5, B=0"], 1)
    ['I=3, B=0', 'I=5, B=0', 'original']
    >>> [repeat_order(3, batch=0, repeat=r) for r in range(3)]  # repeat 0: the original first (the reference)
    [[0, 1, 2], [1, 2, 0], [2, 0, 1]]
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import torch

from .distributed import ProcessInfo, gather, global_batches, shard
from .kinds import PipelineKind, kind_of
from .prompts import PromptItem
from .scoring import ImageScores, Scorer
from .settings import BASELINE, Setting, applied, baseline_first

__all__ = ["DEFAULT_GUIDANCE", "DEFAULT_STEPS", "RunSpec", "SettingRun", "generate_batch", "merge_runs",
           "repeat_order", "rotation", "run_and_score", "run_and_score_sharded", "timed"]

#: Denoising steps of ``eval``, ``demo``, ``tune`` and ``generate`` when ``--steps`` is not given.
DEFAULT_STEPS = 25
#: Their classifier-free guidance scale when ``--guidance`` is not given.
DEFAULT_GUIDANCE = 4.0

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """How every setting of a run generates: steps, guidance, timed repeats and images per pipeline call."""

    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    repeats: int = 1
    batch_size: int = 16

    def __post_init__(self) -> None:
        for name in ("steps", "repeats", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}.")


def timed(call: Callable[[], T], device: torch.device | None = None) -> tuple[T, float]:
    """``call()`` and the seconds it took; on CUDA the device is synchronized before and after, so the seconds are
    the call's own work.

    >>> timed(lambda: 6 * 7)[0]
    42
    """
    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = call()
    if cuda:
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def rotation(items: Sequence[T], offset: int) -> list[T]:
    """``items`` rotated left by ``offset`` (modulo their number).

    >>> rotation([0, 1, 2, 3], 6)
    [2, 3, 0, 1]
    """
    if not items:
        return []
    k = offset % len(items)
    return [*items[k:], *items[:k]]


def repeat_order(count: int, *, batch: int, repeat: int) -> list[int]:
    """The order in which ``count`` settings (0 the original) run on one batch in one repeat.

    Repeat 0 runs the original first (its images are what the others are scored against), then the others rotated by
    the batch number; repeat ``r`` rotates all of them by ``r``. So with as many repeats as settings each one runs
    first once, and with a single repeat the order after the original still changes from batch to batch.

    >>> repeat_order(4, batch=1, repeat=0), repeat_order(4, batch=1, repeat=1)
    ([0, 2, 3, 1], [1, 2, 3, 0])
    """
    if repeat == 0:
        return [0, *rotation(list(range(1, count)), batch)]
    return rotation(list(range(count)), repeat)


@dataclasses.dataclass
class SettingRun:
    """What a run keeps of one setting: seconds per repeat (summed over the batches), each batch's step pattern and
    image count, per-image scores in the order of the batches, and the images only if asked to (``demo``)."""

    setting: Setting
    seconds: list[float]
    patterns: list[tuple[bool, ...]] = dataclasses.field(default_factory=list)
    batch_sizes: list[int] = dataclasses.field(default_factory=list)
    scores: ImageScores | None = None
    images: np.ndarray | None = None

    @property
    def median_seconds(self) -> float:
        return statistics.median(self.seconds)

    @property
    def full_steps(self) -> float | None:
        """Full steps per image (each batch's count weighted by its images; an adaptive schedule decides per batch);
        ``None`` for the original, which has no pattern."""
        if not self.patterns:
            return None
        return float(np.average([sum(p) for p in self.patterns], weights=self.batch_sizes))


def generate_batch(pipe: PipelineKind | Any, helper: Any, setting: Setting, items: Sequence[PromptItem],
                   spec: RunSpec) -> tuple[np.ndarray, float, tuple[bool, ...]]:
    """One pipeline call for ``items`` with ``setting`` enabled on ``helper``: the images (float, N×H×W×3 in [0, 1]),
    the seconds of the call alone (:func:`timed`) and the step pattern (``()`` for the original). ``pipe``: the
    pipeline's kind (what :func:`run_and_score` passes), or a bare pipeline (``deepcache tune``)."""
    kind = kind_of(pipe)
    with applied(helper, setting, spec.steps), torch.no_grad():
        images, seconds = timed(lambda: kind.call(
            [i.prompt for i in items], [int(i.seed) for i in items],  # type: ignore[arg-type]
            steps=spec.steps, guidance=spec.guidance, negative_prompts=[i.negative_prompt for i in items]),
            kind.device)
        pattern = () if setting.is_baseline else tuple(helper.last_steps)
    return np.asarray(images, dtype=np.float32), seconds, pattern


def run_and_score(kind: PipelineKind, items: Sequence[PromptItem], settings: Sequence[Setting], scorer: Scorer,
                  spec: RunSpec, *, batches: Sequence[Sequence[int]] | None = None, on_run: Callable[[Setting], None] | None = None,
                  keep_images: bool = False) -> list[SettingRun]:
    """The original and each setting (:func:`~DeepCache.tools.settings.baseline_first`) on ``batches`` of ``items``
    (default: all of them, :attr:`RunSpec.batch_size` at a time), timed and scored as the module docstring says.
    ``kind``: the pipeline's kind (:mod:`DeepCache.tools.kinds`), as the command loaded it.

    One short untimed uncached call warms up first. ``on_run(setting)`` is called after every generation (a
    progress bar). ``keep_images`` keeps every setting's images (the demo's picture: a few prompts only).
    """
    from ..helper import DeepCacheSDHelper

    order = baseline_first(settings)
    batches = [list(b) for b in (batches if batches is not None else global_batches(len(items), spec.batch_size))]
    helper = DeepCacheSDHelper(pipe=kind.pipe)
    runs = [SettingRun(s, [0.0] * spec.repeats) for s in order]
    parts: list[list[ImageScores]] = [[] for _ in order]
    kept: list[list[np.ndarray]] = [[] for _ in order]
    if items and batches:
        generate_batch(kind, helper, BASELINE, [items[batches[0][0]]], dataclasses.replace(spec, steps=2))  # warm-up
    for number, batch in enumerate(batches):
        chosen = [items[i] for i in batch]
        reference: np.ndarray | None = None
        for repeat in range(spec.repeats):
            for k in repeat_order(len(order), batch=number, repeat=repeat):
                images, seconds, pattern = generate_batch(kind, helper, order[k], chosen, spec)
                runs[k].seconds[repeat] += seconds
                if repeat == 0:
                    reference = images if k == 0 else reference
                    parts[k].append(scorer.score(images, reference, [i.prompt for i in chosen]))  # type: ignore[arg-type]
                    if pattern:
                        runs[k].patterns.append(pattern)
                        runs[k].batch_sizes.append(len(batch))
                    if keep_images:
                        kept[k].append(images)
                del images  # before the next call: at most the reference and one batch alive
                if on_run is not None:
                    on_run(order[k])
    for k, run in enumerate(runs):
        run.scores = ImageScores.concatenate(parts[k]) if parts[k] else None
        run.images = np.concatenate(kept[k]) if kept[k] else None
    return runs


def run_and_score_sharded(kind: PipelineKind, items: Sequence[PromptItem], settings: Sequence[Setting], scorer: Scorer,
                          spec: RunSpec, info: ProcessInfo, *, keep_images: bool = False) -> list[SettingRun] | None:
    """:func:`run_and_score` on this process's whole batches (:func:`~DeepCache.tools.distributed.global_batches`
    dealt out by :func:`~DeepCache.tools.distributed.shard`); the main process gets every setting's run in prompt
    order (:func:`merge_runs`), the others ``None``. Only scores travel between processes (and images if
    ``keep_images``)."""
    batches = shard(global_batches(len(items), spec.batch_size), info.rank, info.world_size)
    runs = run_and_score(kind, items, settings, scorer, spec, batches=batches, keep_images=keep_images) if batches \
        else None
    parts = gather(info, (batches, runs))
    return None if parts is None else merge_runs(parts)


def merge_runs(parts: Sequence[tuple[Sequence[Sequence[int]], list[SettingRun] | None]]) -> list[SettingRun]:
    """One run per setting from every process's (batches, runs): scores (and images) in prompt order, patterns in
    batch order, each repeat's seconds the slowest process's."""
    done = [(batches, runs) for batches, runs in parts if runs is not None]
    order = np.argsort(np.concatenate([np.concatenate([np.asarray(b) for b in batches]) for batches, _ in done]),
                       kind="stable")
    merged = []
    for k, first in enumerate(done[0][1]):  # type: ignore[index]
        runs = [r[k] for _, r in done]  # type: ignore[index]
        scores = ImageScores.concatenate([run.scores for run in runs if run.scores is not None]).reordered(order)
        steps = {batch[0]: (p, len(batch)) for (batches, _), run in zip(done, runs)
                 for batch, p in zip(batches, run.patterns)}
        images = None if first.images is None else np.concatenate([run.images for run in runs])[order]  # type: ignore[misc]
        seconds = [max(run.seconds[r] for run in runs) for r in range(len(first.seconds))]
        merged.append(SettingRun(first.setting, seconds, [steps[i][0] for i in sorted(steps)],
                                 [steps[i][1] for i in sorted(steps)], scores, images))
    return merged
