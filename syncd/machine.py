"""``--json`` shapes of the commands that do work (``sync --once``, ``sync --dry-run``); see
docs/json.md. Times go through :func:`syncd._json.dumps` (ISO 8601, UTC)."""

from __future__ import annotations

from typing import Any

from syncd.stats import CycleStats, PlannedWrite

SUMMARY_KEYS = ("pulled", "changed", "quarantined", "unmapped", "linked", "conflicts", "decisions", "events",
                "sent", "skipped", "failed", "undecided")


def planned_data(p: PlannedWrite) -> dict[str, Any]:
    return {"system": p.system, "object": p.object, "record_id": p.record_id, "op": p.op, "who": p.who,
            "changes": {k: [b, a] for k, (b, a) in p.changes.items()}, "rule": p.rule, "reason": p.reason}


def cycle_data(stats: CycleStats, *, dry_run: bool, group: str | None) -> dict[str, Any]:
    """One cycle: its status (``ok`` or ``partial``, with the reason), its counts (every key
    always present), and for a dry run the planned writes."""
    summary = {**stats.summary(), "undecided": stats.undecided}
    return {"mode": "dry_run" if dry_run else "once", "object": group,
            "status": "partial" if stats.partial else "ok", "reason": stats.partial_reason(),
            "summary": {k: summary.get(k, 0) for k in SUMMARY_KEYS},
            "planned": [planned_data(p) for p in stats.planned] if dry_run else []}
