"""Process logging setup: text, JSON lines or logfmt, at a configured level, never statement values.

The proxy's own log messages name sessions, roles, purposes, tables and rule
lines, never SQL text or values. What cannot be vouched for is an exception's
message (a parser or driver error may quote the SQL it choked on), so every
format renders exceptions as their type and traceback frames with quoted text
and numbers in the message masked.
"""

from __future__ import annotations

import json
import logging
import re
import time
import traceback

_QUOTED = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|\$[A-Za-z_]*\$.*?\$[A-Za-z_]*\$", re.S)
_NUMBER = re.compile(r"(?<![A-Za-z_])\d[\d.,_]*")


def mask_values(text: str, limit: int = 500) -> str:
    """``text`` with quoted strings and numbers replaced by ``?`` (for text the proxy did not write).

    >>> mask_values('invalid input syntax for type integer: "4111 1111" at position 12')
    'invalid input syntax for type integer: ? at position ?'
    """
    text = _NUMBER.sub("?", _QUOTED.sub("?", text))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def format_exception(exc_info) -> str:
    """A traceback with the exception message masked (frames name files, lines and code, not values)."""
    etype, value, tb = exc_info
    frames = "".join(traceback.format_tb(tb)) if tb is not None else ""
    name = etype.__name__ if etype is not None else "Exception"
    return f"Traceback (most recent call last):\n{frames}{name}: {mask_values(str(value))}"


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatException(self, ei) -> str:  # noqa: N802 (logging's name)
        return format_exception(ei)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            data["exc"] = format_exception(record.exc_info)
        return json.dumps(data, ensure_ascii=False)


_BARE = re.compile(r"^[^\s\"=]+$")


def _logfmt_value(value: str) -> str:
    if value and _BARE.match(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class LogfmtFormatter(logging.Formatter):
    """``ts=... level=info logger=proxy.listener msg="listening on ..."`` (one line per record)."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [("ts", _timestamp(record)), ("level", record.levelname.lower()), ("logger", record.name),
                 ("msg", record.getMessage())]
        if record.exc_info:
            parts.append(("exc", format_exception(record.exc_info)))
        return " ".join(f"{k}={_logfmt_value(v)}" for k, v in parts)


FORMATTERS = {"text": TextFormatter, "json": JsonFormatter, "logfmt": LogfmtFormatter}


def configure(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(FORMATTERS.get(fmt, TextFormatter)())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
