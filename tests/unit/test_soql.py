"""The SOQL subset parser used by the Salesforce sandbox."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from syncd.sandbox import soql
from syncd.sandbox.soql import And, Cond, Not, Or, SoqlError, parse


def test_the_incremental_pull_query_parses() -> None:
    q = parse(
        "SELECT Id, Email, SystemModstamp FROM Lead WHERE SystemModstamp >= "
        "2024-01-02T03:04:05Z ORDER BY SystemModstamp, Id LIMIT 10"
    )
    assert q.fields == ("Id", "Email", "SystemModstamp")
    assert q.sobject == "Lead"
    assert q.where == Cond("SystemModstamp", ">=", datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC))
    assert q.order_by == (("SystemModstamp", False), ("Id", False))
    assert q.limit == 10


@pytest.mark.parametrize(
    "literal",
    [
        "2024-01-02T05:04:05+02:00",
        "2024-01-02T03:04:05.000Z",
        "2024-01-02T03:04:05+0000",
        "2024-01-01T22:04:05-05:00",
    ],
)
def test_datetime_literals_with_z_or_offsets_are_utc(literal: str) -> None:
    q = parse(f"SELECT Id FROM Lead WHERE LastModifiedDate > {literal}")
    assert isinstance(q.where, Cond)
    assert q.where.value == datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_and_binds_tighter_than_or_and_parentheses_override() -> None:
    q = parse("SELECT Id FROM Lead WHERE A__c = 1 OR B__c = 2 AND C__c = 3")
    assert q.where == Or((Cond("A__c", "=", 1), And((Cond("B__c", "=", 2), Cond("C__c", "=", 3)))))
    q = parse("select Id from Lead where (A__c = 1 or B__c = 2) and not C__c = 3")
    assert q.where == And(
        (Or((Cond("A__c", "=", 1), Cond("B__c", "=", 2))), Not(Cond("C__c", "=", 3)))
    )


def test_values_of_every_kind() -> None:
    q = parse(
        "SELECT Id FROM Opportunity WHERE Name IN ('a', 'b') AND Amount >= 1.5 AND "
        "IsWon = TRUE AND CloseDate < 2024-03-31 AND AccountId != NULL AND "
        "StageName NOT IN ('Closed Lost') AND Name LIKE 'Ac%'"
    )
    assert isinstance(q.where, And)
    assert [c.value for c in q.where.parts if isinstance(c, Cond)] == [
        ("a", "b"),
        1.5,
        True,
        date(2024, 3, 31),
        None,
        ("Closed Lost",),
        "Ac%",
    ]
    assert [c.op for c in q.where.parts if isinstance(c, Cond)] == [
        "IN",
        ">=",
        "=",
        "<",
        "!=",
        "NOT IN",
        "LIKE",
    ]


def test_string_escapes() -> None:
    q = parse(r"SELECT Id FROM Lead WHERE LastName = 'O\'Brien \\ x'")
    assert isinstance(q.where, Cond)
    assert q.where.value == "O'Brien \\ x"


def test_order_desc_and_operator_alias() -> None:
    q = parse("SELECT Id FROM Lead WHERE Status <> 'x' ORDER BY CreatedDate DESC, Id ASC")
    assert q.where == Cond("Status", "!=", "x")
    assert q.order_by == (("CreatedDate", True), ("Id", False))


@pytest.mark.parametrize(
    "text",
    [
        "",
        "SELECT FROM Lead",
        "SELECT Id Lead",
        "SELECT Id FROM Lead WHERE",
        "SELECT Id FROM Lead WHERE Email = ",
        "SELECT Id FROM Lead WHERE Email == 'a'",
        "SELECT Id FROM Lead WHERE (Email = 'a'",
        "SELECT Id FROM Lead WHERE Email IN ()",
        "SELECT Id FROM Lead LIMIT x",
        "SELECT Id FROM Lead GROUP BY Email",
        "SELECT COUNT(Id) FROM Lead",  # COUNT() is in the subset, COUNT(field) is not
        'SELECT Id FROM Lead WHERE Email = "a"',
        "SELECT Id FROM Lead WHERE Email = 'unterminated",
        "SELECT Id FROM Lead WHERE Email LIKE 5",
        r"SELECT Id FROM Lead WHERE Email = 'bad \q escape'",
    ],
)
def test_outside_the_subset_is_malformed(text: str) -> None:
    with pytest.raises(SoqlError) as exc:
        parse(text)
    assert exc.value.code == "MALFORMED_QUERY"
    assert str(exc.value)


def test_like_patterns() -> None:
    rx = soql.like_to_regex("ac_e")
    assert rx.fullmatch("ACME") is not None
    assert rx.fullmatch("ACE") is None
    assert rx.fullmatch("ACMME") is None
    assert soql.like_to_regex("ac%").fullmatch("Acme Tooling") is not None
    assert soql.like_to_regex(r"50\%").fullmatch("50%") is not None
    assert soql.like_to_regex(r"50\%").fullmatch("500") is None


def test_fields_of_collects_every_field() -> None:
    q = parse("SELECT Id FROM Lead WHERE (A = 1 OR NOT B = 2) AND C IN (1)")
    assert soql.fields_of(q.where) == {"A", "B", "C"}


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30))
def test_any_string_round_trips_through_quoting(value: str) -> None:
    quoted = "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    q = parse(f"SELECT Id FROM Lead WHERE LastName = {quoted}")
    assert isinstance(q.where, Cond)
    assert q.where.value == value
