"""What both connectors do with a failed call, in one place.

Each connector classifies its vendor's failures into :mod:`syncd.errors` (with
``system=`` set); this module holds the rules they share about *resending*:

- an idempotent call (a read, an update) is retried by the one policy in
  :mod:`connectors._retry`;
- a create whose answer was lost (timeout, dropped connection) or answered with
  a 5xx may have been applied: it is raised to the caller, never sent again here
  (the outbox looks the record up by email before it resends).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeGuard, TypeVar

from syncd.connectors._retry import RetryPolicy, retrying
from syncd.errors import RetriableError

T = TypeVar("T")


class NotRetried(Exception):
    """Carries a :class:`RetriableError` of a create past the retry policy, unretried."""

    def __init__(self, error: RetriableError) -> None:
        super().__init__(str(error))
        self.error = error


def lost_answer(error: RetriableError, *, idempotent: bool) -> Exception:
    """A transport failure: retried for an idempotent call; for a create, raised as it is."""
    return error if idempotent else NotRetried(error)


def may_be_applied(error: Exception, *, idempotent: bool) -> TypeGuard[RetriableError]:
    """A create answered with a 5xx: the CRM does not say whether it applied it."""
    return not idempotent and isinstance(error, RetriableError) and (error.status or 0) >= 500


def call(policy: RetryPolicy, log_name: str, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
    """``fn(*args, **kw)`` under the retry policy; a :class:`NotRetried` comes out as its error."""
    try:
        return retrying(policy, log_name=log_name)(fn, *args, **kw)
    except NotRetried as e:
        raise e.error from e.__cause__
