"""Opening a state store: read-write (migrating) or read-only, and what is wrong when it fails.

One line, and the exit code that tells systemd what to do (``RestartPreventExitStatus=2``):

- exit 2, fix the deployment: a bad URL, a directory that does not exist, a file that cannot
  be created, a path that is not a file, a corrupt SQLite file, a store newer than this
  syncd, and (read-only commands) a store that needs migrating;
- exit 1, a failure during work that may pass (systemd retries): a store that exists but
  cannot be opened or reached right now (permissions, I/O errors, a full disk, a database
  server that is down).

Read-only opens never write, not even SQLite's ``-wal``/``-shm`` side files when the store
is not in use: a store without a write-ahead log is opened ``immutable`` (nothing can be
writing it), one with a log ``mode=ro`` (it reads what a running daemon commits).
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from syncd.errors import ConfigError, FatalError, SyncError

MIGRATE_HINT = "run `syncd migrate` or start the service"


class StoreNeedsMigration(ConfigError):
    """A read-only command found a store older than this syncd (or none yet): exit 2."""


class CorruptStore(ConfigError):
    """The SQLite file is not a database or is damaged: restore it (exit 2)."""


def check_sqlite_for_writing(path: str) -> None:
    """The file exists and opens for writing, or its directory exists and it can be created
    (0600: SQLite would honour the umask)."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"[state] url: {p} is a directory, not an SQLite file")
    if p.exists():
        try:
            os.close(os.open(p, os.O_RDWR))
        except OSError as e:
            raise FatalError(f"state store {p}: cannot open it for writing now: {e.strerror}") from None
        return
    _check_directory(p)
    try:
        os.close(os.open(p, os.O_CREAT | os.O_RDWR | os.O_EXCL, 0o600))
    except FileExistsError:
        return  # created meanwhile by another process
    except OSError as e:
        raise ConfigError(f"[state] url: cannot create {p}: {e.strerror}") from None


def sqlite_readonly_uri(path: str) -> str:
    """The ``file:`` URI that opens ``path`` without writing anything; errors as above."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"[state] url: {p} is a directory, not an SQLite file")
    if not p.exists():
        _check_directory(p)
        raise StoreNeedsMigration(f"the state store {p} does not exist yet: {MIGRATE_HINT}")
    try:
        with p.open("rb"):
            pass
    except OSError as e:
        raise FatalError(f"state store {p}: cannot open it for reading now: {e.strerror}") from None
    live = Path(f"{p}-wal").exists()
    return p.resolve().as_uri() + ("?mode=ro" if live else "?immutable=1")


def readonly_engine(uri: str, **kw: Any) -> sa.Engine:
    """An engine whose connections open ``uri`` (a pool, as for a file: threads share it)."""
    return sa.create_engine("sqlite://", creator=lambda: sqlite3.connect(uri, uri=True, check_same_thread=False),
                            poolclass=sa.pool.QueuePool, **kw)


def _check_directory(p: Path) -> None:
    """syncd creates the store's file, never its directory: a missing one is a wrong path or a
    volume not mounted, and a fresh store there would start over from nothing."""
    if p.parent.exists() and not p.parent.is_dir():
        raise ConfigError(f"[state] url: cannot create {p}: {p.parent} is not a directory")
    if not p.parent.is_dir():
        raise ConfigError(f"[state] url: cannot create {p}: the directory {p.parent} does not exist "
                          "(create it, or mount its volume)")


def open_error(e: sa.exc.DBAPIError, *, where: str, sqlite_path: str | None) -> SyncError:
    """The one-line error for a store that failed on its first connection."""
    orig = e.orig
    first = _first_line(orig)
    if sqlite_path is None:
        return FatalError(f"state store {where} unreachable: {first}")
    if getattr(orig, "sqlite_errorname", "") in ("SQLITE_NOTADB", "SQLITE_CORRUPT"):
        return CorruptStore(f"state store {sqlite_path}: not a usable SQLite database ({first}); restore it "
                            "from a backup, or point [state] url at another file")
    return FatalError(f"state store {sqlite_path}: cannot open it now: {first}")


def needs_migration(where: str, version: int, latest: int) -> StoreNeedsMigration:
    if version == 0:
        return StoreNeedsMigration(f"the state store {where} has no syncd schema yet: {MIGRATE_HINT}")
    return StoreNeedsMigration(f"the state store {where} is at schema version {version}; this syncd needs "
                               f"{latest}: {MIGRATE_HINT}")


def _first_line(e: BaseException | None) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
