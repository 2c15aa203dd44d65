"""Reading what ``tsunagu serve`` logs about allocations, whichever worker process served them.

Every worker writes to the same place as the process that started it (the ``--log-file``,
else the inherited stderr), in the same format, so one file holds the audit records of all
workers. The readers here take both formats: ``--log-format text`` lines
(``time logger LEVEL message``, an audit record's message being its JSON) and
``--log-format json`` lines (one object a line; an audit record's fields beside
``time``, ``level``, ``logger`` and ``message``). An audit
record names its worker in ``"worker"`` when the server writes that field; otherwise the
relayed port tells: worker ``i`` of ``n`` binds only ports whose pair number
``port // 2`` is ``i`` modulo ``n``.

The port rule is exact for every port a worker bound itself. The one exception, the odd
port of an EVEN-PORT reservation redeemed by another worker, is still attributed to a worker
that served an allocation (the one that made the reservation), so "these workers served
allocations" never claims a worker that served none.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from typing import Any

__all__ = [
    "AUDIT_MARKER",
    "audit_records",
    "log_lines",
    "relay_port",
    "required_workers",
    "warning_lines",
    "worker_count",
    "worker_of",
    "workers_seen",
]

AUDIT_MARKER = " tsunagu.audit INFO "
_WORKERS = re.compile(r"tsunagu: (\d+) worker processes")


_TEXT_LINE = re.compile(r"^\S+ \S+ (\S+) (DEBUG|INFO|WARNING|ERROR|CRITICAL) (.*)$")
_JSON_KEYS = ("time", "level", "logger", "message")


def log_lines(text: str) -> list[dict[str, Any]]:
    """Every line of a log in either format as a dict: ``level``, ``logger``, ``message``
    and, for JSON lines, ``time`` and the structured fields (continuation lines, such as a
    traceback's in text, are left out)."""
    lines = []
    for line in text.splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
            continue
        match = _TEXT_LINE.match(line)
        if match:
            logger, level, message = match.groups()
            lines.append({"level": level, "logger": logger, "message": message})
    return lines


def audit_records(
    text: str, events: tuple[str, ...] = ("allocation-ended",)
) -> list[dict[str, Any]]:
    """The JSON records logged on ``tsunagu.audit`` in ``text`` (a log file's content) whose
    ``event`` is one of ``events`` (empty: all of them)."""
    records = [record for record in _audit_records(text) if not events or record["event"] in events]
    return records


def _audit_records(text: str) -> list[dict[str, Any]]:
    records = []
    for line in text.splitlines():
        if line.startswith("{"):
            parsed = json.loads(line)
            if parsed.get("logger") == "tsunagu.audit":
                records.append({k: v for k, v in parsed.items() if k not in _JSON_KEYS})
            continue
        _, marker, payload = line.partition(AUDIT_MARKER)
        if marker:
            records.append(json.loads(payload))
    return records


def warning_lines(text: str) -> list[str]:
    """Lines the server logged at WARNING or above."""
    return [
        line
        for line in text.splitlines()
        if re.search(r' (WARNING|ERROR|CRITICAL) |^\{.*"level":"(WARNING|ERROR|CRITICAL)"', line)
    ]


def worker_count(startup: Iterable[str]) -> int:
    """How many worker processes the server said it runs (it says nothing when it is one)."""
    for line in startup:
        match = _WORKERS.search(line)
        if match:
            return int(match.group(1))
    return 1


def relay_port(record: dict[str, Any]) -> int:
    """The port of the first relayed address of an audit record."""
    return int(record["relay"][0].rsplit(":", 1)[1])


def worker_of(record: dict[str, Any], workers: int) -> int:
    """Which worker served the allocation of ``record`` (see the module's note)."""
    if "worker" in record:
        return int(record["worker"])
    return (relay_port(record) // 2) % workers


def workers_seen(records: Iterable[dict[str, Any]], workers: int) -> Counter[int]:
    """Allocations per worker among ``records``."""
    return Counter(worker_of(record, workers) for record in records if record["relay"])


def required_workers(workers: int, allocations: int, odds: float = 1e-6) -> int:
    """How many distinct workers ``allocations`` independently placed allocations must reach.

    The kernel places each client socket on a worker by a hash of its addresses and ports:
    all ``workers`` when the chance of missing one of them is below ``odds``; else two, since
    all allocations on a single worker has odds of ``workers ** (1 - allocations)``.
    """
    if workers <= 1:
        return 1
    if workers * (1 - 1 / workers) ** allocations < odds:
        return workers
    return 2
