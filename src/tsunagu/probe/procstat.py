"""CPU time and memory of a process (and its children) from Linux's /proc.

A server's cost is measured as the CPU time the kernel charged to it (user + system, all
threads), not as wall time: on a shared machine only that is comparable between runs and
between servers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["ProcessSample", "descendants", "sample"]

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass(frozen=True, slots=True)
class ProcessSample:
    cpu_seconds: float  # utime + stime of the process tree
    rss_bytes: int  # resident set of the process tree
    processes: int


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (threads are part of their process already)."""
    found = [pid]
    index = 0
    while index < len(found):
        current = found[index]
        index += 1
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{current}/task/{task}/children") as fh:
                    found.extend(int(child) for child in fh.read().split())
            except (OSError, ValueError):
                continue
    return found


def _cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as fh:
        raw = fh.read()
    # The command name may hold spaces and parentheses: split after the last ')'.
    fields = raw[raw.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm", "rb") as fh:
        return int(fh.read().split()[1]) * _PAGE


def sample(pid: int) -> ProcessSample:
    """CPU seconds and RSS of ``pid`` and its descendants; raises OSError if it is gone."""
    cpu = _cpu(pid)
    rss = _rss(pid)
    count = 1
    for child in descendants(pid)[1:]:
        try:
            cpu += _cpu(child)
            rss += _rss(child)
            count += 1
        except OSError:
            continue
    return ProcessSample(cpu, rss, count)
