"""The deployment config (syncd/config.py): validated up front, unknown keys are errors with
file:line, credentials come only from an environment variable or a secret file and never
show in a repr, a str or an error message."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from syncd.config import (
    CONFIG_ENV,
    Config,
    config_path,
    load_config,
    parse_config,
)
from syncd.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config.example.toml"
TOKEN = "pat-na1-11111111-2222-3333-4444-555555555555"
SESSION = "00D5g000004XyZ1!AQ4AQFakeSessionIdForTests"
# The two required keys (issue 18: no silent production default), as TOML and as parsed data.
HS_URL = 'base_url = "https://api.hubapi.com"\n'
SF_URL = 'instance_url = "https://example.my.salesforce.com"\n'
URLS = f"[hubspot]\n{HS_URL}[salesforce]\n{SF_URL}"
REQUIRED: dict[str, object] = {"hubspot": {"base_url": "https://api.hubapi.com"},
                               "salesforce": {"instance_url": "https://example.my.salesforce.com"}}


def write(tmp_path: Path, text: str, name: str = "syncd.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def problem_lines(err: pytest.ExceptionInfo[ConfigError]) -> list[str]:
    """The problems of one ConfigError: one line, ``; `` between them."""
    assert len(str(err.value).splitlines()) == 1, str(err.value)
    return str(err.value).split("; ")


# ------------------------------------------------------------------ the shipped example

def test_the_example_config_loads_as_it_is() -> None:
    cfg = load_config(EXAMPLE)
    assert cfg.hubspot.token_env == "SYNCD_HUBSPOT_TOKEN"
    assert cfg.salesforce.session_env == "SYNCD_SALESFORCE_SESSION"
    assert cfg.state.url == "sqlite:///syncd.db"


def test_every_commented_out_setting_of_the_example_is_a_real_key() -> None:
    """An operator uncommenting a line of the example never gets 'unknown key'."""
    section = ""
    commented: dict[str, dict[str, object]] = {}
    for line in EXAMPLE.read_text().splitlines():
        if m := re.match(r"^\[(\w+)\]", line):
            section = m.group(1)
        elif m := re.match(r"^#\s*(\w+\s*=\s*.+)$", line):
            commented.setdefault(section, {}).update(tomllib.loads(m.group(1)))
    assert sum(len(v) for v in commented.values()) >= 5, commented  # the test sees them
    doc = tomllib.loads(EXAMPLE.read_text())
    for section, keys in commented.items():
        doc.setdefault(section, {}).update(keys)
    try:
        parse_config(doc, source="example, uncommented", base_dir=ROOT)
    except ConfigError as exc:  # only the files the example names are not on this machine
        assert all("no such file" in p for p in str(exc).split("; ")), str(exc)


# ------------------------------------------------------------------ unknown keys and bad values

def test_an_unknown_key_is_an_error_naming_file_line_and_key(tmp_path: Path) -> None:
    p = write(tmp_path, f'[hubspot]\n{HS_URL}base_ur1 = "typo"\n[salesforce]\n{SF_URL}')
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert problem_lines(err) == [f"{p}:3: hubspot.base_ur1: unknown key (did you mean base_url?)"]


def test_an_unknown_section_is_an_error(tmp_path: Path) -> None:
    p = write(tmp_path, f'[hubspot]\n{HS_URL}token_env = "X"\n[salesforce]\n{SF_URL}\n[hubsopt]\nbase_url = "x"\n')
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert problem_lines(err) == [f"{p}:7: hubsopt: unknown key (did you mean hubspot?)"]


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    p = write(tmp_path, (
        "[sync]\n"
        "overlap_s = -1\n"
        "retry_max_attempts = 99\n"
        "[service]\n"
        "metrics_port = 70000\n"
        "colour = true\n"
        "[logging]\n"
        'level = "verbose"\n'
        f"{URLS}"
    ))
    with pytest.raises(ConfigError) as err:
        load_config(p)
    lines = problem_lines(err)
    assert [ln.split(": ")[0:2] for ln in lines] == [
        [f"{p}:2", "sync.overlap_s"],
        [f"{p}:3", "sync.retry_max_attempts"],
        [f"{p}:5", "service.metrics_port"],
        [f"{p}:6", "service.colour"],
        [f"{p}:8", "logging.level"],
    ], lines


def test_missing_required_keys_come_first_in_one_problem(tmp_path: Path) -> None:
    p = write(tmp_path, "[sync]\noverlap_s = -1\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert problem_lines(err) == [
        f"{p}: missing required keys: hubspot.base_url, salesforce.instance_url (see config.example.toml)",
        f"{p}:2: sync.overlap_s: Input should be greater than or equal to 0",
    ]


@pytest.mark.parametrize("url", ["mysql://db/syncd", "syncd.db", ""])
def test_only_sqlite_and_postgresql_state_stores_are_accepted(tmp_path: Path, url: str) -> None:
    p = write(tmp_path, f'[state]\nurl = "{url}"\n')
    with pytest.raises(ConfigError, match=r"syncd.toml:2: state.url: .*sqlite:///PATH or postgresql://"):
        load_config(p)


def test_base_dir_cannot_be_set_from_the_file(tmp_path: Path) -> None:
    p = write(tmp_path, 'base_dir = "/etc"\n')
    with pytest.raises(ConfigError, match="base_dir: unknown key"):
        load_config(p)


def test_invalid_toml_is_a_config_error_with_its_position(tmp_path: Path) -> None:
    p = write(tmp_path, "[hubspot]\nbase_url = \n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(p))}: invalid TOML: .*line 2"):
        load_config(p)


def test_a_missing_config_file_says_how_to_name_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file not found.*--config or SYNCD_CONFIG.*config.example.toml"):
        load_config(tmp_path / "nope.toml")


def test_the_config_path_is_the_option_then_the_environment_then_the_default(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    assert config_path(None) == Path("syncd.toml")
    monkeypatch.setenv(CONFIG_ENV, "/etc/syncd/prod.toml")
    assert config_path(None) == Path("/etc/syncd/prod.toml")
    assert config_path("here.toml") == Path("here.toml")


def test_the_config_is_frozen(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, URLS))
    with pytest.raises(ValueError, match="frozen"):
        cfg.sync.overlap_s = 0  # type: ignore[misc]


def test_relative_paths_are_resolved_against_the_config_files_folder(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    p = write(tmp_path / "etc", f'{URLS}[state]\nurl = "sqlite:///state/syncd.db"\n[mappings]\ndir = "maps"\n')
    cfg = load_config(p)
    assert cfg.state_url() == f"sqlite:///{tmp_path / 'etc' / 'state' / 'syncd.db'}"
    assert cfg.mappings.dir is not None
    assert cfg.resolve(cfg.mappings.dir) == tmp_path / "etc" / "maps"
    assert cfg.resolve(Path("/abs/maps")) == Path("/abs/maps")
    for url in ("sqlite:////var/lib/syncd.db", "sqlite:///:memory:", "postgresql://u@db/syncd"):
        assert parse_config({**REQUIRED, "state": {"url": url}}, source="x", base_dir=tmp_path).state_url() == url


# ------------------------------------------------------------------ credentials

def test_credentials_come_from_the_named_environment_variables(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_HS_TOKEN", f"  {TOKEN}\n")
    monkeypatch.setenv("MY_SF_SESSION", SESSION)
    cfg = load_config(write(tmp_path, f'[hubspot]\n{HS_URL}token_env = "MY_HS_TOKEN"\n'
                                      f'[salesforce]\n{SF_URL}session_env = "MY_SF_SESSION"\n'))
    assert cfg.hubspot.token(cfg.base_dir).get_secret_value() == TOKEN  # trimmed
    assert cfg.salesforce.session_id(cfg.base_dir).get_secret_value() == SESSION


def test_the_default_variables_are_syncd_hubspot_token_and_syncd_salesforce_session(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNCD_HUBSPOT_TOKEN", TOKEN)
    monkeypatch.setenv("SYNCD_SALESFORCE_SESSION", SESSION)
    cfg = load_config(write(tmp_path, URLS))
    assert cfg.hubspot.token(cfg.base_dir).get_secret_value() == TOKEN
    assert cfg.salesforce.session_id(cfg.base_dir).get_secret_value() == SESSION


@pytest.mark.parametrize("value", [None, "", "   "])
def test_an_unset_or_empty_variable_is_an_error_naming_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    if value is None:
        monkeypatch.delenv("MY_HS_TOKEN", raising=False)
    else:
        monkeypatch.setenv("MY_HS_TOKEN", value)
    cfg = load_config(write(tmp_path, f'[hubspot]\n{HS_URL}token_env = "MY_HS_TOKEN"\n[salesforce]\n{SF_URL}'))
    with pytest.raises(ConfigError, match="hubspot: environment variable MY_HS_TOKEN is not set"):
        cfg.hubspot.token(cfg.base_dir)


def test_a_secret_file_is_read_relative_to_the_config_and_wins_over_the_variable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "hs").write_text(TOKEN + "\n")
    (tmp_path / "secrets" / "sf").write_text(SESSION)
    monkeypatch.setenv("SYNCD_HUBSPOT_TOKEN", "from-the-environment")
    cfg = load_config(write(tmp_path, f'[hubspot]\n{HS_URL}token_file = "secrets/hs"\n'
                                      f'[salesforce]\n{SF_URL}session_file = "{tmp_path / "secrets" / "sf"}"\n'))
    assert cfg.hubspot.token(cfg.base_dir).get_secret_value() == TOKEN
    assert cfg.salesforce.session_id(cfg.base_dir).get_secret_value() == SESSION


def test_a_missing_or_empty_secret_file_is_an_error_naming_the_key_and_the_file(tmp_path: Path) -> None:
    p = write(tmp_path, f'[hubspot]\n{HS_URL}token_file = "hs-token"\n[salesforce]\n{SF_URL}')
    where = re.escape(str(tmp_path / "hs-token"))
    with pytest.raises(ConfigError, match=rf"syncd.toml:3: hubspot.token_file: {where}: no such file"):
        load_config(p)  # at load, with every other problem (issue 18)
    (tmp_path / "hs-token").write_text("")
    with pytest.raises(ConfigError, match=rf"hubspot.token_file: {where}: the secret file is empty"):
        load_config(p)
    (tmp_path / "hs-token").write_text("\n")  # blank: found when the secret is read
    cfg = load_config(p)
    with pytest.raises(ConfigError, match="hubspot: secret file .*hs-token is empty"):
        cfg.hubspot.token(cfg.base_dir)
    (tmp_path / "hs-token").unlink()  # gone after the load
    with pytest.raises(ConfigError, match=rf"hubspot: cannot read secret file {where}"):
        cfg.hubspot.token(cfg.base_dir)


def test_commands_that_call_no_api_do_not_check_the_secret_files(tmp_path: Path) -> None:
    """An operator's shell may rightly be unable to read the service's credentials."""
    p = write(tmp_path, f'[hubspot]\n{HS_URL}token_file = "/run/credentials/syncd.service/hs"\n[salesforce]\n{SF_URL}')
    assert load_config(p, credentials=False).hubspot.token_file is not None
    with pytest.raises(ConfigError, match="hubspot.token_file"):
        load_config(p)


def test_no_credential_source_at_all_is_an_error(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, f'[hubspot]\n{HS_URL}[salesforce]\n{SF_URL}session_env = ""\n'))
    with pytest.raises(ConfigError, match="salesforce: no credential configured"):
        cfg.salesforce.session_id(cfg.base_dir)


@pytest.mark.parametrize(("section", "key"), [
    ("hubspot", "token"), ("hubspot", "access_token"), ("hubspot", "api_key"),
    ("salesforce", "session_id"), ("salesforce", "password"), ("salesforce", "security_token"),
])
def test_a_credential_written_into_the_config_is_refused_without_echoing_it(
        tmp_path: Path, section: str, key: str) -> None:
    url = HS_URL if section == "hubspot" else SF_URL
    other = f"[salesforce]\n{SF_URL}" if section == "hubspot" else f"[hubspot]\n{HS_URL}"
    p = write(tmp_path, f'[{section}]\n{key} = "{TOKEN}"\n{url}{other}')
    with pytest.raises(ConfigError) as err:
        load_config(p)
    (problem,) = problem_lines(err)
    assert problem.startswith(f"{p}:2: {section}.{key}: unknown key"), problem
    assert TOKEN not in str(err.value) and TOKEN not in repr(err.value)


@pytest.mark.parametrize("section", ["hubspot", "salesforce"])
def test_a_credential_pasted_into_the_variable_name_is_refused_without_echoing_it(
        tmp_path: Path, section: str) -> None:
    key = "token_env" if section == "hubspot" else "session_env"
    secret = TOKEN if section == "hubspot" else SESSION
    p = write(tmp_path, URLS.replace(f"[{section}]\n", f'[{section}]\n{key} = "{secret}"\n'))
    with pytest.raises(ConfigError, match=f"{section}.{key}: is not an environment variable name") as err:
        load_config(p)
    assert secret not in str(err.value)


def test_a_secret_never_shows_in_a_repr_a_str_or_a_dump(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNCD_HUBSPOT_TOKEN", TOKEN)
    (tmp_path / "sf").write_text(SESSION)
    cfg = load_config(write(tmp_path, f'[hubspot]\n{HS_URL}[salesforce]\n{SF_URL}session_file = "sf"\n'))
    token, session = cfg.hubspot.token(cfg.base_dir), cfg.salesforce.session_id(cfg.base_dir)
    for secret, value in ((token, TOKEN), (session, SESSION)):
        shown = [repr(secret), str(secret), f"{secret}", f"{secret!r}", repr([secret]), repr({"s": secret})]
        assert all(value not in s for s in shown), shown
        assert secret.get_secret_value() == value
    # the config holds only where secrets come from, never the secrets themselves
    everything = [repr(cfg), str(cfg), cfg.model_dump_json(), repr(cfg.model_dump())]
    assert all(TOKEN not in s and SESSION not in s for s in everything)


def test_defaults_are_the_documented_ones_and_the_crm_urls_have_none(tmp_path: Path) -> None:
    """README: SQLite by default; design: emails masked unless debugging asks; issue 18: no
    silent production URL."""
    cfg = parse_config(REQUIRED, source="x", base_dir=tmp_path)
    assert cfg.state.url == "sqlite:///syncd.db"
    assert cfg.service.metrics_port == 9464
    assert cfg.logging.show_emails is False  # emails are masked unless debugging asks
    assert cfg.mappings.sla == "file"  # a folder without sla.toml is refused
    with pytest.raises(ValueError, match="hubspot"):
        Config()
