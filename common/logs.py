"""Logging for every process: JSON lines in services, readable lines in a terminal."""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import TextIO

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line; `extra=` fields become keys."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class ReadableFormatter(logging.Formatter):
    """`HH:MM:SS level logger: message key=value ...` for people at a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created, UTC).strftime("%H:%M:%S")
        extras = " ".join(
            f"{k}={v}"
            for k, v in vars(record).items()
            if k not in _STANDARD and not k.startswith("_")
        )
        line = f"{when} {record.levelname.lower():7} {record.name}: {record.getMessage()}"
        if extras:
            line += f"  {extras}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class StderrHandler(logging.StreamHandler[TextIO]):
    """A stream handler that writes to `sys.stderr` as it is when a record is logged, not as it
    was when the handler was made (a test's output capture replaces and later closes it)."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass  # StreamHandler.__init__ and setStream assign it; the property answers


def setup_logging(level: str | None = None, json_lines: bool | None = None) -> None:
    """Configure the root logger once per process.

    JSON lines unless stderr is a terminal; `WTC_LOG_FORMAT=json|text` and `WTC_LOG_LEVEL`
    override.
    """
    fmt = os.environ.get("WTC_LOG_FORMAT")
    if json_lines is None:
        json_lines = fmt == "json" if fmt else not sys.stderr.isatty()
    handler = StderrHandler()
    handler.setFormatter(JsonFormatter() if json_lines else ReadableFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel((level or os.environ.get("WTC_LOG_LEVEL", "INFO")).upper())
