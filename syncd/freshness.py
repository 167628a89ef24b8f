"""Never act on half a picture: may entities of a kind be decided, given how complete and how
fresh the store's copy of each CRM object is? Pure (no I/O, time passed in).

An entity is decided only when every object it reads
- has finished a first full pull into this store (``first_complete_at``), and
- pulled successfully within its freshness bound (default two intervals of its group).

Otherwise it stays due and undecided; the cycle is ``partial`` and says why, in one line per
object that holds it back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from syncd import catalogue
from syncd.store.rows import PullStateRow

ObjectKey = tuple[str, str]  # (system, object)

# The intervals `syncd run` uses by default; engines built from a config pass their own bounds.
DEFAULT_INTERVALS_S = {"contacts": 30.0, "deals": 60.0}
DEFAULT_FRESHNESS_INTERVALS = 2.0


def objects_read_by(kind: str) -> list[ObjectKey]:
    """Every (system, object) whose records a decision about an entity of ``kind`` reads.

    A person's decision reads its person records in both CRMs, the connection attempts
    pointing at them and the deals they are on (an open or won deal moves the stage), so it
    needs every object; a deal's reads the deal objects of both CRMs."""
    objs = catalogue.OBJECTS if kind == "person" else catalogue.objects(kind="deal")
    return [(o.system, o.name) for o in objs]


def bounds(intervals_s: Mapping[str, float] | None = None,
           freshness_intervals: float = DEFAULT_FRESHNESS_INTERVALS) -> dict[ObjectKey, timedelta]:
    """The freshness bound of each object: ``freshness_intervals`` × its group's interval."""
    iv = {**DEFAULT_INTERVALS_S, **(intervals_s or {})}
    return {(o.system, o.name): timedelta(seconds=freshness_intervals * iv[o.group]) for o in catalogue.OBJECTS}


def human_age(delta: timedelta) -> str:
    s = max(0, int(delta.total_seconds()))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d"


@dataclass(frozen=True, slots=True)
class Picture:
    """The store's pull state at ``now``, judged against the freshness bounds."""

    states: Mapping[ObjectKey, PullStateRow]
    bounds: Mapping[ObjectKey, timedelta]
    now: datetime

    def problem(self, key: ObjectKey) -> str | None:
        """Why ``key`` holds decisions back (one line), or None when it is complete and fresh."""
        system, obj = key
        st = self.states.get(key)
        why = f": {st.last_error}" if st is not None and st.last_error else ""
        if st is None or st.first_complete_at is None:
            return f"{system} {obj}: first full pull not finished{why}"
        bound = self.bounds.get(key, timedelta(seconds=DEFAULT_FRESHNESS_INTERVALS * 60))
        assert st.last_ok_at is not None
        age = self.now - st.last_ok_at
        if age > bound:
            return (f"{system} {obj}: last successful pull {human_age(age)} ago, over the "
                    f"{human_age(bound)} freshness bound{why}")
        return None

    def linkable_kinds(self) -> list[str]:
        """Which kinds of records may be linked: people once every person object of both CRMs
        finished a first full pull into this store, deals (and connection attempts) once every
        object did. Until then those records are recorded but not linked: linking one CRM's
        records alone would make one-sided people and deals that the other side's records,
        arriving later, could not all rejoin."""
        def done(keys: Sequence[ObjectKey]) -> bool:
            return all((st := self.states.get(k)) is not None and st.first_complete_at is not None for k in keys)

        if not done([(o.system, o.name) for o in catalogue.objects(kind="person")]):
            return []
        return list(catalogue.KINDS) if done(objects_read_by("person")) else ["person"]

    def first_pulls_done(self) -> bool:
        """Every object finished a first full pull into this store."""
        return len(self.linkable_kinds()) == len(catalogue.KINDS)

    def blockers(self, kind: str) -> list[str]:
        """One line per object that keeps entities of ``kind`` from being decided."""
        return [p for key in objects_read_by(kind) if (p := self.problem(key)) is not None]

    def ready(self, kind: str) -> bool:
        return not self.blockers(kind)

    def by_system(self) -> dict[str, list[str]]:
        """The problems of every object, grouped by system (for status and /healthz)."""
        out: dict[str, list[str]] = {}
        for key in objects_read_by("person"):
            p = self.problem(key)
            if p is not None:
                out.setdefault(key[0], []).append(p)
        return out
