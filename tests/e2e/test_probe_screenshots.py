"""Pictures of ``tsunagu probe`` in a terminal, for the README.

Each probe runs on a real terminal: a detached tmux session of fixed size (a private tmux
server, ``tmux -L`` with a name of this run, killed by that name afterwards), against a real
``tsunagu serve --rfc5780`` on 127.0.0.1 and 127.0.0.2. When it has ended, ``tmux
capture-pane -e -p`` gives the screen with its ANSI colours, which become HTML spans in a
page that Chromium renders and screenshots. The test checks the captured screens (the steps
with their terminal marks, the verdicts) and the pictures; they are written into docs/ only
when asked (``TSUNAGU_UPDATE_SCREENSHOTS=1``), so that a test run leaves the checkout as it
was:

- docs/probe-turn-ok.png: ``probe turn`` over UDP that works;
- docs/probe-turn-wrong-password.png: the same with a wrong password;
- docs/probe-nat.png: ``probe nat`` with the binding lifetime test;
- docs/probe-nat-symmetric.png: ``probe nat`` behind a symmetric NAT, in the namespaces of
  tests/support/natlab.py (the probe runs in the client's namespace, the server on the lab's
  "internet").
"""

from __future__ import annotations

import html
import os
import re
import secrets
import shlex
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.browser import ROOT, chromium
from support.interop import HOST, PASSWORD, USER, ServeProcess, run_serve
from support.natlab import PORT, SERVER, nat_lab, serve_in

pytestmark = pytest.mark.e2e

UPDATE_SCREENSHOTS = os.environ.get("TSUNAGU_UPDATE_SCREENSHOTS") == "1"
HOST2 = "127.0.0.2"
COLUMNS, ROWS = 120, 22
PROBE_TIMEOUT = 60.0

# The 16 colours of the terminal's palette (xterm's), for SGR 30-37 and 90-97.
_PALETTE = [
    "#2e3436", "#ef2929", "#8ae234", "#fce94f", "#729fcf", "#ad7fa8", "#34e2e2", "#d3d7cf",
    "#555753", "#ff6b6b", "#b5f56e", "#fff48f", "#9ec5f0", "#d7a9cf", "#7ff7f7", "#eeeeec",
]  # fmt: skip
_FOREGROUND, _BACKGROUND = "#d3d7cf", "#1e1e1e"
_SGR = re.compile(r"\x1b\[([0-9;]*)m")
TITLES = {
    "probe-turn-ok": "tsunagu probe turn: a server that works",
    "probe-turn-wrong-password": "tsunagu probe turn: a wrong password",
    "probe-nat": "tsunagu probe nat: no NAT (a server on loopback)",
    "probe-nat-symmetric": "tsunagu probe nat: behind a symmetric NAT (nftables masquerade "
    "fully-random)",
}
PROMPT = "\\033[1;32muser@host\\033[0m:\\033[1;34m~\\033[0m$ %s\\n"  # printf's format


def _colour(codes: list[int], i: int) -> tuple[str | None, int]:
    """A 38;5;N or 38;2;R;G;B colour starting at ``codes[i]`` (the 5 or 2), and its length."""
    if i < len(codes) and codes[i] == 5 and i + 1 < len(codes):
        n = codes[i + 1]
        if n < 16:
            return _PALETTE[n], 2
        if n < 232:
            n -= 16
            steps = [0, 95, 135, 175, 215, 255]
            return f"#{steps[n // 36]:02x}{steps[n // 6 % 6]:02x}{steps[n % 6]:02x}", 2
        grey = 8 + (n - 232) * 10
        return f"#{grey:02x}{grey:02x}{grey:02x}", 2
    if i < len(codes) and codes[i] == 2 and i + 3 < len(codes):
        r, g, b = codes[i + 1 : i + 4]
        return f"#{r:02x}{g:02x}{b:02x}", 4
    return None, 1


def ansi_to_html(text: str) -> str:
    """Terminal text with SGR sequences as HTML spans (bold, colours, reverse)."""
    out: list[str] = []
    fg: str | None = None
    bg: str | None = None
    bold = False
    opened = False
    position = 0
    for match in _SGR.finditer(text):
        out.append(html.escape(text[position : match.start()]))
        position = match.end()
        codes = [int(part) if part else 0 for part in match.group(1).split(";")]
        i = 0
        while i < len(codes):
            code = codes[i]
            if code == 0:
                fg, bg, bold = None, None, False
            elif code == 1:
                bold = True
            elif code == 22:
                bold = False
            elif 30 <= code <= 37 or 90 <= code <= 97:
                fg = _PALETTE[code - 30 if code < 90 else code - 90 + 8]
            elif 40 <= code <= 47 or 100 <= code <= 107:
                bg = _PALETTE[code - 40 if code < 100 else code - 100 + 8]
            elif code == 39:
                fg = None
            elif code == 49:
                bg = None
            elif code in (38, 48):
                colour, used = _colour(codes, i + 1)
                if code == 38:
                    fg = colour
                else:
                    bg = colour
                i += used
            i += 1
        if opened:
            out.append("</span>")
            opened = False
        style = ";".join(
            part
            for part in (
                f"color:{fg}" if fg else "",
                f"background:{bg}" if bg else "",
                "font-weight:bold" if bold else "",
            )
            if part
        )
        if style:
            out.append(f'<span style="{style}">')
            opened = True
    out.append(html.escape(text[position:]))
    if opened:
        out.append("</span>")
    return "".join(out)


def page(screen: str, title: str) -> str:
    return (
        "<!doctype html><html><head><meta charset='utf-8'><style>"
        "body{margin:0;background:#fff}"
        f"#term{{display:inline-block;margin:0;background:{_BACKGROUND};color:{_FOREGROUND};"
        "border-radius:6px;overflow:hidden;font:14px/1.3 'DejaVu Sans Mono',monospace}"
        "#bar{background:#3a3a3a;color:#bbb;padding:4px 10px;font:12px sans-serif}"
        f"pre{{margin:0;padding:10px 12px;white-space:pre;font:inherit;width:{COLUMNS}ch}}"
        f"</style></head><body><div id='term'><div id='bar'>{html.escape(title)}</div>"
        f"<pre>{ansi_to_html(screen)}</pre></div></body></html>"
    )


class Terminal:
    """A private tmux server; each shot is one detached session of COLUMNS x ROWS."""

    def __init__(self, tmp: Path) -> None:
        tmux = shutil.which("tmux")
        assert tmux is not None, "tmux is not installed: run ./scripts/setup --test"
        self.tmux = tmux
        self.socket = f"tsunagu-shots-{secrets.token_hex(4)}"
        self.tmp = tmp
        self.count = 0

    def _run(self, *args: str) -> str:
        done = subprocess.run(
            [self.tmux, "-L", self.socket, "-f", "/dev/null", *args],
            capture_output=True,
            timeout=20,
            stdin=subprocess.DEVNULL,
        )
        assert done.returncode == 0, (args, done.stderr.decode(errors="replace"))
        return done.stdout.decode(errors="replace")

    def shot(self, argv: list[str], wrap: tuple[str, ...] = ()) -> str:
        """Run ``tsunagu ...argv`` after a coloured prompt; the screen once it has ended.

        ``wrap`` goes in front of the command (``ip netns exec NS``) but is not shown.
        """
        self.count += 1
        name = f"shot{self.count}"
        marker = self.tmp / f"{name}.done"
        shown = "tsunagu " + shlex.join(argv)
        command = " ".join(
            [
                f"printf {shlex.quote(PROMPT)} {shlex.quote(shown)};",
                shlex.join([*wrap, sys.executable, "-m", "tsunagu", *argv]) + ";",
                f"echo $? > {shlex.quote(str(marker))};",
                "sleep 120",
            ]
        )
        self._run(
            "new-session", "-d", "-s", name, "-x", str(COLUMNS), "-y", str(ROWS),
            "-e", "LANG=C.UTF-8", "-e", "TERM=xterm-256color", "sh", "-c", command,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + PROBE_TIMEOUT
            while not marker.exists() or not marker.read_text().strip():
                assert time.monotonic() < deadline, self._run("capture-pane", "-p", "-t", name)
                time.sleep(0.1)
            return self._run("capture-pane", "-e", "-p", "-t", name)
        finally:
            self._run("kill-session", "-t", name)

    def close(self) -> None:
        subprocess.run(
            [self.tmux, "-L", self.socket, "kill-server"], capture_output=True, timeout=20
        )


@pytest.fixture
def terminal(tmp_path: Path) -> Iterator[Terminal]:
    term = Terminal(tmp_path)
    try:
        yield term
    finally:
        term.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServeProcess]:
    with run_serve(tmp_path / "serve", "--rfc5780", hosts=(HOST, HOST2)) as serve:
        yield serve


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack("!II", data[16:24])
    return int(width), int(height)


async def test_probe_screenshots(tmp_path: Path, terminal: Terminal, server: ServeProcess) -> None:
    turn = f"turn:{HOST}:{server.port}?transport=udp"
    shots = {
        "probe-turn-ok": ["probe", "turn", turn, "-u", f"{USER}:{PASSWORD}", "--seconds", "1"],
        "probe-turn-wrong-password": ["probe", "turn", turn, "-u", f"{USER}:wrong"],
        "probe-nat": ["probe", "nat", f"stun:{HOST}:{server.port}", "--lifetime-max", "2"],
    }
    screens = {name: terminal.shot(argv) for name, argv in shots.items()}
    with nat_lab(tmp_path, "symmetric") as (inet, _, cli), serve_in(inet, tmp_path / "lab"):
        argv = ["probe", "nat", f"stun:{SERVER}:{PORT}", "--timeout", "1.5"]
        screens["probe-nat-symmetric"] = terminal.shot(argv, wrap=("ip", "netns", "exec", cli))
        shots["probe-nat-symmetric"] = argv
    plain = {name: re.sub(r"\x1b\[[0-9;]*m", "", screen) for name, screen in screens.items()}
    ok, wrong, nat = plain["probe-turn-ok"], plain["probe-turn-wrong-password"], plain["probe-nat"]
    # A terminal: the marks of a live display, and the prompt in colour.
    assert "✓ relay test" in ok and "verdict: TURN over UDP works" in ok, ok
    assert "✗ allocate" in wrong and "stopped: wrong-password" in wrong, wrong
    assert "verdict: The server refused the password for user alice" in wrong, wrong
    assert "✓ filtering" in nat and "✓ lifetime" in nat, nat
    assert "verdict: No NAT: this host has a public address" in nat, nat
    symmetric = plain["probe-nat-symmetric"]
    assert "a new mapping per destination" in symmetric, symmetric
    assert "verdict: Symmetric NAT (address-and-port-dependent mapping" in symmetric, symmetric
    assert all("\x1b[" in screen for screen in screens.values()), screens
    out_dir = ROOT / "docs" if UPDATE_SCREENSHOTS else tmp_path
    async with chromium() as browser:
        for name, screen in screens.items():
            tab = await browser.new_page(device_scale_factor=1)
            title = TITLES[name]
            await tab.set_content(page(screen.strip("\n") + "\n", title))
            await tab.locator("#term").screenshot(path=str(out_dir / f"{name}.png"))
            await tab.close()
    for name in shots:
        width, height = png_size(out_dir / f"{name}.png")
        assert width > 800 and 150 < height < 900, f"{name}.png is {width}x{height}"
