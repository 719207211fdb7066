"""What the tools write: one table renderer (markdown or plain text), one JSON writer, the run environment.

Every table of ``deepcache bench``, ``eval`` and ``demo`` is a list of :class:`Column` and a list of
row mappings; :func:`render_table` formats the cells (``n/a`` for a missing or NaN value) and, if
asked, leaves out the columns that have no value in any row. Every JSON file and JSON line goes
through :func:`to_jsonable`: dataclasses become objects, tuples lists, paths strings, and NaN or
infinity ``null`` (so the files are strict JSON).

Example::

    >>> from DeepCache.tools.report import Column, render_table
    >>> cols = [Column("setting", "setting"), Column("psnr", "PSNR dB", ".1f", align="right"),
    ...         Column("lpips", "LPIPS", ".3f", align="right")]
    >>> rows = [{"setting": "original", "psnr": float("inf")}, {"setting": "I=3, B=0", "psnr": 37.04}]
    >>> print(render_table(cols, rows, drop_empty=True))
    | setting | PSNR dB |
    |---|---:|
    | original | inf |
    | I=3, B=0 | 37.0 |
    >>> print(render_table(cols, rows, style="plain", drop_empty=True))
    setting   PSNR dB
    --------  -------
    original      inf
    I=3, B=0     37.0
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import platform
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

__all__ = [
    "NA",
    "SCHEMA_VERSION",
    "TABLE_STYLES",
    "Column",
    "environment",
    "format_value",
    "json_document",
    "json_line",
    "render_table",
    "to_jsonable",
    "write_json",
]

#: What a cell shows when there is no value.
NA = "n/a"
TABLE_STYLES = ("markdown", "plain")
#: Version of the JSON documents the tools write (``schema_version`` key).
SCHEMA_VERSION = 1


def format_value(value: Any, spec: str = "", suffix: str = "") -> str:
    """``format(value, spec) + suffix``, or ``n/a`` for ``None`` and NaN (infinity prints as ``inf``).

    >>> format_value(0.02 * 100, "+.1f", " %"), format_value(None, ".2f"), format_value(float("nan"))
    ('+2.0 %', 'n/a', 'n/a')
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NA
    return format(value, spec) + suffix


@dataclasses.dataclass(frozen=True)
class Column:
    """One table column: the row key it shows, its title and how a value is written.

    ``fmt`` is a format spec (``".2f"``) or a function of the value returning the cell text.
    """

    key: str
    title: str
    fmt: str | Callable[[Any], str] = ""
    suffix: str = ""
    align: str = "left"  # "left" or "right"

    def cell(self, row: Mapping[str, Any]) -> str:
        value = row.get(self.key)
        if callable(self.fmt):
            return NA if value is None else self.fmt(value)
        return format_value(value, self.fmt, self.suffix)


def render_table(columns: Sequence[Column], rows: Sequence[Mapping[str, Any]], *, style: str = "markdown",
                 drop_empty: bool = False) -> str:
    """The rows as a markdown table (``| a | b |``) or aligned plain text.

    With ``drop_empty``, columns (other than the first) that are ``n/a`` in every row are left out.
    """
    if style not in TABLE_STYLES:
        raise ValueError(f"unknown table style {style!r}; choose one of {', '.join(TABLE_STYLES)}.")
    cells = [[col.cell(row) for col in columns] for row in rows]
    keep = [k for k in range(len(columns)) if k == 0 or not drop_empty or any(r[k] != NA for r in cells)]
    cols = [columns[k] for k in keep]
    body = [[r[k] for k in keep] for r in cells]
    if style == "markdown":
        rule = "|" + "|".join("---:" if c.align == "right" else "---" for c in cols) + "|"
        lines = ["| " + " | ".join(c.title for c in cols) + " |", rule]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])
    widths = [max([len(c.title)] + [len(r[k]) for r in body]) for k, c in enumerate(cols)]

    def line(texts: Sequence[str]) -> str:
        return "  ".join(t.rjust(w) if c.align == "right" else t.ljust(w)
                         for t, w, c in zip(texts, widths, cols)).rstrip()

    return "\n".join([line([c.title for c in cols]), line(["-" * w for w in widths]), *map(line, body)])


def to_jsonable(obj: Any) -> Any:
    """``obj`` with dataclasses as dicts, tuples as lists, paths as strings and NaN/infinity as ``None``."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def json_document(tool: str, **sections: Any) -> dict[str, Any]:
    """The one layout of every JSON report: ``schema_version``, ``tool``, then the tool's sections."""
    return {"schema_version": SCHEMA_VERSION, "tool": tool, **sections}


def json_line(obj: Any) -> str:
    """One compact JSON line (``--jsonl`` output)."""
    return json.dumps(to_jsonable(obj), allow_nan=False)


def write_json(path: str | Path, document: Any) -> Path:
    """Write ``document`` as strict, indented JSON to ``path`` (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(document), indent=1, allow_nan=False) + "\n", encoding="utf-8")
    return path


def environment(device: torch.device, dtype: torch.dtype, pipe: Any | None = None) -> dict[str, Any]:
    """The versions, card, threads and attention backend a measurement depends on."""
    import diffusers
    import transformers

    from .. import __version__

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "deepcache": __version__,
        "device": str(device),
        "gpu_name": None,
        "cuda": torch.version.cuda,
        "cpu_threads": torch.get_num_threads(),
        "dtype": str(dtype).replace("torch.", ""),
        "attention_backend": None,
        "sdpa_kernels_enabled": None,
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if device.type == "cuda":
        env["gpu_name"] = torch.cuda.get_device_name(device)
        env["sdpa_kernels_enabled"] = {
            "flash": torch.backends.cuda.flash_sdp_enabled(),
            "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
            "math": torch.backends.cuda.math_sdp_enabled(),
        }
    if pipe is not None:
        from .kinds import kind_of

        procs = kind_of(pipe).attention_processors()
        sdpa = any(name.endswith("2_0") for name in procs)
        env["attention_backend"] = ("torch SDPA (" if sdpa else "") + ", ".join(procs) + (")" if sdpa else "")
    return env
