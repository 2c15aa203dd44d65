"""The sdist and the wheels an operator installs: built with ``python -m build`` from this
checkout, installed into a fresh venv (no system site-packages; dependencies from the
package index, through pip's cache), then ``tsunagu version`` and a short ``tsunagu serve``
from it. The C relay path is optional: a wheel built with TSUNAGU_NO_EXTENSION=1 (as where
no compiler is) is pure Python and serves on the Python path.

About 70-100 s on a 2-core machine with pip's cache warm (sdist 8 s, each wheel 10-15 s,
the venv and its dependencies 30-50 s, the two serve starts 2 s each).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from support.interop import free_ports, relay_range
from tsunagu import __version__

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parents[1]
BUILD_TIMEOUT = 300
figures = logging.getLogger("figures")


def run(command: list[str], timeout: float = BUILD_TIMEOUT, **kwargs: object) -> str:
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, check=False, **kwargs
    )  # type: ignore[call-overload]
    assert done.returncode == 0, f"{command}:\n{done.stdout}\n{done.stderr}"
    return str(done.stdout)


def build(tmp: Path, what: list[str], source: Path, out: Path, **env: str) -> float:
    started = time.monotonic()
    environ = {**os.environ, **env}
    run([sys.executable, "-m", "build", *what, "--outdir", str(out), str(source)], env=environ)
    return time.monotonic() - started


def serve_once(tsunagu: Path, tmp: Path) -> str:
    """``tsunagu serve`` from the installed package on loopback until ready, then SIGTERM;
    what it printed."""
    web_port, turn_port, tls_port = free_ports(3)
    low, high = relay_range()
    out = tmp / "serve.out"
    command = [
        *(str(tsunagu), "serve", "-L", "127.0.0.1", "--listening-port", str(turn_port)),
        *("--tls-listening-port", str(tls_port), "--min-port", str(low), "--max-port", str(high)),
        *("--web-port", str(web_port), "--workers", "1", "--drain-timeout", "0"),
    ]
    env = dict(os.environ, XDG_STATE_HOME=str(tmp / "state"), PYTHONUNBUFFERED="1")
    with open(out, "wb") as sink:
        # From a directory where the checkout's package cannot be imported by accident.
        process = subprocess.Popen(
            command,
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=tmp,
        )
    try:
        deadline = time.monotonic() + 30
        while "tsunagu: ready" not in out.read_text() and time.monotonic() < deadline:
            assert process.poll() is None, out.read_text()
            time.sleep(0.05)
        assert "tsunagu: ready" in out.read_text(), out.read_text()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0, out.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=5)
    return out.read_text()


def test_sdist_and_wheels_install_and_serve(tmp_path: Path) -> None:
    dist, pure = tmp_path / "dist", tmp_path / "pure"
    times = {"sdist": build(tmp_path, ["--sdist"], ROOT, dist)}
    (sdist,) = dist.glob("tsunagu-*.tar.gz")
    # The wheels are built from the sdist, as pip does from PyPI: what the sdist lacks shows.
    times["wheel"] = build(tmp_path, ["--wheel"], sdist, dist)
    times["pure wheel"] = build(tmp_path, ["--wheel"], sdist, pure, TSUNAGU_NO_EXTENSION="1")

    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    for needed in (
        "src/tsunagu/transport/_fastpath.c",
        "src/tsunagu/transport/_fastpath.pyi",
        "src/tsunagu/web/static/index.html",
        "src/tsunagu/web/static/room.html",
        "src/tsunagu/web/static/test.html",
        "src/tsunagu/py.typed",
        "setup.py",
        "pyproject.toml",
        "README.md",
        "docs/DEPLOYMENT.md",
        "docs/SECURITY.md",
        "docs/SIGNALING.md",
        "contrib/tsunagu.service",
        "contrib/tsunagu.toml",
        "contrib/tsunagu.sysusers",
        "contrib/Dockerfile",
    ):
        assert needed in names, needed
    assert any(n.startswith("src/tsunagu/web/static/js/") for n in names), sorted(names)
    unwanted = [
        n
        for n in names
        if n.startswith(("tests/", "bench/", ".venv/", ".ci/"))
        or n.endswith((".so", ".pyc"))
        or "__pycache__" in n
    ]
    assert not unwanted, unwanted

    (wheel,) = dist.glob("tsunagu-*.whl")
    (pure_wheel,) = pure.glob("tsunagu-*.whl")
    assert pure_wheel.name == f"tsunagu-{__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        inside = archive.namelist()
    assert any(n.startswith("tsunagu/transport/_fastpath") and n.endswith(".so") for n in inside)
    assert "tsunagu/web/static/room.html" in inside
    assert not [n for n in inside if n.startswith(("tests/", "bench/"))]
    with zipfile.ZipFile(pure_wheel) as archive:
        assert not [n for n in archive.namelist() if n.endswith(".so")]

    started = time.monotonic()
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    pip = [
        str(venv / "bin" / "python"),
        "-m",
        "pip",
        "install",
        "-q",
        "--disable-pip-version-check",
    ]
    run([*pip, str(wheel)])
    times["venv and install"] = time.monotonic() - started
    tsunagu = venv / "bin" / "tsunagu"
    assert run([str(tsunagu), "version"], cwd=tmp_path).strip().endswith(__version__)
    # The venv sees its own installation, not this checkout.
    where = run([str(venv / "bin" / "python"), "-c", "import tsunagu; print(tsunagu.__file__)"])
    assert where.startswith(str(venv)), where
    (tmp_path / "native").mkdir()
    printed = serve_once(tsunagu, tmp_path / "native")
    assert "relay path: native" in printed, printed

    started = time.monotonic()
    run([*pip, "--force-reinstall", "--no-deps", str(pure_wheel)])
    times["pure reinstall"] = time.monotonic() - started
    (tmp_path / "pure-serve").mkdir()
    printed = serve_once(tsunagu, tmp_path / "pure-serve")
    # Without the C extension the engine selection falls back to the Python path.
    assert "relay path: python" in printed, printed
    figures.info("packaging times (s): %s", {k: round(v, 1) for k, v in times.items()})
