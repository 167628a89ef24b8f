"""Log lines as the CLI configures them: one line each, no traceback unless debugging, no emails."""

from __future__ import annotations

import io
import json
import logging
import warnings
from collections.abc import Iterator

import pytest
import structlog

from syncd import logs


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """A stream for ``logs.configure(capture_stdlib=True)``; global logging state restored after."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, structlog.get_config())
    out = io.StringIO()
    try:
        yield out
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        logging.captureWarnings(False)
        structlog.configure(**saved[2])


def lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(ln) for ln in out.getvalue().splitlines()]


def _raise_key_error() -> None:
    raise KeyError("x")


def test_a_library_error_with_a_traceback_is_one_line_without_it(stream: io.StringIO) -> None:
    logs.configure(level="info", fmt="json", stream=stream, capture_stdlib=True)
    try:
        _raise_key_error()
    except KeyError:
        logging.getLogger("apscheduler.executors.default").exception('Job "cycle" raised an exception')
    (line,) = lines(stream)
    assert line["event"] == 'Job "cycle" raised an exception' and line["level"] == "error"
    assert line["error"] == "KeyError: 'x'" and line["logger"] == "apscheduler.executors.default"
    assert "Traceback" not in stream.getvalue()


def test_debugging_keeps_the_traceback(stream: io.StringIO) -> None:
    logs.configure(level="debug", fmt="json", stream=stream, capture_stdlib=True)
    try:
        _raise_key_error()
    except KeyError:
        structlog.get_logger().exception("cycle_crashed")
    (line,) = lines(stream)
    assert "Traceback (most recent call last)" in str(line["exception"])


def test_an_exception_logged_by_syncd_is_an_error_field(stream: io.StringIO) -> None:
    logs.configure(level="info", fmt="json", stream=stream)
    try:
        raise ValueError("no record for jane.doe@example.com")
    except ValueError:
        structlog.get_logger().exception("cycle_crashed", job="cycle:contacts")
    (line,) = lines(stream)
    assert line["error"] == "ValueError: no record for j***@example.com" and "exception" not in line


def test_a_warning_is_one_log_line(stream: io.StringIO) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        logs.configure(level="info", fmt="json", stream=stream, capture_stdlib=True)
        warnings.warn("a library complains\nover two lines", FutureWarning, stacklevel=1)
    (line,) = lines(stream)
    assert "FutureWarning: a library complains" in str(line["event"]) and line["logger"] == "py.warnings"


def test_stdlib_records_are_scrubbed_like_ours(stream: io.StringIO) -> None:
    logs.configure(level="info", fmt="json", stream=stream, capture_stdlib=True)
    logging.getLogger("urllib3.connectionpool").warning(
        "Retrying after connection broken: /query/?q=SELECT+Id+FROM+Lead+WHERE+Email='jane.doe%40example.com' "
        "Authorization: Bearer abc.def")
    text = stream.getvalue()
    assert "jane.doe" not in text and "j***@example.com" in text
    assert "abc.def" not in text


@pytest.mark.parametrize(("raw", "masked"), [
    ("jane.doe@example.com", "j***@example.com"),
    ("jane.doe%40example.com", "j***@example.com"),
    ("Email%3D%27jane%2Bx%40example.co.uk%27", "E***@example.co.uk%27"),  # the quote is eaten: no harm
    ("no address here", "no address here"),
])
def test_mask_email_covers_url_encoded_addresses(raw: str, masked: str) -> None:
    assert logs.mask_email(raw) == masked


@pytest.mark.parametrize(("raw", "flat"), [
    ("one line", "one line"),
    ("two\nlines", "two lines"),
    ("a\x1eb", "a\\x1eb"),
    ("tab\there", "tab\\there"),
    ("ünïcode ok", "ünïcode ok"),
])
def test_one_line(raw: str, flat: str) -> None:
    assert logs.one_line(raw) == flat
    assert len(logs.one_line(raw).splitlines()) == 1
