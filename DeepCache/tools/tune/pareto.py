"""``deepcache tune``'s Pareto plot: measured speedup vs PSNR of every candidate, a colour and marker per kind.

The choice is labelled as the printed ``set_params`` line (:func:`chosen_label`).
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import Any

from ..pipelines import model_name
from ..plot import PALETTE, Series, scatter_plot
from ..settings import Setting
from .search import KINDS, TuneResult

__all__ = ["KIND_STYLE", "chosen_label", "pareto_plot", "plot_series"]


def chosen_label(row: dict[str, Any]) -> str:
    """The chosen row as the plot names it: its kind and the label of the parameters ``set_params`` gets.

    >>> chosen_label({"kind": "adaptive", "params": Setting(8, 0, "adaptive", threshold=0.16).helper_kwargs()})
    'adaptive I=8, B=0, adaptive, threshold=0.16'
    """
    return f"{row['kind']} {Setting(**row['params']).label}"


#: How the plot draws each kind: its colour and marker (reuse kinds round or square, forecasting kinds pointed).
KIND_STYLE: dict[str, tuple[tuple[int, int, int], str]] = {
    kind: (PALETTE[k], marker) for k, (kind, marker) in enumerate(zip(KINDS, (
        "circle", "square", "circle", "square", "diamond", "triangle")))
}


def plot_series(rows: Sequence[dict[str, Any]]) -> list[Series]:
    """One series per kind that has candidates, in :data:`KINDS` order, each in its :data:`KIND_STYLE`.

    >>> [(s.label, s.marker) for s in plot_series([{"kind": "linear", "speedup": 2.0, "psnr": 40.0}])]
    [('linear', 'triangle')]
    """
    return [Series(kind, [(r["speedup"], r["psnr"]) for r in rows if r["kind"] == kind], *KIND_STYLE[kind])
            for kind in KINDS if any(r["kind"] == kind for r in rows)]


def pareto_plot(result: TuneResult) -> Any:
    """Measured speedup vs PSNR of every candidate, by kind; the Pareto front, the bound and the choice."""
    rows = result.judged
    series = plot_series(rows)
    m = result.meta
    marked = None
    if result.chosen is not None:
        c = result.chosen
        label = textwrap.wrap(f"chosen: {chosen_label(c)}", 100, break_long_words=False, break_on_hyphens=False)
        marked = ((c["speedup"], c["psnr"]), "\n".join(label))  # a forecast's weights make a long label
    return scatter_plot(
        series, x_label="measured speedup over the uncached pipeline", y_label="PSNR dB vs uncached",
        title=f"deepcache tune: {model_name(m)}, {m['steps']} steps, "
        f"{len(m['prompts'])} prompts",
        line=[(r["speedup"], r["psnr"]) for r in rows if r["pareto"]],
        hline=(m["min_psnr"], f"bound {m['min_psnr']:g} dB") if m["min_psnr"] is not None else None, marked=marked)
