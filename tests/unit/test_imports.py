"""Arrows point down: every module of scaletrain imports only its own room or rooms below it,
and no modules import each other in a cycle. Imports inside functions count like the others.

The order of the rooms is written once, in docs/architecture.md (the line starting with
"rooms:"); this test reads it. Each name there is a top-level package or module of scaletrain;
names joined by "|" share a room.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "scaletrain"


def _rooms() -> list[set[str]]:
    lines = [ln.strip() for ln in (REPO / "docs" / "architecture.md").read_text().splitlines()]
    (line,) = [ln for ln in lines if ln.startswith("rooms:")]
    return [{name.strip() for name in room.split("|")} for room in line.removeprefix("rooms:").split(">")]


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[int, str]]:
    """(line, scaletrain module) of every import in `path`, at any depth; `from pkg import mod`
    counts as an import of the submodule, `from pkg import name` of the package."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((node.lineno, sub if sub in modules else base))
    return [(line, name) for line, name in found if name == "scaletrain" or name.startswith("scaletrain.")]


def _room_of(module: str, rooms: list[set[str]]) -> int | None:
    parts = module.split(".")
    if len(parts) == 1:
        return None  # the package root
    index = [i for i, room in enumerate(rooms) if parts[1] in room]
    assert index, f"{module}: scaletrain.{parts[1]} is in no room of docs/architecture.md's 'rooms:' line"
    return index[0]


def test_every_top_level_module_has_exactly_one_room():
    rooms = _rooms()
    names = [name for room in rooms for name in room]
    assert len(names) == len(set(names)), f"a name appears in two rooms: {names}"
    top = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"} | {
        p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert top == set(names), f"modules without a room: {sorted(top - set(names))}; rooms without a module: " \
                              f"{sorted(set(names) - top)}"


def test_no_room_imports_a_room_above_it():
    rooms, modules = _rooms(), _modules()
    upward = []
    for module, path in modules.items():
        source = _room_of(module, rooms)
        for line, target in _imports(module, path, modules):
            to = _room_of(target, rooms)
            if source is None or to is None:
                assert source is not None, f"the package root imports {target} (line {line}): keep it empty"
                assert to is not None, f"{module}:{line} imports the package root"
            elif to < source:
                upward.append(f"{path.relative_to(REPO)}:{line} ({'|'.join(sorted(rooms[source]))}) imports "
                              f"{target} ({'|'.join(sorted(rooms[to]))})")
    assert not upward, "imports pointing up:\n" + "\n".join(upward)


def test_no_import_cycles_between_modules():
    modules = _modules()
    graph = {m: {t for _, t in _imports(m, p, modules) if t != m} for m, p in modules.items()}
    cycles, done, stack = [], set(), []

    def visit(m: str) -> None:  # depth-first; a module met again on the current path closes a cycle
        if m in stack:
            cycles.append(" -> ".join(stack[stack.index(m):] + [m]))
            return
        if m in done:
            return
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            visit(t)
        stack.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_architecture_page_lists_every_module():
    """docs/architecture.md's module table names every module (a package's __init__.py when it
    defines functions or classes), as `room/file.py`."""
    text = (REPO / "docs" / "architecture.md").read_text()
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if path.name == "__init__.py" and (path.parent == PACKAGE or not any(
                isinstance(n, (ast.FunctionDef, ast.ClassDef)) for n in ast.parse(path.read_text()).body)):
            continue
        if f"`{rel}`" not in text:
            missing.append(rel)
    assert not missing, f"docs/architecture.md does not list: {missing}"
