"""Waiting on observable state, and talking to a service's HTTP port, for the end-to-end tests
that drive `syncd run` as a subprocess. A deadline is a bound on observable state, never a
timing assertion: it only turns a hang into a failure that says what was awaited."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from http.client import HTTPConnection
from typing import Any

DEADLINE_S = 120.0


def wait_until(cond: Callable[[], Any], what: str | Callable[[], str], timeout: float = DEADLINE_S,
               every: float = 0.2) -> Any:
    """``cond()``'s first truthy value; AssertionError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not (got := cond()):
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for: {what() if callable(what) else what}")
        time.sleep(every)
    return got


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(port: int, path: str, timeout: float = 10) -> tuple[int, str]:
    """(status, body) of a GET on 127.0.0.1; (0, "") while nothing answers."""
    conn = HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    except OSError:
        return 0, ""
    finally:
        conn.close()
