"""Plain JSON-ready values for the state store's JSON columns (dates become ISO strings)."""

from __future__ import annotations

from datetime import date
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
