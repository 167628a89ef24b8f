"""Every log line of a cycle can be filtered: run_id and job are bound for the cycle, system and
object for each pull (structlog contextvars), and nothing is left bound after it. Also the progress
log line off a terminal, and a log line printed through the live display's console."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest
import structlog
from rich.console import Console

from syncd import logs
from syncd.progress import LiveProgress, LogProgress, logs_through

if TYPE_CHECKING:
    from conftest import E2E


@pytest.fixture
def logged() -> Iterator[io.StringIO]:
    saved = structlog.get_config()
    out = io.StringIO()
    logs.configure(level="info", fmt="json", stream=out)
    try:
        yield out
    finally:
        structlog.configure(**saved)


def _lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(ln) for ln in out.getvalue().splitlines() if ln.startswith("{")]


def test_a_cycles_log_lines_carry_run_id_job_system_and_object(e2e: E2E, logged: io.StringIO) -> None:
    e2e.hs.add("contacts", {"email": "ctx@example.com", "lifecyclestage": "lead", "hubspotscore": "1"})
    e2e.cycle()
    lines = _lines(logged)
    with e2e.rt.store.tx() as tx:
        run_id = tx.last_runs(limit=1)[0].run_id
    pulled = [ln for ln in lines if ln["event"] == "salesforce.pulled"]
    assert pulled and all(ln["run_id"] == run_id and ln["job"] == "cycle:all" and ln["system"] == "salesforce"
                          for ln in pulled)
    assert {ln["object"] for ln in pulled} >= {"Lead", "Contact"}
    cycle = next(ln for ln in lines if ln["event"] == "cycle")
    assert cycle["run_id"] == run_id and "system" not in cycle  # the per-pull binding is gone after the pull
    assert structlog.contextvars.get_contextvars() == {}  # nothing left bound after the cycle


def test_off_a_terminal_progress_is_a_log_line_every_few_seconds(logged: io.StringIO) -> None:
    p = LogProgress(every_s=0.05, what="sync --once")
    try:
        p.page("hubspot", "contacts", 100, 250)
        p.stage("write", 7)
        p.written("hubspot")
        deadline = time.monotonic() + 30
        while not any(ln["event"] == "progress" for ln in _lines(logged)) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        p.close()
    line = next(ln for ln in _lines(logged) if ln["event"] == "progress")
    assert line["pulled"] == {"hubspot.contacts": "100/250"} and line["writes_sent"] == "1/7"
    assert line["work"] == "sync --once" and line["stage"] == "writes sent"


def test_log_lines_go_through_the_live_displays_console(logged: io.StringIO) -> None:
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=100)
    live = LiveProgress(console)
    with logs_through(console):
        live.start()
        live.page("hubspot", "contacts", 5, 10)
        structlog.get_logger().info("while_live", n=1)
        live.close()
    assert "while_live" in screen.getvalue() and "while_live" not in logged.getvalue()
    structlog.get_logger().info("after_live")
    assert "after_live" in logged.getvalue()
