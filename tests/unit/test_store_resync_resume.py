"""A queued resync a shutdown interrupted (state ``interrupted``, with what it did) goes back to
the queue at the next service start, marked to resume; on both store backends."""

from __future__ import annotations

from datetime import UTC, datetime

from syncd.resync import ResyncRequest
from syncd.store import Store

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


def test_an_interrupted_resync_is_queued_again_to_resume(store: Store) -> None:
    with store.tx() as tx:
        rid = tx.queue_resync(ResyncRequest(group="contacts", full=True).to_params(), now=T0)
        done = tx.queue_resync(ResyncRequest().to_params(), now=T0)
        assert tx.claim_resync("daemon-a", now=T0).id == rid  # type: ignore[union-attr]
        tx.finish_resync(rid, "interrupted", {"pulled": 120, "note": "stopped"}, now=T0)
        assert tx.claim_resync("daemon-a", now=T0).id == done  # type: ignore[union-attr]
        tx.finish_resync(done, "done", {"pulled": 1}, now=T0)

    with store.tx() as tx:
        (again,) = tx.requeue_interrupted_resyncs()
        assert (again.id, again.result) == (rid, {"pulled": 120, "note": "stopped"})
        assert tx.requeue_interrupted_resyncs() == []  # once
        (row,) = tx.resync_queue()
    assert (row.id, row.state, row.picked_by) == (rid, "queued", None)
    req = ResyncRequest.from_params(row.params)
    assert (req.group, req.full, req.resume) == ("contacts", True, True)
    assert row.result == {"pulled": 120, "note": "stopped"}  # what the first run did, until it finishes
