"""``syncd mappings check``: every problem in every mapping file at once, with file:line:col.

Exit-code policy (the CLI applies it with :func:`exit_code`): 0 clean (warnings
allowed), 1 problems found, 2 a directory or file that cannot be read.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import structlog

from syncd._toml import Problem
from syncd.mapping import Mappings, collect

log = structlog.get_logger()


def _sla_checker() -> Callable[[Path], list[Problem]] | None:
    """The SLA module's ``sla_problems`` if it exists (it is owned and validated there)."""
    try:
        mod = importlib.import_module("syncd.sla")
    except ImportError:
        return None
    fn = getattr(mod, "sla_problems", None)
    return fn if callable(fn) else None


def check_directory(directory: Path) -> list[Problem]:
    """Every problem in the mapping folder: schema, unknown terms, duplicates, unknown files."""
    d = Path(directory)
    if not d.is_dir():
        return [Problem(str(d), 1, 1, "not a readable directory", code="unreadable")]
    _, problems = collect(d)
    if any(p.code == "unreadable" and p.file == str(d) for p in problems):
        return problems
    checker = _sla_checker()
    if checker is not None:
        try:
            problems += checker(d)
        except Exception as e:  # noqa: BLE001 - a bug there must not hide the problems found here
            log.error("sla_check_failed", error=f"{type(e).__name__}: {e}")
            problems.append(Problem(str(d / "sla.toml"), 1, 1,
                                    f"the SLA check failed: {type(e).__name__}: {e}",
                                    code="sla-check-failed"))
    return sorted(dict.fromkeys(problems), key=lambda p: (p.file, p.line, p.col))  # each problem once


def compare_live(
    m: Mappings, allowed: Mapping[tuple[str, str, str], Iterable[str]]
) -> list[Problem]:
    """Compare the mappings with the values each CRM field allows today.

    ``allowed``: (system, object, raw field) -> the values the CRM offers (picklist
    values, enumeration options, pipeline stage ids). Reports values in the CRM that
    no mapping names (they would be read as unknown), and mapped values the CRM no
    longer has (they can never be read, and writing them fails).
    """
    out: list[Problem] = []
    for (system, obj, field), values in sorted(allowed.items()):
        if (system, obj) not in m.objects():
            continue
        term_field = m.term_fields(system, obj).get(field)
        if term_field is None:
            continue  # not a field the mappings translate
        crm = set(values)
        mapped = m.allowed_raw_values(system, obj, field)
        base = (obj, "terms", term_field)
        for v in sorted(crm - mapped):
            f, line, col = m.position(system, (*base, "values"))
            out.append(Problem(
                f, line, col,
                f"{system} {obj}.{field}: CRM value {v!r} is not mapped (read as unknown); "
                "map it or list it in unmapped", code="live-unmapped"))
        for v in sorted(mapped - crm):
            f, line, col = m.position(system, m.value_path(system, obj, term_field, v))
            out.append(Problem(
                f, line, col,
                f"{system} {obj}.{field}: mapped value {v!r} no longer exists in the CRM",
                code="live-missing"))
    return out


def live_problems(m: Mappings, connectors: Mapping[str, Any]) -> list[Problem]:
    """``--live``: the values each CRM field allows (:func:`compare_live`) and the External ID
    fields the mappings declare (:func:`check_external_ids`), read through ``connectors``
    (closed here)."""
    allowed: dict[tuple[str, str, str], list[str]] = {}
    described: dict[tuple[str, str], list[dict[str, Any]]] = {}  # the objects declaring an External ID
    for system, conn in connectors.items():
        try:
            for (obj, fld), vals in conn.allowed_values().items():
                allowed[(system, obj, fld)] = vals
            describe = getattr(conn, "described_fields", None)
            for obj in [o for s, o in m.objects() if s == system and m.external_id(s, o)]:
                if describe is not None:
                    described[(system, obj)] = describe(obj)
        finally:
            conn.close()
    return compare_live(m, allowed) + check_external_ids(m, described)


def check_external_ids(m: Mappings, described: Mapping[tuple[str, str], Iterable[Mapping[str, Any]]]) -> list[Problem]:
    """Whether the CRM has the External ID fields the mappings declare (``external_id``: creates
    upsert on it). ``described``: (system, object) -> describe's fields as the user syncd runs as
    sees them, for the objects that declare one. A declared field the CRM lacks, that is not an
    External ID, or that this user cannot set on create, is an error (its creates fall back to the
    weaker email look-up, or are refused); Salesforce mappings declaring none get a warning."""
    out: list[Problem] = []
    declared = [(s, o, f) for s, o in m.objects() if (f := m.external_id(s, o))]
    for system, obj, field in declared:
        if (system, obj) not in described:
            continue
        seen = {str(d.get("name", "")).lower(): d for d in described[(system, obj)]}
        info = seen.get(field.lower())
        if info is None:
            code, why = ("live-external-id-missing",
                         "no such External ID field in the CRM; creates fall back to the email look-up (weaker). "
                         "Add it (Text, External ID, Unique) or remove external_id")
        elif not info.get("externalId"):
            code, why = ("live-external-id-not-external",
                         "not an External ID field; creates fall back to the email look-up (weaker). Mark it "
                         "External ID and Unique, or name another field in external_id")
        elif not info.get("createable"):
            code, why = ("live-external-id-not-createable",
                         "the External ID is not createable for this user: the CRM refuses the creates that set "
                         "it. Give the user edit access to the field (field-level security) or remove external_id")
        else:
            continue
        f, line, col = m.position(system, (obj, "external_id"))
        out.append(Problem(f, line, col, f"{system} {obj}.{field}: {why}", code=code))
    if not any(s == "salesforce" for s, _, _ in declared) and any(s == "salesforce" for s, _ in m.objects()):
        f, line, col = m.position("salesforce", ())
        out.append(Problem(f, line, col, "salesforce: no object declares external_id: creates rely on the "
                           "email look-up before a resend (weaker; see [Lead] external_id)",
                           severity="warning", code="live-external-id-none"))
    return out


def format_problems(problems: Iterable[Problem], fmt: str = "text") -> str:
    """Text: one ``file:line:col: severity: message`` per line. JSON: a list of objects."""
    ps = list(problems)
    if fmt == "json":
        return json.dumps([
            {"file": p.file, "line": p.line, "col": p.col, "severity": p.severity,
             "code": p.code, "message": p.message} for p in ps
        ], indent=2)
    return "\n".join(f"{p.file}:{p.line}:{p.col}: {p.severity}: {p.message}" for p in ps)


def exit_code(problems: Iterable[Problem]) -> int:
    """0 clean (warnings allowed), 1 problems found, 2 something could not be read."""
    ps = list(problems)
    if any(p.code == "unreadable" for p in ps):
        return 2
    return 1 if any(p.severity == "error" for p in ps) else 0
