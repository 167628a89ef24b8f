"""Every failure becomes one line and the contract's exit code (design.md: CLI contract).

0 ok, 1 a failure during work, 2 bad config, mapping files or usage, 130 interrupted. The line
is ``syncd: error: …`` on stderr, never a traceback: syncd's own errors say what, where and
why; anything else is an internal error with its type and message. ``--debug`` shows the
traceback (for bug reports) and unmasked text. Used by the `syncd` command and by every
command group defined beside it (review, …), so none of them imports the CLI module.
"""

from __future__ import annotations

import re
import sys
import traceback
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import click

from syncd import logs
from syncd.errors import AuthError, BudgetExhausted, ConfigError, MappingError, SyncError

T = TypeVar("T")
#: set from ``-v`` / ``--debug`` for this invocation (read by the error reporting)
DEBUG = {"on": False}
_QUERY = re.compile(r"((?:https?://[^\s/?'\"]+)?/[^\s?'\"]*)\?[^\s'\";]*=[^\s'\";]*")  # a URL's or path's query


def _line(message: str) -> str:
    """What an error line may show: one line; without --debug no query strings, tokens or emails."""
    text = logs.one_line(message)
    return text if DEBUG["on"] else logs.mask_email(logs.redact(_QUERY.sub(r"\1?…", text)))


def fail(code: int, message: str) -> NoReturn:
    click.echo(f"syncd: error: {_line(message)}", err=True)
    sys.exit(code)


def _traceback(exc: BaseException) -> None:
    if DEBUG["on"]:
        click.echo("".join(traceback.format_exception(exc)).rstrip(), err=True)


def report(exc: BaseException) -> NoReturn:
    """One line and the contract's exit code for any exception (the traceback only with --debug)."""
    _traceback(exc)
    if isinstance(exc, ConfigError | MappingError):
        fail(2, str(exc))
    if isinstance(exc, AuthError):
        fail(1, f"authentication failed: {exc}")
    if isinstance(exc, BudgetExhausted):
        fail(1, f"API budget exhausted: {exc}")
    if isinstance(exc, SyncError):
        fail(1, str(exc))
    if isinstance(exc, KeyboardInterrupt):
        fail(130, "interrupted")
    if type(exc).__module__.split(".")[0] == "sqlalchemy":
        orig = getattr(exc, "orig", None)
        fail(1, f"state store{_store_shown()}: {logs.exception_line(orig if orig is not None else exc)}")
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        fail(1, f"{exc.strerror}{where}")
    hint = "" if DEBUG["on"] else " (run with --debug for the traceback)"
    fail(1, f"internal error: {logs.exception_line(exc)}{hint}")


def _store_shown() -> str:
    """`` sqlite:///…`` (password hidden) when this command has loaded its config, else ``""``."""
    ctx = click.get_current_context(silent=True)
    config: Any = getattr(ctx.obj, "_config", None) if ctx is not None else None  # the CLI's Ctx, once loaded
    if config is None:
        return ""
    from sqlalchemy.engine import make_url

    try:
        return " " + make_url(config.state_url()).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - only decoration of an error line
        return ""


def guarded(fn: Callable[[], T]) -> T:
    """Run ``fn``; turn every exception into one clear line and the contract's exit code.

    2: bad config, mapping files or usage; 1: a failure during work (and any unexpected
    error, reported as ``internal error: Type: message``); 130: interrupted. Click's own
    exceptions (usage errors, ``--help``) and ``sys.exit`` pass through.
    """
    try:
        return fn()
    except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort,
            SystemExit, BrokenPipeError):
        raise
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - the one place every failure becomes a line
        report(exc)
