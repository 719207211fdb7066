"""``deepcache tune``'s decisions, as pure functions: the full-step budget, the adaptive threshold search, the
Pareto front, and which candidate the evidence supports.

A measured speedup is trusted up to the candidate's FLOP-ideal speedup (the denoiser's and VAE's FLOPs it saves; text
encoding and scheduler work only lower the real figure): a measurement more than :data:`NOISE_MARGIN` above that
bound is noise, flagged (:func:`beats_bound`), and the candidate is ranked at its bound (:func:`credible_speedup`).

Example::

    >>> row = {"speedup": 3.12, "ideal_speedup": 2.73, "psnr": 31.0, "ssim": 0.95}
    >>> beats_bound(row), credible_speedup(row)
    (True, 2.73)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["NOISE_MARGIN", "beats_bound", "bound_text", "choose", "credible_speedup", "full_step_budget", "meets",
           "pareto_front", "search_threshold", "unmet_bound"]

#: A measured speedup more than this share above its FLOP-ideal bound is noise.
NOISE_MARGIN = 0.10
#: The adaptive threshold's bisection: bracket (log space) and rounds.
THRESHOLD_BRACKET, THRESHOLD_ROUNDS = (1e-3, 1.0), 6


def full_step_budget(evaluations: int, interval: int) -> int:
    """K = ceil(n / N): the full steps of a uniform interval ``N`` in an ``n``-evaluation generation.

    >>> full_step_budget(25, 3), full_step_budget(25, 5), full_step_budget(25, 6)
    (9, 5, 5)
    """
    return -(-evaluations // interval)


def search_threshold(full_steps_at: Callable[[float], float], budget: float, *,
                     bracket: tuple[float, float] = THRESHOLD_BRACKET, rounds: int = THRESHOLD_ROUNDS) -> float:
    """The smallest adaptive threshold found whose mean full steps (``full_steps_at(t)``) is at most ``budget``.

    A bisection in log space over ``bracket`` (thresholds rounded to 3 significant digits, so that the printed
    value is the one measured); the answer is always a threshold that was measured to keep the budget (the
    upper end grows tenfold until one does).

    >>> search_threshold(lambda t: 25 * (1 - t), 9)  # full steps fall as the threshold grows
    0.65
    """
    lo, hi = bracket
    measured: dict[float, float] = {}

    def keeps(t: float) -> bool:
        if t not in measured:
            measured[t] = full_steps_at(t)
        return measured[t] <= budget

    for _ in range(rounds):
        mid = float(f"{math.sqrt(lo * hi):.3g}")
        if not lo < mid < hi:
            break
        if keeps(mid):
            hi = mid
        else:
            lo = mid
    while not keeps(hi):
        if hi > 1e6:
            raise ValueError(f"no adaptive threshold up to {hi:g} keeps the mean full steps at {budget} or fewer.")
        lo, hi = hi, hi * 10
    return hi


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats in both speed and quality (higher is better in both).

    >>> pareto_front([(1.5, 40.0), (2.0, 35.0), (1.8, 30.0), (3.0, 28.0)])
    [0, 1, 3]
    """
    order = sorted(range(len(points)), key=lambda k: (-points[k][0], -points[k][1]))
    front, best = [], -math.inf
    for k in order:
        if points[k][1] > best:
            front.append(k)
            best = points[k][1]
    return sorted(front)


def meets(row: dict[str, Any], min_psnr: float | None, min_ssim: float | None) -> bool:
    """Whether a row's PSNR and SSIM keep the bounds that are set.

    >>> meets({"psnr": 31.0, "ssim": 0.8}, 30, None), meets({"psnr": 31.0, "ssim": 0.8}, 30, 0.9)
    (True, False)
    """
    return (min_psnr is None or row["psnr"] >= min_psnr) and (min_ssim is None or row["ssim"] >= min_ssim)


def bound_text(min_psnr: float | None, min_ssim: float | None) -> str:
    """``PSNR >= 30 dB and SSIM >= 0.9``."""
    parts = ([f"PSNR >= {min_psnr:g} dB"] if min_psnr is not None else []) + (
        [f"SSIM >= {min_ssim:g}"] if min_ssim is not None else [])
    return " and ".join(parts)


def beats_bound(row: dict[str, Any], margin: float = NOISE_MARGIN) -> bool:
    """Whether the measured speedup beats the FLOP-ideal one by more than ``margin`` (noise); ``False`` when the
    FLOP-ideal speedup is unknown.

    >>> beats_bound({"speedup": 2.2, "ideal_speedup": 2.0}), beats_bound({"speedup": 2.21, "ideal_speedup": 2.0})
    (False, True)
    """
    ideal = row.get("ideal_speedup")
    return ideal is not None and row["speedup"] > ideal * (1 + margin) + 1e-12


def credible_speedup(row: dict[str, Any]) -> float:
    """The measured speedup, but never above the FLOP-ideal one (when known): what the evidence supports.

    >>> credible_speedup({"speedup": 1.8, "ideal_speedup": 2.5}), credible_speedup({"speedup": 1.8, "ideal_speedup": None})
    (1.8, 1.8)
    """
    ideal = row.get("ideal_speedup")
    return row["speedup"] if ideal is None else min(row["speedup"], ideal)


def choose(rows: Sequence[dict[str, Any]], min_psnr: float | None, min_ssim: float | None) -> dict[str, Any] | None:
    """The candidate row with the highest :func:`credible_speedup` (then PSNR) that meets the bound; ``None`` if none
    does.

    >>> rows = [{"setting": "a", "speedup": 3.1, "ideal_speedup": 1.7, "psnr": 47.0, "ssim": 0.99},
    ...         {"setting": "b", "speedup": 2.2, "ideal_speedup": 2.4, "psnr": 33.0, "ssim": 0.97},
    ...         {"setting": "c", "speedup": 2.9, "ideal_speedup": 3.0, "psnr": 25.0, "ssim": 0.90}]
    >>> choose(rows, 30, None)["setting"]  # a's 3.1x beats its FLOP bound 1.7x: noise, ranked at 1.7x
    'b'
    """
    ok = [r for r in rows if meets(r, min_psnr, min_ssim)]
    return max(ok, key=lambda r: (credible_speedup(r), r["psnr"])) if ok else None


def unmet_bound(rows: Sequence[dict[str, Any]], min_psnr: float | None, min_ssim: float | None) -> ValueError:
    """The error when no candidate row meets the bound: what the best ones reached, and what to try."""
    best_psnr = max(rows, key=lambda r: r["psnr"])
    best_ssim = max(rows, key=lambda r: r["ssim"])
    return ValueError(
        f"no candidate meets {bound_text(min_psnr, min_ssim)} (only the uncached pipeline does): the best PSNR "
        f"reached is {best_psnr['psnr']:.2f} dB ({best_psnr['kind']} {best_psnr['setting']}), the best SSIM "
        f"{best_ssim['ssim']:.4f} ({best_ssim['kind']} {best_ssim['setting']}). Lower the bound, or search closer "
        "to the original: --intervals 2 and deeper --branches (or --all-branches)."
    )
