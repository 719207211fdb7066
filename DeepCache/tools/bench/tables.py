"""``deepcache bench``'s tables: the documented layout (``seconds (speedup×)`` per setting), the details, the
compiled rows and the FLOP counts, all :func:`DeepCache.tools.report.render_table` tables of a :class:`BenchReport`.

Example::

    >>> from DeepCache.tools.bench.results import BenchReport, ScenarioResult
    >>> from DeepCache.tools.bench.scenarios import Scenario
    >>> from DeepCache.tools.settings import Setting
    >>> r = ScenarioResult.new("sd21", 4, Scenario(512, 512, 1, Setting(3, 0)), (True, False, False, True))
    >>> print(markdown_table(BenchReport({}, {}, [r])))
    | Resolution | Batch size | DeepCache (I=3, B=0) |
    |---|---|---|
    | 512 | 1 | n/a |
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

from ..report import Column, render_table
from ..kinds import denoiser_name
from .results import BenchReport, ScenarioResult
from .scenarios import TINY_RESOLUTION_DIVISOR

__all__ = ["DETAIL_COLUMNS", "FLOP_COLUMNS", "detail_columns", "flop_columns", "markdown_compile", "markdown_details",
           "markdown_flops", "markdown_table", "render_markdown"]


# -- tables -------------------------------------------------------------------------------------------
def _seconds(x: float) -> str:
    return "n/a" if math.isnan(x) else (f"{x:.4g}" if x >= 10 else f"{x:.3f}")


def _res(r: ScenarioResult) -> str:
    return str(r.height) if r.height == r.width else f"{r.height}x{r.width}"


def _percent(x: float | None) -> float | None:
    return None if x is None else x * 100


def _tflops(x: int | None) -> float | None:
    return None if x is None else x / 1e12


def _summary_cell(r: ScenarioResult | None, compiled_column: bool) -> str:
    """A cell of the documented layout: ``seconds (speedup×)``, or the ideal speedup when nothing was timed."""
    if r is None:
        return "n/a"
    if r.variant == "original" and not compiled_column:
        return _seconds(r.seconds)
    if math.isnan(r.seconds):
        return f"ideal {r.ideal_speedup:.2f}×" if r.ideal_speedup else "n/a"
    if compiled_column and r.variant != "original" and r.speedup_vs_compiled is not None:
        return f"{_seconds(r.seconds)} ({r.speedup:.2f}×; {r.speedup_vs_compiled:.2f}× vs compiled)"
    return f"{_seconds(r.seconds)} ({r.speedup:.2f}×)"


def _column_title(label: str, compiled: bool) -> str:
    title = "original" if label == "original" else f"DeepCache ({label})"
    return f"Compiled {title}" if compiled else title[0].upper() + title[1:]


def markdown_table(report: BenchReport) -> str:
    """The documented layout: rows resolution × batch, columns original and each variant "s (x×)"."""
    labels = list(dict.fromkeys(r.variant for r in report.results))  # "original" first
    compiled = any(r.compile_mode for r in report.results)
    kinds = (False, True) if compiled else (False,)
    columns = [Column("res", "Resolution"), Column("batch", "Batch size")]
    for kind in kinds:  # speedups stay relative to the eager original; compiled DeepCache also vs the compiled one
        columns += [Column(f"{kind}:{lab}", _column_title(lab, kind)) for lab in labels]
    rows: dict[tuple[int, int, int], dict[str, Any]] = {}
    for r in report.results:
        row = rows.setdefault((r.height, r.width, r.batch_size), {"res": _res(r), "batch": r.batch_size})
        row[f"{bool(r.compile_mode)}:{r.variant}"] = r
    cells = [{k: (_summary_cell(v, k.startswith("True")) if isinstance(v, ScenarioResult) else v)
              for k, v in row.items()} for row in rows.values()]
    return render_table(columns, cells)


def _display_rows(report: BenchReport, compiled_only: bool = False) -> list[dict[str, Any]]:
    """Each result as a dict, with the derived display values the detail tables show."""
    out = []
    for r in report.results:
        if compiled_only and not r.compile_mode:
            continue
        row = asdict(r)
        row.update(res=_res(r), name=("compiled " if r.compile_mode else "") + r.variant,
                   achieved_pct=_percent(r.achieved_fraction),
                   achieved_compiled_pct=_percent(r.achieved_fraction_compiled),
                   overhead_pct=_percent(r.memory_overhead),
                   peak_gib=None if r.peak_memory_bytes is None else r.peak_memory_bytes / 2**30,
                   steps_split=f"{r.full_steps} / {r.retrieval_steps}", tf_full=_tflops(r.flops_full_step),
                   tf_retr=_tflops(r.flops_retrieval_step), tf_vae=_tflops(r.flops_vae_decode))
        out.append(row)
    return out


_RES, _BATCH = Column("res", "Res"), Column("batch_size", "Batch")
_STEP_MS = (Column("step_ms_full", "Full step ms", ".1f"), Column("step_ms_retrieval", "Retrieval step ms", ".1f"))
COMPILE_COLUMNS: tuple[Column, ...] = (
    _RES, _BATCH, Column("variant", "Variant"), Column("compile_mode", "Mode"),
    Column("warmup_seconds", "Compile + warm-up s", ".1f"), Column("graphs_compiled", "Graphs compiled", "d"),
    Column("recompiles_timed", "Recompiles (timed)", "d"), Column("seconds", "Seconds", _seconds),
    Column("speedup", "Speedup vs eager original", ".2f", "×"),
    Column("speedup_vs_compiled", "Speedup vs compiled original", ".2f", "×"),
    Column("ideal_speedup", "Ideal (FLOPs, e2e)", ".2f", "×"),
    Column("achieved_compiled_pct", "Achieved vs compiled", ".0f", " %"), *_STEP_MS,
)
def detail_columns(denoiser: str = "U-Net") -> tuple[Column, ...]:
    """The detail table's columns, ``denoiser`` naming the model's denoiser
    (:func:`DeepCache.tools.kinds.denoiser_name`)."""
    return (
        _RES, _BATCH, Column("name", "Variant"), Column("seconds", "Seconds", _seconds),
        Column("speedup", "Speedup", ".2f", "×"), Column("ideal_speedup", "Ideal (FLOPs, e2e)", ".2f", "×"),
        Column("achieved_pct", "Achieved", ".0f", " %"),
        Column("ideal_speedup_uniform", f"Ideal {denoiser} N/(1+(N-1)f)", ".2f", "×"),
        Column("flop_ratio", "f", ".3f"),
        *_STEP_MS, Column("peak_gib", "Peak GiB", ".2f"), Column("overhead_pct", "Mem overhead", "+.1f", " %"),
    )


def flop_columns(denoiser: str = "U-Net") -> tuple[Column, ...]:
    """The FLOP table's columns (``--flops-only``), ``denoiser`` naming the model's denoiser."""
    return (
        _RES, _BATCH, Column("variant", "Variant"), Column("steps_split", "Full / retrieval steps"),
        Column("tf_full", "Full step TFLOPs", ".4f"), Column("tf_retr", "Retrieval step TFLOPs", ".4f"),
        Column("flop_ratio", "f", ".4f"), Column("tf_vae", "VAE decode TFLOPs", ".4f"),
        Column("ideal_speedup", "Ideal e2e", ".3f", "×"),
        Column("ideal_speedup_unet", f"Ideal {denoiser} loop", ".3f", "×"),
        Column("ideal_speedup_uniform", "N/(1+(N-1)f)", ".3f", "×"),
    )


#: The U-Net's tables (a transformer's say "transformer": :func:`detail_columns`, :func:`flop_columns`).
DETAIL_COLUMNS, FLOP_COLUMNS = detail_columns(), flop_columns()


def _denoiser(report: BenchReport) -> str:
    return denoiser_name(report.settings.get("denoiser"))


def _attribute(report: BenchReport) -> str:
    return "transformer" if report.settings.get("denoiser") == "transformer" else "unet"


def markdown_details(report: BenchReport) -> str:
    """One row per scenario: time, speedup, FLOP-ideal speedup and achieved fraction, step times, memory."""
    return render_table(detail_columns(_denoiser(report)), _display_rows(report))


def markdown_compile(report: BenchReport) -> str:
    """``--compile`` rows: compile + warm-up time, graph counts, speedups vs the compiled original."""
    return render_table(COMPILE_COLUMNS, _display_rows(report, compiled_only=True))


def markdown_flops(report: BenchReport) -> str:
    """FLOP counts per scenario (``--flops-only``): step FLOPs, ratio, VAE decode and the ideal speedups."""
    return render_table(flop_columns(_denoiser(report)), _display_rows(report))


def _header_lines(report: BenchReport) -> list[str]:
    s, e = report.settings, report.env
    card = e.get("gpu_name") or f"CPU ({e.get('cpu_threads')} thread{'s' if e.get('cpu_threads') != 1 else ''})"
    lines = [
        f"Model: {s['model_name']} ({s['weights']} weights, {s['model_source']}); {s['steps']} steps, "
        f"scheduler {s['scheduler']}, guidance {s['guidance_scale']}; {s['dtype']} on {card}.",
        f"Timed: {s['timed']}; median of {s['repeats']} interleaved repeats after a {s['warmup_steps']}-step warm-up per scenario.",
        f"torch {e['torch']}, diffusers {e['diffusers']}, DeepCache {e['deepcache']}, attention: {e.get('attention_backend') or 'n/a'}; {e['date_utc']}.",
    ]
    if s.get("tiny"):
        lines.append(f"TINY models (CI smoke test): resolutions are the nominal ones / {TINY_RESOLUTION_DIVISOR}; "
                     "these timings say nothing about real models.")
    if s["weights"] == "random":
        lines.append("Random weights: timing is identical to trained weights (same kernels, same shapes); nothing was downloaded.")
    return lines


def render_markdown(report: BenchReport) -> str:
    """Header lines, the documented-layout table and the detailed table (or the FLOP table)."""
    if report.settings.get("flops_only"):
        s, name = report.settings, _denoiser(report)
        counted = ("U-Net batch = 2 x batch); counted on the meta device" if name == "U-Net" else
                   "every CFG branch counted); counted on one real 1-step call per shape, block by block,")
        head = (f"- FLOPs only (nothing timed): {s['model_name']}, {s['steps']} steps (step pattern from "
                f"DeepCache.schedules.schedule, one {name} evaluation per step), guidance {s['guidance_scale']} "
                f"({counted} with torch.utils.flop_counter (matmuls, convolutions, attention); torch "
                f"{report.env['torch']}, diffusers {report.env['diffusers']}.")
        return "\n\n".join([head, markdown_table(report), markdown_flops(report)]) + "\n"
    parts = ["\n".join(f"- {x}" for x in _header_lines(report)), markdown_table(report), markdown_details(report),
             "Ideal (FLOPs, e2e) = (n·F + V) / (n_full·F + n_retr·R + V) for this run's step pattern, with F/R the "
             f"full/retrieval {_denoiser(report)} step FLOPs and V the VAE decode (torch.utils.flop_counter, attention "
             "included); "
             "Achieved = speedup / ideal."]
    if any(r.compile_mode for r in report.results):
        parts += [markdown_compile(report),
                  f"Compiled rows: torch.compile(pipe.{_attribute(report)}, mode=..., fullgraph=True, dynamic=False); "
                  "DeepCache's step "
                  "decision runs outside the graphs (two graphs per shape and branch). Compile + warm-up s is the "
                  "scenario's first (warm-up) call; timed calls come after it."]
    return "\n\n".join(parts) + "\n"
