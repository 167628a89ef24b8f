"""``syncd migrate``: bring the state store's schema to this syncd's version, explicitly.

The service, ``sync`` and ``resync`` migrate on start as well; the read-only commands
(``status``, ``audit``, ``mappings impact``, ``auth check``) never do, and refuse a store
that needs it.
"""

from __future__ import annotations

from syncd.config import Config
from syncd.store import Store, migrations


def run_migrate(cfg: Config) -> str:
    """Migrate the configured store; the line to print."""
    with Store.open(cfg.state_url(), sqlite_synchronous=cfg.state.sqlite_synchronous) as store:
        where = store.where
        before = store.migrated_from
    if before is None:
        return f"state store {where}: schema version {migrations.LATEST}, up to date"
    if before == 0:
        return f"state store {where}: created at schema version {migrations.LATEST}"
    return f"state store {where}: migrated from schema version {before} to {migrations.LATEST}"
