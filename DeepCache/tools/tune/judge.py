"""``deepcache tune``'s judge: each candidate generates the judging prompts once (scored and timed), and only the
contenders are timed again.

The tools' one way to generate, time and score (:func:`DeepCache.tools.runs.generate_batch`: only the pipeline
call timed; :class:`DeepCache.tools.scoring.Scorer`), taken one candidate at a time because ``tune`` decides after
each which candidates can still win (:mod:`.plan`). The uncached images of the judging prompts are made first
(after a short warm-up) and kept as the reference: memory holds them and one batch, whatever the number of
candidates. :meth:`Judge.retime` times the original and the contenders again, the order rotated between repeats
(:func:`DeepCache.tools.runs.repeat_order`); a row's speedup is the original's median over its own median.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..distributed import global_batches
from ..prompts import PromptItem
from ..runs import RunSpec, SettingRun, generate_batch, repeat_order
from ..scoring import ImageScores, Scorer
from ..settings import BASELINE, Setting

__all__ = ["Judge"]


class Judge:
    """Judges settings on ``items`` against the uncached images (made on construction)."""

    def __init__(self, pipe: Any, items: Sequence[PromptItem], spec: RunSpec, scorer: Scorer | None = None) -> None:
        from ...helper import DeepCacheSDHelper

        self.pipe, self.items, self.spec, self.scorer = pipe, list(items), spec, scorer or Scorer()
        self.helper = DeepCacheSDHelper(pipe=pipe)
        self.batches = [list(b) for b in global_batches(len(self.items), spec.batch_size)]
        generate_batch(pipe, self.helper, BASELINE, [self.items[0]], dataclasses.replace(spec, steps=2))  # warm-up
        self.references: list[np.ndarray] = []
        self.baseline = SettingRun(BASELINE, [0.0])
        for batch in self.batches:
            images, seconds, _ = generate_batch(pipe, self.helper, BASELINE, self._chosen(batch), spec)
            self.references.append(images)
            self.baseline.seconds[0] += seconds

    def _chosen(self, batch: Sequence[int]) -> list[PromptItem]:
        return [self.items[i] for i in batch]

    def judge(self, setting: Setting) -> SettingRun:
        """``setting`` on every batch once: its scores, step patterns and one timing."""
        run = SettingRun(setting, [0.0])
        parts: list[ImageScores] = []
        for batch, reference in zip(self.batches, self.references):
            chosen = self._chosen(batch)
            images, seconds, pattern = generate_batch(self.pipe, self.helper, setting, chosen, self.spec)
            run.seconds[0] += seconds
            parts.append(self.scorer.score(images, reference, [i.prompt for i in chosen]))
            run.patterns.append(pattern)
            run.batch_sizes.append(len(batch))
            del images
        run.scores = ImageScores.concatenate(parts)
        return run

    def retime(self, runs: Sequence[SettingRun], repeats: int, on_call: Callable[[Setting], None] | None = None) -> None:
        """Time the original and ``runs`` until each has ``repeats`` timings (images dropped unscored; the order
        rotated between repeats, every batch of a repeat in the same order)."""
        order = [self.baseline, *runs]
        for repeat in range(1, repeats):
            todo = [k for k in repeat_order(len(order), batch=0, repeat=repeat) if len(order[k].seconds) <= repeat]
            if not todo:
                continue
            took = {k: 0.0 for k in todo}
            for batch in self.batches:
                for k in todo:
                    _, seconds, _ = generate_batch(self.pipe, self.helper, order[k].setting, self._chosen(batch),
                                                   self.spec)
                    took[k] += seconds
                    if on_call is not None:
                        on_call(order[k].setting)
            for k in todo:
                order[k].seconds.append(took[k])
