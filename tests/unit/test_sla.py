"""The SLA file: defaults, and every bad parameter reported at its line."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from syncd.errors import MappingError
from syncd.sla import SLA, SLA_MISSING, load_sla, sla_problems

MAPPINGS = Path(__file__).resolve().parents[2] / "syncd" / "mappings"


def _dir(tmp_path: Path, old: str | None = None, new: str = "", *,
         terms: bool = True) -> tuple[Path, str]:
    """A copy of the shipped sla.toml (+ terms.toml) with ``old`` replaced by ``new``."""
    text = (MAPPINGS / "sla.toml").read_text("utf-8")
    if old is not None:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    (tmp_path / "sla.toml").write_text(text, "utf-8")
    if terms:
        shutil.copy(MAPPINGS / "terms.toml", tmp_path / "terms.toml")
    return tmp_path, text


def _line_of(text: str, needle: str) -> int:
    return text[: text.index(needle)].count("\n") + 1


def test_the_shipped_file_is_the_documented_defaults() -> None:
    assert sla_problems(MAPPINGS) == []
    sla = load_sla(MAPPINGS)
    assert sla == SLA()
    assert sla.score.threshold == 50 and sla.score.rehandoff_margin == 10
    assert (sla.attempts.count, sla.attempts.window_days) == (3, 14)
    assert sla.followup.window_hours == 24
    assert sla.terms.returned_status == "returned_not_ready"
    assert sla.handoff.status == "new"
    assert sla.handoff.placeholders == {"company": "[not provided]",
                                        "last_name": "[not provided]"}
    assert sla.reverse_handoff.enabled
    assert sla.writeback.max_tries == 5
    assert sla.owner_of("lead_status") == "salesforce"
    assert sla.owner_of("score") == "hubspot"
    assert sla.owner_of("subscriber") == "hubspot"
    assert sla.owner_of("deal_stage") == "salesforce"


def test_a_missing_file_is_refused_unless_the_defaults_are_asked_for(tmp_path: Path) -> None:
    with pytest.raises(MappingError, match=r"sla\.toml:1:1: missing: .*sla = \"defaults\""):
        load_sla(tmp_path)
    (p,) = sla_problems(tmp_path)
    assert p.code == SLA_MISSING and p.file == str(tmp_path / "sla.toml")
    # [mappings] sla = "defaults" in the config: the built-in SLA
    assert load_sla(tmp_path, defaults=True) == SLA()
    assert sla_problems(tmp_path, defaults=True) == []


def test_the_model_is_frozen() -> None:
    with pytest.raises(ValueError, match="frozen"):
        SLA().score.threshold = 1  # type: ignore[misc]


@pytest.mark.parametrize(("old", "new", "words"), [
    ("threshold = 50", "threshold = -1", "threshold"),
    ("rehandoff_margin = 10", "rehandoff_margin = -5", "rehandoff_margin"),
    ("count = 3", "count = 0", "count"),
    ("window_days = 14", "window_days = 0", "window_days"),
    ("window_hours = 24", "window_hours = -1", "window_hours"),
    ("max_tries = 5", "max_tries = 0", "max_tries"),
    ("threshold = 50", "threshold = \"fifty\"", "threshold"),
    ("enabled = true\nobject = \"Lead\"", "enabled = true\nobject = \"Lead\"\ncolour = 1",
     "colour"),
])
def test_each_bad_parameter_is_reported_at_its_line(tmp_path: Path, old: str, new: str,
                                                    words: str) -> None:
    d, text = _dir(tmp_path, old, new)
    bad_line = _line_of(text, new.splitlines()[-1])
    problems = sla_problems(d)
    assert len(problems) == 1, problems
    (p,) = problems
    assert (p.line, p.severity) == (bad_line, "error")
    assert words in p.message
    assert p.file.endswith("sla.toml")
    with pytest.raises(MappingError, match=rf"sla\.toml:{bad_line}:\d+: .*{words}"):
        load_sla(d)


@pytest.mark.parametrize(("old", "new", "needle", "words"), [
    ('hubspot = ["subscriber", "lead", "score"]',
     'hubspot = ["subscriber", "lead", "score", "lead_status"]',
     'salesforce = ["lead_status"', "owned by both"),
    ('hubspot = ["subscriber", "lead", "score"]',
     'hubspot = ["subscriber", "lead", "score"]\npipedrive = ["lead_type"]',
     "pipedrive", "unknown system"),
    ('returned_stage = "lead"', 'returned_stage = "nurture"', 'returned_stage = "nurture"',
     "unknown lifecycle term 'nurture'"),
    ('returned_status = "returned_not_ready"', 'returned_status = "Returned - Not Ready"',
     "returned_status = ", "unknown lead_status term"),
    ('status = "new"', 'status = "open"', 'status = "open"', "unknown lead_status term"),
    ('connected_statuses = ["connected"]', 'connected_statuses = ["connected", "reached"]',
     "connected_statuses", "'reached'"),
    ('company = "[not provided]"', 'compnay = "[not provided]"', "compnay",
     "unknown field 'compnay'"),
    ('"lead_type", "qualification_reason"]', '"lead_type", "qualification"]',
     '"qualification"]', "unknown field 'qualification'"),
    ('fields = ["lead_status"]', 'fields = ["lead_status", "lifecycle"]',
     'fields = ["lead_status", "lifecycle"]', "not a syncable"),
])
def test_contradictions_and_unknown_terms_are_reported_at_their_line(
        tmp_path: Path, old: str, new: str, needle: str, words: str) -> None:
    d, text = _dir(tmp_path, old, new)
    (p,) = sla_problems(d)
    assert p.line == _line_of(text, needle)
    assert words in p.message
    with pytest.raises(MappingError, match=r"sla\.toml:\d+:\d+: "):
        load_sla(d)


def test_terms_are_not_checked_without_a_terms_file(tmp_path: Path) -> None:
    d, _ = _dir(tmp_path, 'returned_stage = "lead"', 'returned_stage = "nurture"', terms=False)
    assert sla_problems(d) == []
    assert load_sla(d).terms.returned_stage == "nurture"


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    d, text = _dir(tmp_path, "count = 3\nwindow_days = 14", "count = 0\nwindow_days = -2")
    lines = sorted(p.line for p in sla_problems(d))
    assert lines == [_line_of(text, "count = 0"), _line_of(text, "window_days = -2")]


def test_invalid_toml_is_reported_with_its_position(tmp_path: Path) -> None:
    (tmp_path / "sla.toml").write_text("[score]\nthreshold = = 3\n", "utf-8")
    (p,) = sla_problems(tmp_path)
    assert p.line == 2
    with pytest.raises(MappingError, match=r"sla\.toml:2:"):
        load_sla(tmp_path)
