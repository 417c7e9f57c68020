"""Logging for every productd process: one JSON object per line on stderr, or text for a terminal."""

from __future__ import annotations

import logging
import os
import sys
import time

import orjson

_role = "supervisor"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "role": _role,
            "pid": os.getpid(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if extra:
            entry.update(extra)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = (
            f"{time.strftime('%H:%M:%S', time.localtime(record.created))} "
            f"{record.levelname:<7} {_role}[{os.getpid()}] {record.getMessage()}"
        )
        extra = getattr(record, "fields", None)
        if extra:
            line += " " + " ".join(f"{k}={v}" for k, v in extra.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


_formatter: logging.Formatter = JsonFormatter()


def formatter() -> logging.Formatter:
    """The formatter chosen by setup(), for handlers made by others (gunicorn's)."""
    return _formatter


def setup(level: str, fmt: str) -> None:
    global _formatter
    _formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def set_role(role: str) -> None:
    """Name this process in every line it logs from now on (after a fork)."""
    global _role
    _role = role
