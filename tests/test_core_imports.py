"""The sans-I/O core imports no I/O, clock or randomness module.

The STUN codec, the TURN state machine and the room logic take the current time and random
bytes as arguments. That keeps them deterministic under test and lets every transport drive
them the same way. This test reads their source with :mod:`ast` and fails on any import of a
module that would let them reach the network, the clock, a thread or a random source.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

FORBIDDEN = frozenset(
    {
        "asyncio",
        "socket",
        "selectors",
        "ssl",
        "uvloop",
        "aiohttp",
        "time",
        "random",
        "secrets",
        "threading",
        "datetime",
    }
)
CORE_PACKAGES = ("src/tsunagu/stun", "src/tsunagu/turn")
CORE_FILES = (
    "src/tsunagu/signaling/rooms.py",
    "src/tsunagu/signaling/access.py",
)  # checked when present
DYNAMIC_IMPORTERS = frozenset({"__import__", "import_module"})


@dataclass(frozen=True)
class Violation:
    filename: str
    line: int
    module: str

    def __str__(self) -> str:
        return f"{self.filename}:{self.line}: imports {self.module}"


def _top(module: str) -> str:
    return module.split(".", 1)[0]


def find_violations(source: str, filename: str = "<source>") -> list[Violation]:
    """Every import of a FORBIDDEN module (or a submodule of one) in ``source``.

    Covers ``import m``, ``import m.sub as x``, ``from m import y``, ``from m.sub import y``
    and the dynamic forms ``__import__("m")`` / ``importlib.import_module("m")`` with a
    literal name. Relative imports stay inside tsunagu and are not judged here.
    """
    found: list[Violation] = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if not isinstance(node, ast.stmt | ast.expr):
            continue
        modules: list[str] = []
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            first = node.args[0]
            if (
                name in DYNAMIC_IMPORTERS
                and isinstance(first, ast.Constant)
                and isinstance(first.value, str)
            ):
                modules = [first.value]
        found += [
            Violation(filename, node.lineno, module)
            for module in modules
            if _top(module) in FORBIDDEN
        ]
    return found


def core_files(root: Path) -> list[Path]:
    files: list[Path] = []
    for package in CORE_PACKAGES:
        files += sorted((root / package).rglob("*.py"))
    files += [root / name for name in CORE_FILES if (root / name).is_file()]
    return files


# --- the rule applied to the real core ------------------------------------------------------


def test_core_packages_exist(repo_root: Path) -> None:
    # A scan of nothing would pass vacuously; the core must be where this test looks.
    for package in CORE_PACKAGES:
        assert (repo_root / package / "__init__.py").is_file(), package
        assert any(p.name != "__init__.py" for p in (repo_root / package).rglob("*.py")), package


def test_core_imports_no_io_clock_or_randomness(repo_root: Path) -> None:
    files = core_files(repo_root)
    violations = [
        str(v)
        for path in files
        for v in find_violations(path.read_text(encoding="utf-8"), str(path.relative_to(repo_root)))
    ]
    assert not violations, (
        "the sans-I/O core must get time and randomness as arguments:\n" + "\n".join(violations)
    )


# --- the scanner itself ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "module"),
    [
        ("import asyncio\n", "asyncio"),
        ("import os, socket\n", "socket"),
        ("import time as clock\n", "time"),
        ("from datetime import datetime\n", "datetime"),
        ("from asyncio.events import AbstractEventLoop\n", "asyncio.events"),
        ("import concurrent.futures, threading\n", "threading"),
        ("def f():\n    import random\n    return random.random()\n", "random"),
        ("try:\n    import uvloop\nexcept ImportError:\n    pass\n", "uvloop"),
        ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import ssl\n", "ssl"),
        ("import aiohttp.web\n", "aiohttp.web"),
        ("from secrets import token_bytes\n", "secrets"),
        ("import selectors\n", "selectors"),
        ("x = __import__('time')\n", "time"),
        ("import importlib\nm = importlib.import_module('socket')\n", "socket"),
    ],
)
def test_scanner_detects_forbidden_imports(source: str, module: str) -> None:
    violations = find_violations(source, "synthetic.py")
    assert [v.module for v in violations] == [module]
    assert str(violations[0]).startswith("synthetic.py:")


@pytest.mark.parametrize(
    "source",
    [
        "import os\nimport hmac, hashlib, struct\n",
        "from collections.abc import Callable\nfrom dataclasses import dataclass\n",
        "from . import time\nfrom .asyncio import x\n",  # relative: tsunagu's own modules
        "import timeit\nimport sockets_helper\n",  # names that merely start alike
        "from tsunagu.stun.message import Message\n",
        "time = 5\nrandom_bytes = b''\n",
        "def f(now: float, rand: bytes) -> float:\n    return now\n",
    ],
)
def test_scanner_accepts_clean_source(source: str) -> None:
    assert find_violations(source) == []


def test_scanner_reports_every_violation_with_its_line() -> None:
    source = "import hmac\nimport time\n\nfrom socket import AF_INET\n"
    assert [str(v) for v in find_violations(source, "core.py")] == [
        "core.py:2: imports time",
        "core.py:4: imports socket",
    ]


def test_scan_of_a_tree_finds_a_planted_violation(tmp_path: Path) -> None:
    # The same walk as the real test, over a copy with one bad module added.
    for package in CORE_PACKAGES:
        (tmp_path / package).mkdir(parents=True)
        (tmp_path / package / "__init__.py").write_text('"""Clean."""\n')
    bad = tmp_path / CORE_PACKAGES[1] / "deep" / "clock.py"
    bad.parent.mkdir()
    bad.write_text("import hashlib\nfrom time import monotonic\n")
    rooms = tmp_path / CORE_FILES[0]
    rooms.parent.mkdir(parents=True)
    rooms.write_text("import asyncio\n")
    files = core_files(tmp_path)
    assert bad in files and rooms in files
    found = [v for path in files for v in find_violations(path.read_text(), path.name)]
    assert [(v.filename, v.line, v.module) for v in found] == [
        ("clock.py", 2, "time"),
        ("rooms.py", 1, "asyncio"),
    ]
