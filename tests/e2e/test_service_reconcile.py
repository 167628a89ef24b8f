"""The service's count check, as a user runs `syncd run`: a gap planted in the store while it runs
is flagged (the error metric, cycles counted failed with ``reconcile_gap``, a status line with
sample ids); `syncd reconcile --repair` closes it and the next check clears the metric."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta

import pytest
from test_service import ServiceProc, World, start_service, wait_until, world  # noqa: F401 - fixtures

from syncd.model import utcnow

pytestmark = pytest.mark.slow


def test_service_count_check_flags_a_planted_gap_until_repaired(
    world: World, start_service: Callable[[], ServiceProc]  # noqa: F811 - the fixtures imported above
) -> None:
    world.config.write_text(world.config.read_text() + "\n[reconcile]\ncount_every_s = 1\nsample_ids = 3\n")
    svc = start_service()
    svc.wait_ok_cycles("contacts", 2)
    store = world.store()
    try:
        with store.tx() as tx:  # records not touched lately: the overlap re-read does not bring them back
            old = [r.id for r in tx.iter_records("hubspot", "contacts") if r.modified_at < utcnow() - timedelta(days=1)]
            planted = sorted(old)[:2]
            tx.forget_records([("hubspot", "contacts", i) for i in planted])
    finally:
        store.close()

    wait_until(lambda: svc.alive() and svc.metric("syncd_reconcile_missing_records", system="hubspot",
                                                  object="contacts") == 2, lambda: f"the gap metric; {svc.tail()}")
    wait_until(lambda: svc.metric("syncd_cycle_failures_total", group="contacts", error="reconcile_gap") >= 1,
               "a contacts cycle counted failed for the gap")
    status = json.loads(world.syncd("status", "--json").stdout)
    line = " ".join(status["reconcile"]["lines"])
    assert "hubspot contacts: 2 records missing from the store" in line
    assert all(i in line for i in planted)  # sample ids
    assert svc.events("reconcile_gap")

    r = world.syncd("reconcile", "--object", "contacts", "--repair")
    assert r.returncode == 0, r.stderr

    wait_until(lambda: svc.alive() and svc.metric("syncd_reconcile_missing_records", system="hubspot",
                                                  object="contacts") == 0 and not json.loads(
        world.syncd("status", "--json").stdout)["reconcile"]["gaps"], "the gap cleared")
    ok_before = svc.ok_cycles("contacts")
    svc.wait_ok_cycles("contacts", ok_before + 1)
    assert svc.stop() == 0


def test_the_running_service_settles_a_purged_contact_its_count_check_finds(
    world: World, start_service: Callable[[], ServiceProc]  # noqa: F811 - the fixtures imported above
) -> None:
    """A contact purged in HubSpot (gone from every endpoint: no feed reports it) is found by the
    service's own count check (a counted gap makes it diff ids), confirmed, tombstoned and left
    alone, with no `reconcile --repair` from a person."""
    world.config.write_text(world.config.read_text() + "\n[reconcile]\ncount_every_s = 1\nsample_ids = 3\n")
    svc = start_service()
    svc.wait_ok_cycles("contacts", 2)
    store = world.store()
    try:
        with store.tx() as tx:  # a counted gap (two records forgotten) makes the check diff ids
            old = sorted(r.id for r in tx.iter_records("hubspot", "contacts")
                         if r.modified_at < utcnow() - timedelta(days=1))
            gone, planted = old[0], old[1:3]
            tx.forget_records([("hubspot", "contacts", i) for i in planted])
    finally:
        store.close()
    world.sb.hubspot.purge("contacts", gone)

    def tombstoned() -> bool:
        r = world.syncd("tombstones", "--system", "hubspot", "--json")
        return r.returncode == 0 and any(t["id"] == gone for t in json.loads(r.stdout)["tombstones"])

    wait_until(lambda: svc.alive() and tombstoned(),
               lambda: f"the purged contact tombstoned by the service; {svc.tail()}")
    assert svc.events("reconcile_extras_settled")
    seen = world.sb.hubspot.id_requests[gone]
    r = world.syncd("reconcile", "--object", "contacts", "--repair")  # the two planted as missing
    assert r.returncode == 0, r.stderr
    ok_before = svc.ok_cycles("contacts")
    svc.wait_ok_cycles("contacts", ok_before + 2)
    assert world.sb.hubspot.id_requests[gone] == seen  # nothing asks for (or writes to) the dead id again
    assert svc.stop() == 0
