"""The log scrubber (syncd/logs.py): secrets redacted and emails masked in every line the
daemon writes, through the real structlog configuration of the entry point."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import structlog

from syncd import logs

TOKEN = "pat-na1-0f0f0f0f-1111-2222-3333-444444444444"
EMAIL = "jane.doe+crm@sub.example.com"
MASKED = "j***@sub.example.com"


@pytest.fixture
def emit() -> Iterator[Callable[..., list[dict[str, Any]]]]:
    """Configure logging as ``syncd`` does (JSON to a stream), log one event, return the lines."""
    saved = structlog.get_config()

    def _emit(method: str = "info", *, show_emails: bool = False, level: str = "debug",
              event: str = "event", **kw: Any) -> list[dict[str, Any]]:
        out = io.StringIO()
        logs.configure(level=level, fmt="json", show_emails=show_emails, stream=out)
        getattr(structlog.get_logger(), method)(event, **kw)
        return [json.loads(line) for line in out.getvalue().splitlines()]

    yield _emit
    structlog.contextvars.clear_contextvars()
    structlog.configure(**saved)


def test_mask_email_keeps_the_first_letter_and_the_domain() -> None:
    assert logs.mask_email("jane.doe@example.com") == "j***@example.com"
    assert logs.mask_email(f"no match for {EMAIL}, nor for a@b.io") == f"no match for {MASKED}, nor for a***@b.io"
    assert logs.mask_email("not an email: @example.com, jane@localhost") == "not an email: @example.com, jane@localhost"


@pytest.mark.parametrize("key", [
    "token", "access_token", "hubspot_token", "Authorization", "password", "client_secret",
    "session_id", "api_key", "SECRET",
])
def test_a_value_under_a_secret_sounding_key_is_redacted(emit: Callable[..., list[dict[str, Any]]],
                                                         key: str) -> None:
    (line,) = emit(**{key: TOKEN})
    assert line[key] == "***"
    assert TOKEN not in json.dumps(line)


def test_secret_keys_are_redacted_at_any_depth(emit: Callable[..., list[dict[str, Any]]]) -> None:
    (line,) = emit(request={"headers": {"Authorization": f"Bearer {TOKEN}", "Accept": "json"},
                            "params": [{"api_key": TOKEN}]})
    assert line["request"] == {"headers": {"Authorization": "***", "Accept": "json"},
                               "params": [{"api_key": "***"}]}


def test_a_bearer_token_inside_any_text_is_redacted(emit: Callable[..., list[dict[str, Any]]]) -> None:
    (line,) = emit(event=f"got 401 for Authorization: Bearer {TOKEN}",
                   detail=[f"curl -H 'authorization: bearer {TOKEN}'"])
    assert line["event"] == "got 401 for Authorization: Bearer ***"
    assert line["detail"] == ["curl -H 'authorization: bearer ***'"]


def test_emails_are_masked_in_the_event_in_values_and_in_nested_structures(
        emit: Callable[..., list[dict[str, Any]]]) -> None:
    (line,) = emit(event=f"linked {EMAIL}", email=EMAIL,
                   candidates=(f"hubspot:{EMAIL}", {"who": EMAIL}), count=3, ok=True, missing=None)
    assert line["event"] == f"linked {MASKED}"
    assert line["email"] == MASKED
    assert line["candidates"] == [f"hubspot:{MASKED}", {"who": MASKED}]
    assert (line["count"], line["ok"], line["missing"]) == (3, True, None)  # non-text untouched


def test_values_bound_through_contextvars_are_scrubbed_too(emit: Callable[..., list[dict[str, Any]]]) -> None:
    structlog.contextvars.bind_contextvars(record=EMAIL, token=TOKEN)
    (line,) = emit()
    assert (line["record"], line["token"]) == (MASKED, "***")


def test_show_emails_keeps_emails_for_debugging_but_never_secrets(
        emit: Callable[..., list[dict[str, Any]]]) -> None:
    (line,) = emit(show_emails=True, email=EMAIL, token=TOKEN, note=f"Bearer {TOKEN} for {EMAIL}")
    assert line["email"] == EMAIL
    assert line["token"] == "***"
    assert line["note"] == f"Bearer *** for {EMAIL}"


@pytest.mark.parametrize("method", ["debug", "info", "warning", "error"])
def test_every_level_is_scrubbed(emit: Callable[..., list[dict[str, Any]]], method: str) -> None:
    (line,) = emit(method, email=EMAIL, password=TOKEN)
    assert (line["level"], line["email"], line["password"]) == (method, MASKED, "***")


def test_the_level_filters_and_lines_are_json_with_level_and_utc_time(
        emit: Callable[..., list[dict[str, Any]]]) -> None:
    assert emit("info", level="warning") == []
    (line,) = emit("warning", level="warning")
    assert line["level"] == "warning" and line["timestamp"].endswith("Z")


def test_the_console_renderer_is_scrubbed_as_well() -> None:
    saved = structlog.get_config()
    out = io.StringIO()
    try:
        logs.configure(fmt="console", stream=out)
        structlog.get_logger().info("handed off", email=EMAIL, token=TOKEN)
    finally:
        structlog.configure(**saved)
    text = out.getvalue()
    assert "handed off" in text and MASKED in text
    assert EMAIL not in text and TOKEN not in text


def test_a_logged_exception_is_scrubbed(emit: Callable[..., list[dict[str, Any]]]) -> None:
    try:
        raise RuntimeError(f"update of {EMAIL} refused for Bearer {TOKEN}")
    except RuntimeError:
        lines = emit("exception", event="write failed")
    assert EMAIL not in json.dumps(lines) and TOKEN not in json.dumps(lines)
