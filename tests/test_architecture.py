"""The package shows its architecture: the library never imports the tools, no command imports another command, and
no module imports, even lazily, a module that imports it back (checked on the source, every import statement that
runs: those under ``if TYPE_CHECKING:`` only name types for the type checker)."""

from __future__ import annotations

import ast
from pathlib import Path

import DeepCache

PACKAGE = Path(DeepCache.__file__).parent
#: The commands of ``deepcache``: a module, or every module under a subpackage.
COMMANDS = ("DeepCache.tools.bench", "DeepCache.tools.demo", "DeepCache.tools.evaluate", "DeepCache.tools.generate",
            "DeepCache.tools.tune", "DeepCache.tools.demo_model.train",
            "DeepCache.tools.demo_model.train_dit")


def _name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every DeepCache module ``path`` imports, at the top or inside a function."""
    name, found = _name(path), set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in _executed(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("DeepCache")}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[: len(base) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            if not module.startswith("DeepCache"):
                continue
            for alias in node.names:  # `from . import calibration` names a module
                candidate = f"{module}.{alias.name}"
                found.add(candidate if _module_path(candidate) else module)
    return {m for m in found if _module_path(m)} - {name}


def _type_checking_only(node: ast.AST) -> bool:
    test = getattr(node, "test", None) if isinstance(node, ast.If) else None
    return isinstance(test, ast.Name) and test.id == "TYPE_CHECKING" or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _executed(tree: ast.AST):
    """Every node of ``tree`` except the bodies of ``if TYPE_CHECKING:`` (their ``else`` runs)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        children = node.orelse if _type_checking_only(node) else list(ast.iter_child_nodes(node))
        stack.extend(children)


def _module_path(name: str) -> Path | None:
    base = PACKAGE.parent.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


GRAPH = {_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def _command(module: str) -> str | None:
    return next((c for c in COMMANDS if module == c or module.startswith(c + ".")), None)


def test_the_library_never_imports_the_tools() -> None:
    library = {m: deps for m, deps in GRAPH.items() if not m.startswith("DeepCache.tools")}
    assert "DeepCache.helper" in library and "DeepCache.schedules.schedule" in library
    offenders = {m: sorted(d for d in deps if d.startswith("DeepCache.tools")) for m, deps in library.items()
                 if m != "DeepCache.__main__"}  # `python -m DeepCache` is the command line's door
    assert {m: d for m, d in offenders.items() if d} == {}


def test_no_command_imports_another_command() -> None:
    assert {_command(m) for m in GRAPH} >= set(COMMANDS)
    assert {"DeepCache.tools.quality", "DeepCache.tools.runs"} <= GRAPH["DeepCache.tools.demo"]  # the graph is read
    assert {"DeepCache.tools.tune.calibrated", "DeepCache.tools.runs"} <= GRAPH["DeepCache.tools.tune.search"]
    assert {"DeepCache.schedules.calibration", "DeepCache.schedules.forecast_calibration"} <= GRAPH["DeepCache.tools.tune.calibrated"]
    crossings = sorted((m, d) for m, deps in GRAPH.items() for d in deps
                       if _command(m) and _command(d) and _command(m) != _command(d))
    assert crossings == []
    # ... and the command line, which registers them all, is the only module that names each of them
    shared = sorted((m, d) for m, deps in GRAPH.items() for d in deps
                    if _command(m) is None and _command(d) and m not in ("DeepCache.tools.cli",))
    assert shared == []


def test_no_import_cycles() -> None:
    cycles, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for dep in sorted(GRAPH.get(module, ())):
            if state.get(dep) == "open":
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    # a package's __init__ re-exporting its own modules is not a cycle between modules
    cycles = [c for c in cycles if not (len(c) == 3 and c[0] == c[2] and c[1].startswith(c[0] + "."))]
    assert cycles == []


def test_the_library_keeps_at_most_eight_modules_at_its_top() -> None:
    """Grow by rooms: the schedule cluster and each denoiser family are packages, not more top-level modules."""
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 8, top
    for package in ("schedules", "engine", "engine/unet", "engine/transformer", "tools"):
        assert (PACKAGE / package / "__init__.py").is_file(), package
