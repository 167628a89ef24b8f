"""The one retry policy (connectors/_retry.py): what is retried, how long it waits, what is raised.

The waits are recorded instead of slept: ``retrying(...).copy(sleep=...)`` is tenacity's own
way to swap the sleep function, so the policy under test is the one the connectors build.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import tenacity
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from syncd.connectors._retry import RetryPolicy, retrying
from syncd.errors import AuthError, BudgetExhausted, FatalError, RateLimited, RecordError, RetriableError
from syncd.logs import scrubber


def recorded(policy: RetryPolicy, name: str = "test.op") -> tuple[tenacity.Retrying, list[float]]:
    sleeps: list[float] = []
    return retrying(policy, log_name=name).copy(sleep=sleeps.append), sleeps


def failing(*errors: BaseException, result: Any = "ok") -> tuple[Callable[[], Any], list[int]]:
    """A call that raises ``errors`` in turn, then returns ``result``; counts its calls."""
    calls: list[int] = []

    def call() -> Any:
        calls.append(1)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return result

    return call, calls


# ------------------------------------------------------------------ what is retried

def test_a_transient_failure_is_retried_until_it_succeeds() -> None:
    r, sleeps = recorded(RetryPolicy(max_attempts=4))
    call, calls = failing(RetriableError("503", status=503), RateLimited("429", status=429))
    assert r(call) == "ok"
    assert len(calls) == 3
    assert len(sleeps) == 2


def test_after_max_attempts_the_last_error_itself_is_raised() -> None:
    r, sleeps = recorded(RetryPolicy(max_attempts=3))
    errors = [RetriableError(f"503 #{n}", status=503) for n in range(5)]
    call, calls = failing(*errors)
    with pytest.raises(RetriableError) as err:
        r(call)
    assert err.value is errors[2]  # reraise=True: the caller sees our error, not a tenacity.RetryError
    assert len(calls) == 3
    assert len(sleeps) == 2


@pytest.mark.parametrize("error", [
    AuthError("401"),
    BudgetExhausted("daily limit"),
    FatalError("gone"),
    RecordError("bad record", system="hubspot", object="contacts", record_id="1"),
    ValueError("a bug"),
    ConnectionError("not classified by the connector"),
], ids=lambda e: type(e).__name__)
def test_anything_but_a_retriable_error_is_raised_at_once(error: Exception) -> None:
    r, sleeps = recorded(RetryPolicy(max_attempts=6))
    call, calls = failing(error)
    with pytest.raises(type(error)) as err:
        r(call)
    assert err.value is error
    assert calls == [1]
    assert sleeps == []


@pytest.mark.parametrize("max_attempts", [0, 1])
def test_max_attempts_below_two_means_one_try(max_attempts: int) -> None:
    r, sleeps = recorded(RetryPolicy(max_attempts=max_attempts))
    call, calls = failing(RetriableError("503"))
    with pytest.raises(RetriableError):
        r(call)
    assert calls == [1]
    assert sleeps == []


def test_the_attempt_loop_form_retries_the_same_way() -> None:
    r, sleeps = recorded(RetryPolicy(max_attempts=3, base=0.25, cap=0.25))
    call, calls = failing(RetriableError("503"))
    for attempt in r:
        with attempt:
            result = call()
    assert result == "ok"
    assert len(calls) == 2
    assert len(sleeps) == 1 and 0 <= sleeps[0] <= 0.25


# ------------------------------------------------------------------ how long it waits

def test_retry_after_from_the_server_is_slept_exactly() -> None:
    r, sleeps = recorded(RetryPolicy(max_attempts=4, base=0.5, cap=30.0, max_retry_after=60.0))
    call, _ = failing(RateLimited("429", status=429, retry_after=7),
                      RateLimited("429", status=429, retry_after=0.25),
                      RetriableError("503", status=503, retry_after=0))
    assert r(call) == "ok"
    assert sleeps == [7.0, 0.25, 0.0]


def test_a_retry_after_beyond_the_maximum_is_capped() -> None:
    r, sleeps = recorded(RetryPolicy(max_attempts=2, max_retry_after=60.0))
    call, _ = failing(RateLimited("429", retry_after=3600))
    r(call)
    assert sleeps == [60.0]


@given(
    attempt=st.integers(min_value=1, max_value=40),
    base=st.floats(min_value=0.001, max_value=10),
    cap=st.floats(min_value=0.001, max_value=120),
    retry_after=st.one_of(st.none(), st.floats(max_value=-0.001, min_value=-1e6)),
)
def test_without_retry_after_the_wait_is_jittered_exponential_backoff_under_the_cap(
        attempt: int, base: float, cap: float, retry_after: float | None) -> None:
    """Full jitter: anywhere in [0, min(cap, base * 2**(attempt-1))]; a negative
    Retry-After (nonsense from the server) is ignored like a missing one."""
    policy = RetryPolicy(base=base, cap=cap)
    wait = policy.wait_for(attempt, RetriableError("503", retry_after=retry_after))
    assert 0 <= wait <= min(cap, base * 2 ** (attempt - 1))


def test_backoff_doubles_per_attempt_then_stops_at_the_cap() -> None:
    policy = RetryPolicy(base=0.5, cap=4.0)
    ceilings = []
    for attempt in range(1, 7):
        ceilings.append(max(policy.wait_for(attempt, None) for _ in range(300)))
    # the largest of 300 uniform draws is within 5% of the ceiling (odds against: 0.95**300)
    for got, ceiling in zip(ceilings, [0.5, 1.0, 2.0, 4.0, 4.0, 4.0], strict=True):
        assert ceiling * 0.95 <= got <= ceiling


def test_waits_are_jittered_so_clients_do_not_retry_in_lockstep() -> None:
    policy = RetryPolicy(base=1.0, cap=30.0)
    assert len({policy.wait_for(3, None) for _ in range(50)}) > 40


# ------------------------------------------------------------------ what is logged

def test_every_retry_is_logged_with_the_operation_the_wait_the_status_and_what_failed() -> None:
    """The error's own words (what, where, why), never its class name; a token never, an email
    masked when the line is rendered (the scrubber, which honours show_emails)."""
    r, sleeps = recorded(RetryPolicy(max_attempts=3), name="hubspot.contacts.search")
    secret = "Bearer pat-na1-0123456789 for jane@example.com"
    call, _ = failing(RateLimited(f"429 {secret}", status=429, retry_after=2),
                      RetriableError("hubspot contacts.search: 127.0.0.1:9: connection refused", status=503))
    with capture_logs() as logs:
        assert r(call) == "ok"
    retries = [e for e in logs if e["event"] == "retrying"]
    assert [(e["operation"], e["attempt"], e["max_attempts"], e["error"], e["status"]) for e in retries] == [
        ("hubspot.contacts.search", 1, 3, "429 Bearer *** for jane@example.com", 429),
        ("hubspot.contacts.search", 2, 3, "hubspot contacts.search: 127.0.0.1:9: connection refused", 503),
    ]
    assert [e["log_level"] for e in retries] == ["warning", "warning"]
    assert retries[0]["wait_s"] == 2.0 == sleeps[0]
    assert retries[1]["wait_s"] == round(sleeps[1], 3)
    assert all("pat-na1" not in repr(e) for e in logs)
    assert scrubber(False)(None, "warning", dict(retries[0]))["error"] == "429 Bearer *** for j***@example.com"


def test_a_first_try_success_logs_nothing_and_sleeps_never() -> None:
    r, sleeps = recorded(RetryPolicy())
    with capture_logs() as logs:
        assert r(lambda: 42) == 42
    assert logs == []
    assert sleeps == []
