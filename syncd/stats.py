"""What one cycle did (:class:`CycleStats`) and the writes it planned (:class:`PlannedWrite`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from syncd.errors import SyncError


@dataclass
class PlannedWrite:
    """A write the rules want, for --dry-run tables and the demo narrative."""

    system: str
    object: str
    record_id: str | None
    op: str
    who: str
    changes: dict[str, tuple[Any, Any]]
    rule: str
    reason: str


@dataclass
class CycleStats:
    pulled: dict[str, int] = field(default_factory=dict)
    changed: int = 0
    quarantined: int = 0
    unmapped: int = 0
    linked: int = 0
    conflicts: int = 0
    decisions: int = 0
    events: int = 0
    sent: int = 0
    skipped: int = 0
    failed: int = 0
    planned: list[PlannedWrite] = field(default_factory=list)
    # the half picture: systems whose pull failed in this cycle (the error, for back-off),
    # why decisions were held, and how many due entities were left undecided for it
    pull_failures: dict[str, SyncError] = field(default_factory=dict)
    held: list[str] = field(default_factory=list)
    undecided: int = 0
    conflicts_resolved: int = 0
    dead: int = 0  # records found deleted or merged away (tombstoned) in this cycle
    restored: int = 0  # tombstoned records that came back (restore, undelete)

    @property
    def partial(self) -> bool:
        return bool(self.pull_failures or self.held)

    def partial_reason(self) -> str | None:
        """One line: which systems failed and why, and what that held back."""
        if not self.partial:
            return None
        parts = [f"{system}: {one_line(exc)}" for system, exc in sorted(self.pull_failures.items())]
        parts += [h for h in self.held if not any(h.startswith(f"{s} ") for s in self.pull_failures)]
        if self.undecided:
            parts.append(f"{self.undecided} due people/deals wait for a complete picture")
        return "; ".join(parts)

    def summary(self) -> dict[str, Any]:
        out = {"pulled": sum(self.pulled.values()), "changed": self.changed, "quarantined": self.quarantined,
               "unmapped": self.unmapped, "linked": self.linked, "conflicts": self.conflicts,
               "decisions": self.decisions, "events": self.events, "sent": self.sent,
               "skipped": self.skipped, "failed": self.failed}
        if self.partial:
            out["undecided"] = self.undecided
        if self.dead or self.restored:
            out.update(dead=self.dead, restored=self.restored)
        return out


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: first line`` of an error, for run rows, log lines and status."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"[:limit]
