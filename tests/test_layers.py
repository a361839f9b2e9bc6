"""The house keeps its shape: every import in the package (lazy ones inside functions included)
runs down the declared layers, no module imports its way back to itself, no module passes 400
lines and no class 200 lines of logic. The layers are declared in ``batchkimi.LAYERS``; this
test reads the code, so a new import that runs upward fails here, naming both files."""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

import pytest

import batchkimi

PKG = Path(batchkimi.__file__).resolve().parent


def modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = ["batchkimi", *p.relative_to(PKG).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = modules()


def imports_of(name: str, path: Path) -> set[str]:
    """The package modules ``name`` imports, at any depth of its code."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                mod = ".".join(anchor + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            subs = [f"{mod}.{a.name}" for a in node.names]
            # `from .. import kimi` imports the module kimi, not the package's face
            targets = subs if all(t in MODULES for t in subs) else [mod, *subs]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        found |= {t for t in targets if t in MODULES and t != name}
    return found


def room(module: str) -> str:
    """``batchkimi.execution.run`` -> ``execution``; ``batchkimi.kimi`` -> ``kimi``; the package -> ``batchkimi``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "batchkimi"


LAYER_OF = {r: i for i, rooms in enumerate(batchkimi.LAYERS) for r in rooms}


def test_every_module_has_a_declared_room() -> None:
    missing = sorted({room(m) for m in MODULES} - set(LAYER_OF) - set(batchkimi.APART))
    assert not missing, f"rooms with no layer in batchkimi.LAYERS: {missing}"


def test_imports_run_down_the_layers() -> None:
    """A module imports its own room, lower layers, and nothing beside or above it; the
    simulator (a product of its own) takes only the foundation and is imported only by the doors."""
    wrong = []
    for name, path in MODULES.items():
        mine = room(name)
        for target in imports_of(name, path):
            theirs = room(target)
            if mine == theirs or (mine == "batchkimi" and name == "batchkimi"):
                continue
            if mine in batchkimi.APART or theirs in batchkimi.APART:
                allowed = (theirs in batchkimi.LAYERS[0] if mine in batchkimi.APART
                           else mine in batchkimi.APART[theirs])
                if not allowed:
                    wrong.append(f"{path.relative_to(PKG)} imports {target} ({mine} -> {theirs}, kept apart)")
                continue
            if LAYER_OF[theirs] >= LAYER_OF[mine]:
                where = "beside" if LAYER_OF[theirs] == LAYER_OF[mine] else "above"
                wrong.append(f"{path.relative_to(PKG)} imports {target}: {theirs} is {where} {mine}")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles() -> None:
    graph = {name: {t for t in imports_of(name, path)
                    # a package's face importing its own children is no cycle of interest
                    if not (path.name == "__init__.py" and t.startswith(name + "."))}
             for name, path in MODULES.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def logic_lines(src: str, node: ast.AST) -> int:
    """Lines holding code: no blank lines, comments or docstrings."""
    docs: set[int] = set()
    for sub in ast.walk(node):
        body = getattr(sub, "body", None)
        if isinstance(sub, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Module) and body:
            first = body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                docs.update(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    lines = src.splitlines(keepends=True)[node.lineno - 1: node.end_lineno]  # type: ignore[attr-defined]
    code: set[int] = set()
    skip = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER)
    for tok in tokenize.generate_tokens(io.StringIO("".join(lines)).readline):
        if tok.type not in skip:
            code.update(ln + node.lineno - 1 for ln in range(tok.start[0], tok.end[0] + 1))  # type: ignore[attr-defined]
    return len(code - docs)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_rooms_stay_small(name: str) -> None:
    path = MODULES[name]
    src = path.read_text(encoding="utf-8")
    assert len(src.splitlines()) <= 400, f"{path.relative_to(PKG)} has {len(src.splitlines())} lines: it holds two ideas"
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.ClassDef):
            n = logic_lines(src, node)
            assert n <= 200, f"class {node.name} in {path.relative_to(PKG)} has {n} lines of logic"


def test_every_room_says_what_it_owns() -> None:
    """Each subpackage opens with a docstring saying what it owns and what it may import."""
    silent = [str(p.relative_to(PKG)) for p in PKG.glob("*/__init__.py")
              if not (ast.get_docstring(ast.parse(p.read_text(encoding="utf-8"))) or "").strip()]
    assert not silent, silent
