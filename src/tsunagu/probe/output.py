"""How ``tsunagu probe stun`` and ``probe turn`` show what they find.

On a terminal, each step shows while it runs (``…``), with live counts during the relay
test, and is replaced by its outcome when it ends. Elsewhere (a pipe, a file, a CI log)
each step is one plain line once it has ended, so that the output reads the same in a log.
Then, for each URL, the verdict and what to do. ``--json`` prints nothing while running and
one JSON object at the end.
"""

from __future__ import annotations

import json
import shutil
from typing import IO, Any

from .checks import CheckResult, Step
from .verdicts import Verdict

__all__ = ["JsonOutput", "TextOutput", "json_report"]

_NAME_WIDTH = 16


def _ms(seconds: float) -> str:
    ms = seconds * 1000
    return f"{ms:.1f} ms" if ms < 100 else f"{ms:.0f} ms"


class TextOutput:
    """Steps as they run and verdicts, for a person; ``live`` redraws lines in place."""

    def __init__(self, stream: IO[str], *, live: bool) -> None:
        self.stream = stream
        self.live = live
        encoding = (getattr(stream, "encoding", None) or "ascii").lower()
        fancy = live and "utf" in encoding
        self.marks = ("✓", "✗", "…") if fancy else ("ok", "FAIL", "..")
        self._mark_width = max(len(mark) for mark in self.marks)
        self._current = ""

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def heading(self, text: str) -> None:
        self._write(f"{text}\n")

    def _line(self, mark: str, name: str, detail: str) -> str:
        return f"  {mark:<{self._mark_width}} {name:<{_NAME_WIDTH}} {detail}"

    def _live(self, line: str) -> str:
        """A line redrawn in place must not wrap: "\r" only returns to its last row."""
        width = shutil.get_terminal_size().columns - 1
        return line if len(line) <= width else line[: max(0, width - 1)] + "…"

    # Observer
    def begin(self, name: str, detail: str) -> None:
        self._current = name
        if self.live:
            self._write(self._live(self._line(self.marks[2], name, detail)))

    def progress(self, text: str) -> None:
        if self.live:
            self._write("\r\x1b[K" + self._live(self._line(self.marks[2], self._current, text)))

    def end(self, step: Step) -> None:
        mark = self.marks[0] if step.ok else self.marks[1]
        # A failure's sentence is the verdict, printed next: here only its code.
        detail = step.detail if step.ok else f"stopped: {step.code}"
        line = self._line(mark, step.name, f"{detail} ({_ms(step.seconds)})")
        self._write(("\r\x1b[K" if self.live else "") + line + "\n")

    def verdict(self, verdict: Verdict, *, label: str = "verdict", advice: bool = True) -> None:
        self._write(f"{label}: {verdict.sentence}\n")
        if advice and verdict.advice:
            self._write(f"what to do: {verdict.advice}\n")


class JsonOutput:
    """Quiet while running: the JSON object comes at the end."""

    def heading(self, text: str) -> None:
        pass

    def begin(self, name: str, detail: str) -> None:
        pass

    def progress(self, text: str) -> None:
        pass

    def end(self, step: Step) -> None:
        pass


def json_report(probe: str, results: list[CheckResult], verdict: Verdict) -> str:
    report: dict[str, Any] = {
        "probe": probe,
        "verdict": verdict.as_dict(),
        "results": [result.as_dict() for result in results],
    }
    return json.dumps(report, indent=2)
