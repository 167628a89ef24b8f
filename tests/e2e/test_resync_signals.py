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
