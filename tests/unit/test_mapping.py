"""The mapping layer: loading, raw <-> canonical, positions, revision."""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict

from syncd._toml import load_toml, problems_for, validate_file
from syncd.errors import MappingError, RecordError
from syncd.mapping import default_mappings_dir, load_mappings
from syncd.model import RawRecord

T0 = datetime(2024, 1, 5, 10, 0, tzinfo=UTC)
DEFAULTS = default_mappings_dir()
M = load_mappings(DEFAULTS)


def raw(system: str, obj: str, fields: dict[str, Any], id: str = "r1") -> RawRecord:
    return RawRecord(system=system, object=obj, id=id, modified_at=T0, fields=fields)


def _tables() -> list[tuple[str, str, str, str, str, list[str]]]:
    """(system, object, term field, raw field, term, raw values) from the files themselves."""
    out = []
    for system in ("hubspot", "salesforce"):
        doc = tomllib.loads((DEFAULTS / f"{system}.toml").read_text())
        for obj, om in doc.items():
            for tf, tm in om.get("terms", {}).items():
                for term, raws in tm["values"].items():
                    out.append((system, obj, tf, tm["field"], term, raws))
    return out


TABLES = _tables()


# --------------------------------------------------------------------------- loading

def test_default_files_load_with_the_glossary() -> None:
    assert M.stages == ("subscriber", "lead", "mql", "sal", "sql", "opportunity", "customer")
    assert M.stage_index("mql") < M.stage_index("sql")
    assert M.lead_statuses == ("new", "attempting", "connected", "returned_not_ready",
                               "disqualified", "converted")
    assert [s for s in M.deal_stages if M.deal_stage_closed(s)] == ["closed_won", "closed_lost"]
    assert [s for s in M.deal_stages if M.deal_stage_won(s)] == ["closed_won"]
    assert not M.deal_stage_closed("on_hold")
    assert M.label("lead_status", "returned_not_ready") == "Returned - not ready"
    assert M.terms.lifecycle[2].section == "MOFU"
    assert {t.term for t in M.terms.lead_type} == {"new_business", "existing_customer",
                                                   "maintenance"}


def test_default_mappings_dir_is_the_repo_folder() -> None:
    assert (DEFAULTS / "terms.toml").is_file()


def test_pull_fields_cover_every_mapped_field() -> None:
    hs = M.pull_fields("hubspot", "contacts")
    for f in ("email", "lifecyclestage", "hs_lead_status", "hubspotscore",
              "recent_conversion_event_name", "recent_conversion_date", "syncd_lead_type"):
        assert f in hs
    assert len(hs) == len(set(hs))
    assert {"StageName", "Amount", "CloseDate", "ContactId"} <= set(
        M.pull_fields("salesforce", "Opportunity"))
    assert {"WhoId", "Type", "CreatedDate"} <= set(M.pull_fields("salesforce", "Task"))


def test_unknown_object_is_a_record_error() -> None:
    with pytest.raises(RecordError, match="no mapping for hubspot tickets"):
        M.to_canonical(raw("hubspot", "tickets", {}))


# --------------------------------------------------------------------------- round trips

@pytest.mark.parametrize(("system", "obj", "tf", "field", "term", "raws"), TABLES,
                         ids=[f"{t[0]}-{t[1]}-{t[4]}" for t in TABLES])
def test_every_mapped_value_round_trips(system: str, obj: str, tf: str, field: str,
                                        term: str, raws: list[str]) -> None:
    for value in raws:
        c = M.to_canonical(raw(system, obj, {field: value}))
        assert c.terms[tf] == term
        assert c.unmapped == ()
    written = M.to_raw(system, obj, {tf: term})
    assert written == {field: raws[0]}  # the first listed value is the one written
    assert M.to_canonical(raw(system, obj, written)).terms[tf] == term


def test_several_raw_values_one_term_writes_the_first() -> None:
    assert M.to_canonical(raw("hubspot", "contacts", {"hs_lead_status": "OPEN"})).terms[
        "lead_status"] == "new"
    assert M.to_raw("hubspot", "contacts", {"lead_status": "new"}) == {"hs_lead_status": "NEW"}
    assert M.to_canonical(raw("hubspot", "contacts", {"lifecyclestage": "evangelist"})).terms[
        "lifecycle"] == "customer"
    assert M.to_raw("hubspot", "contacts", {"lifecycle": "customer"}) == {
        "lifecyclestage": "customer"}


def test_key_glossary_equivalences() -> None:
    hs = M.to_canonical(raw("hubspot", "contacts", {"hs_lead_status": "BAD_TIMING"}))
    sf = M.to_canonical(raw("salesforce", "Lead", {"Status": "Returned - Not Ready"}))
    assert hs.terms["lead_status"] == sf.terms["lead_status"] == "returned_not_ready"
    assert M.to_raw("salesforce", "Lead", {"lead_status": "returned_not_ready"}) == {
        "Status": "Returned - Not Ready"}
    opp = M.to_canonical(raw("salesforce", "Opportunity", {"StageName": "Id. Decision Makers"}))
    assert opp.kind == "deal" and opp.terms["deal_stage"] == "quote_building"


def test_a_term_the_crm_cannot_hold_is_never_written() -> None:
    assert not M.can_hold("salesforce", "Lead", "lead_status", "attempting")
    assert M.can_hold("hubspot", "contacts", "lead_status", "attempting")
    with pytest.raises(RecordError, match="cannot hold"):
        M.to_raw("salesforce", "Lead", {"lead_status": "attempting"})


# --------------------------------------------------------------------------- unmapped

def test_unmapped_values_are_counted_never_guessed() -> None:
    c = M.to_canonical(raw("hubspot", "contacts", {
        "lifecyclestage": "other", "hs_lead_status": "Open", "syncd_lead_type": ""}))
    assert c.terms == {"lifecycle": None, "lead_status": None, "lead_type": None}
    # "other" is deliberately unmapped, "Open" differs in case from OPEN: both counted;
    # an empty value is just "not set"
    assert set(c.unmapped) == {("lifecyclestage", "other"), ("hs_lead_status", "Open")}


def test_missing_fields_are_not_set_not_unmapped() -> None:
    c = M.to_canonical(raw("salesforce", "Contact", {}))
    assert c.kind == "person"
    assert c.terms == {"lifecycle": None, "lead_type": None}
    assert c.unmapped == ()
    assert c.email is None


@given(st.text(min_size=1, max_size=30))
def test_any_unknown_raw_value_is_reported(value: str) -> None:
    known = M.allowed_raw_values("salesforce", "Opportunity", "StageName")
    c = M.to_canonical(raw("salesforce", "Opportunity", {"StageName": value}))
    if value in known:
        assert c.unmapped == ()
    elif value.strip():
        assert c.terms["deal_stage"] is None
        assert c.unmapped == (("StageName", value),)


# --------------------------------------------------------------------------- values

def test_hubspot_contact_values() -> None:
    c = M.to_canonical(raw("hubspot", "contacts", {
        "email": "  Ann.Lee@Example.COM ", "firstname": "Ann", "lastname": "", "hubspotscore": "35",
        "recent_conversion_event_name": "Demo request",
        "recent_conversion_date": "2024-01-04T09:30:00.000Z",
    }))
    v = c.values
    assert c.email == "ann.lee@example.com"
    assert v["first_name"] == "Ann" and v["last_name"] is None
    assert v["score"] == 35
    assert v["bofu_conversion_at"] == datetime(2024, 1, 4, 9, 30, tzinfo=UTC)


def test_a_conversion_that_is_not_bottom_of_funnel_has_no_bofu_time() -> None:
    c = M.to_canonical(raw("hubspot", "contacts", {
        "recent_conversion_event_name": "Ebook download",
        "recent_conversion_date": "2024-01-04T09:30:00.000Z"}))
    assert c.values["bofu_conversion_at"] is None


def test_salesforce_lead_values() -> None:
    c = M.to_canonical(raw("salesforce", "Lead", {
        "Email": "B@x.io", "Lead_Score__c": 35.0, "IsConverted": True,
        "ConvertedContactId": "003000000000001AAA", "Lead_Type__c": "Existing Customer"}))
    assert c.values["score"] == 35
    assert c.values["is_converted"] is True
    assert c.values["converted_contact_id"] == "003000000000001AAA"
    assert c.terms["lead_type"] == "existing_customer"
    c2 = M.to_canonical(raw("salesforce", "Lead", {"IsConverted": "false"}))
    assert c2.values["is_converted"] is False


def test_deal_values_in_both_systems() -> None:
    hs = M.to_canonical(raw("hubspot", "deals", {
        "dealname": "Big", "amount": "1500", "closedate": "2024-03-31T00:00:00Z",
        "dealstage": "closedwon", "_contact_ids": ["101", "102"]}))
    sf = M.to_canonical(raw("salesforce", "Opportunity", {
        "Name": "Big", "Amount": 1500.0, "CloseDate": "2024-03-31", "StageName": "Closed Won",
        "ContactId": "003A"}))
    for c in (hs, sf):
        assert c.values["amount"] == 1500.0
        assert c.values["close_date"] == date(2024, 3, 31)
        assert c.terms["deal_stage"] == "closed_won"
    assert hs.values["contact_ids"] == ["101", "102"]
    assert sf.values["contact_ids"] == ["003A"]
    none = M.to_canonical(raw("salesforce", "Opportunity", {"ContactId": None}))
    assert none.values["contact_ids"] == [] and none.values["amount"] is None


def test_task_attempts() -> None:
    call = M.to_canonical(raw("salesforce", "Task", {
        "WhoId": "00Q1", "Type": "Call", "Status": "Completed",
        "CreatedDate": "2024-01-02T03:04:05.000+0000"}))
    assert call.kind == "attempt"
    assert call.values["counts"] is True
    assert call.values["at"] == datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    meeting = M.to_canonical(raw("salesforce", "Task", {"WhoId": "00Q1", "Type": "Meeting"}))
    assert meeting.values["counts"] is False


@pytest.mark.parametrize(("system", "obj", "field", "value"), [
    ("hubspot", "contacts", "hubspotscore", "abc"),
    ("salesforce", "Lead", "Lead_Score__c", "n/a"),
    ("hubspot", "deals", "amount", "lots"),
    ("salesforce", "Opportunity", "CloseDate", "31/03/2024"),
    ("salesforce", "Lead", "IsConverted", "maybe"),
    ("salesforce", "Task", "CreatedDate", "yesterday"),
])
def test_bad_input_is_a_record_error_naming_everything(system: str, obj: str, field: str,
                                                       value: str) -> None:
    with pytest.raises(RecordError) as ei:
        M.to_canonical(raw(system, obj, {field: value}, id="rec-42"))
    e = ei.value
    assert (e.system, e.object, e.record_id) == (system, obj, "rec-42")
    for part in (system, obj, "rec-42", field, value):
        assert part in str(e)


def test_naive_datetimes_become_utc() -> None:
    c = M.to_canonical(raw("salesforce", "Task", {"CreatedDate": "2024-01-02T03:04:05"}))
    assert c.values["at"].tzinfo is not None


def test_to_raw_formats_for_each_crm() -> None:
    assert M.to_raw("hubspot", "contacts", {"score": 35, "email": "a@b.c", "return_reason": None}
                    ) == {"hubspotscore": "35", "email": "a@b.c", "syncd_return_reason": ""}
    assert M.to_raw("hubspot", "deals", {"amount": 1500.0, "close_date": date(2024, 3, 31)}) == {
        "amount": "1500", "closedate": "2024-03-31T00:00:00.000Z"}
    assert M.to_raw("salesforce", "Opportunity", {"amount": 1500.5, "close_date": date(2024, 3, 31)}
                    ) == {"Amount": 1500.5, "CloseDate": "2024-03-31"}
    assert M.to_raw("salesforce", "Lead", {"score": 35, "lead_type": "maintenance"}) == {
        "Lead_Score__c": 35, "Lead_Type__c": "Maintenance"}
    with pytest.raises(RecordError, match="no field for 'phone'"):
        M.to_raw("hubspot", "contacts", {"phone": "1"})


def test_helpers_for_the_engine() -> None:
    assert M.raw_email("salesforce", "Lead", {"Email": " X@Y.Z"}) == "x@y.z"
    assert M.raw_email("salesforce", "Lead", {}) is None
    assert M.clear_first_fields("hubspot", "contacts", {"lifecycle": "lead"}) == ["lifecyclestage"]
    assert M.clear_first_fields("salesforce", "Lead", {"lifecycle": "lead"}) == []


_names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")),
                 min_size=1, max_size=20).filter(lambda s: s.strip() == s and s != "")


@given(score=st.integers(0, 10**6), name=_names,
       amount=st.floats(0, 1e9, allow_nan=False).map(lambda f: round(f, 2)),
       day=st.dates(date(2000, 1, 1), date(2100, 1, 1)),
       at=st.datetimes(datetime(2000, 1, 1), datetime(2100, 1, 1), timezones=st.just(UTC)))
def test_values_round_trip_through_both_crms(score: int, name: str, amount: float, day: date,
                                             at: datetime) -> None:
    at = at - timedelta(microseconds=at.microsecond % 1000)  # both CRMs keep milliseconds
    person = {"score": score, "first_name": name}
    deal = {"amount": amount, "close_date": day, "name": name}
    for system, pobj, dobj in (("hubspot", "contacts", "deals"),
                               ("salesforce", "Lead", "Opportunity")):
        p = M.to_canonical(raw(system, pobj, M.to_raw(system, pobj, person)))
        assert {k: p.values[k] for k in person} == person
        d = M.to_canonical(raw(system, dobj, M.to_raw(system, dobj, deal)))
        assert {k: d.values[k] for k in deal} == deal
    sf_at = M.to_raw("salesforce", "Task", {"at": at})
    assert M.to_canonical(raw("salesforce", "Task", sf_at)).values["at"] == at


# --------------------------------------------------------------------------- bad files

def _copy(tmp_path: Path) -> Path:
    d = tmp_path / "mappings"
    d.mkdir()
    for f in ("terms.toml", "hubspot.toml", "salesforce.toml"):
        shutil.copy(DEFAULTS / f, d / f)
    return d


def _line_of(path: Path, needle: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


def test_bad_file_fails_closed_with_file_and_line(tmp_path: Path) -> None:
    d = _copy(tmp_path)
    hs = d / "hubspot.toml"
    hs.write_text(hs.read_text().replace('connected = ["CONNECTED"]',
                                         'connectd = ["CONNECTED"]'))
    line = _line_of(hs, "connectd =")
    with pytest.raises(MappingError) as ei:
        load_mappings(d)
    assert str(ei.value).startswith(f"{hs}:{line}:1: ")
    assert "'connectd' is not a term in terms.toml" in str(ei.value)


def test_schema_error_points_at_the_key(tmp_path: Path) -> None:
    d = _copy(tmp_path)
    sf = d / "salesforce.toml"
    sf.write_text(sf.read_text().replace('types = ["Call", "Email"]', 'types = "Call"'))
    line = _line_of(sf, 'types = "Call"')
    with pytest.raises(MappingError, match=rf"^{sf}:{line}:1: Task\.attempts\.types: "):
        load_mappings(d)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(MappingError, match="not found"):
        load_mappings(tmp_path / "nope")


# --------------------------------------------------------------------------- _toml

class _Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n: int


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid")
    title: str
    items: list[_Inner] = []
    table: dict[str, _Inner] = {}


def test_locator_positions(tmp_path: Path) -> None:
    p = tmp_path / "x.toml"
    p.write_text(
        '# c\n'
        'title = "t"\n'
        '[table.a]\n'
        'n = 1\n'
        '[[items]]\n'
        'n = 1\n'
        '[[items]]\n'
        '  n = 2\n'
        'arr = [\n'
        '  "a",  # c\n'
        '  "b",\n'
        ']\n'
        '[table]\n'
        'b = { n = 3 }\n'
        'c.n = 4\n'
    )
    doc, loc = load_toml(p)
    assert doc["items"][1]["arr"] == ["a", "b"]
    assert loc(("title",)) == (2, 1)
    assert loc(("table", "a", "n")) == (4, 1)
    assert loc(("items", 1)) == (7, 1)
    assert loc(("items", 1, "n")) == (8, 3)
    assert loc(("items", 1, "arr", 1)) == (11, 3)
    assert loc(("table", "b", "n")) == (14, 7)
    assert loc(("table", "c", "n")) == (15, 3)
    assert loc(("table", "b", "nope", 3)) == (14, 1)  # nearest parent
    assert loc(("zzz",)) == (1, 1)


def test_validate_file_first_error_and_all_problems(tmp_path: Path) -> None:
    p = tmp_path / "x.toml"
    p.write_text('title = "t"\n[[items]]\nn = "x"\n[[items]]\nn = 2\nextra = 1\n')
    with pytest.raises(MappingError) as ei:
        validate_file(p, _Doc)
    assert str(ei.value) == f"{p}:3:1: items[0].n: Input should be a valid integer, " \
        "unable to parse string as an integer"
    problems = problems_for(p, _Doc)
    assert [(q.line, q.col) for q in problems] == [(3, 1), (6, 1)]
    assert str(problems[1]).startswith(f"{p}:6:1: items[1].extra: unknown key")
    p.write_text('title = "t"\n')
    assert validate_file(p, _Doc).title == "t"
    assert problems_for(p, _Doc) == []


def test_invalid_toml_message(tmp_path: Path) -> None:
    p = tmp_path / "x.toml"
    p.write_text('title = "t"\ntitle = "u"\n')
    with pytest.raises(MappingError, match=rf"^{p}:2:\d+: invalid TOML: "):
        load_toml(p)
    p.write_bytes(b'title = "\xff"\n')
    [q] = problems_for(p, _Doc)
    assert (q.line, q.code) == (1, "toml")


# --------------------------------------------------------------------------- revision

def _git(d: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.email=t@example.com", "-c", "user.name=t", "-C", str(d), *args],
        check=True, capture_output=True, text=True).stdout.strip()


def test_revision_outside_git_is_a_content_hash(tmp_path: Path) -> None:
    d = _copy(tmp_path)
    rev = load_mappings(d).revision
    assert rev.startswith("sha256:") and len(rev) == len("sha256:") + 12
    assert not rev.endswith("+dirty")
    assert load_mappings(d).revision == rev  # stable
    (d / "terms.toml").write_text((d / "terms.toml").read_text() + "\n# note\n")
    assert load_mappings(d).revision != rev


def test_revision_in_git_clean_and_dirty(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    d = _copy(repo)
    assert load_mappings(d).revision.endswith("+dirty")  # never committed
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "mappings")
    head = _git(repo, "rev-parse", "HEAD")
    assert load_mappings(d).revision == head
    hs = d / "hubspot.toml"
    hs.write_text(hs.read_text() + "\n# a local edit\n")
    rev = load_mappings(d).revision
    assert rev.startswith("sha256:") and rev.endswith("+dirty")
