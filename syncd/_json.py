"""Plain JSON-ready values for the state store's JSON columns (dates become ISO strings), and the
one JSON style of the commands' ``--json`` output (:func:`dumps`, :func:`iso`)."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, date, datetime
from typing import Any

_PLAIN = (str, int, float, bool, type(None))


def jsonable(v: Any) -> Any:
    if type(v) in _PLAIN:  # the common case first: most values are strings
        return v
    if isinstance(v, date):  # datetimes too
        return v.isoformat()
    if isinstance(v, dict):
        return {k if type(k) is str else str(k): x if type(x) in _PLAIN else jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple | set):
        return [jsonable(x) for x in v]
    return v


# ---- machine output of the commands (``--json``; see docs/json.md) -----------------------------


def iso(v: datetime | None) -> str | None:
    """A time as syncd's JSON gives it: ISO 8601 in UTC with a ``+00:00`` offset (``T`` between
    date and time); a naive datetime is taken as UTC. None stays None."""
    if v is None:
        return None
    return (v.replace(tzinfo=UTC) if v.tzinfo is None else v.astimezone(UTC)).isoformat()


def _default(v: Any) -> Any:
    if isinstance(v, datetime):
        return iso(v)
    if isinstance(v, date):
        return v.isoformat()
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: getattr(v, f.name) for f in dataclasses.fields(v)}
    if isinstance(v, set | frozenset):
        return sorted(v, key=str)
    return str(v)


def dumps(data: Any) -> str:
    """The ``--json`` output of every command: indented, keys as given, times per :func:`iso`."""
    return json.dumps(data, indent=2, default=_default, ensure_ascii=False)
