"""How far one ``deepcache eval`` run carries its arguments through the tools: modules entered and moves between them.

Runs ``deepcache eval`` in this process on the embedded demo model with the smallest arguments (one prompt, two
steps, one setting) under :func:`sys.setprofile`, and counts, among the modules of ``DeepCache.tools``:

* **modules**: the tools modules whose functions ran;
* **moves**: the distinct calls from a function of module A to a function of module B != A (``caller -> callee``,
  both named ``module:qualname``; the same call made again, in a loop or for another batch, is one move);
* **back up a level**: the moves from a module deeper in the package tree to a shallower one (depth = the parts of
  its dotted name, a package being its ``__init__``: ``tools.pipelines`` and ``tools.demo_model`` are 3,
  ``tools.kinds.unet`` 4); ``tools/kinds/unet.py -> tools/pipelines.py`` is one, and so is
  ``tools/kinds/unet.py -> tools/demo_model/__init__.py``;
* **sideways**: moves between modules of two different packages at the same depth (``kinds.unet -> demo_model.data``);
* **module pairs**: the distinct (module A, module B) pairs the moves connect;
* per module, the distinct moves that enter it, and the raw number of calls crossing modules (loops included).

The trace starts with the parsed arguments (``args.func(args)``; building the parser and parsing are not traced).
Module bodies running at import (``<module>`` frames) and what they call are not counted, so the counts do not depend
on which modules an earlier import already loaded. Calls into the library (``DeepCache.helper``, the engine),
diffusers or torch are not counted either: this measures the tools' own plumbing. The counts are deterministic for
given arguments (no times), on a machine without LPIPS weights (with them, scoring calls a few more functions);
``tests/test_tools_trace.py`` bounds them, with LPIPS switched off.

Example::

    OMP_NUM_THREADS=1 python tools/eval_trace.py            # the table and the moves
    OMP_NUM_THREADS=1 python tools/eval_trace.py --json trace.json -- --variant 3,0 --steps 2
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import io
import json
import sys
from pathlib import Path
from types import FrameType
from typing import Any, Sequence

#: The package whose plumbing is measured.
SCOPE = "DeepCache.tools"
#: The smallest ``deepcache eval``: one prompt, two steps, one setting, one thread, no JSON.
SMALLEST_EVAL = ("eval", "--num-prompts", "1", "--steps", "2", "--variant", "3,0", "--threads", "1")


def depth(module: str) -> int:
    """How deep a module sits in the package tree: the parts of its dotted name (a package is its ``__init__``).

    >>> depth("DeepCache.tools.pipelines"), depth("DeepCache.tools.kinds.unet"), depth("DeepCache.tools.demo_model")
    (3, 4, 3)
    """
    return len(module.split("."))


def _parent(module: str) -> str:
    return module.rsplit(".", 1)[0]


@dataclasses.dataclass(frozen=True)
class Move:
    """One distinct call from a function of one tools module to a function of another."""

    caller_module: str
    caller: str
    callee_module: str
    callee: str

    @property
    def back_up(self) -> bool:
        """From a deeper module to a shallower one."""
        return depth(self.callee_module) < depth(self.caller_module)

    @property
    def sideways(self) -> bool:
        """Between two different subpackages at the same depth (``kinds.unet -> demo_model.data``)."""
        return depth(self.callee_module) == depth(self.caller_module) and \
            _parent(self.callee_module) != _parent(self.caller_module)

    def __str__(self) -> str:
        short = lambda m: m.removeprefix(SCOPE + ".")  # noqa: E731
        arrow = " ^ " if self.back_up else (" ~ " if self.sideways else " -> ")
        return f"{short(self.caller_module)}:{self.caller}{arrow}{short(self.callee_module)}:{self.callee}"


@dataclasses.dataclass
class Trace:
    """What one traced run did (see the module docstring)."""

    modules: set[str] = dataclasses.field(default_factory=set)
    moves: dict[Move, int] = dataclasses.field(default_factory=dict)

    @property
    def back_up(self) -> list[Move]:
        return [m for m in self.moves if m.back_up]

    @property
    def sideways(self) -> list[Move]:
        return [m for m in self.moves if m.sideways]

    @property
    def crossings(self) -> int:
        """Calls that crossed modules, every repetition counted."""
        return sum(self.moves.values())

    def entries(self) -> dict[str, int]:
        """Per module, the distinct moves that enter it (most first)."""
        counts = collections.Counter(m.callee_module for m in self.moves)
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    @property
    def module_pairs(self) -> set[tuple[str, str]]:
        return {(m.caller_module, m.callee_module) for m in self.moves}

    def summary(self) -> dict[str, Any]:
        return {"modules": len(self.modules), "moves": len(self.moves), "back_up": len(self.back_up),
                "sideways": len(self.sideways), "module_pairs": len(self.module_pairs), "crossings": self.crossings}

    def to_json(self) -> dict[str, Any]:
        return {**self.summary(), "module_names": sorted(self.modules), "entries": self.entries(),
                "move_list": [str(m) for m in self.moves]}


def _module(frame: FrameType) -> str | None:
    name = frame.f_globals.get("__name__", "")
    return name if name == SCOPE or name.startswith(SCOPE + ".") else None


def traced(argv: Sequence[str] = SMALLEST_EVAL) -> tuple[Trace, int, str]:
    """Parse ``deepcache ARGV``, then run the command here under the profiler: the trace, the exit status and what
    it printed. Parsing is not traced (the trace starts with the parsed arguments); nor is a module body that an
    import runs meanwhile, nor anything it calls."""
    import DeepCache.tools.cli as cli

    trace = Trace()
    importing = [0]  # module bodies running now

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if frame.f_code.co_name == "<module>":
            importing[0] += {"call": 1, "return": -1}.get(event, 0)
            return
        if event != "call" or importing[0]:
            return
        callee = _module(frame)
        if callee is None:
            return
        trace.modules.add(callee)
        back = frame.f_back
        caller = _module(back) if back is not None else None
        if caller is None or caller == callee:
            return
        move = Move(caller, back.f_code.co_qualname, callee, frame.f_code.co_qualname)  # type: ignore[union-attr]
        trace.moves[move] = trace.moves.get(move, 0) + 1

    args = cli.build_parser().parse_args(list(argv))
    out = io.StringIO()
    old = sys.getprofile()
    with contextlib.redirect_stdout(out):
        sys.setprofile(profile)
        try:
            status = int(args.func(args) or 0)
        finally:
            sys.setprofile(old)
    return trace, status, out.getvalue()


def report(trace: Trace) -> str:
    s = trace.summary()
    lines = [f"modules {s['modules']}, moves {s['moves']}, back up a level {s['back_up']}, sideways {s['sideways']}, "
             f"module pairs {s['module_pairs']}, calls across modules {s['crossings']}", "",
             "entries per module (distinct moves in):"]
    lines += [f"  {n:3d}  {m.removeprefix(SCOPE + '.')}" for m, n in trace.entries().items()]
    lines += ["", "moves (^ back up a level, ~ sideways):"] + [f"  {m}  x{n}" for m, n in trace.moves.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write the counts and moves here")
    parser.add_argument("deepcache_args", nargs="*",
                        help="after --: the eval arguments (default: " + " ".join(SMALLEST_EVAL[1:]) + ")")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    trace, status, _ = traced(("eval", *args.deepcache_args) if args.deepcache_args else SMALLEST_EVAL)
    if status != 0:
        print(f"deepcache eval exited with status {status}", file=sys.stderr)
        return status
    print(report(trace))
    if args.json is not None:
        args.json.write_text(json.dumps(trace.to_json(), indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's DeepCache
    sys.exit(main())
