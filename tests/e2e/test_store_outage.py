"""The service when its state store fails under it (issue 18): every failed cycle is one JSON
``cycle_failed`` line naming the store and the cause; no traceback (APScheduler's or ours)
reaches the log, and the service keeps running and retrying.

The store is PostgreSQL: its schema is dropped under the running service, so every statement
fails from then on, starting with the lease acquisition that begins each cycle. (An SQLite file
broken under a running service is not seen at once: its open connections keep serving pages
from their cache and the write-ahead log.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from _waiting import wait_until

from syncd.sandbox import Sandbox
from syncd.sandbox.seed import SeedSpec, seed

pytestmark = pytest.mark.slow
SYNCD = str(Path(sys.executable).with_name("syncd"))
DEADLINE_S = 90.0  # generous: a deadline on observable state, never a timing assertion




def log_lines(path: Path) -> list[dict[str, Any]]:
    """Every stderr line as JSON; a line that is not JSON (a traceback) fails the parse."""
    return [json.loads(line) for line in path.read_text(errors="replace").splitlines() if line.strip()]


def break_store(store_url: str) -> Callable[[], None]:
    """Break the store under the service; returns what puts it back for the fixture's teardown."""
    url = sa.make_url(store_url)
    schema = url.query["options"].split("=", 1)[1]
    admin = sa.create_engine(url.difference_update_query(["options"]))
    # DROP ... CASCADE locks the schema's tables one by one while the service is writing to them, so
    # PostgreSQL may pick the DROP as a deadlock's victim (seen in CI); a victim is rolled back whole
    # and is simply tried again.
    for attempt in range(20):
        try:
            with admin.begin() as conn:
                conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
            break
        except sa.exc.OperationalError as ex:
            if not isinstance(ex.orig, psycopg.errors.DeadlockDetected) or attempt == 19:
                raise

    def restore() -> None:
        with admin.begin() as conn:  # for the fixture's own DROP SCHEMA
            conn.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
        admin.dispose()

    return restore


@pytest.mark.parametrize("store_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
def test_a_store_failing_under_the_service_is_a_cycle_failed_line_not_a_traceback(
        tmp_path: Path, store_url: str) -> None:
    with Sandbox(tmp_path / "sandbox") as sb:
        seed(sb.hubspot, sb.salesforce, SeedSpec(seed=3, people=10, deals=2))
        cfg = sb.write_config(tmp_path / "syncd.toml", state_url=store_url, extra=(
            "\n[sync]\ncontacts_interval_s = 1\ndeals_interval_s = 1\njitter_s = 0.1\n"
            "retry_max_attempts = 2\nretry_cap_s = 0.5\n[service]\nmetrics_port = 0\n"))
        err = tmp_path / "service.stderr"
        with err.open("wb") as e:
            proc = subprocess.Popen([SYNCD, "--config", str(cfg), "--log-format", "json", "run"],
                                    env={**os.environ, **sb.env()}, stdout=subprocess.DEVNULL, stderr=e)
        restore = lambda: None  # noqa: E731
        try:
            wait_until(lambda: any(x.get("event") == "cycle" for x in log_lines(err)), "a first cycle")
            restore = break_store(store_url)
            wait_until(lambda: len([x for x in log_lines(err) if x.get("event") == "cycle_failed"]) >= 3,
                       "three failed cycles")
            assert proc.poll() is None, "the service died"
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
            restore()
    text = err.read_text(errors="replace")
    assert "Traceback" not in text and "apscheduler" not in text.lower(), text[-3000:]
    lines = log_lines(err)  # every line JSON: nothing printed raw
    failed = [x for x in lines if x.get("event") == "cycle_failed"]
    for x in failed:
        assert x["job"].startswith("cycle:") and x["error"].startswith("state store "), x
        assert "\n" not in x["error"] and "SELECT" not in x["error"] and "UPDATE" not in x["error"], x
        assert "traceback" not in x
    assert not [x for x in lines if x.get("event") == "cycle_crashed"]
