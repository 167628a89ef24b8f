"""`syncd status` tells the truth, through the CLI as an operator runs it: after a partial cycle
(a Salesforce outage), after an authentication failure (and while the service has that system
paused, until when), and after queued resyncs that finished or failed (with outcome and counts).

Every wait is a deadline on observable state, never an assertion on time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from _waiting import wait_until

from syncd.sandbox import Sandbox
from syncd.sandbox.seed import SeedSpec, seed

SYNCD = str(Path(sys.executable).with_name("syncd"))
DEADLINE_S = 120.0
EXTRA = ("\n[sync]\ncontacts_interval_s = 1\ndeals_interval_s = 2\njitter_s = 0.1\n"
         "retry_max_attempts = 2\nretry_cap_s = 0.5\n\n[service]\nmetrics_port = 0\nshutdown_grace_s = 10\n")


@dataclass
class World:
    sb: Sandbox
    tmp: Path
    config: Path
    env: dict[str, str]

    def syncd(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([SYNCD, "--config", str(self.config), "--log-format", "json", *args],
                              env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=DEADLINE_S)

    def status(self) -> dict[str, Any]:
        p = self.syncd("status", "--json")
        assert p.returncode == 0, p.stderr
        return dict(json.loads(p.stdout))

    def text(self) -> str:
        p = self.syncd("status")
        assert p.returncode == 0, p.stderr
        return p.stdout


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with Sandbox(tmp_path / "sandbox") as sb:
        seed(sb.hubspot, sb.salesforce, SeedSpec(seed=5, people=30, deals=6))
        cfg = sb.write_config(tmp_path / "syncd.toml", state_url=f"sqlite:///{tmp_path / 'state.db'}", extra=EXTRA)
        w = World(sb, tmp_path, cfg, {**os.environ, **sb.env(), "COLUMNS": "200"})
        assert w.syncd("migrate").returncode == 0  # status is read-only: it never creates the store
        yield w




class Service:
    def __init__(self, w: World) -> None:
        self.err = w.tmp / "service.stderr"
        with self.err.open("wb") as e:
            self.proc = subprocess.Popen([SYNCD, "--config", str(w.config), "--log-format", "json", "run"],
                                         env=w.env, stdout=subprocess.DEVNULL, stderr=e)

    def alive(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"syncd run exited with {self.proc.returncode}: {self.err.read_text()[-2000:]}")
        return True

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


def test_status_after_a_partial_cycle_says_which_system_why_and_since_when(world: World) -> None:
    assert world.syncd("sync", "--once").returncode == 0
    world.sb.salesforce_server.inject("server_error", count=10**9, status=503)
    p = world.syncd("sync", "--once")
    assert p.returncode == 1 and "partial cycle" in p.stderr

    data = world.status()
    run = data["runs"][0]
    assert run["status"] == "partial" and "salesforce" in run["error"] and "503" in run["error"]
    sf = data["systems"]["salesforce"]
    assert sf["failing_since"] is not None and sf["failure_kind"] == "outage" and sf["paused"] is None
    assert data["systems"]["hubspot"]["failing_since"] is None
    lead = next(o for o in data["objects"] if o["system"] == "salesforce" and o["object"] == "Lead")
    assert lead["last_error_at"] is not None and "503" in lead["last_error"]
    assert lead["newest_change"] is not None and lead["lag_s"] is not None

    text = world.text()
    assert "last cycle: partial (cycle:all" in text
    assert "salesforce: last complete pull" in text and "(outage)" in text
    assert "not paused: every cycle tries it again" in text
    assert "partial" in text.split("cycles (ok")[-1] or "| partial" in text
    assert ".0000" not in text and "+00:00" not in text  # times for people
    explained = world.syncd("status", "--explain")
    assert explained.returncode == 0 and "blocked re-hand-offs" in explained.stdout and "lag" in explained.stdout


def test_status_after_an_auth_failure_and_while_the_service_has_it_paused(world: World) -> None:
    assert world.syncd("sync", "--once").returncode == 0
    bad = {"SYNCD_HUBSPOT_TOKEN": "not-the-token"}
    p = world.syncd("sync", "--once", env=bad)
    assert p.returncode == 1
    data = world.status()
    hs = data["systems"]["hubspot"]
    assert hs["failure_kind"] == "auth" and "401" in (hs["error"] or "")
    assert "(auth)" in world.text()

    # the service backs hubspot off: status says paused, why, and until when
    world.env.update(bad)
    svc = Service(world)
    try:
        paused = wait_until(lambda: svc.alive() and world.status()["systems"]["hubspot"]["paused"],
                            "the service to report hubspot paused")
        assert paused["kind"] == "auth" and paused["until"] > data["now"] and "authentication failed" in paused["why"]
        text = world.text()
        assert "hubspot: last complete pull" in text and "PAUSED (auth) by the service until" in text
        assert data["systems"]["salesforce"]["paused"] is None
    finally:
        assert svc.stop() == 0


def test_status_after_queued_resyncs_finished_and_failed(world: World) -> None:
    svc = Service(world)
    try:
        wait_until(lambda: svc.alive() and world.status()["services"], "the service's heartbeat")
        p = world.syncd("resync", "--object", "contacts")
        assert p.returncode == 0 and "queued resync #" in p.stdout, p.stdout + p.stderr
        done = wait_until(lambda: [r for r in world.status()["resync_history"] if r["state"] != "queued"
                                   and r["state"] != "running"], "the first resync to finish")
        assert done[0]["outcome"] == "done" and done[0]["counts"].get("pulled", 0) > 0, done
        assert not done[0]["inline"]

        world.sb.salesforce_server.inject("server_error", count=10**9, status=503)
        p = world.syncd("resync", "--object", "contacts")
        assert p.returncode == 0 and "queued" in p.stdout
        hist = wait_until(lambda: (h := world.status()["resync_history"]) and h[0]["state"] == "failed" and h,
                          "the second resync to fail")
        assert "salesforce" in (hist[0]["error"] or "") and hist[1]["outcome"] == "done"
        text = world.text()
        assert "resyncs (last 2, newest first)" in text
        assert "failed" in text and "resync partial: salesforce" in text
        assert "pulled " in text  # the finished one's counts
    finally:
        assert svc.stop() == 0
