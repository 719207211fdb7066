"""Which prompts a tool runs when none are given, the same for ``deepcache demo``, ``eval`` and ``tune``.

On the embedded demo model: ``count`` distinct captions drawn (seeded) from its 720 attribute
combinations, so ``demo``'s six prompts are the first six of ``eval``'s 64. On any other model: the
first ``count`` of a few generic prompts. Image ``k`` uses seed ``first_seed + k``. ``tune`` calibrates
on other prompts (:func:`calibration_prompts`): the next captions of the same draw, or a second generic list.

Example::

    >>> from DeepCache.prompts import choose_prompts, embedded_prompts
    >>> embedded_prompts(2)
    ['a small green triangle on a black background, bottom right', 'a large red square on a green background, bottom left']
    >>> choose_prompts(embedded=True, count=6) == embedded_prompts(64)[:6]
    True
    >>> choose_prompts(embedded=False, count=2, given=["a cat"])
    ['a cat']
    >>> calibration_prompts(embedded=True, count=2, exclude=embedded_prompts(6)) == embedded_prompts(8)[6:]
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["GENERIC_CALIBRATION_PROMPTS", "GENERIC_PROMPTS", "calibration_prompts", "choose_prompts",
           "embedded_prompts", "prompt_seeds"]

GENERIC_PROMPTS: tuple[str, ...] = (
    "a photograph of an astronaut riding a horse",
    "a watercolor painting of a lighthouse at sunset",
    "a bowl of fruit on a wooden table, studio lighting",
    "a red sports car in the snow",
)
#: What ``deepcache tune`` calibrates on for a model other than the embedded one (none of them is evaluated).
GENERIC_CALIBRATION_PROMPTS: tuple[str, ...] = (
    "a portrait of an old fisherman, oil painting",
    "a city street at night in the rain, neon signs",
    "a mountain lake surrounded by pine trees at dawn",
    "a cute robot reading a book in a library",
)


def embedded_prompts(count: int, seed: int = 0) -> list[str]:
    """``count`` distinct captions drawn (seeded) from all 720 attribute combinations of the demo model.

    The draw is a seeded permutation, so a shorter list is a prefix of a longer one with the same seed.
    """
    from .demo_model.data import all_attributes, caption

    combos = all_attributes()
    if not 1 <= count <= len(combos):
        raise ValueError(f"count must be in 1..{len(combos)}, got {count}.")
    order = np.random.default_rng(seed).permutation(len(combos))[:count]
    return [caption(combos[i]) for i in order]


def choose_prompts(*, embedded: bool, count: int, seed: int = 0, given: Sequence[str] | None = None) -> list[str]:
    """``given`` when there are any; else :func:`embedded_prompts` (demo model) or the generic prompts."""
    if given:
        return list(given)
    if embedded:
        return embedded_prompts(count, seed=seed)
    return list(GENERIC_PROMPTS[:count])


def prompt_seeds(prompts: Sequence[str], first_seed: int = 0) -> list[int]:
    """One seed per prompt: ``first_seed + k`` for prompt ``k``."""
    return [first_seed + k for k in range(len(prompts))]


def calibration_prompts(*, embedded: bool, count: int, seed: int = 0, exclude: Sequence[str] = (),
                        given: Sequence[str] | None = None) -> list[str]:
    """Prompts to calibrate on, none of them in ``exclude`` (the evaluation prompts).

    ``given`` when there are any (``ValueError`` if one is also evaluated); else the first ``count`` captions of
    the seeded draw that are not excluded (demo model), or of :data:`GENERIC_CALIBRATION_PROMPTS`.
    """
    excluded = set(exclude)
    if given:
        shared = sorted(excluded.intersection(given))
        if shared:
            raise ValueError(f"calibration and evaluation prompts must differ; both have {shared[0]!r}.")
        return list(given)
    if embedded:
        pool = embedded_prompts(min(720, len(excluded) + count), seed=seed)
    else:
        pool = list(GENERIC_CALIBRATION_PROMPTS)
    chosen = [p for p in pool if p not in excluded][:count]
    if not chosen:
        raise ValueError("no calibration prompt is left that is not evaluated; pass --calibration-prompt.")
    return chosen
