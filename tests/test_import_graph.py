"""The package's imports run one way, and no module imports itself through others.

tsunagu is built in layers: the sans-I/O core (``stun``, then ``turn``) at the bottom, the
credential backends and configuration above it, the transports (the asyncio glue around the
core), the signaling server and the probe beside them, then the process wiring (``workers``,
``serve``) and the command line on top. A module may import from its own part and from parts
of a lower layer, never from a higher layer nor from another part of the same layer. And no
set of modules may import each other in a circle: a circle means two rooms that cannot be
understood, tested or changed one without the other.

The graph is read from the source with :mod:`ast`, so every import counts: at module level,
inside functions, and under ``if TYPE_CHECKING:`` (a type-only edge still ties the two
modules together; a ``Protocol`` in the lower module is the way to name what it needs).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "tsunagu"

# The first component below ``tsunagu`` (a subpackage or a top-level module) -> its layer.
LAYERS: dict[str, int] = {
    "stun": 0,
    "turn": 1,
    # Below config, which calls it: a pure reader of coturn's file format that imports
    # nothing of tsunagu.
    "coturn_config": 1,
    "config": 2,
    "logs": 2,
    "auth": 3,
    "tls": 3,
    # What a reload changes: a reading of two configurations, for the admin API and serve.
    "config_reload": 3,
    "acme_certificates": 3,
    "transport": 4,
    "signaling": 4,
    "probe": 4,
    "browser_policy": 4,
    "admin": 5,
    "workers": 5,
    "serve": 6,
    "cli": 7,
    "__main__": 8,
    "__init__": 8,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 2:
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> Iterator[tuple[str, int]]:
    """The tsunagu modules that ``name`` imports, with the line of each import."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    if name == "tsunagu.__init__":
        package = "tsunagu"
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "tsunagu":
                    yield _resolve(alias.name, known), node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if target.split(".")[0] != "tsunagu":
                continue
            for alias in node.names:
                # ``from . import native`` imports a module, not a name of the package.
                submodule = f"{target}.{alias.name}"
                yield _resolve(submodule if submodule in known else target, known), node.lineno


def _resolve(target: str, known: set[str]) -> str:
    while target not in known and "." in target:
        target = target.rpartition(".")[0]
    return target


def graph() -> dict[str, set[tuple[str, int]]]:
    modules = all_modules()
    known = set(modules) | {"tsunagu"}
    return {
        name: {(target, line) for target, line in imports_of(name, path, known) if target != name}
        for name, path in modules.items()
    }


def part_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the sets of modules that reach each other (size > 1 only)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                item = stack.pop()
                on_stack.discard(item)
                component.append(item)
                if item == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_the_graph_is_read() -> None:
    edges = graph()
    assert ("tsunagu.stun", 0) not in edges["tsunagu.turn.server"]
    targets = {target for target, _ in edges["tsunagu.turn.server"]}
    assert any(target.startswith("tsunagu.stun") for target in targets)


def test_no_import_circles() -> None:
    edges = {name: {target for target, _ in targets} for name, targets in graph().items()}
    circles = strongly_connected(edges)
    assert not circles, "modules that import each other in a circle: " + "; ".join(
        " <-> ".join(circle) for circle in circles
    )


def test_every_part_has_a_layer() -> None:
    missing = {part_of(name) for name in all_modules()} - LAYERS.keys()
    assert not missing, f"add these to LAYERS in {Path(__file__).name}: {sorted(missing)}"


def test_imports_run_down_the_layers() -> None:
    wrong = []
    for name, targets in graph().items():
        mine = part_of(name)
        for target, line in sorted(targets):
            theirs = part_of(target)
            if target == "tsunagu" or theirs == mine or theirs not in LAYERS:
                continue
            if LAYERS[theirs] >= LAYERS.get(mine, 99):
                wrong.append(f"{name}:{line} imports {target}")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from ..turn.server import TurnServer", "tsunagu.turn.server"),
        ("from . import relay", "tsunagu.transport.relay"),
        ("import tsunagu.stun.message", "tsunagu.stun.message"),
        ("from tsunagu.turn import Allocation", "tsunagu.turn"),
    ],
)
def test_import_forms_are_resolved(tmp_path: Path, source: str, expected: str) -> None:
    # Inside a function, resolved as if the file were tsunagu/transport/listeners.py.
    fake = tmp_path / "listeners.py"
    fake.write_text("if True:\n    def f() -> None:\n        " + source + "\n")
    known = set(all_modules())
    found = [target for target, _ in imports_of("tsunagu.transport.listeners", fake, known)]
    assert found == [expected], found


def test_a_circle_is_found() -> None:
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []
