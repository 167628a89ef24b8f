"""API burn as operators read it (``syncd status``, ``/metrics``), from the ledger in the store.

Per system: calls today and in the rolling window, the cap in force and what is left of it,
the pace in use, the projection to the end of the window at the last hour's rate, syncd's share
of the org's total use (as the CRM reports it), and whether the system is paused. Read-only:
a store without the ledger (an older schema) shows nothing.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from syncd.connectors._pacing import SYSTEM_HOLD, factor_at, when
from syncd.store.ledger import Window, utc


def burn(tx: Any, now: float) -> dict[str, dict[str, Any]]:
    """Per system, the burn (see the module docstring) as plain data."""
    if not sa.inspect(tx.conn).has_table("api_reports"):
        return {}
    holds = tx.api_holds()
    return {system: _one(tx, system, r, holds, now) for system, r in sorted(tx.api_reports().items())}


def _one(tx: Any, system: str, r: dict[str, Any], holds: dict[Any, Any], now: float) -> dict[str, Any]:
    st = r["settings"] or {}
    window = Window(st.get("window", "day"), int(st.get("window_s", 86_400)))
    day, rolling = Window("day", window.length_s), Window("rolling", window.length_s)
    calls = tx.api_calls_since(system, min(day.start(now), rolling.start(now)))
    today = sum(n for (_, b), n in calls.items() if b >= day.start(now))
    last = sum(n for (_, b), n in calls.items() if b >= rolling.start(now))
    in_window = today if window.kind == "day" else last
    claims = tx.api_claims_since(system, window.start(now))
    used = max(in_window, sum(claims.values()))
    cap = int(r["cap"] or 0)
    recent_from = window.bucket(now) - window.bucket_s
    recent = sum(n for (_, b), n in calls.items() if b >= recent_from)
    rate = recent / max(1.0, now - recent_from)
    ahead = window.end(now) - now if window.kind == "day" else window.length_s
    fresh = r["reported_at"] is not None and (
        window.kind == "rolling" or window.start(r["reported_at"]) == window.start(now))
    # the CRM's own count, as last reported; never below syncd's own calls in the window (a
    # report predates the calls made since, and HubSpot's search answers carry no headers)
    org_used = max(int(r["org_used"]), in_window) if fresh and r["org_used"] is not None else None
    pace = {k: round(v * factor_at(holds.get((system, k)), now), 3) for k, v in (st.get("pace") or {}).items()}
    return {
        "window": window.describe(), "today": today, "rolling": last, "cap": cap,
        "remaining": max(0, cap - used), "pace_per_s": pace, "projected": round(in_window + rate * ahead),
        "projected_at": utc(window.end(now)).isoformat(),  # ISO 8601 (docs/json.md)
        "org_used": org_used, "org_limit": r["org_limit"],
        "org_share": round(in_window / org_used, 4) if org_used else None,
        "by_class": _by_class(calls, window.start(now)),
        "paused": _paused(system, holds.get((system, SYSTEM_HOLD)), claims, used, cap, window, now),
    }


def _paused(system: str, whole: Any, claims: dict[int, int], used: int, cap: int, window: Window,
            now: float) -> str | None:
    if whole is not None and whole.until > now:
        return f"{system}: {whole.reason} — paused until {when(whole.until, window)}"
    if cap and used >= cap:
        return (f"{system}: daily API share {used:,}/{cap:,} used — paused until "
                f"{when(window.frees_at(claims, sum(claims.values()), cap, now), window)}")
    return None


def _by_class(calls: dict[tuple[str, int], int], start: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for (k, b), n in calls.items():
        if b >= start:
            out[k] = out.get(k, 0) + n
    return out


def status_lines(data: dict[str, dict[str, Any]]) -> list[str]:
    """The lines ``syncd status`` prints for :func:`burn`'s data."""
    lines = []
    for system, b in sorted(data.items()):
        pace = ", ".join(f"{k} {v:g}/s" for k, v in sorted(b["pace_per_s"].items())) or "unpaced"
        org = (f"; syncd is {b['org_share']:.0%} of the org's {b['org_used']:,} calls"
               if b.get("org_share") is not None else "")
        lines.append(f"{system} API: {b['today']:,} calls today, {b['rolling']:,} in the rolling window "
                     f"({b['window']} budget: {b['remaining']:,} of {b['cap']:,} left); pace {pace}; "
                     f"projected {b['projected']:,} by {_human(b['projected_at'])}{org}")
        if b.get("paused"):
            lines.append(b["paused"])
    return lines


def _human(iso: str) -> str:
    return iso[:16].replace("T", " ") + " UTC"


def print_lines(data: dict[str, dict[str, Any]], console: Any) -> None:
    for line in status_lines(data):
        console.print(line, highlight=False)
