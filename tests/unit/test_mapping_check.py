"""`syncd mappings check`: every problem class at the right file:line, never a traceback."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from syncd._toml import Problem
from syncd.errors import MappingError
from syncd.mapping import default_mappings_dir, load_mappings
from syncd.mapping_check import check_directory, compare_live, exit_code, format_problems

CORPUS = Path(__file__).parent / "broken_mappings"
CASES = sorted(p.name for p in CORPUS.iterdir() if p.is_dir())
MAPPING_FILES = ("terms.toml", "hubspot.toml", "salesforce.toml")
EXPECT = re.compile(r"#\s*expect:\s*([\w-]+)(\s+warning)?")


def _copy_defaults(dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in MAPPING_FILES:
        shutil.copy(default_mappings_dir() / name, dst / name)
    return dst


def _mine(problems: list[Problem]) -> list[Problem]:
    """Problems in the mapping files (the SLA file is checked by syncd.sla, not here)."""
    return [p for p in problems if not p.file.endswith("sla.toml")]


def test_default_mappings_are_clean() -> None:
    problems = _mine(check_directory(default_mappings_dir()))
    assert problems == []
    assert exit_code(problems) == 0


@pytest.mark.parametrize("case", CASES)
def test_each_problem_class_is_reported_at_its_line(case: str, tmp_path: Path) -> None:
    d = _copy_defaults(tmp_path / "m")
    expected: set[tuple[str, int, str, str]] = set()
    case_files = set()
    for f in (CORPUS / case).glob("*.toml"):
        shutil.copy(f, d / f.name)
        case_files.add(str(d / f.name))
        for i, line in enumerate(f.read_text().splitlines(), start=1):
            m = EXPECT.search(line)
            if m:
                sev = "warning" if m.group(2) else "error"
                expected.add((str(d / f.name), i, m.group(1), sev))
    assert expected, f"case {case} marks no expected problem"

    problems = _mine(check_directory(d))
    got = {(p.file, p.line, p.code, p.severity) for p in problems}
    assert expected <= got, format_problems(problems)
    # every error in the case's own files is one we expected: no noise
    unexpected = {
        (p.file, p.line, p.code, p.severity) for p in problems
        if p.severity == "error" and p.file in case_files
    } - expected
    assert not unexpected, format_problems(problems)
    if any(sev == "error" for *_, sev in expected):
        assert exit_code(problems) == 1
        with pytest.raises(MappingError, match=re.escape(str(d)) + r"/\w+\.toml:\d+:\d+: "):
            load_mappings(d)
    else:
        assert exit_code(problems) == 0
        load_mappings(d)  # warnings never stop the daemon


def test_toml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    d = _copy_defaults(tmp_path / "m")
    (d / "terms.toml").write_text('[[lifecycle]]\nterm = "lead"\nlabel = \n')
    problems = check_directory(d)
    [p] = [p for p in problems if p.code == "toml"]
    assert (p.line, p.col) == (3, 9)
    assert str(p).startswith(f"{d / 'terms.toml'}:3:9: invalid TOML: ")


def test_all_problems_in_all_files_at_once(tmp_path: Path) -> None:
    d = _copy_defaults(tmp_path / "m")
    for case in ("unknown_term", "unknown_field", "unknown_file"):
        for f in (CORPUS / case).glob("*.toml"):
            shutil.copy(f, d / f.name)
    codes = {p.code for p in check_directory(d)}
    assert {"unknown-term", "unknown-field", "unknown-file"} <= codes


def test_unreadable_directory_or_file_is_exit_2(tmp_path: Path) -> None:
    problems = check_directory(tmp_path / "missing")
    assert exit_code(problems) == 2
    d = _copy_defaults(tmp_path / "m")
    (d / "hubspot.toml").unlink()
    (d / "hubspot.toml").mkdir()  # exists, cannot be read as a file
    problems = check_directory(d)
    assert [p.code for p in problems if p.file.endswith("hubspot.toml")] == ["unreadable"]
    assert exit_code(problems) == 2


def test_missing_file_is_reported(tmp_path: Path) -> None:
    d = _copy_defaults(tmp_path / "m")
    (d / "salesforce.toml").unlink()
    problems = check_directory(d)
    assert any(p.file == str(d / "salesforce.toml") for p in problems)
    assert exit_code(problems) != 0


def test_format_text_and_json() -> None:
    ps = [Problem("m/hubspot.toml", 3, 5, "bad", code="schema"),
          Problem("m/terms.toml", 1, 1, "meh", severity="warning", code="unreached-term")]
    assert format_problems(ps, "text").splitlines() == [
        "m/hubspot.toml:3:5: error: bad", "m/terms.toml:1:1: warning: meh"]
    data = json.loads(format_problems(ps, "json"))
    assert data[0] == {"file": "m/hubspot.toml", "line": 3, "col": 5, "severity": "error",
                       "code": "schema", "message": "bad"}
    assert format_problems([], "text") == ""
    assert exit_code(ps[1:]) == 0
    assert exit_code(ps) == 1


def test_compare_live_reports_both_directions() -> None:
    m = load_mappings(default_mappings_dir())
    hs = sorted(m.allowed_raw_values("hubspot", "contacts", "hs_lead_status"))
    sf = sorted(m.allowed_raw_values("salesforce", "Lead", "Status"))
    allowed = {
        # the CRM gained a value and lost BAD_TIMING
        ("hubspot", "contacts", "hs_lead_status"): [v for v in hs if v != "BAD_TIMING"]
        + ["NURTURE"],
        # exactly what the mappings name: nothing to report
        ("salesforce", "Lead", "Status"): sf,
        # a field the mappings do not translate: ignored
        ("salesforce", "Lead", "Industry"): ["Banking"],
    }
    problems = compare_live(m, allowed)
    assert [(p.code, p.message.split(": ", 1)[1][:28]) for p in problems] == [
        ("live-unmapped", "CRM value 'NURTURE' is not m"),
        ("live-missing", "mapped value 'BAD_TIMING' no"),
    ]
    hubspot_file = str(default_mappings_dir() / "hubspot.toml")
    lines = (default_mappings_dir() / "hubspot.toml").read_text().splitlines()
    missing = problems[1]
    assert missing.file == hubspot_file
    assert '"BAD_TIMING"' in lines[missing.line - 1]
    unmapped = problems[0]
    assert "[contacts.terms.lead_status.values]" in lines[unmapped.line - 1]


def test_compare_live_knows_deliberately_unmapped_values() -> None:
    m = load_mappings(default_mappings_dir())
    values = sorted(m.allowed_raw_values("hubspot", "contacts", "lifecyclestage"))
    assert "other" in values
    assert compare_live(m, {("hubspot", "contacts", "lifecyclestage"): values}) == []


# --------------------------------------------------------------------------- fuzzing

def _assert_no_traceback(d: Path) -> None:
    problems = check_directory(d)
    assert all(isinstance(p, Problem) and p.line >= 1 and p.col >= 1 for p in problems)
    format_problems(problems, "json")
    try:
        load_mappings(d)
    except MappingError as e:
        assert re.match(r".+:\d+:\d+: ", str(e)), str(e)
        assert any(p.severity == "error" for p in problems)
    else:
        assert not [p for p in _mine(problems) if p.severity == "error"]


_fuzz = settings(max_examples=60, deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture])


@_fuzz
@given(name=st.sampled_from(MAPPING_FILES), data=st.binary(max_size=300) | st.text(max_size=300))
def test_garbage_never_tracebacks(tmp_path: Path, name: str, data: bytes | str) -> None:
    d = _copy_defaults(tmp_path / "g")
    p = d / name
    if isinstance(data, bytes):
        p.write_bytes(data)
    else:
        p.write_text(data, encoding="utf-8", errors="surrogatepass") if _encodable(data) \
            else p.write_bytes(data.encode("utf-8", "replace"))
    _assert_no_traceback(d)


def _encodable(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@st.composite
def _mutation(draw: st.DrawFn) -> tuple[str, str]:
    name = draw(st.sampled_from(MAPPING_FILES))
    lines = (default_mappings_dir() / name).read_text().splitlines()
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, max(len(lines) - 1, 0)))
        op = draw(st.sampled_from(["delete", "duplicate", "swap", "edit", "insert"]))
        if not lines:
            break
        if op == "delete":
            del lines[i]
        elif op == "duplicate":
            lines.insert(i, lines[i])
        elif op == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == "edit" and lines[i]:
            k = draw(st.integers(0, len(lines[i]) - 1))
            ch = draw(st.sampled_from(list('"[]=.,#{}\'ab1 _-')))
            lines[i] = lines[i][:k] + ch + lines[i][k + 1:]
        else:
            lines.insert(i, draw(st.sampled_from([
                'x = 1', '[contacts]', '[[lifecycle]]', 'values = {}', 'new = ["NEW"]',
                'kind = "deal"', 'term = "mql"', 'fields.email = 3', '[deals.terms.x]',
            ])))
    return name, "\n".join(lines) + "\n"


@_fuzz
@given(mut=_mutation())
def test_mutated_default_files_never_traceback(tmp_path: Path, mut: tuple[str, str]) -> None:
    name, text = mut
    d = _copy_defaults(tmp_path / "mut")
    (d / name).write_text(text)
    _assert_no_traceback(d)
