"""Shared fixtures: the state store, parametrised over every backend.

``store_url`` / ``store`` run each test once on SQLite (a file in tmp_path) and
once on PostgreSQL (marker ``postgres``; a fresh schema per test, dropped after).
PostgreSQL is at ``SYNCD_TEST_PG_URL`` (default: user postgres, then root, on
127.0.0.1:5432, database ``test``). When it is unreachable the PostgreSQL
cases are skipped, except with ``CI=true``, where they fail.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path

import pytest
import sqlalchemy as sa

from syncd.store import Store

# A terminal width inherited from the runner (pytest-xdist workers get one) would make `syncd`
# subprocesses render for it: the tests that care about width set COLUMNS themselves.
os.environ.pop("COLUMNS", None)
os.environ.pop("LINES", None)


_PG_CANDIDATES = (
    "postgresql+psycopg://postgres@127.0.0.1:5432/test",
    "postgresql+psycopg://root@127.0.0.1:5432/test",
)


@cache
def _pg_server() -> tuple[str | None, str]:
    """(a URL that connects, "") or (None, why not)."""
    env = os.environ.get("SYNCD_TEST_PG_URL")
    errors = []
    for url in (env,) if env else _PG_CANDIDATES:
        engine = sa.create_engine(url, connect_args={"connect_timeout": 3})
        try:
            with engine.connect() as conn:
                conn.execute(sa.text("select 1"))
            return url, ""
        except sa.exc.OperationalError as e:
            errors.append(f"{engine.url.render_as_string()}: {str(e.orig).strip().splitlines()[0]}")
        finally:
            engine.dispose()
    return None, "; ".join(errors)


def _pg_url_or_skip() -> str:
    url, why = _pg_server()
    if url is None:
        msg = f"PostgreSQL unreachable ({why})"
        if os.environ.get("CI") == "true":
            pytest.fail(msg + " — CI=true: PostgreSQL tests must run", pytrace=False)
        pytest.skip(msg)
    return url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL of an empty state store of each backend."""
    if request.param == "sqlite":
        (tmp_path / "state").mkdir(exist_ok=True)
        yield f"sqlite:///{tmp_path / 'state' / 'syncd.db'}"
        return
    base = _pg_url_or_skip()
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(base)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{name}"'))
    try:
        yield sa.make_url(base).update_query_dict(
            {"options": f"-csearch_path={name}"}).render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{name}" CASCADE'))
        admin.dispose()


@pytest.fixture
def open_store(store_url: str) -> Iterator[Callable[[], Store]]:
    """Open more ``Store`` instances on the same database (closed after the test)."""
    opened: list[Store] = []

    def _open() -> Store:
        s = Store.open(store_url)
        opened.append(s)
        return s

    yield _open
    for s in opened:
        s.close()


@pytest.fixture
def store(open_store: Callable[[], Store]) -> Store:
    """A migrated, empty state store (SQLite and PostgreSQL)."""
    return open_store()
