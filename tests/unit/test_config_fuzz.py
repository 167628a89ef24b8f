"""Whatever a config file holds, ``load_config`` returns a Config or raises one ConfigError on one
line: never another exception, never a multi-line message. The SLA file keeps the same promise
with MappingError.

Sources of input: valid TOML in the file's own shape with wrong values and stray keys, valid
TOML of any shape, and random bytes (also random damage to the shipped example config).
"""

from __future__ import annotations

import json
import math
import shutil
from datetime import date, datetime, time
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from syncd.config import Config, ConfigError, load_config
from syncd.errors import MappingError
from syncd.mapping import default_mappings_dir
from syncd.sla import SLA, load_sla, sla_problems

EXAMPLE = Path(__file__).resolve().parents[2] / "config.example.toml"
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# -- a small TOML writer (the standard library only reads TOML) -------------------------------------


def _key(k: str) -> str:
    return json.dumps(k, ensure_ascii=False)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, datetime | date | time):
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def to_toml(doc: dict[str, Any]) -> str:
    """Top-level tables as ``[section]`` blocks, everything else inline."""
    lines = [f"{_key(k)} = {_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for k, v in doc.items():
        if isinstance(v, dict):
            lines.append(f"[{_key(k)}]")
            lines += [f"{_key(kk)} = {_value(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"


# -- strategies -------------------------------------------------------------------------------------

# The config's own shape, read from the model: sections and their keys.
SECTIONS: dict[str, list[str]] = {}
for _name, _field in Config.model_fields.items():
    _ann = _field.annotation
    if isinstance(_ann, type) and issubclass(_ann, BaseModel):
        SECTIONS[_name] = list(_ann.model_fields)

text = st.text(max_size=30)
scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    text,
    st.sampled_from(["https://", "api.hubapi.com", "https://127.0.0.1:0", "http://[::1", "sqlite:syncd.db",
                     "postgresql://u:p@h:abc/db", "sqlite:///:memory:", "/dev/null", ".", "", "ftp://x",
                     "https://h:65536", "postgres://h/db", "defaults", "file", "debug", "json"]),
    st.dates(),
    st.datetimes(),
    st.times(),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(text, inner, max_size=3)), max_leaves=6)


@st.composite
def shaped(draw: st.DrawFn) -> dict[str, Any]:
    """Known sections and keys (and a few unknown ones), values of any type."""
    doc: dict[str, Any] = {}
    for section in draw(st.lists(st.sampled_from([*SECTIONS, "bogus"]), unique=True, max_size=len(SECTIONS) + 1)):
        keys = st.sampled_from(SECTIONS.get(section, []) + ["bogus_key"]) | text
        doc[section] = draw(st.dictionaries(keys, values, max_size=6))
    if draw(st.booleans()):
        doc[draw(text)] = draw(values)
    return doc


any_shape = st.dictionaries(text, values, max_size=6)


def assert_loads_or_one_line(path: Path) -> None:
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        msg = str(exc)
        assert msg, "an empty error"
        assert len(msg.splitlines()) == 1 and msg.isprintable(), repr(msg)
        assert str(path) in msg, msg
        assert "Traceback" not in msg
    else:
        assert isinstance(cfg, Config)


@FUZZ
@given(doc=shaped())
def test_wrong_values_in_the_right_shape(doc: dict[str, Any], tmp_path: Path) -> None:
    p = tmp_path / "syncd.toml"
    p.write_text(to_toml(doc), "utf-8")
    assert_loads_or_one_line(p)


@FUZZ
@given(doc=any_shape)
def test_any_toml_document(doc: dict[str, Any], tmp_path: Path) -> None:
    p = tmp_path / "syncd.toml"
    p.write_text(to_toml(doc), "utf-8")
    assert_loads_or_one_line(p)


@FUZZ
@given(data=st.binary(max_size=400))
@example(data=b"\xef\xbb\xbf")
@example(data=b"\xff\xfe[\x00")
@example(data=b"a = [" * 2000)
@example(data=b'[hubspot]\nbase_url = "https://h"\n\x00')
def test_random_bytes(data: bytes, tmp_path: Path) -> None:
    p = tmp_path / "syncd.toml"
    p.write_bytes(data)
    assert_loads_or_one_line(p)


@FUZZ
@given(data=st.data())
def test_random_damage_to_the_example_config(data: st.DataObject, tmp_path: Path) -> None:
    raw = bytearray(EXAMPLE.read_bytes())
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    p = tmp_path / "syncd.toml"
    p.write_bytes(bytes(raw))
    assert_loads_or_one_line(p)


def test_the_example_config_loads() -> None:
    """The documented example is valid as shipped (its secrets come from the environment)."""
    cfg = load_config(EXAMPLE)
    assert cfg.hubspot.base_url.startswith("https://")
    assert cfg.salesforce.instance_url.startswith("https://")


# -- the SLA file (mappings/sla.toml): the same promise, as MappingError ----------------------------

SLA_SECTIONS: dict[str, list[str]] = {}
for _name, _field in SLA.model_fields.items():
    _ann = _field.annotation
    SLA_SECTIONS[_name] = list(_ann.model_fields) if isinstance(_ann, type) and issubclass(_ann, BaseModel) else []


@st.composite
def sla_shaped(draw: st.DrawFn) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for section in draw(st.lists(st.sampled_from([*SLA_SECTIONS, "bogus"]), unique=True, max_size=4)):
        keys = st.sampled_from(SLA_SECTIONS.get(section, []) + ["hubspot", "salesforce", "bogus_key"]) | text
        doc[section] = draw(st.dictionaries(keys, values, max_size=5))
    return doc


def assert_sla_loads_or_one_line(d: Path) -> None:
    problems = sla_problems(d)  # never raises
    assert all(len(str(p).splitlines()) == 1 for p in problems), problems
    try:
        load_sla(d)
    except MappingError as exc:
        msg = str(exc)
        assert len(msg.splitlines()) == 1 and msg.startswith(str(d / "sla.toml")), repr(msg)
    else:
        assert not [p for p in problems if p.severity == "error"], problems


@FUZZ
@given(doc=sla_shaped())
def test_sla_wrong_values_in_the_right_shape(doc: dict[str, Any], tmp_path: Path) -> None:
    shutil.copy(default_mappings_dir() / "terms.toml", tmp_path / "terms.toml")
    (tmp_path / "sla.toml").write_text(to_toml(doc), "utf-8")
    assert_sla_loads_or_one_line(tmp_path)


@FUZZ
@given(data=st.binary(max_size=300))
@example(data=b"")
@example(data=b"\xef\xbb\xbf[score]\nthreshold = 3\n")
def test_sla_random_bytes(data: bytes, tmp_path: Path) -> None:
    (tmp_path / "sla.toml").write_bytes(data)
    assert_sla_loads_or_one_line(tmp_path)
