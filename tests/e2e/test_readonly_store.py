"""Read-only commands never write (issue 18): ``status``, ``audit`` and ``mappings impact`` open
the store read-only and refuse, with one line, a store that needs migrating; ``syncd migrate``
is the explicit way to migrate (the service and ``sync`` still migrate on start).

Each runs the ``syncd`` command as a subprocess, on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from syncd.mapping import default_mappings_dir
from syncd.store import Store, migrations, normalise_url, open_store_readonly
from syncd.store import schema as s

SYNCD = str(Path(sys.executable).with_name("syncd"))
TIMEOUT = 120
HINT = "run `syncd migrate` or start the service"
READ_ONLY = (("status",), ("status", "--json"), ("audit",), ("mappings", "impact"), ("conflicts",), ("quarantine",),
             ("unmapped",), ("blocked",), ("tombstones",), ("tombstones", "--json"))


def _config(tmp: Path, state_url: str, *, sla: str = "file") -> Path:
    cfg = tmp / "syncd.toml"
    cfg.write_text(
        '[hubspot]\nbase_url = "https://127.0.0.1:9"\ntoken_env = "SYNCD_HUBSPOT_TOKEN"\n'
        '[salesforce]\ninstance_url = "https://127.0.0.1:9"\nsession_env = "SYNCD_SALESFORCE_SESSION"\n'
        f'[state]\nurl = "{state_url}"\n[mappings]\ndir = "m"\nsla = "{sla}"\n[logging]\nlevel = "error"\n')
    # a mapping folder in git, so that `mappings impact` (HEAD against the working tree) runs
    shutil.copytree(default_mappings_dir(), tmp / "m")
    if sla == "defaults":
        (tmp / "m" / "sla.toml").unlink()
    git = ["git", "-C", str(tmp / "m"), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    for args in (["init", "-q"], ["add", "."], ["commit", "-qm", "mappings"]):
        subprocess.run([*git, *args], check=True, capture_output=True, timeout=TIMEOUT)
    return cfg


def syncd(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCD_")}
    env.update(SYNCD_HUBSPOT_TOKEN="t", SYNCD_SALESFORCE_SESSION="s")
    return subprocess.run([SYNCD, "--config", str(cfg), *args], cwd=cfg.parent, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)


def refused(p: subprocess.CompletedProcess[str]) -> str:
    """The one line of a refused command (exit 2, no traceback)."""
    out = f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    assert p.returncode == 2 and "Traceback" not in p.stdout + p.stderr, out
    (line,) = p.stderr.splitlines()
    assert line.startswith("syncd: error: "), out
    return line


def snapshot(d: Path) -> dict[str, str]:
    """Every file in ``d`` and its content hash (new side files would show here too)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def store_at(url: str, version: int) -> None:
    """A store as syncd ``version`` left it (the migration steps up to it, as released)."""
    engine = sa.create_engine(normalise_url(url))
    try:
        with engine.begin() as conn:
            s.meta.create(conn, checkfirst=True)
            for step in migrations.STEPS:
                if step.version <= version:
                    step.apply(conn)
            conn.execute(sa.insert(s.meta).values(key="schema_version", value=str(version)))
    finally:
        engine.dispose()


@pytest.fixture
def write_protected(tmp_path: Path) -> Iterator[Path]:
    """A copy of a store with data, in a folder where neither the file nor the folder is writable."""
    live = tmp_path / "live"
    live.mkdir()
    with Store.open(f"sqlite:///{live / 'state.db'}") as store, store.tx() as tx:
        tx.start_run("cycle:all", owner="a-daemon")
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy2(live / "state.db", copy / "state.db")
    (copy / "state.db").chmod(0o444)
    copy.chmod(0o555)
    try:
        yield copy / "state.db"
    finally:
        copy.chmod(0o755)


def test_read_only_commands_on_a_write_protected_copy_work_and_leave_it_byte_identical(
        tmp_path: Path, write_protected: Path) -> None:
    cfg = _config(tmp_path, f"sqlite:///{write_protected}")
    before = snapshot(write_protected.parent)
    assert list(before) == ["state.db"]
    for args in READ_ONLY:
        p = syncd(cfg, *args)
        assert p.returncode == 0, (args, p.stdout, p.stderr)
        assert snapshot(write_protected.parent) == before, args  # no -wal/-shm either
    assert '"status": "running"' in syncd(cfg, "status", "--json").stdout  # it did read the copy's data
    assert stat.S_IMODE(write_protected.stat().st_mode) == 0o444


def test_a_store_in_use_is_read_as_the_daemon_commits_it(tmp_path: Path) -> None:
    """A daemon holds the store open (its write-ahead log exists): status reads what it committed."""
    (tmp_path / "state").mkdir()
    url = f"sqlite:///{tmp_path / 'state' / 'state.db'}"
    cfg = _config(tmp_path, url)
    with Store.open(url) as daemon:
        with daemon.tx() as tx:
            tx.start_run("cycle:all", owner="a-daemon")
        with daemon.engine.connect():  # the daemon's connection stays open: the log is live
            assert (tmp_path / "state" / "state.db-wal").exists()
            p = syncd(cfg, "status", "--json")
    assert p.returncode == 0, p.stderr
    assert '"status": "running"' in p.stdout


def test_a_store_not_created_yet_is_refused_and_not_created(tmp_path: Path) -> None:
    cfg = _config(tmp_path, f"sqlite:///{tmp_path / 'state.db'}")
    for args in READ_ONLY:
        line = refused(syncd(cfg, *args))
        assert f"{tmp_path / 'state.db'} does not exist yet" in line and HINT in line, line
    assert not (tmp_path / "state.db").exists()
    p = syncd(cfg, "migrate")
    assert p.returncode == 0 and "created at schema version" in p.stdout, p.stderr
    assert syncd(cfg, "status").returncode == 0


@pytest.mark.parametrize("store_url", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)],
                         indirect=True)
def test_a_store_with_an_older_schema_is_refused_until_syncd_migrate(tmp_path: Path, store_url: str) -> None:
    old = migrations.LATEST - 1
    store_at(store_url, old)
    cfg = _config(tmp_path, store_url)
    sqlite = store_url.startswith("sqlite")
    db = Path(sa.make_url(store_url).database or "") if sqlite else None
    before = db.read_bytes() if db else b""
    for args in READ_ONLY:
        line = refused(syncd(cfg, *args))
        assert f"at schema version {old}; this syncd needs {migrations.LATEST}: {HINT}" in line, line
    if db is not None:
        assert db.read_bytes() == before
        assert sorted(p.name for p in db.parent.iterdir()) == [db.name]
    p = syncd(cfg, "migrate")
    assert p.returncode == 0, p.stderr
    assert f"migrated from schema version {old} to {migrations.LATEST}" in p.stdout
    assert f"schema version {migrations.LATEST}, up to date" in syncd(cfg, "migrate").stdout
    for args in READ_ONLY:
        assert syncd(cfg, *args).returncode == 0, args


@pytest.mark.parametrize("store_url", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)],
                         indirect=True)
def test_a_store_newer_than_this_syncd_is_refused_with_upgrade(tmp_path: Path, store_url: str) -> None:
    store_at(store_url, migrations.LATEST)
    engine = sa.create_engine(normalise_url(store_url))
    with engine.begin() as conn:
        conn.execute(sa.update(s.meta).where(s.meta.c.key == "schema_version")
                     .values(value=str(migrations.LATEST + 1)))
    engine.dispose()
    cfg = _config(tmp_path, store_url)
    for args in (("status",), ("migrate",), ("sync", "--once")):
        assert "upgrade syncd" in refused(syncd(cfg, *args)), args


@pytest.mark.parametrize("store_url", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)],
                         indirect=True)
def test_the_read_only_store_refuses_every_write(store_url: str) -> None:
    """What the read-only commands open: SQLite read-only connections (query_only), PostgreSQL
    read-only transactions (default_transaction_read_only, and each tx() says READ ONLY)."""
    Store.open(store_url).close()
    ro = open_store_readonly(store_url)
    try:
        with pytest.raises(sa.exc.DBAPIError, match="read-only transaction|readonly database"), ro.tx() as tx:
            tx.conn.execute(sa.insert(s.meta).values(key="x", value="y"))
        if ro.dialect == "postgresql":
            with ro.engine.connect() as conn:  # even outside syncd's own transactions
                assert conn.exec_driver_sql("SHOW default_transaction_read_only").scalar() == "on"
                assert conn.exec_driver_sql("SHOW search_path").scalar() == sa.make_url(
                    store_url).query["options"].split("=", 1)[1]  # the URL's own options kept
    finally:
        ro.close()


@pytest.mark.parametrize("store_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
def test_postgres_an_empty_database_is_refused_and_left_empty(tmp_path: Path, store_url: str) -> None:
    cfg = _config(tmp_path, store_url)
    line = refused(syncd(cfg, "status"))
    assert f"has no syncd schema yet: {HINT}" in line and "***" not in line, line
    engine = sa.create_engine(normalise_url(store_url))
    try:
        with engine.connect() as conn:
            assert sa.inspect(conn).get_table_names() == []
    finally:
        engine.dispose()


def test_impact_uses_the_built_in_sla_when_the_config_asks_for_it(tmp_path: Path) -> None:
    """A mapping folder without sla.toml and ``[mappings] sla = "defaults"``: impact runs on the
    built-in SLA, as the service does; without that setting the folder is refused (exit 2)."""
    url = f"sqlite:///{tmp_path / 'state.db'}"
    Store.open(url).close()
    cfg = _config(tmp_path, url, sla="defaults")
    p = syncd(cfg, "mappings", "impact")
    assert p.returncode == 0, p.stdout + p.stderr
    cfg.write_text(cfg.read_text().replace('sla = "defaults"', 'sla = "file"'))
    line = refused(syncd(cfg, "mappings", "impact"))
    assert "sla.toml" in line, line
