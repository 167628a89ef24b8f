"""Shared end-to-end fixtures: a running sandbox, a config file in tmp_path, an open Runtime.

    def test_x(e2e: E2E) -> None:
        hid = e2e.hs.add("contacts", {...})
        e2e.converge()
        assert e2e.hs.get("contacts", hid)["lifecyclestage"] == ...

Everything runs the real client libraries over HTTPS on 127.0.0.1 against the
in-process simulators. Fixtures only: nothing here asserts.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from syncd.config import load_config
from syncd.engine import CycleStats, Engine
from syncd.model import OBJECT_GROUPS
from syncd.runtime import Runtime, open_runtime
from syncd.sandbox import Sandbox
from syncd.sandbox.hubspot import HubSpotApp
from syncd.sandbox.salesforce import SalesforceApp
from syncd.store.rows import AuditRow


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    """Both CRM simulators, empty, on 127.0.0.1 (HTTPS, throwaway CA)."""
    with Sandbox(tmp_path / "sandbox") as sb:
        yield sb


@pytest.fixture
def state_url(tmp_path: Path) -> str:
    """A SQLite state store in tmp_path (created on first open)."""
    return f"sqlite:///{tmp_path / 'state.db'}"


@pytest.fixture
def config_path(
    sandbox: Sandbox, tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """A syncd.toml pointing at the sandbox; the credential env vars are set for this test."""
    for k, v in sandbox.env().items():
        monkeypatch.setenv(k, v)
    return sandbox.write_config(tmp_path / "syncd.toml", state_url=state_url)


@pytest.fixture
def runtime(config_path: Path) -> Iterator[Runtime]:
    """An open Runtime (store, mappings, SLA, connectors) on that config; closed after the test."""
    rt = open_runtime(load_config(config_path))
    try:
        yield rt
    finally:
        rt.close()


@dataclass
class E2E:
    """A sandbox, a config and a Runtime, with the few verbs every scenario needs."""

    sb: Sandbox
    rt: Runtime
    config: Path
    tmp: Path

    @property
    def hs(self) -> HubSpotApp:
        return self.sb.hubspot

    @property
    def sf(self) -> SalesforceApp:
        return self.sb.salesforce

    def engine(
        self, *, dry_run: bool = False, clock: Callable[[], datetime] | None = None
    ) -> Engine:
        """The runtime's engine; with ``clock``, one that reads that clock instead of the wall."""
        if clock is None:
            return self.rt.engine(dry_run=dry_run)
        return Engine(
            self.rt.store,
            self.rt.mappings,
            self.rt.sla,
            self.rt.connectors,
            overlap=timedelta(seconds=self.rt.config.sync.overlap_s),
            dry_run=dry_run,
            write_batch=self.rt.config.sync.write_batch,
            clock=clock,
        )

    def cycle(self, group: str | None = None, **kw: Any) -> CycleStats:
        return self.engine(**kw).cycle(group)

    def decide_only(self) -> CycleStats:
        """A cycle's pull, link and decide, without the write-back: the outbox holds the
        writes, nothing is sent (to place a crash or a fault before or around the send)."""
        eng = self.engine()
        stats = CycleStats()
        for group in OBJECT_GROUPS.values():
            for system, objects in group.items():
                for obj in objects:
                    eng.pull(system, obj, stats)
        eng.link_and_decide(stats)
        return stats

    def converge(self, max_cycles: int = 6, **kw: Any) -> list[CycleStats]:
        """Cycles until one sends nothing and has nothing left in the outbox (or ``max_cycles``)."""
        out = []
        for _ in range(max_cycles):
            st = self.cycle(**kw)
            out.append(st)
            if st.sent == 0 and st.failed == 0 and self.outbox_depth() == 0:
                break
        return out

    def writes(self) -> int:
        """API writes both simulators have logged so far."""
        return len(self.hs.write_log) + len(self.sf.write_log)

    def outbox_depth(self) -> int:
        with self.rt.store.tx() as tx:
            return tx.outbox_depth()

    def audit(self, **filters: Any) -> list[AuditRow]:
        with self.rt.store.tx() as tx:
            return tx.query_audit(**filters)

    def syncd(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """``python -m syncd --config <config> ARGS`` as a user runs it."""
        env = {**os.environ, **self.sb.env()}
        return subprocess.run(
            [sys.executable, "-m", "syncd", "--config", str(self.config), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


@pytest.fixture
def e2e(sandbox: Sandbox, runtime: Runtime, config_path: Path, tmp_path: Path) -> E2E:
    return E2E(sandbox, runtime, config_path, tmp_path)
