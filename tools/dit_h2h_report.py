"""Tables and the Pareto plot of ``tools/dit_head_to_head.py`` from its JSON (one ``mode`` per guidance setting).

Example::

    >>> mode = {"cfg": 1.0, "rows": [
    ...     {"family": "ours: uniform", "label": "I=2 B=0", "status": "ok", "mac_fraction": 0.5, "mac_min": 0.5,
    ...      "mac_max": 0.5, "psnr": 40.0, "psnr_min": 38.0, "ssim": 0.99, "task_acc": 0.8, "frechet": None}]}
    >>> print(budget_table(mode, (0.5,)).splitlines()[4])
    | 50 % | ours: uniform | I=2 B=0 | 0.500 | 40.00 (38.00) | 0.9900 | 0.800 | - |
"""

from __future__ import annotations

from typing import Any, Sequence

BUDGETS: tuple[float, ...] = (0.5, 1 / 3, 0.25)
TOLERANCE = 0.03  # a setting counts for a budget if its mean MAC fraction is at most budget + this


def best_per_family(rows: Sequence[dict[str, Any]], budget: float) -> dict[str, dict[str, Any]]:
    """Per family, the ok setting with the highest mean PSNR whose mean MAC fraction is within the budget."""
    best: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row.get("status") != "ok" or row["family"] == "uncached" or row["mac_fraction"] > budget + TOLERANCE:
            continue
        if row["family"] not in best or row["psnr"] > best[row["family"]]["psnr"]:
            best[row["family"]] = row
    return best


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def budget_table(mode: dict[str, Any], budgets: Sequence[float] = BUDGETS) -> str:
    """Markdown: per budget, each family's best setting (MAC fraction with its per-image range for threshold methods)."""
    lines = [f"CFG {'on (true_cfg_scale ' + format(mode['cfg'], 'g') + ')' if mode['cfg'] > 1 else 'off'}", "",
             "| budget | method | setting | MACs (min-max) | PSNR dB (worst image) | SSIM | task acc | Fréchet |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for budget in budgets:
        rows = sorted(best_per_family(mode["rows"], budget).values(), key=lambda r: -r["psnr"])
        for row in rows:
            spread = "" if row["mac_min"] == row["mac_max"] else f" ({row['mac_min']:.3f}-{row['mac_max']:.3f})"
            lines.append(f"| {budget * 100:.0f} % | {row['family']} | {row['label']} | {row['mac_fraction']:.3f}{spread} "
                         f"| {row['psnr']:.2f} ({row['psnr_min']:.2f}) | {row['ssim']:.4f} | "
                         f"{_fmt(row.get('task_acc'), '.3f')} | {_fmt(row.get('frechet'), '.3f')} |")
    return "\n".join(lines)


def failures(mode: dict[str, Any]) -> list[str]:
    """One line per setting that failed, skipped nothing, or was not installed."""
    return [f"{r['family']}: {r['label']}: {r['status']}" + (f" ({r['error']})" if "error" in r else "")
            for r in mode["rows"] if r.get("status") != "ok"]


def group_colour(family: str) -> int:
    """The palette index of a family's group: ours (reuse), ours with a forecast, diffusers, cache-dit, cache-dit with a
    calibrator, fewer steps."""
    if family.startswith("cache-dit: DBCache +"):
        return 4
    if family.startswith("ours") and "forecast" in family:
        return 5
    return {"ours": 3, "diffusers": 0, "cache-dit": 1, "fewer steps": 2}.get(family.split(":")[0], 5)


def pareto_plot(modes: Sequence[dict[str, Any]]) -> Any:
    """MAC fraction vs mean PSNR (capped at 60 dB), one series per family, one panel per guidance setting (stacked)."""
    from PIL import Image

    from DeepCache.tools.plot import MARKERS, PALETTE, Series, scatter_plot

    styles: dict[str, tuple[int, str]] = {}  # one colour and marker per family, the same in every panel
    for family in dict.fromkeys(r["family"] for mode in modes for r in mode["rows"] if r["family"] != "uncached"):
        colour = group_colour(family)
        styles[family] = (colour, MARKERS[sum(c == colour for c, _ in styles.values()) % len(MARKERS)])
    panels = []
    for mode in modes:
        families: dict[str, list[tuple[float, float]]] = {}
        for row in mode["rows"]:
            if row.get("status") in ("ok", "no skipping") and row["family"] != "uncached":
                families.setdefault(row["family"], []).append((row["mac_fraction"], min(row["psnr"], 60.0)))
        series = [Series(family, points, PALETTE[styles[family][0]], styles[family][1])
                  for family, points in families.items()]
        cfg = f"true CFG {mode['cfg']:g}" if mode["cfg"] > 1 else "no CFG"
        panels.append(scatter_plot(series, x_label="MACs / uncached (per generation)", y_label="PSNR dB vs uncached",
                                   title=f"tiny Flux DiT, {cfg}", size=(1000, 640)))
    out = Image.new("RGB", (max(p.width for p in panels), sum(p.height for p in panels)), "white")
    y = 0
    for panel in panels:
        out.paste(panel, (0, y))
        y += panel.height
    return out


def timing_table(mode: dict[str, Any]) -> str:
    """Markdown: seconds per image and the ratio to the uncached pipeline of the same run, eager and compiled."""
    lines = ["| run | method: setting | eager s/image | eager / uncached | compiled s/image | compiled / uncached |",
             "|---:|---|---:|---:|---:|---:|"]
    for index, run in enumerate(mode.get("timing_runs", []), 1):
        eager, compiled = run.get("timing_eager", {}), run.get("timing_compiled", {})
        for name in eager:
            cells = []
            for timing in (eager.get(name, {}), compiled.get(name)):
                if timing is None:
                    cells += ["-", "-"]
                elif "error" in timing:
                    cells += [f"failed: {timing['error'][:90]}", "-"]
                else:
                    cells += [f"{timing['seconds']:.3f}", f"{timing['ratio']:.2f}"]
            lines.append(f"| {index} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goal_table(modes: Sequence[dict[str, Any]], budgets: Sequence[float] = BUDGETS) -> str:
    """Markdown: per guidance and budget, the best of ours, of the peers (diffusers, cache-dit) and of fewer steps."""
    lines = ["| CFG | budget | best ours | best peer | fewer steps | ours - best peer | >= +1 dB? |",
             "|---|---|---|---|---|---:|---|"]
    for mode in modes:
        for budget in budgets:
            best = best_per_family(mode["rows"], budget).values()
            pick = {}
            for group, test in (("ours", _is_ours), ("peer", _is_peer),
                                ("steps", lambda f: f == "fewer steps")):
                rows = [r for r in best if test(r["family"])]
                pick[group] = max(rows, key=lambda r: r["psnr"]) if rows else None
            cells = [f"{r['family']} {r['label']}: {r['psnr']:.2f} dB at {r['mac_fraction']:.3f}" if r else "none"
                     for r in pick.values()]
            gap = pick["ours"]["psnr"] - pick["peer"]["psnr"] if pick["ours"] and pick["peer"] else None
            verdict = "-" if gap is None else ("yes" if gap >= 1 else "no")
            cfg = f"{mode['cfg']:g}" if mode["cfg"] > 1 else "off"
            lines.append(f"| {cfg} | {budget * 100:.0f} % | " + " | ".join(cells) +
                         f" | {_fmt(gap, '+.2f')} | {verdict} |")
    return "\n".join(lines)


def _is_ours(family: str) -> bool:
    return family.startswith("ours")


def _is_peer(family: str) -> bool:
    return family.startswith(("diffusers", "cache-dit"))


def equal_mac_gaps(mode: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any] | None, float | None]]:
    """Per ok peer setting, the best ok setting of ours that spends **no more** of the MACs (mean fraction; none if
    ours has no setting that cheap) and ours' PSNR minus the peer's: "never behind at equal MACs" is every gap >= 0.

    >>> rows = [{"family": "ours: u", "label": "a", "status": "ok", "mac_fraction": 0.5, "psnr": 40.0},
    ...         {"family": "diffusers: x", "label": "b", "status": "ok", "mac_fraction": 0.6, "psnr": 41.0},
    ...         {"family": "cache-dit: y", "label": "c", "status": "ok", "mac_fraction": 0.4, "psnr": 30.0}]
    >>> [(p["label"], o and o["label"], gap) for p, o, gap in equal_mac_gaps({"rows": rows})]
    [('b', 'a', -1.0), ('c', None, None)]
    """
    ok = [r for r in mode["rows"] if r.get("status") == "ok"]
    out: list[tuple[dict[str, Any], dict[str, Any] | None, float | None]] = []
    for peer in (r for r in ok if _is_peer(r["family"])):
        cheaper = [r for r in ok if _is_ours(r["family"]) and r["mac_fraction"] <= peer["mac_fraction"]]
        best = max(cheaper, key=lambda r: r["psnr"]) if cheaper else None
        out.append((peer, best, None if best is None else best["psnr"] - peer["psnr"]))
    return out


def equal_mac_table(mode: dict[str, Any]) -> str:
    """Markdown: every peer setting against the best of ours at no more MACs, worst gap first."""
    lines = ["| peer: setting | MACs | PSNR dB | best ours at <= its MACs | MACs | PSNR dB | ours - peer |",
             "|---|---:|---:|---|---:|---:|---:|"]
    for peer, ours, gap in sorted(equal_mac_gaps(mode), key=lambda t: float("inf") if t[2] is None else t[2]):
        theirs = f"{peer['family']}: {peer['label']} | {peer['mac_fraction']:.3f} | {peer['psnr']:.2f}"
        mine = "none | - | -" if ours is None else \
            f"{ours['family']}: {ours['label']} | {ours['mac_fraction']:.3f} | {ours['psnr']:.2f}"
        lines.append(f"| {theirs} | {mine} | {_fmt(gap, '+.2f')} |")
    return "\n".join(lines)
