"""The one retry policy both connectors use (style.md: "one policy, one place").

Connectors only classify failures into :mod:`syncd.errors`; this module decides
what to retry and how long to wait. Only :class:`~syncd.errors.RetriableError`
(including :class:`~syncd.errors.RateLimited`) is retried. A server-given
``retry_after`` is honoured (capped at ``max_retry_after``); otherwise the wait is
exponential with full jitter, capped at ``cap``. The last error is re-raised.

Rate limits are per endpoint class, not per call: the connector's budget
(:mod:`connectors._pacing`) holds the whole class for the Retry-After (in the store, so
other processes and later cycles wait too) and slows it down. A 429 without a Retry-After is
waited at least ``rate_limited_s`` (the class hold), never retried at once.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import structlog
import tenacity

from syncd.errors import RateLimited, RetriableError
from syncd.logs import one_line, redact

log = structlog.get_logger()


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How hard to retry a transient failure. Times in seconds."""

    max_attempts: int = 6
    base: float = 0.5
    cap: float = 30.0
    max_retry_after: float = 60.0
    rate_limited_s: float = 1.0  # the least wait after a 429 without Retry-After (_pacing.DEFAULT_HOLD_S)

    def wait_for(self, attempt: int, exc: BaseException | None) -> float:
        """Seconds to sleep after failed attempt number ``attempt`` (1-based)."""
        retry_after = getattr(exc, "retry_after", None)
        if isinstance(retry_after, int | float) and retry_after >= 0:
            return float(min(retry_after, self.max_retry_after))
        ceiling = min(self.cap, self.base * (2 ** (attempt - 1)))
        wait = random.uniform(0, ceiling)  # noqa: S311 - jitter, not crypto
        return max(wait, self.rate_limited_s) if isinstance(exc, RateLimited) else wait


def retrying(policy: RetryPolicy, *, log_name: str) -> tenacity.Retrying:
    """A tenacity ``Retrying`` for ``policy``.

    Use ``retrying(policy, log_name="x")(fn, *args)`` or
    ``for attempt in retrying(...): with attempt: ...``. ``log_name`` names the
    operation in the logs.
    """

    def _wait(state: tenacity.RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        return policy.wait_for(state.attempt_number, exc)

    def _before_sleep(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        log.warning(
            "retrying",
            operation=log_name,
            attempt=state.attempt_number,
            max_attempts=policy.max_attempts,
            wait_s=round(state.upcoming_sleep, 3),
            error=redact(one_line(str(exc))) if exc is not None else None,  # emails: masked when rendered
            status=getattr(exc, "status", None),
        )

    return tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(RetriableError),
        stop=tenacity.stop_after_attempt(max(1, policy.max_attempts)),
        wait=_wait,
        before_sleep=_before_sleep,
        reraise=True,
    )
