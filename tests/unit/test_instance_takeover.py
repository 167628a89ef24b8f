"""A restarted daemon takes over its own dead predecessor's leases at once: same instance name on
this host, and no process with the predecessor's pid. Anyone else's lease still waits for its TTL."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from syncd.model import utcnow
from syncd.resync import LeaseKeeper, dead_predecessor, new_owner
from syncd.store import Store


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_only_a_dead_process_of_the_same_instance_is_a_predecessor() -> None:
    me = new_owner("/etc/syncd/syncd.toml")
    where = me.rsplit(":", 2)[0]
    dead = _dead_pid()
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]) as alive:
        try:
            assert dead_predecessor(f"{where}:{dead}:deadbeef", me)
            assert not dead_predecessor(f"{where}:{alive.pid}:cafe0000", me)  # still running
            assert not dead_predecessor(f"{where}x:{dead}:deadbeef", me)  # another instance
            assert not dead_predecessor(f"otherhost/etc/syncd/syncd.toml:{dead}:deadbeef", me)
            assert not dead_predecessor(me, me)
        finally:
            alive.kill()


def test_a_restart_takes_its_dead_predecessors_lease_at_once_with_a_new_token(tmp_path: Path) -> None:
    store = Store.open(f"sqlite:///{tmp_path / 's.db'}")
    try:
        me = new_owner("/etc/syncd/syncd.toml")
        where = me.rsplit(":", 2)[0]
        gone = f"{where}:{_dead_pid()}:deadbeef"
        stranger = f"{where}-other:{_dead_pid()}:deadbeef"
        with store.tx() as tx:
            first = tx.acquire_lease_token("cycle:contacts", gone, 30, utcnow())
            assert tx.acquire_lease_token("cycle:deals", stranger, 30, utcnow()) is not None
        keeper = LeaseKeeper(store, me, takeover=True)
        try:
            assert keeper.try_acquire("cycle:contacts")  # not 30 s later: now
            fence = keeper.fence("cycle:contacts")
            assert fence is not None and first is not None and fence[2] == first + 1
            assert not keeper.try_acquire("cycle:deals")  # another instance's: it waits for the TTL
            with store.tx() as tx:
                assert tx.lease_holder("cycle:contacts", utcnow()) == me
        finally:
            keeper.close()
    finally:
        store.close()
