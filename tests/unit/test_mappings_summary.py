"""A clean `syncd mappings check` says what it read; with problems (or --format json) it does not."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from syncd.mapping import default_mappings_dir
from syncd.report import mappings_summary

SYNCD = str(Path(sys.executable).with_name("syncd"))


def test_a_clean_check_says_ok_with_files_terms_and_values(tmp_path: Path) -> None:
    terms = tomllib.loads((default_mappings_dir() / "terms.toml").read_text())
    n_terms = sum(len(v) for v in terms.values() if isinstance(v, list))
    p = subprocess.run([SYNCD, "mappings", "check"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == mappings_summary(default_mappings_dir())
    assert p.stdout.startswith(f"ok: 4 files, {n_terms} terms, ") and p.stdout.strip().endswith(" values")
    js = subprocess.run([SYNCD, "mappings", "check", "--format", "json"], cwd=tmp_path, capture_output=True,
                        text=True, timeout=60)
    assert js.returncode == 0 and js.stdout.strip() == "[]"


def test_a_value_more_is_counted_and_a_broken_file_gets_no_ok(tmp_path: Path) -> None:
    d = tmp_path / "m"
    shutil.copytree(default_mappings_dir(), d, ignore=shutil.ignore_patterns("README.md"))
    before = int(mappings_summary(d).split(", ")[2].split()[0])
    hs = d / "hubspot.toml"
    hs.write_text(hs.read_text().replace('subscriber = ["subscriber"]', 'subscriber = ["subscriber", "newsletter"]'))
    assert int(mappings_summary(d).split(", ")[2].split()[0]) == before + 1
    hs.write_text(hs.read_text() + "\n[contacts.terms.lifecycle\n")
    p = subprocess.run([SYNCD, "mappings", "check", str(d)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode != 0 and "ok:" not in p.stdout
