"""structlog set-up, once, in the entry point: JSON in service mode, readable on a TTY.

Secrets are redacted and emails masked at every level unless debugging asks for them.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_EMAIL = re.compile(r"([A-Za-z0-9._%+-])[A-Za-z0-9._%+-]*@([A-Za-z0-9.-]+\.[A-Za-z]{2,})")
_SECRET_KEYS = re.compile(r"token|secret|password|session_id|authorization|api_key", re.I)
_BEARER = re.compile(r"(Bearer\s+)[A-Za-z0-9._~+/=-]+", re.I)


def mask_email(text: str) -> str:
    """``jane.doe@example.com`` → ``j***@example.com``."""
    return _EMAIL.sub(r"\1***@\2", text)


def _scrub(value: Any, show_emails: bool) -> Any:
    if isinstance(value, str):
        value = _BEARER.sub(r"\1***", value)
        return value if show_emails else mask_email(value)
    if isinstance(value, dict):
        return {k: ("***" if _SECRET_KEYS.search(str(k)) else _scrub(v, show_emails)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v, show_emails) for v in value]
    return value


def scrubber(show_emails: bool) -> structlog.types.Processor:
    def scrub(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        for k in list(event_dict):
            if _SECRET_KEYS.search(k):
                event_dict[k] = "***"
            else:
                event_dict[k] = _scrub(event_dict[k], show_emails)
        return event_dict

    return scrub


def configure(*, level: str = "info", fmt: str = "auto", show_emails: bool = False,
              stream: Any = None) -> None:
    stream = stream or sys.stderr
    as_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if as_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty()))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            scrubber(show_emails),
            structlog.processors.format_exc_info if as_json else structlog.dev.set_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
