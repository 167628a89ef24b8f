"""`syncd resync --inline` stops on SIGTERM like the service: the current page or batch finishes,
the leases are released at once, the run is recorded interrupted, and the user is told in one line;
running it again finishes the work."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from syncd.model import utcnow
from syncd.sandbox import Sandbox
from syncd.sandbox.seed import SeedSpec, seed
from syncd.store import Store

pytestmark = pytest.mark.slow

SYNCD = str(Path(sys.executable).with_name("syncd"))


def test_sigterm_stops_an_inline_resync_cleanly_and_a_rerun_finishes(tmp_path: Path) -> None:
    with Sandbox(tmp_path / "sb") as sb:
        seed(sb.hubspot, sb.salesforce, SeedSpec(seed=11, people=3000, deals=300))
        state_url = f"sqlite:///{tmp_path / 'state.db'}"
        cfg = sb.write_config(tmp_path / "syncd.toml", state_url=state_url,
                              extra="\n[service]\nmetrics_port = 0\n")
        env = {**os.environ, **sb.env()}
        cmd = [SYNCD, "--config", str(cfg), "--log-format", "json", "resync", "--inline", "--full"]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while sb.hubspot_server.request_count("contacts.search") < 2:  # a few pages in
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the resync never started pulling"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 1, (out, err)
        last = err.strip().splitlines()[-1]
        assert last.startswith("syncd: error: resync interrupted by SIGTERM"), err[-2000:]
        assert "Traceback" not in err
        with Store.open(state_url) as store, store.tx(readonly=True) as tx:
            assert tx.lease_owners(utcnow()) == set()  # released at once, not left to lapse
            runs = tx.last_runs()
            assert runs and runs[0].status == "interrupted" and not any(r.status == "running" for r in runs)
            stored = tx.count_records("hubspot", "contacts")
        assert 0 < stored < 3000  # stopped part-way; what was pulled is kept

        again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-2000:]
        assert again.stdout.startswith("resync done")
        with Store.open(state_url) as store, store.tx(readonly=True) as tx:
            assert tx.count_records("hubspot", "contacts") == 3000
            # both are in the resync history status shows: the rerun done, the first interrupted
            assert [r.state for r in tx.resync_history(2)] == ["done", "interrupted"]


def test_a_queued_resync_stopped_by_sigterm_is_recorded_interrupted_and_resumed_at_the_next_start(
    tmp_path: Path,
) -> None:
    """Issue 14: a queued resync the service's shutdown interrupts is recorded ``interrupted``
    with what it did (it used to be ``done`` part-way), and the next service start resumes it
    from the stored cursors instead of reading everything again."""
    people = 1500
    with Sandbox(tmp_path / "sb") as sb:
        seed(sb.hubspot, sb.salesforce, SeedSpec(seed=12, people=people, deals=100))
        state_url = f"sqlite:///{tmp_path / 'state.db'}"
        cfg = sb.write_config(tmp_path / "syncd.toml", state_url=state_url,
                              extra="\n[sync]\ncontacts_interval_s = 5\ndeals_interval_s = 5\n"
                                    "\n[service]\nmetrics_port = 0\n")
        env = {**os.environ, **sb.env()}
        run = [SYNCD, "--config", str(cfg), "--log-format", "json", "run"]

        def request() -> Any:
            with Store.open(state_url) as store, store.tx(readonly=True) as tx:
                rows = tx.resync_queue(include_finished=True)
            return rows[0] if rows else None

        def wait(cond: Any, what: str, proc: subprocess.Popen[str]) -> Any:
            deadline = time.monotonic() + 120
            while not (got := cond()):
                assert proc.poll() is None, f"syncd run exited: {proc.communicate()[1][-2000:]}"
                assert time.monotonic() < deadline, f"gave up waiting for {what}"
                time.sleep(0.1)
            return got

        svc = subprocess.Popen(run, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        with Store.open(state_url) as store:
            def pulled_once() -> bool:
                with store.tx(readonly=True) as tx:
                    return any(r.status in ("ok", "partial") for r in tx.last_runs())
            wait(pulled_once, "a first cycle", svc)
        queued = subprocess.run([SYNCD, "--config", str(cfg), "resync", "--object", "contacts", "--full"],
                                env=env, capture_output=True, text=True, timeout=60)
        assert queued.stdout.startswith("queued resync #1"), (queued.stdout, queued.stderr)
        wait(lambda: (r := request()) is not None and r.state == "running", "the service to pick it up", svc)
        pages = sb.hubspot_server.request_count("contacts.search")
        wait(lambda: sb.hubspot_server.request_count("contacts.search") >= pages + 2, "a few pages in", svc)
        svc.send_signal(signal.SIGTERM)
        _, err = svc.communicate(timeout=60)
        assert svc.returncode == 0, err[-2000:]

        stopped = request()
        assert stopped.state == "interrupted", stopped
        assert stopped.result["pulled"] > 0 and "resumes" in stopped.result["note"]

        again = subprocess.Popen(run, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            done = wait(lambda: (r := request()) is not None and r.state in ("done", "failed") and r, "the resume",
                        again)
        finally:
            again.send_signal(signal.SIGTERM)
            _, err = again.communicate(timeout=60)
        assert done.state == "done", done.result
        assert done.params.get("resume") is True
        assert done.result["before_resume"]["pulled"] == stopped.result["pulled"]
        assert '"event": "resync_resumed"' in err
        # it went on from the stored cursors (a new reset would read every HubSpot contact again)
        assert done.result["pulled"] < people
        with Store.open(state_url) as store, store.tx(readonly=True) as tx:
            assert tx.count_records("hubspot", "contacts") == people
