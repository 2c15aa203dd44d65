"""The server's log: one destination, one format, for every worker process.

``--log-format text`` (the default) writes ``time logger LEVEL message`` lines, as tsunagu
always has; ``--log-format json`` writes one JSON object per line with ``time`` (ISO 8601,
UTC), ``level``, ``logger`` and ``message``, plus the structured fields a line carries: the
failure lines (``cause``, ``client``, ``user``, ``peer``, ``rule``, ``count``...) and the
audit records (every field of the record). A line carries them with
``extra=structured(...)``; the text format ignores them, since its message already says it
all in words. An audit record's text line is its JSON (``tsunagu.audit INFO {...}``); in
JSON its fields stand beside ``message``.

Worker processes set up the same handler from the same configuration
(:func:`setup_logging`), so they write to the same file, or the stderr they inherited, in
the same format. A log file moved away (logrotate) is opened anew under its name at the next
line, by each worker: no signal and no ``copytruncate`` needed.
"""

from __future__ import annotations

import datetime
import json
import logging
import logging.handlers
import sys
from typing import Any

__all__ = [
    "LEVELS",
    "AuditFormatter",
    "JsonFormatter",
    "TextFormatter",
    "set_log_level",
    "setup_logging",
    "structured",
]

LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

# LogRecord attributes (set through ``extra``) that carry the structured fields and, when the
# text message is the fields themselves (an audit record), the JSON line's message.
_FIELDS = "tsunagu_fields"
_MESSAGE = "tsunagu_message"
# What a JSON line always has; a field of the same name is written with a "_" prefix.
_RESERVED = frozenset({"time", "level", "logger", "message", "exception"})


def structured(fields: dict[str, Any], message: str | None = None) -> dict[str, Any]:
    """The ``extra`` of a log call whose line carries ``fields`` in JSON.

    ``message`` replaces the text message in JSON, for a line whose text message is only
    the fields written out (an audit record).
    """
    extra: dict[str, Any] = {_FIELDS: fields}
    if message is not None:
        extra[_MESSAGE] = message
    return extra


class TextFormatter(logging.Formatter):
    """``2026-01-31 12:00:00,123 tsunagu INFO message``: the format tsunagu has always had."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(name)s %(levelname)s %(message)s")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        line: dict[str, Any] = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": getattr(record, _MESSAGE, None) or record.getMessage(),
        }
        fields = getattr(record, _FIELDS, None)
        if fields:
            for key, value in fields.items():
                line[f"_{key}" if key in _RESERVED else key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        return json.dumps(line, default=str, ensure_ascii=False, separators=(",", ":"))


class AuditFormatter(logging.Formatter):
    """An audit record as one JSON object: ``time`` and the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        line: dict[str, Any] = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        }
        line.update(getattr(record, _FIELDS, None) or {"message": record.getMessage()})
        return json.dumps(line, default=str, ensure_ascii=False, separators=(",", ":"))


def set_log_level(level: str) -> None:
    """Log at ``level`` and above from now on (a reload), to where :func:`setup_logging` chose."""
    logging.getLogger("tsunagu").setLevel(LEVELS[level])


def setup_logging(
    level: str = "info", fmt: str = "text", file: str | None = None, audit_file: str | None = None
) -> None:
    """Send the ``tsunagu`` loggers' lines at ``level`` and above to ``file`` (else stderr)
    in ``fmt`` ("text" or "json"); the audit records to ``audit_file`` instead, when given,
    as JSON lines (every worker appends whole lines to it)."""
    audit = logging.getLogger("tsunagu.audit")
    if audit_file:
        audit_handler = logging.handlers.WatchedFileHandler(audit_file)
        audit_handler.setFormatter(AuditFormatter())
        audit.handlers[:] = [audit_handler]
        audit.setLevel(logging.INFO)
        audit.propagate = False
    else:
        audit.handlers[:] = []
        audit.setLevel(logging.NOTSET)
        audit.propagate = True
    handler: logging.Handler = (
        logging.handlers.WatchedFileHandler(file) if file else logging.StreamHandler(sys.stderr)
    )
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("tsunagu")
    root.handlers[:] = [handler]
    root.setLevel(LEVELS[level])
    root.propagate = False
