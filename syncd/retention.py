"""Retention: finished rows older than ``[retention]`` says are deleted, in small batches.

What goes (each kind only once it is finished, never open work):

- ``outbox``: done, skipped and superseded writes (their audit rows stay: audit has its own age);
- ``runs``: finished runs; ``quarantine``: resolved entries;
- ``tombstones``: deleted/merged records (0 days by default: kept for ever, they stop re-creation);
- ``audit``: audit rows, 400 days by default.

``syncd prune --dry-run`` counts what would go; ``syncd prune`` deletes it. The service runs
:func:`prune` as its own scheduled job, off the cycle's worker: each batch of ``batch_size`` rows
is its own short transaction, with ``pause_s`` between batches, so a cycle waits at most one batch
for the store's write lock (SQLite) and no lock outlives a batch (PostgreSQL).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog

from syncd.config import Config, RetentionConfig
from syncd.model import utcnow
from syncd.store import Store
from syncd.store.retention import PRUNE_KINDS

log = structlog.get_logger()

_DAYS = {
    "outbox": "outbox_done_days",
    "runs": "runs_days",
    "quarantine": "quarantine_resolved_days",
    "tombstones": "tombstones_days",
    "audit": "audit_days",
}
_WHAT = {
    "outbox": "done/skipped/superseded writes",
    "runs": "finished runs",
    "quarantine": "resolved quarantine entries",
    "tombstones": "tombstones (deleted/merged records)",
    "audit": "audit rows",
}


@dataclass(frozen=True, slots=True)
class PruneLine:
    kind: str
    what: str
    keep_days: int  # 0: kept for ever
    cutoff: datetime | None  # rows older than this go; None: nothing goes
    rows: int  # would go (dry run) or went


def cutoffs(ret: RetentionConfig, now: datetime) -> dict[str, datetime | None]:
    """Per kind, the time before which finished rows go (None: kept for ever)."""
    out: dict[str, datetime | None] = {}
    for kind in PRUNE_KINDS:
        days = int(getattr(ret, _DAYS[kind]))
        out[kind] = now - timedelta(days=days) if days > 0 else None
    return out


def plan(store: Store, cfg: Config, now: datetime | None = None) -> list[PruneLine]:
    """What a prune would delete now (read-only: one snapshot, nothing written)."""
    now = now or utcnow()
    lines = []
    with store.tx(readonly=True) as tx:
        for kind, cutoff in cutoffs(cfg.retention, now).items():
            n = tx.count_prunable(kind, cutoff) if cutoff is not None else 0
            lines.append(PruneLine(kind, _WHAT[kind], int(getattr(cfg.retention, _DAYS[kind])), cutoff, n))
    return lines


def prune(store: Store, cfg: Config, now: datetime | None = None, *,
          should_stop: Callable[[], bool] = lambda: False,
          on_batch: Callable[[str, int], None] | None = None) -> list[PruneLine]:
    """Delete what :func:`plan` counts, ``batch_size`` rows per transaction, ``pause_s`` apart;
    stops between two batches when ``should_stop()``. Returns what went, per kind."""
    now = now or utcnow()
    ret = cfg.retention
    lines = []
    for kind, cutoff in cutoffs(ret, now).items():
        gone = 0
        while cutoff is not None and not should_stop():
            with store.tx() as tx:  # one batch, one short transaction
                n = tx.prune_batch(kind, cutoff, ret.batch_size)
            gone += n
            if on_batch is not None:
                on_batch(kind, n)
            if n < ret.batch_size:
                break
            if ret.pause_s:
                time.sleep(ret.pause_s)
        lines.append(PruneLine(kind, _WHAT[kind], int(getattr(ret, _DAYS[kind])), cutoff, gone))
        if gone:
            log.info("pruned", kind=kind, rows=gone, older_than=cutoff.isoformat() if cutoff else None)
    return lines


def run_job(store: Store, cfg: Config, *, should_stop: Callable[[], bool]) -> None:
    """The service's prune job: never raises (a failed prune is retried at the next run)."""
    try:
        prune(store, cfg, should_stop=should_stop)
    except Exception as exc:  # noqa: BLE001 - housekeeping never takes the service down
        from syncd.stats import one_line

        log.warning("prune_failed", error=one_line(exc), next="the next prune run retries")


def as_json(lines: list[PruneLine], *, dry_run: bool) -> dict[str, Any]:
    return {"dry_run": dry_run,
            "kinds": [{**asdict(x), "cutoff": x.cutoff.isoformat() if x.cutoff else None} for x in lines]}


def print_lines(lines: list[PruneLine], *, dry_run: bool) -> None:
    from syncd.sheet import Sheet, stdout_console, token

    t = Sheet("prune --dry-run: what would go (nothing deleted)" if dry_run else "prune: deleted")
    for col in ("kind", "rows", "kept", "older than"):
        token(t, col, justify="right" if col == "rows" else "left")
    for x in lines:
        kept = f"{x.keep_days} days" if x.keep_days else "for ever"
        t.add_row(x.what, f"{x.rows:,}", kept, x.cutoff.isoformat()[:19] if x.cutoff else "—")
    t.print(stdout_console())


def run_cli(cfg: Config, *, dry_run: bool, as_json_out: bool) -> None:
    """``syncd prune [--dry-run] [--json]``."""
    import json

    import click

    store = Store.open(cfg.state_url(), sqlite_synchronous=cfg.state.sqlite_synchronous)
    try:
        lines = plan(store, cfg) if dry_run else prune(store, cfg)
    finally:
        store.close()
    if as_json_out:
        click.echo(json.dumps(as_json(lines, dry_run=dry_run), indent=2))
    else:
        print_lines(lines, dry_run=dry_run)
