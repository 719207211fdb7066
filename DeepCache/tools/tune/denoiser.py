"""What ``deepcache tune`` asks of the pipeline's kind (:mod:`DeepCache.tools.kinds`), U-Net or transformer: how
many denoiser evaluations one generation has and at what image size (:func:`probe`); and the candidate kinds asked
for, checked (:func:`kinds_for`: every kind is built on U-Nets and transformers alike).

Example::

    >>> from DeepCache.tools.kinds import load_kind
    >>> from DeepCache.tools.prompts import PromptItem
    >>> pipe = load_kind().pipe                                 # the embedded demo model (a U-Net), offline
    >>> probe(pipe, PromptItem("a red circle", 0), steps=4, guidance=7.5)
    Probe(evaluations=4, height=32, width=32)
    >>> kinds_for(None)[-2:]
    ('forecast', 'linear')
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from ..kinds import kind_of
from ..prompts import PromptItem

__all__ = ["KINDS", "Probe", "kinds_for", "probe"]

#: Every candidate kind, in the order of the report's rows.
KINDS: tuple[str, ...] = ("uniform", "non-uniform", "calibrated", "adaptive", "forecast", "linear")


@dataclasses.dataclass(frozen=True)
class Probe:
    """One uncached generation: its denoiser evaluations (the helper's steps: a U-Net's evaluations, a transformer's
    timesteps, every CFG call of a step counted once) and the size of its images."""

    evaluations: int
    height: int
    width: int


def probe(pipe: Any, item: PromptItem, *, steps: int, guidance: float) -> Probe:
    """Generate ``item`` once with the helper at ``cache_interval=1`` (bit-identical to uncached): its step count
    (``helper.last_steps``, what every candidate's pattern is measured in) and its image size (what FLOPs count)."""
    from ...helper import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=1, cache_branch_id=0)
    with helper, torch.no_grad():
        images = kind_of(pipe).call([item.prompt], [int(item.seed)],  # type: ignore[arg-type]
                                    steps=steps, guidance=guidance)
    height, width = (int(x) for x in images.shape[1:3])
    return Probe(len(helper.last_steps), height, width)


def kinds_for(asked: Sequence[str] | None) -> tuple[str, ...]:
    """The candidate kinds ``tune`` tries: ``asked``, or (``None``) every kind.

    Raises ``ValueError`` naming the valid kinds when ``asked`` is empty or holds an unknown one.
    """
    if asked is None:
        return KINDS
    unknown = sorted(set(asked) - set(KINDS))
    if unknown or not asked:
        raise ValueError(f"unknown kind(s) {unknown}; choose from {', '.join(KINDS)}.")
    return tuple(asked)
