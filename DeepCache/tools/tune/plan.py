"""``deepcache tune``'s search order and pruning, as pure functions: which candidates can still win.

A candidate's credible speedup (:func:`.choice.credible_speedup`) never exceeds its FLOP-ideal speedup, and that is
known before anything runs: it depends only on how many of the n evaluations are full steps (an adaptive schedule
runs at least the full steps its cap forces). So once some candidate meets the bound at a credible speedup S, a
candidate whose bound is below S cannot win, whatever its quality: it is *pruned*, never built, run or timed.

``tune`` walks the slots (one per kind, branch and budget) from the highest bound down, the ones that cost nothing
to build first (:func:`order`), judges each once on the judging prompts (quality and one timing), and stops
building where the bound falls below the best S so far. Only the *contenders*, the candidates that meet the bound
and whose bound reaches S, are timed again (:func:`contenders`); when their median lowers S, slots whose bound
now reaches it are taken up again, until no pruned slot and no once-timed candidate could have won
(:func:`could_win`).

Example::

    >>> slots = [Slot("uniform", 0, 3, 9, 2.29), Slot("forecast", 0, None, 6, 3.0), Slot("uniform", 0, 5, 5, 3.38)]
    >>> [(s.kind, s.budget) for s in order(slots)]
    [('uniform', 5), ('uniform', 9), ('forecast', 6)]
    >>> could_win(2.29, 2.5), could_win(3.0, 2.5), could_win(None, 2.5)
    (False, True, True)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

from .choice import credible_speedup, meets

__all__ = ["BUILD_COST", "Slot", "best_credible", "contenders", "could_win", "order"]

#: What building a kind's setting costs before it can be judged: 0 nothing, 1 the calibration replay and a few
#: pipeline calls on the calibration prompts, 2 a closed-loop search (forecast) or a bisection (adaptive).
BUILD_COST: dict[str, int] = {"uniform": 0, "non-uniform": 0, "linear": 0, "calibrated": 1, "forecast": 2,
                              "adaptive": 2}


@dataclasses.dataclass(frozen=True)
class Slot:
    """One candidate before it is built: its kind, branch, the interval N it comes from (``None`` for a budget
    between two intervals' budgets), its budget K of full steps and the bound on its speedup (``None``: unknown)."""

    kind: str
    branch: int
    interval: int | None
    budget: int
    bound: float | None

    @property
    def cost(self) -> int:
        return BUILD_COST[self.kind]


def order(slots: Iterable[Slot]) -> list[Slot]:
    """The slots that cost nothing to build first (they set the bar that prunes the others), each group from the
    highest bound down (an unknown bound first), then by branch, budget and kind.

    >>> [s.kind for s in order([Slot("adaptive", 0, 4, 7, 9.0), Slot("calibrated", 0, None, 6, 3.0),
    ...                         Slot("non-uniform", 1, 4, 7, 2.0)])]
    ['non-uniform', 'calibrated', 'adaptive']
    """
    return sorted(slots, key=lambda s: (s.cost > 0, s.cost > 1, -(math.inf if s.bound is None else s.bound),
                                        s.branch, s.budget, s.kind))


def could_win(bound: float | None, best: float | None) -> bool:
    """Whether a candidate whose speedup cannot exceed ``bound`` could still beat the ``best`` credible speedup of a
    candidate that meets the quality bound (``None``: nothing meets it yet, or the bound is unknown). Ties could win
    (the choice then goes by PSNR)."""
    return best is None or bound is None or bound >= best


def best_credible(rows: Sequence[dict[str, Any]], min_psnr: float | None, min_ssim: float | None) -> float | None:
    """The highest credible speedup among the judged rows that meet the bound; ``None`` if none does.

    >>> best_credible([{"speedup": 2.5, "ideal_speedup": 2.2, "psnr": 31.0, "ssim": 0.9},
    ...                {"speedup": 3.0, "ideal_speedup": 3.4, "psnr": 20.0, "ssim": 0.8}], 30, None)
    2.2
    """
    ok = [credible_speedup(r) for r in rows if r.get("psnr") is not None and meets(r, min_psnr, min_ssim)]
    return max(ok) if ok else None


def contenders(rows: Sequence[dict[str, Any]], min_psnr: float | None, min_ssim: float | None) -> list[int]:
    """Indices of the judged rows that meet the bound and whose FLOP-ideal speedup (or unknown bound) reaches the best
    credible speedup: the only ones whose ranking more timings could change.

    >>> rows = [{"speedup": 2.5, "ideal_speedup": 2.6, "psnr": 31.0, "ssim": 0.9},
    ...         {"speedup": 2.0, "ideal_speedup": 2.4, "psnr": 33.0, "ssim": 0.9},
    ...         {"speedup": 2.2, "ideal_speedup": 2.8, "psnr": 32.0, "ssim": 0.9},
    ...         {"speedup": 3.0, "ideal_speedup": 3.4, "psnr": 20.0, "ssim": 0.8}]
    >>> contenders(rows, 30, None)
    [0, 2]
    """
    best = best_credible(rows, min_psnr, min_ssim)
    return [k for k, r in enumerate(rows) if r.get("psnr") is not None and meets(r, min_psnr, min_ssim)
            and could_win(r.get("ideal_speedup"), best)]
