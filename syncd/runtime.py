"""Wiring: config → state store, mapping + SLA files, connectors, engine.

Everything is validated before the first API call: a bad config or mapping file
stops here with a clear error (exit 2), nothing half-started.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from syncd import catalogue
from syncd.config import Config
from syncd.connectors import _pacing
from syncd.connectors._retry import RetryPolicy
from syncd.connectors.base import Connector
from syncd.engine import Engine
from syncd.errors import ConfigError
from syncd.mapping import Mappings, default_mappings_dir, load_mappings
from syncd.sla import SLA, load_sla
from syncd.store import Store

PULL_OBJECTS: dict[str, tuple[str, ...]] = {s: catalogue.names(s) for s in catalogue.SYSTEMS}


def mappings_dir(cfg: Config) -> Path:
    return cfg.resolve(cfg.mappings.dir) if cfg.mappings.dir else default_mappings_dir()


def load_rules_files(cfg: Config) -> tuple[Mappings, SLA]:
    d = mappings_dir(cfg)
    return load_mappings(d), load_sla(d, defaults=cfg.mappings.sla == "defaults")


def build_connectors(cfg: Config, mappings: Mappings) -> dict[str, Connector]:
    from syncd.connectors.auth import hubspot_provider, salesforce_provider
    from syncd.connectors.hubspot import HubSpotConnector
    from syncd.connectors.salesforce import SalesforceConnector

    retry = RetryPolicy(max_attempts=cfg.sync.retry_max_attempts, cap=cfg.sync.retry_cap_s)
    hs = cfg.hubspot
    sf = cfg.salesforce
    hubspot = HubSpotConnector(
        hs.base_url, hubspot_provider(hs, cfg.base_dir),
        ca_bundle=str(cfg.resolve(hs.ca_bundle)) if hs.ca_bundle else None,
        properties={o: mappings.pull_fields("hubspot", o) for o in PULL_OBJECTS["hubspot"]},
        retry=retry, timeout=hs.timeout_s, archive_scan_s=hs.archive_scan_s)
    salesforce = SalesforceConnector(
        sf.instance_url, salesforce_provider(sf, cfg.base_dir),
        ca_bundle=str(cfg.resolve(sf.ca_bundle)) if sf.ca_bundle else None,
        fields={o: mappings.pull_fields("salesforce", o) for o in PULL_OBJECTS["salesforce"]},
        retry=retry, timeout=sf.timeout_s)
    return {"hubspot": hubspot, "salesforce": salesforce}


@dataclass
class Runtime:
    config: Config
    store: Store
    mappings: Mappings
    sla: SLA
    connectors: dict[str, Connector] = field(default_factory=dict)

    def engine(self, *, dry_run: bool = False) -> Engine:
        return Engine(self.store, self.mappings, self.sla, self.connectors,
                      overlap=timedelta(seconds=self.config.sync.overlap_s), dry_run=dry_run,
                      write_batch=self.config.sync.write_batch)

    def close(self) -> None:
        _pacing.close(self.connectors)  # the ledger gets the last counts while the store is open
        for c in self.connectors.values():
            c.close()
        self.store.close()


def open_runtime(cfg: Config, *, connect: bool = True) -> Runtime:
    mappings, sla = load_rules_files(cfg)
    connectors = build_connectors(cfg, mappings) if connect else {}
    check_caps(cfg, connectors)  # a cap no cycle fits in is a config error, before any call
    store = Store.open(cfg.state_url(), sqlite_synchronous=cfg.state.sqlite_synchronous)
    _pacing.attach(connectors, store, cfg)  # one API ledger and pace per CRM, on the store
    return Runtime(cfg, store, mappings, sla, connectors)


def check_caps(cfg: Config, connectors: Mapping[str, Connector]) -> None:
    """A ``run_cap`` or ``daily_budget`` below :func:`~syncd.connectors._pacing.cycle_floor`
    lets no cycle ever complete: every one would stop at the cap part-way, for ever (a config
    error, said before any call)."""
    problems = []
    for system, (floor, why) in _pacing.cycle_floor(connectors).items():
        section = getattr(cfg, system)
        for key in ("run_cap", "daily_budget"):
            cap = getattr(section, key)
            if cap and cap < floor:
                problems.append(f"[{system}] {key} = {cap:,} is below the {floor} calls one cycle needs at the "
                                f"least ({why}): no cycle could ever complete; raise it"
                                + (", or 0 for no per-cycle cap" if key == "run_cap" else ""))
    if problems:
        where = f"{cfg.source}: " if cfg.source else ""
        raise ConfigError(where + "; ".join(problems))
