"""The log formats (logs.py): text as it always was, and JSON lines with structured fields."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.audit import audit_records, log_lines
from tsunagu.logs import JsonFormatter, TextFormatter, setup_logging, structured


def record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    made = logging.LogRecord("tsunagu", logging.INFO, __file__, 1, message, args, None)
    for key, value in extra.items():
        setattr(made, key, value)
    return made


def test_a_json_line_has_time_level_logger_message_and_fields() -> None:
    line = record("refused %d", 3, **structured({"cause": "wrong password", "count": 3}))
    line.created = 1_700_000_000.25
    parsed = json.loads(JsonFormatter().format(line))
    assert parsed == {
        "time": "2023-11-14T22:13:20.250Z",
        "level": "INFO",
        "logger": "tsunagu",
        "message": "refused 3",
        "cause": "wrong password",
        "count": 3,
    }


def test_json_keeps_its_own_keys_and_writes_exceptions() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        info = sys.exc_info()
    line = record("oops", **structured({"message": "clash", "level": 1}))
    line.exc_info = info
    parsed = json.loads(JsonFormatter().format(line))
    assert parsed["message"] == "oops" and parsed["_message"] == "clash"
    assert parsed["level"] == "INFO" and parsed["_level"] == 1
    assert "ValueError: boom" in parsed["exception"]


def test_an_audit_record_is_its_fields_in_json_and_its_json_in_text() -> None:
    fields = {"event": "allocation-ended", "user": "alice", "peers": []}
    line = record("%s", json.dumps(fields), **structured(fields, "allocation ended"))
    line.name = "tsunagu.audit"
    parsed = json.loads(JsonFormatter().format(line))
    assert parsed["message"] == "allocation ended" and parsed["user"] == "alice"
    text = TextFormatter().format(line)
    assert text.endswith(
        ' tsunagu.audit INFO {"event": "allocation-ended", "user": "alice", "peers": []}'
    )
    # The test helper reads both.
    assert audit_records(text) == [fields]
    assert audit_records(JsonFormatter().format(line)) == [fields]


@pytest.fixture
def restore_logging() -> Iterator[None]:
    logger = logging.getLogger("tsunagu")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield
    for handler in logger.handlers:
        handler.close()
    logger.handlers[:], logger.level, logger.propagate = saved


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("fmt", ["text", "json"])
def test_setup_logging_writes_the_chosen_level_and_format(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / "log"
    setup_logging("warning", fmt, str(path))
    logging.getLogger("tsunagu.x").info("hidden")
    logging.getLogger("tsunagu.x").warning("shown %s", "here", extra=structured({"a": 1}))
    for handler in logging.getLogger("tsunagu").handlers:
        handler.flush()
    [line] = path.read_text().splitlines()
    if fmt == "json":
        assert json.loads(line)["message"] == "shown here" and json.loads(line)["a"] == 1
    else:
        assert line.endswith(" tsunagu.x WARNING shown here")
    assert [parsed["message"] for parsed in log_lines(path.read_text())] == ["shown here"]


@pytest.mark.usefixtures("restore_logging")
def test_a_log_file_moved_away_is_opened_anew(tmp_path: Path) -> None:
    path, audit = tmp_path / "log", tmp_path / "audit"
    setup_logging("info", "text", str(path), str(audit))
    logging.getLogger("tsunagu.x").info("before")
    logging.getLogger("tsunagu.audit").info("record one")
    path.rename(tmp_path / "log.1")  # what logrotate does
    audit.rename(tmp_path / "audit.1")
    logging.getLogger("tsunagu.x").info("after")
    logging.getLogger("tsunagu.audit").info("record two")
    for name in ("tsunagu", "tsunagu.audit"):
        for handler in logging.getLogger(name).handlers:
            handler.flush()
    assert "before" in (tmp_path / "log.1").read_text()
    assert "after" in path.read_text() and "before" not in path.read_text()
    assert "record two" in audit.read_text() and "record one" not in audit.read_text()
