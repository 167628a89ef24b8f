"""Bad input, as a new user gives it: every failure is one line on stderr and the documented exit code.

Each case runs the ``syncd`` command as a subprocess and asserts the exit code (2: bad usage,
config or mapping files; 1: a failure during work), that stderr is exactly one line,
``syncd: error: …``, naming the thing that is wrong, and that no traceback appears anywhere.
Secrets named in a case never appear in the output.

Most cases fail before any network call, so they need no peer; the few that need live CRMs
(a closed port, a CA that does not match, a bad token) share one sandbox for the module.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import certifi
import pytest
from _waiting import free_port

from syncd.mapping import default_mappings_dir
from syncd.sandbox import HUBSPOT_TOKEN, SALESFORCE_SESSION, SESSION_ENV, TOKEN_ENV, Sandbox

SYNCD = str(Path(sys.executable).with_name("syncd"))
TIMEOUT = 120  # a generous deadline, never a performance assertion


@dataclass
class W:
    """Where a case runs: its folder, and the peers it may point at."""

    tmp: Path
    hs_url: str = "https://127.0.0.1:9"  # never reached: these cases fail before any API call
    sf_url: str = "https://127.0.0.1:9"
    ca: str = ""
    closed: int = 9  # a port nothing listens on
    busy: int = 0  # a port something listens on
    mute: int = 0  # a port that accepts connections and never answers
    other_ca: str = field(default_factory=certifi.where)  # a valid CA bundle that did not sign the sandbox

    def fmt(self, s: str) -> str:
        return s.format(tmp=self.tmp, hs=self.hs_url, sf=self.sf_url, ca=self.ca, closed=self.closed,
                        busy=self.busy, mute=self.mute, other_ca=self.other_ca)


Sections = dict[str, dict[str, str | None]]


def config(w: W, changes: Sections | None = None, *, live: bool = False) -> str:
    """A valid config (TOML literals per key), with ``changes`` applied (None removes a key)."""
    secs: Sections = {
        "hubspot": {"base_url": '"{hs}"', "token_env": f'"{TOKEN_ENV}"', "timeout_s": "5"},
        "salesforce": {"instance_url": '"{sf}"', "session_env": f'"{SESSION_ENV}"', "timeout_s": "5"},
        "state": {"url": '"sqlite:///{tmp}/state.db"'},
        "sync": {"retry_max_attempts": "2", "retry_cap_s": "0.2"},
        "service": {"metrics_port": "0"},
        "logging": {"level": '"error"'},
    }
    if live:
        secs["hubspot"]["ca_bundle"] = secs["salesforce"]["ca_bundle"] = '"{ca}"'
    for name, keys in (changes or {}).items():
        sec = secs.setdefault(name, {})
        for k, v in keys.items():
            if v is None:
                sec.pop(k, None)
            else:
                sec[k] = v
    out = []
    for name, keys in secs.items():
        out.append(f"[{name}]")
        out += [f"{k} = {v}" for k, v in keys.items()]
        out.append("")
    return w.fmt("\n".join(out))


def with_(changes: Sections, *, live: bool = False) -> Callable[[W], str]:
    return lambda w: config(w, changes, live=live)


def mappings(edit: Callable[[Path], None]) -> Callable[[W], None]:
    """Set-up: a copy of the shipped mappings in tmp/m, edited."""

    def setup(w: W) -> None:
        d = w.tmp / "m"
        shutil.copytree(default_mappings_dir(), d)
        edit(d)

    return setup


def replace_in(name: str, old: str, new: str) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        text = (d / name).read_text("utf-8")
        assert old in text, (name, old)
        (d / name).write_text(text.replace(old, new, 1), "utf-8")

    return edit


def write(name: str, content: str | bytes) -> Callable[[W], None]:
    def setup(w: W) -> None:
        p = w.tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(w.fmt(content), "utf-8")

    return setup


def mkdir(name: str) -> Callable[[W], None]:
    return lambda w: (w.tmp / name).mkdir(parents=True)


def both(*steps: Callable[[W], None]) -> Callable[[W], None]:
    def setup(w: W) -> None:
        for s in steps:
            s(w)

    return setup


MAPPINGS_M: Sections = {"mappings": {"dir": '"m"'}}
PASTED_TOKEN = "pat-na1-11111111-2222-3333-4444-555555555555"
PG_PASSWORD = "s3cr3t-pw"


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]
    code: int
    names: tuple[str, ...]  # what the one line must say (substrings)
    config: Callable[[W], str | bytes] | None = None  # None: the command runs without --config
    setup: Callable[[W], None] | None = None
    env: dict[str, str | None] = field(default_factory=dict)  # None unsets the variable
    hides: tuple[str, ...] = ()  # must appear nowhere in the output
    live: bool = False  # points at the module's sandbox


SYNC = ("sync", "--once")
C = Case

# -- config: the file itself and its shape ---------------------------------------------------------
CONFIG = [
    C("config-empty", SYNC, 2, ("missing required keys", "hubspot.base_url", "salesforce.instance_url"),
      config=lambda w: ""),
    C("config-no-salesforce-section", ("status",), 2, ("missing required key", "salesforce.instance_url"),
      config=lambda w: w.fmt('[hubspot]\nbase_url = "{hs}"\n')),
    C("config-hubspot-without-base-url", SYNC, 2, ("hubspot.base_url", "missing"),
      config=with_({"hubspot": {"base_url": None}})),
    C("config-not-found", SYNC, 2, ("nowhere.toml", "not found"), config=None,
      env={"SYNCD_CONFIG": "{tmp}/nowhere.toml"}),
    C("config-is-a-directory", ("--config", "{tmp}/cfgdir", "status"), 2, ("cfgdir", "cannot read config"),
      setup=mkdir("cfgdir")),
    C("config-invalid-toml", SYNC, 2, ("syncd.toml: invalid TOML", "line 3"),
      config=lambda w: w.fmt('[hubspot]\nbase_url = "{hs}"\ntimeout_s = = 5\n')),
    C("config-duplicate-section", SYNC, 2, ("invalid TOML",),
      config=lambda w: config(w) + "\n[sync]\noverlap_s = 1\n"),
    C("config-not-utf8", SYNC, 2, ("syncd.toml:2", "not UTF-8", "0xff", "offset 25"),
      config=lambda w: b'[state]\nurl = "sqlite:///\xff.db"\n'),
    C("config-utf16", SYNC, 2, ("UTF-16",),
      config=lambda w: config(w).encode("utf-16")),
    C("config-unknown-section", SYNC, 2, ("hubspott", "unknown key", "did you mean hubspot"),
      config=lambda w: config(w) + '\n[hubspott]\nbase_url = "https://x"\n'),
    C("config-unknown-key", SYNC, 2, ("syncd.toml:", "sync.overlap", "unknown key", "overlap_s"),
      config=with_({"sync": {"overlap": "60"}})),
    C("config-base-dir-key", SYNC, 2, ("base_dir", "unknown key"),
      config=lambda w: 'base_dir = "/"\n' + config(w)),
    C("config-wrong-type", SYNC, 2, ("sync.overlap_s", "number"),
      config=with_({"sync": {"overlap_s": '"two minutes"'}})),
    C("config-section-is-a-value", SYNC, 2, ("logging", "must be a table"),
      config=lambda w: 'logging = "debug"\n' + config(w).replace('[logging]\nlevel = "error"\n', "")),
    C("config-run-cap-below-a-cycle", SYNC, 2, ("syncd.toml", "[hubspot] run_cap = 3", "below the 4 calls",
                                                 "no cycle could ever complete"),
      config=with_({"hubspot": {"run_cap": "3"}})),
    C("config-daily-budget-below-a-cycle", SYNC, 2, ("[salesforce] daily_budget = 4", "below the 5 calls"),
      config=with_({"salesforce": {"daily_budget": "4"}})),
    C("config-negative-interval", SYNC, 2, ("sync.contacts_interval_s", "greater than 0"),
      config=with_({"sync": {"contacts_interval_s": "-1"}})),
    C("config-infinite-timeout", SYNC, 2, ("hubspot.timeout_s", "finite"),
      config=with_({"hubspot": {"timeout_s": "inf"}})),
    C("config-retry-attempts-zero", SYNC, 2, ("sync.retry_max_attempts", "greater than or equal to 1"),
      config=with_({"sync": {"retry_max_attempts": "0"}})),
    C("config-unknown-log-level", SYNC, 2, ("logging.level", "'debug'"),
      config=with_({"logging": {"level": '"loud"'}})),
    C("config-metrics-port-70000", ("run",), 2, ("service.metrics_port", "65535"),
      config=with_({"service": {"metrics_port": "70000"}})),
    C("config-metrics-port-negative", ("run",), 2, ("service.metrics_port", "greater than or equal to 0"),
      config=with_({"service": {"metrics_port": "-1"}})),
    C("config-mappings-sla-unknown-value", SYNC, 2, ("mappings.sla", "'defaults'"),
      config=with_({"mappings": {"sla": '"builtin"'}})),
    C("config-several-problems-at-once", SYNC, 2,
      ("hubspot.base_url", "sync.overlap_s", "state.url", "logging.level"),
      config=with_({"hubspot": {"base_url": '"api.hubapi.com"'}, "sync": {"overlap_s": "-5"},
                    "state": {"url": '"sqlite:syncd.db"'}, "logging": {"level": '"loud"'}})),
]

# -- URLs --------------------------------------------------------------------------------------------
URLS = [
    C("url-no-scheme", SYNC, 2, ("hubspot.base_url", "'api.hubapi.com'", "no scheme"),
      config=with_({"hubspot": {"base_url": '"api.hubapi.com"'}})),
    C("url-ftp-scheme", SYNC, 2, ("salesforce.instance_url", "scheme 'ftp'"),
      config=with_({"salesforce": {"instance_url": '"ftp://example.my.salesforce.com"'}})),
    C("url-no-host", SYNC, 2, ("hubspot.base_url", "no host"),
      config=with_({"hubspot": {"base_url": '"https://"'}})),
    C("url-port-not-a-number", SYNC, 2, ("salesforce.instance_url", "port is not a number"),
      config=with_({"salesforce": {"instance_url": '"https://example.my.salesforce.com:abc"'}})),
    C("url-port-70000", SYNC, 2, ("hubspot.base_url", "port is out of range"),
      config=with_({"hubspot": {"base_url": '"https://127.0.0.1:70000"'}})),
    C("url-port-0", SYNC, 2, ("hubspot.base_url", "port 0"),
      config=with_({"hubspot": {"base_url": '"https://127.0.0.1:0"'}})),
    C("url-empty", SYNC, 2, ("salesforce.instance_url", "empty"),
      config=with_({"salesforce": {"instance_url": '""'}})),
    C("url-with-spaces", SYNC, 2, ("hubspot.base_url", "spaces"),
      config=with_({"hubspot": {"base_url": '"https://api.hubapi.com "'}})),
    C("url-with-query", SYNC, 2, ("salesforce.instance_url", "query"),
      config=with_({"salesforce": {"instance_url": '"https://x.my.salesforce.com/?org=1"'}})),
    C("url-broken-ipv6", SYNC, 2, ("hubspot.base_url", "does not parse"),
      config=with_({"hubspot": {"base_url": '"https://[::1"'}})),
    C("url-not-a-string", SYNC, 2, ("hubspot.base_url", "valid string"),
      config=with_({"hubspot": {"base_url": "443"}})),
    C("url-password-hidden", SYNC, 2, ("hubspot.base_url", "***"),
      config=with_({"hubspot": {"base_url": f'"ftp://user:{PG_PASSWORD}@example.com"'}}), hides=(PG_PASSWORD,)),
]

# -- secrets and the files the config names ----------------------------------------------------------
SECRETS = [
    C("secret-env-unset", SYNC, 2, (TOKEN_ENV, "not set"), config=with_({}), env={TOKEN_ENV: None}),
    C("secret-session-env-empty", SYNC, 2, (SESSION_ENV, "not set"), config=with_({}), env={SESSION_ENV: ""}),
    C("secret-token-pasted-into-token-env", SYNC, 2, ("hubspot.token_env", "not an environment variable name"),
      config=with_({"hubspot": {"token_env": f'"{PASTED_TOKEN}"'}}), hides=(PASTED_TOKEN,)),
    C("secret-token-file-missing", SYNC, 2, ("hubspot.token_file", "{tmp}/hubspot-token", "no such file"),
      config=with_({"hubspot": {"token_file": '"hubspot-token"'}})),
    C("secret-session-file-is-a-directory", SYNC, 2, ("salesforce.session_file", "not a regular file"),
      config=with_({"salesforce": {"session_file": '"creds"'}}), setup=mkdir("creds")),
    C("secret-token-file-empty", SYNC, 2, ("hubspot.token_file", "empty"),
      config=with_({"hubspot": {"token_file": '"hubspot-token"'}}), setup=write("hubspot-token", "")),
    C("secret-token-file-not-utf8", SYNC, 2, ("secret file", "{tmp}/hubspot-token", "not UTF-8"),
      config=with_({"hubspot": {"token_file": '"hubspot-token"'}}), setup=write("hubspot-token", b"\xff\xfe\x00")),
    C("ca-bundle-missing", SYNC, 2, ("hubspot.ca_bundle", "{tmp}/ca.pem", "no such file"),
      config=with_({"hubspot": {"ca_bundle": '"ca.pem"'}})),
    C("ca-bundle-not-pem", SYNC, 2, ("salesforce.ca_bundle", "{tmp}/ca.pem", "not a PEM CA bundle"),
      config=with_({"salesforce": {"ca_bundle": '"ca.pem"'}}), setup=write("ca.pem", "hello\n")),
    C("ca-bundle-is-a-directory", ("status",), 2, ("hubspot.ca_bundle", "not a regular file"),
      config=with_({"hubspot": {"ca_bundle": '"certs"'}}), setup=mkdir("certs")),
]

# -- the state store ---------------------------------------------------------------------------------
STORE = [
    C("store-sqlite-two-slashes-missing", ("status",), 2, ("state.url", "'sqlite:syncd.db'", "three slashes"),
      config=with_({"state": {"url": '"sqlite:syncd.db"'}})),
    C("store-postgres-port-abc", ("status",), 2, ("state.url", "port is not a number"),
      config=with_({"state": {"url": f'"postgresql://syncd:{PG_PASSWORD}@db.internal:abc/syncd"'}}),
      hides=(PG_PASSWORD,)),
    C("store-postgres-port-out-of-range", ("status",), 2, ("state.url", "port 99999"),
      config=with_({"state": {"url": f'"postgresql://syncd:{PG_PASSWORD}@db.internal:99999/syncd"'}}),
      hides=(PG_PASSWORD,)),
    C("store-unsupported-database", ("status",), 2, ("state.url", "unsupported database 'mysql'"),
      config=with_({"state": {"url": '"mysql://db.internal/syncd"'}})),
    C("store-sqlite-with-host", ("status",), 2, ("state.url", "no host"),
      config=with_({"state": {"url": '"sqlite://server/syncd.db"'}})),
    C("store-sqlite-in-memory", ("status",), 2, ("[state] url", "file path"),
      config=with_({"state": {"url": '"sqlite:///:memory:"'}})),
    C("store-not-a-url", ("status",), 2, ("state.url", "does not parse"),
      config=with_({"state": {"url": '"syncd.db"'}})),
    C("store-corrupt-sqlite-file", ("status",), 2,
      ("state store {tmp}/state.db: not a usable SQLite database", "file is not a database", "backup"),
      config=with_({}), setup=write("state.db", bytes(range(256)) * 64)),
    C("store-corrupt-sqlite-file-sync", SYNC, 2, ("state store {tmp}/state.db: not a usable SQLite database",),
      config=with_({}), setup=write("state.db", bytes(range(256)) * 64), hides=("cannot create",)),
    C("store-path-is-a-directory", SYNC, 2, ("[state] url", "{tmp}/state.db is a directory"),
      config=with_({}), setup=mkdir("state.db")),
    C("store-directory-missing-sync", SYNC, 2, ("cannot create {tmp}/gone/state.db", "{tmp}/gone does not exist"),
      config=with_({"state": {"url": '"sqlite:///{tmp}/gone/state.db"'}})),
    C("store-directory-missing-status", ("status",), 2, ("{tmp}/gone does not exist",),
      config=with_({"state": {"url": '"sqlite:///{tmp}/gone/state.db"'}})),
    C("store-parent-is-a-file", ("run",), 2, ("cannot create {tmp}/afile/state.db", "{tmp}/afile is not a directory"),
      config=with_({"state": {"url": '"sqlite:///{tmp}/afile/state.db"'}}), setup=write("afile", "x\n")),
    C("store-not-created-yet-status", ("status",), 2,
      ("the state store {tmp}/state.db does not exist yet", "run `syncd migrate` or start the service"),
      config=with_({})),
    C("store-not-created-yet-audit", ("audit",), 2, ("{tmp}/state.db does not exist yet", "syncd migrate"),
      config=with_({})),
    C("store-not-created-yet-impact", ("mappings", "impact"), 2, ("{tmp}/state.db does not exist yet",),
      config=with_({})),
    C("store-corrupt-migrate", ("migrate",), 2, ("{tmp}/state.db: not a usable SQLite database",),
      config=with_({}), setup=write("state.db", b"SQLite format 3\x00" + bytes(4080))),
    C("store-postgres-unreachable", ("status",), 1, ("state store", "unreachable"),
      config=with_({"state": {"url": '"postgresql://syncd@127.0.0.1:{closed}/syncd"'}})),
    C("store-postgres-unreachable-sync", SYNC, 1, ("state store postgresql+psycopg://syncd:***@127.0.0.1:{closed}",
                                                   "unreachable"),
      config=with_({"state": {"url": f'"postgresql://syncd:{PG_PASSWORD}@127.0.0.1:{{closed}}/syncd"'}}),
      hides=(PG_PASSWORD,)),
]

# -- mapping and SLA files ---------------------------------------------------------------------------
MAPPINGS = [
    C("mappings-dir-missing", SYNC, 2, ("{tmp}/m", "mappings directory not found"),
      config=with_(MAPPINGS_M)),
    C("mappings-dir-is-a-file", SYNC, 2, ("{tmp}/m", "mappings directory"),
      config=with_(MAPPINGS_M), setup=write("m", "x\n")),
    C("sla-missing", SYNC, 2, ("{tmp}/m/sla.toml", "missing", 'sla = "defaults"'),
      config=with_(MAPPINGS_M), setup=mappings(lambda d: (d / "sla.toml").unlink())),
    C("sla-missing-run", ("run",), 2, ("{tmp}/m/sla.toml", "missing"),
      config=with_(MAPPINGS_M), setup=mappings(lambda d: (d / "sla.toml").unlink())),
    C("sla-invalid-toml", SYNC, 2, ("sla.toml:", "invalid TOML"),
      config=with_(MAPPINGS_M), setup=mappings(replace_in("sla.toml", "threshold = 50", "threshold = = 50"))),
    C("sla-unknown-key", SYNC, 2, ("sla.toml:", "thresold", "unknown key", "did you mean 'threshold'"),
      config=with_(MAPPINGS_M), setup=mappings(replace_in("sla.toml", "threshold = 50", "thresold = 50"))),
    C("sla-unknown-term", SYNC, 2, ("sla.toml:", "'marketing_qualified'"),
      config=with_(MAPPINGS_M),
      setup=mappings(replace_in("sla.toml", 'score_stage = "mql"', 'score_stage = "marketing_qualified"'))),
    C("mapping-file-unreadable-sync", SYNC, 2, ("{tmp}/m/hubspot.toml", "cannot read"),
      config=with_(MAPPINGS_M),
      setup=mappings(lambda d: ((d / "hubspot.toml").unlink(), (d / "hubspot.toml").mkdir()))),
    C("mapping-file-unreadable-run", ("run",), 2, ("{tmp}/m/salesforce.toml", "cannot read"),
      config=with_(MAPPINGS_M),
      setup=mappings(lambda d: ((d / "salesforce.toml").unlink(), (d / "salesforce.toml").mkdir()))),
    C("mapping-unknown-term", SYNC, 2, ("hubspot.toml:44", "mystery_stage"),
      config=with_(MAPPINGS_M),
      setup=mappings(replace_in("hubspot.toml", 'mql = ["marketingqualifiedlead"]',
                                'mystery_stage = ["marketingqualifiedlead"]'))),
    C("mapping-not-utf8", SYNC, 2, ("terms.toml", "not UTF-8"),
      config=with_(MAPPINGS_M),
      setup=mappings(lambda d: (d / "terms.toml").write_bytes(b"\xff" + (d / "terms.toml").read_bytes()))),
    C("mapping-terms-empty", SYNC, 2, ("terms.toml:1:1", "the file is empty", "lifecycle"),
      config=with_(MAPPINGS_M), setup=mappings(lambda d: (d / "terms.toml").write_text(""))),
    C("mapping-terms-missing", SYNC, 2, ("terms.toml",),
      config=with_(MAPPINGS_M), setup=mappings(lambda d: (d / "terms.toml").unlink())),
    C("mappings-check-dir-missing", ("mappings", "check", "{tmp}/no-such-dir"), 2, ("no-such-dir",)),
]

# -- command-line arguments --------------------------------------------------------------------------
ARGS = [
    C("audit-limit-negative", ("audit", "--limit", "-5"), 2, ("--limit", "-5")),
    C("audit-limit-zero", ("audit", "--limit", "0"), 2, ("--limit",)),
    C("audit-unknown-rule", ("audit", "--rule", "R99"), 2, ("--rule", "'R99'", "R2-returned")),
    C("audit-since-after-until", ("audit", "--since", "2026-02-01", "--until", "2026-01-01"), 2,
      ("--since", "--until")),
    C("audit-since-not-a-date", ("audit", "--since", "last tuesday"), 2, ("--since", "last tuesday")),
    C("impact-samples-negative", ("mappings", "impact", "--samples", "-1"), 2, ("--samples", "-1")),
    C("demo-speed-zero", ("demo", "--speed", "0"), 2, ("--speed",)),
    C("demo-speed-negative", ("demo", "--speed", "-2"), 2, ("--speed",)),
    C("demo-speed-nan", ("demo", "--speed", "nan"), 2, ("--speed", "nan")),
    C("demo-people-negative", ("demo", "--people", "-1"), 2, ("--people",)),
    C("serve-people-negative", ("sandbox", "serve", "--people", "-5"), 2, ("--people", "-5")),
    C("serve-deals-negative", ("sandbox", "serve", "--deals", "-1"), 2, ("--deals",)),
    C("serve-port-70000", ("sandbox", "serve", "--hubspot-port", "70000"), 2, ("--hubspot-port", "70000")),
    C("serve-port-negative", ("sandbox", "serve", "--salesforce-port", "-1"), 2, ("--salesforce-port",)),
    C("serve-same-port-twice", ("sandbox", "serve", "--hubspot-port", "{busy}", "--salesforce-port", "{busy}"),
      2, ("--hubspot-port", "--salesforce-port", "two ports")),
    C("serve-port-in-use", ("sandbox", "serve", "--salesforce-port", "{busy}"), 2,
      ("--salesforce-port", "127.0.0.1:{busy}", "in use")),
    C("serve-dir-is-a-file", ("sandbox", "serve", "--dir", "{tmp}/afile"), 2, ("afile", "file"),
      setup=write("afile", "x\n")),
    C("serve-dir-under-a-file", ("sandbox", "serve", "--dir", "{tmp}/afile/sub"), 2, ("--dir", "afile/sub"),
      setup=write("afile", "x\n")),
    C("sync-without-once", ("sync",), 2, ("--once",)),
    C("sync-unknown-object", ("sync", "--once", "--object", "widgets"), 2, ("--object", "widgets")),
    C("unknown-command", ("synch",), 2, ("synch",)),
    C("unknown-option", ("status", "--colour"), 2, ("--colour",)),
    C("unknown-log-format", ("--log-format", "xml", "status"), 2, ("--log-format", "xml")),
    C("resync-id-without-system", ("resync", "--id", "00Q5e00000AbCdE"), 2, ("--id", "SYSTEM:ID")),
    C("resync-full-and-since", ("resync", "--full", "--since", "2026-01-01"), 2, ("--full", "--since")),
    C("run-metrics-port-in-use", ("run",), 2, ("service.metrics_port", "127.0.0.1:{busy}"),
      config=with_({"service": {"metrics_port": "{busy}"}})),
]

# -- peers that cannot be reached or will not talk (the module's sandbox) ----------------------------
PEERS = [
    C("peer-hubspot-closed-port", SYNC, 1, ("hubspot",), live=True,
      config=with_({"hubspot": {"base_url": '"https://127.0.0.1:{closed}"'}}, live=True)),
    C("peer-salesforce-closed-port", SYNC, 1, ("salesforce",), live=True,
      config=with_({"salesforce": {"instance_url": '"https://127.0.0.1:{closed}"'}}, live=True)),
    C("peer-both-closed", SYNC, 1, ("hubspot", "salesforce"), live=True,
      config=with_({"hubspot": {"base_url": '"https://127.0.0.1:{closed}"'},
                    "salesforce": {"instance_url": '"https://127.0.0.1:{closed}"'}}, live=True)),
    C("peer-untrusted-certificate", SYNC, 1, ("hubspot", "certificate verify failed"), live=True,
      config=with_({"hubspot": {"ca_bundle": None}}, live=True)),
    C("peer-plain-http-to-https", SYNC, 1, ("hubspot",), live=True,
      config=lambda w: config(w, live=True).replace('base_url = "https://', 'base_url = "http://')),
    C("peer-hubspot-bad-token", SYNC, 1, ("hubspot", "401"), live=True,
      config=with_({}, live=True), env={TOKEN_ENV: "wrong-token-7d1c"}, hides=("wrong-token-7d1c",)),
    C("peer-salesforce-bad-session", SYNC, 1, ("salesforce", "INVALID_SESSION_ID"), live=True,
      config=with_({}, live=True), env={SESSION_ENV: "wrong-session-5e2a"}, hides=("wrong-session-5e2a",)),
    C("peer-mappings-check-live-closed", ("mappings", "check", "--live"), 1, ("hubspot",), live=True,
      config=with_({"hubspot": {"base_url": '"https://127.0.0.1:{closed}"'}}, live=True)),
    # each names the system, host:port and the cause, never a vendor class name or the request URL
    C("peer-hubspot-refused-names-host-and-cause", SYNC, 1,
      ("hubspot contacts.search: 127.0.0.1:{closed}: connection refused",), live=True,
      config=with_({"hubspot": {"base_url": '"https://127.0.0.1:{closed}"'}}, live=True),
      hides=("MaxRetryError", "RetriableError", "NewConnectionError")),
    C("peer-salesforce-refused-names-host-and-cause", SYNC, 1,
      ("salesforce queryAll: 127.0.0.1:{closed}: connection refused",), live=True,
      config=with_({"salesforce": {"instance_url": '"https://127.0.0.1:{closed}"'}}, live=True),
      hides=("SELECT", "/services/data", "ConnectionError", "HTTPSConnectionPool", "RetriableError")),
    C("peer-hubspot-dns-failure", SYNC, 1, ("hubspot contacts.search: crm.syncd-test.invalid:443: DNS lookup",),
      live=True, config=with_({"hubspot": {"base_url": '"https://crm.syncd-test.invalid"'}}, live=True),
      hides=("NameResolutionError", "MaxRetryError")),
    C("peer-salesforce-dns-failure", SYNC, 1, ("salesforce queryAll: org.syncd-test.invalid:8443: DNS lookup",),
      live=True, config=with_({"salesforce": {"instance_url": '"https://org.syncd-test.invalid:8443"'}}, live=True),
      hides=("SELECT", "ConnectionError")),
    C("peer-hubspot-wrong-ca", SYNC, 1,
      ("hubspot contacts.search: 127.0.0.1:", "TLS certificate verify failed", "CA bundle {other_ca}"), live=True,
      config=with_({"hubspot": {"ca_bundle": '"{other_ca}"'}}, live=True), hides=("SSLError",)),
    C("peer-salesforce-wrong-ca", SYNC, 1,
      ("salesforce queryAll: 127.0.0.1:", "TLS certificate verify failed", "CA bundle {other_ca}"), live=True,
      config=with_({"salesforce": {"ca_bundle": '"{other_ca}"'}}, live=True), hides=("SSLError", "SELECT")),
    C("peer-hubspot-never-answers", SYNC, 1,
      ("hubspot contacts.search: 127.0.0.1:{mute}: timeout after 1 s",), live=True,
      config=with_({"hubspot": {"base_url": '"https://127.0.0.1:{mute}"', "timeout_s": "1"}}, live=True),
      hides=("ReadTimeoutError", "MaxRetryError")),
    C("peer-salesforce-never-answers", SYNC, 1,
      ("salesforce queryAll: 127.0.0.1:{mute}: timeout after 1 s",), live=True,
      config=with_({"salesforce": {"instance_url": '"https://127.0.0.1:{mute}"', "timeout_s": "1"}}, live=True),
      hides=("ReadTimeout", "SELECT")),
]

CASES = CONFIG + URLS + SECRETS + STORE + MAPPINGS + ARGS + PEERS
assert len({c.id for c in CASES}) == len(CASES)




@pytest.fixture(scope="module")
def busy_port() -> Iterator[int]:
    """A port something listens on (for "already in use")."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


@pytest.fixture(scope="module")
def mute_port() -> Iterator[int]:
    """A port whose listener never accepts: the kernel completes the TCP handshake, nothing answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield int(s.getsockname()[1])


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    with Sandbox(tmp_path_factory.mktemp("sandbox")) as sb:
        yield sb


def run(w: W, case: Case) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCD_")}
    env.update({TOKEN_ENV: HUBSPOT_TOKEN, SESSION_ENV: SALESFORCE_SESSION})
    for k, v in case.env.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = w.fmt(v)
    args = [w.fmt(a) for a in case.args]
    if case.config is not None:
        content = case.config(w)
        path = w.tmp / "syncd.toml"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, "utf-8")
        args = ["--config", str(path), *args]
    return subprocess.run([SYNCD, *args], env=env, cwd=w.tmp, capture_output=True, text=True,
                          errors="replace", timeout=TIMEOUT, stdin=subprocess.DEVNULL)


def assert_one_line(w: W, case: Case, p: subprocess.CompletedProcess[str]) -> str:
    out = f"exit {p.returncode}\n--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}"
    assert "Traceback" not in p.stdout + p.stderr, out
    assert p.returncode == case.code, out
    lines = p.stderr.splitlines()
    assert len(lines) == 1, out
    (line,) = lines
    assert line.startswith("syncd: error: "), out
    for name in case.names:
        assert w.fmt(name) in line, f"{w.fmt(name)!r} not in: {line}"
    for secret in case.hides:
        assert secret not in p.stdout + p.stderr, out
    return line


@pytest.mark.parametrize("case", [c for c in CASES if not c.live], ids=lambda c: c.id)
def test_bad_input_is_one_line_and_the_documented_exit_code(case: Case, tmp_path: Path, busy_port: int) -> None:
    w = W(tmp_path, closed=free_port(), busy=busy_port)
    if case.setup is not None:
        case.setup(w)
    assert_one_line(w, case, run(w, case))


@pytest.mark.parametrize("case", [c for c in CASES if c.live], ids=lambda c: c.id)
def test_unreachable_or_unwilling_peer_is_one_line_exit_1(case: Case, tmp_path: Path, live: Sandbox,
                                                         busy_port: int, mute_port: int) -> None:
    w = W(tmp_path, hs_url=live.hubspot_url, sf_url=live.salesforce_url, ca=str(live.ca_path),
          closed=free_port(), busy=busy_port, mute=mute_port)
    if case.setup is not None:
        case.setup(w)
    assert_one_line(w, case, run(w, case))


def test_the_table_covers_at_least_60_bad_inputs() -> None:
    assert len(CASES) >= 60


# -- the good side of the same checks ----------------------------------------------------------------

def test_a_utf8_bom_is_accepted(tmp_path: Path) -> None:
    w = W(tmp_path)
    (tmp_path / "syncd.toml").write_bytes(b"\xef\xbb\xbf" + config(w).encode())
    p = subprocess.run([SYNCD, "--config", str(tmp_path / "syncd.toml"), "mappings", "check"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, p.stdout + p.stderr


def test_a_utf8_bom_in_a_mapping_file_is_accepted(tmp_path: Path) -> None:
    w = W(tmp_path)
    mappings(lambda d: (d / "hubspot.toml").write_bytes(b"\xef\xbb\xbf" + (d / "hubspot.toml").read_bytes()))(w)
    p = subprocess.run([SYNCD, "mappings", "check", str(tmp_path / "m")], cwd=tmp_path, capture_output=True,
                       text=True, timeout=TIMEOUT)
    assert p.returncode == 0, p.stdout + p.stderr


def test_status_needs_no_secret_file(tmp_path: Path) -> None:
    """An operator's shell may not read the service's credentials (systemd LoadCredential):
    commands that call no API do not check them; one that does names the file."""
    w = W(tmp_path)
    cfg = config(w, {"hubspot": {"token_file": '"/run/credentials/syncd.service/hubspot-token"'}})
    (tmp_path / "syncd.toml").write_text(cfg)
    for command in ("migrate", "status"):
        p = subprocess.run([SYNCD, "--config", "syncd.toml", command], cwd=tmp_path, capture_output=True,
                           text=True, timeout=TIMEOUT)
        assert p.returncode == 0, p.stdout + p.stderr
    p = subprocess.run([SYNCD, "--config", "syncd.toml", "sync", "--once"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=TIMEOUT)
    assert p.returncode == 2 and "hubspot.token_file" in p.stderr, p.stderr


def test_mappings_check_accepts_a_folder_without_sla_when_the_config_asks_for_defaults(tmp_path: Path) -> None:
    w = W(tmp_path)
    mappings(lambda d: (d / "sla.toml").unlink())(w)
    (tmp_path / "syncd.toml").write_text(config(w, MAPPINGS_M))
    p = subprocess.run([SYNCD, "--config", "syncd.toml", "mappings", "check"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 1 and "sla.toml" in p.stdout, p.stdout + p.stderr
    (tmp_path / "syncd.toml").write_text(config(w, {"mappings": {"dir": '"m"', "sla": '"defaults"'}}))
    p = subprocess.run([SYNCD, "--config", "syncd.toml", "mappings", "check"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, p.stdout + p.stderr


def test_debug_shows_the_traceback_of_a_failure(tmp_path: Path) -> None:
    """--debug is for bug reports: the one line, and the traceback above it."""
    w = W(tmp_path)
    (tmp_path / "state.db").write_bytes(bytes(range(256)) * 64)
    (tmp_path / "syncd.toml").write_text(config(w))
    p = subprocess.run([SYNCD, "--debug", "--config", "syncd.toml", "status"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 2
    assert "Traceback (most recent call last)" in p.stderr
    assert p.stderr.splitlines()[-1].startswith("syncd: error: state store")


def test_sync_uses_the_built_in_sla_when_the_config_asks_for_it(tmp_path: Path) -> None:
    """Past the mapping folder (no sla.toml, sla = "defaults"): the cycle then fails on the
    unreachable peers (exit 1), not on the folder (exit 2)."""
    w = W(tmp_path, closed=free_port())
    mappings(lambda d: (d / "sla.toml").unlink())(w)
    case = C("sla-defaults", SYNC, 1, ("partial cycle",),
             config=with_({"mappings": {"dir": '"m"', "sla": '"defaults"'},
                           "hubspot": {"base_url": '"https://127.0.0.1:{closed}"'},
                           "salesforce": {"instance_url": '"https://127.0.0.1:{closed}"'}}))
    assert_one_line(w, case, run(w, case))


@pytest.fixture
def unwritable_store(tmp_path: Path) -> Iterator[W]:
    """A config and an existing store file that cannot be opened for writing right now (as on a
    disk remounted read-only): chmod for a user, the immutable attribute for root."""
    w = W(tmp_path)
    (tmp_path / "syncd.toml").write_text(config(w))
    assert run(w, C("migrate", ("migrate",), 0, ())).returncode == 0
    path = tmp_path / "state.db"
    root = os.geteuid() == 0
    if root:
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
            pytest.skip("root without chattr +i: cannot make a file unwritable here")
    else:
        path.chmod(0o444)
    try:
        yield w
    finally:
        if root:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        path.chmod(0o600)


def test_a_store_there_but_not_openable_now_is_exit_1_so_systemd_retries(unwritable_store: W) -> None:
    """Exit 1, a failure during work (deploy/syncd.service's RestartPreventExitStatus=2 would stop
    the service for good on exit 2); the line names the file and says why, never "cannot create"."""
    w = unwritable_store
    for args in (SYNC, ("run",), ("migrate",)):
        case = C("store-unwritable", args, 1, ("state store {tmp}/state.db: cannot open it for writing now",),
                 hides=("cannot create",))
        assert_one_line(w, case, run(w, case))
    p = run(w, C("status", ("status",), 0, ()))  # the read-only commands still read it
    assert p.returncode == 0, p.stderr
