"""structlog set-up, once, in the entry point: JSON in service mode, readable on a TTY.

Secrets are redacted and emails masked at every level unless debugging asks for them.
Tracebacks appear only when debugging (``-v`` / ``--debug`` or ``level = "debug"``);
otherwise a log line carries the exception as ``error="Type: message"``, on one line.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

# a plain or URL-encoded (%40) address: both are masked
_EMAIL = re.compile(r"([A-Za-z0-9._%+-])[A-Za-z0-9._%+-]*(?:@|%40)([A-Za-z0-9.-]+\.[A-Za-z]{2,})")
_SECRET_KEYS = re.compile(r"token|secret|password|session_id|authorization|api_key", re.I)
_BEARER = re.compile(r"(Bearer\s+)[A-Za-z0-9._~+/=-]+", re.I)


def mask_email(text: str) -> str:
    """``jane.doe@example.com`` → ``j***@example.com`` (also ``jane.doe%40example.com``)."""
    return _EMAIL.sub(r"\1***@\2", text)


def redact(text: str) -> str:
    """``Bearer abc…`` → ``Bearer ***``."""
    return _BEARER.sub(r"\1***", text)


def one_line(text: str) -> str:
    """``text`` as one printable line: line breaks and other control characters are escaped."""
    if text.isprintable():
        return text
    out = []
    for c in text:
        if c.isprintable():
            out.append(c)
        elif c in "\r\n":
            out.append(" ")
        else:
            out.append(repr(c)[1:-1])
    return re.sub(r"  +", " ", "".join(out)).strip()


def exception_line(exc: BaseException) -> str:
    """``KeyError: 'x'``: the exception's type and the first line of its message."""
    msg = str(exc).strip()
    first = msg.splitlines()[0] if msg else ""
    return f"{type(exc).__name__}: {one_line(first)}" if first else type(exc).__name__


def _scrub(value: Any, show_emails: bool) -> Any:
    if isinstance(value, str):
        value = redact(value)
        return value if show_emails else mask_email(value)
    if isinstance(value, dict):
        return {k: ("***" if _SECRET_KEYS.search(str(k)) else _scrub(v, show_emails)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v, show_emails) for v in value]
    return value


def scrubber(show_emails: bool) -> structlog.types.Processor:
    def scrub(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        for k in list(event_dict):
            if k == "exc_info":  # the exception itself, for the renderer (its text is scrubbed once rendered)
                continue
            if _SECRET_KEYS.search(k):
                event_dict[k] = "***"
            else:
                event_dict[k] = _scrub(event_dict[k], show_emails)
        return event_dict

    return scrub


def _exception_as_line(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Without debugging, an exception is one ``error`` field, never a traceback."""
    exc_info = event_dict.pop("exc_info", None)
    exc: BaseException | None = None
    if exc_info is True:
        exc = sys.exc_info()[1]
    elif isinstance(exc_info, BaseException):
        exc = exc_info
    elif isinstance(exc_info, tuple) and len(exc_info) == 3:
        exc = exc_info[1]
    if exc is not None:
        event_dict.setdefault("error", exception_line(exc))
    return event_dict


class _ToStructlog(logging.Handler):
    """Standard-library log records (APScheduler, urllib3, warnings) as syncd's own log lines."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
            if record.name == "py.warnings":  # "file:line: Category: text\n  source line"
                msg = msg.strip().splitlines()[0] if msg.strip() else msg
            kw: dict[str, Any] = {"logger": record.name}
            if record.exc_info and record.exc_info[1] is not None:
                kw["exc_info"] = record.exc_info
            structlog.get_logger().log(record.levelno, one_line(msg), **kw)
        except Exception:  # noqa: BLE001 - a log line must never break the program (nor print a traceback)
            pass


def configure(*, level: str = "info", fmt: str = "auto", show_emails: bool = False,
              stream: Any = None, tracebacks: bool | None = None, capture_stdlib: bool = False) -> None:
    """Configure structlog. ``tracebacks`` (default: when ``level`` is debug) keeps exceptions'
    tracebacks in log lines. ``capture_stdlib`` (the CLI) routes the standard library's logging
    and warnings through the same renderer, so a library never prints a raw traceback either."""
    stream = stream or sys.stderr
    debug = level == "debug"
    tracebacks = debug if tracebacks is None else tracebacks
    as_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if as_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty()))
    exceptions: structlog.types.Processor = (
        (structlog.processors.format_exc_info if as_json else structlog.dev.set_exc_info)
        if tracebacks else _exception_as_line)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            exceptions,  # before the scrubber: an exception's text is scrubbed too
            scrubber(show_emails),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    if capture_stdlib:
        root = logging.getLogger()
        for h in [h for h in root.handlers if isinstance(h, _ToStructlog)]:
            root.removeHandler(h)
        root.addHandler(_ToStructlog())
        root.setLevel(logging.DEBUG if debug else logging.WARNING)
        logging.captureWarnings(True)
