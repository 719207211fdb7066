"""How far one ``deepcache eval`` carries its arguments through the tools (tools/eval_trace.py, on the embedded demo
model): the counts are bounded, so the design cannot silently grow back, and the pipeline's kind is decided once,
at load, and passed down.

Measured with tools/eval_trace.py (modules / distinct moves / back up a level): before the kinds (3e53576~1)
14 / 53 / 0; with ``kind_of`` asked from six modules (main at b8e446c) 17 / 73 / 2; the kind decided at load and
passed down 16 / 57 / 0. The bounds are those counts: a change that adds a move must say why here.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from DeepCache.tools.demo_model import EMBEDDED_CLASSIFIER, EMBEDDED_MODEL

ROOT = Path(__file__).resolve().parents[1]
needs_model = pytest.mark.skipif(not (EMBEDDED_MODEL / "model_index.json").is_file(),
                                 reason="embedded demo model not built")

#: Upper bounds on the smallest ``deepcache eval`` (tools/eval_trace.py: SMALLEST_EVAL).
MAX_MODULES, MAX_MOVES, MAX_BACK_UP = 16, 57, 0


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("eval_trace", ROOT / "tools" / "eval_trace.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script() -> ModuleType:
    return _script()


@pytest.fixture(scope="module")
def traced(script: ModuleType) -> tuple[Any, int, str]:
    """The smallest eval, traced; LPIPS off, as on a machine without its weights (with them, scoring adds moves)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("DeepCache.tools.scoring.lpips_model", lambda: None)
        return script.traced()


def test_back_up_and_sideways_are_told_by_the_dotted_depth(script: ModuleType) -> None:
    def move(a: str, b: str) -> Any:
        return script.Move(f"DeepCache.tools.{a}", "f", f"DeepCache.tools.{b}", "g")

    assert move("kinds.unet", "pipelines").back_up and move("kinds.unet", "demo_model").back_up
    assert not move("pipelines", "kinds.base").back_up and not move("quality", "runs").back_up
    assert move("kinds.unet", "demo_model.data").sideways and not move("kinds.unet", "kinds.base").sideways
    assert str(move("kinds.unet", "pipelines")) == "kinds.unet:f ^ pipelines:g"


@needs_model
def test_the_smallest_eval_runs_and_reports(traced: tuple[Any, int, str]) -> None:
    _, status, out = traced
    lines = out.splitlines()
    assert status == 0
    assert lines[0] == ("embedded demo model (offline); 2 DDIMScheduler steps, 1 prompts, guidance 4.0, 1 CPU "
                        "thread(s), cpu float32")
    assert [line.split(" | ")[0] for line in lines[3:5]] == ["| original", "| I=3, B=0"]


@needs_model
def test_eval_carries_its_arguments_through_few_modules_and_never_back_up(traced: tuple[Any, int, str]) -> None:
    trace = traced[0]
    summary = trace.summary()
    assert summary["modules"] <= MAX_MODULES, sorted(trace.modules)
    assert summary["moves"] <= MAX_MOVES, "\n".join(map(str, trace.moves))
    assert summary["back_up"] <= MAX_BACK_UP, [str(m) for m in trace.back_up]
    assert "DeepCache.tools.pipelines" not in {m.caller_module for m in trace.moves}  # a leaf: asks no one


@needs_model
def test_the_kind_is_decided_once_at_load_and_passed_down(traced: tuple[Any, int, str]) -> None:
    """One kind is made (by load_kind), none is decided again from a bare pipeline, and no module asks the demo
    model's package whether the pipeline is a demo model: the kind knew at load."""
    moves = traced[0].moves
    made = sum(n for m, n in moves.items() if m.callee == "PipelineKind.__init__")
    assert made == 1
    assert [str(m) for m in moves if m.caller == "kind_of"] == []  # kind_of only ever handed back a kind
    assert [str(m) for m in moves if m.callee_module == "DeepCache.tools.demo_model"] == []
    loads = [str(m) for m in moves if m.callee == "load_kind"]
    assert loads == ["cli_common:kind_from_args -> kinds:load_kind"]


@needs_model
def test_a_kind_knows_at_load_what_it_is() -> None:
    """The embedded model loaded by name and the same pipeline handed over bare (its folder says) are the same kind."""
    from DeepCache.tools.kinds import UNetKind, kind_of, load_kind

    loaded = load_kind()
    bare = kind_of(loaded.pipe)
    for kind in (loaded, bare):
        assert isinstance(kind, UNetKind) and kind.embedded and kind.default_batch_size == 16
        assert kind.classifier == EMBEDDED_CLASSIFIER and kind.source == str(EMBEDDED_MODEL)
    assert bare is not loaded and kind_of(loaded) is loaded
