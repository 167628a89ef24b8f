"""The auth keys of [salesforce] / [hubspot] (issue 15): each method names what it still needs,
on one line with file:line (exit 2), and secrets are read from variables or files only."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from syncd.config import load_config
from syncd.connectors.auth import salesforce_provider, write_secret
from syncd.errors import ConfigError

HS = '[hubspot]\nbase_url = "https://api.hubapi.com"\n'
SF = '[salesforce]\ninstance_url = "https://example.my.salesforce.com"\n'


def load(tmp_path: Path, text: str) -> object:
    p = tmp_path / "syncd.toml"
    p.write_text(text)
    return load_config(p)


@pytest.mark.parametrize(("section", "needs"), [
    (SF + 'auth = "jwt"\n', 'salesforce: auth = "jwt" needs consumer_key, username, '
                            'private_key_file or private_key_env'),
    (SF + 'auth = "client_credentials"\nconsumer_key = "ck"\n',
     'salesforce: auth = "client_credentials" needs client_secret_env or client_secret_file'),
    (SF + 'auth = "refresh_token"\n', 'salesforce: auth = "refresh_token" needs consumer_key, '
                                      'refresh_token_env or refresh_token_file'),
])
def test_each_salesforce_method_names_the_keys_it_still_needs(tmp_path: Path, section: str, needs: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, HS + section)
    assert str(err.value) == f"{tmp_path / 'syncd.toml'}:3: {needs} (see config.example.toml)"


def test_hubspot_oauth_names_the_keys_it_still_needs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, HS + 'auth = "oauth"\nclient_id = "x"\n' + SF)
    assert str(err.value).endswith('hubspot: auth = "oauth" needs client_secret_env or client_secret_file, '
                                   'refresh_token_env or refresh_token_file (see config.example.toml)')


def test_an_unknown_method_is_an_error_listing_the_methods(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, HS + SF + 'auth = "password"\n')
    assert "salesforce.auth" in str(err.value) and "'jwt'" in str(err.value)


def test_the_default_is_still_the_session_id_and_the_private_app_token(tmp_path: Path) -> None:
    cfg = load(tmp_path, HS + SF)
    assert cfg.salesforce.auth == "session" and cfg.hubspot.auth == "private_app"  # type: ignore[attr-defined]


def test_a_private_key_file_that_is_not_a_pem_key_is_a_config_error_that_never_shows_it(
        tmp_path: Path) -> None:
    key = tmp_path / "sf.key"
    key.write_text("not-a-key-but-a-secret-looking-string")
    cfg = load(tmp_path, HS + SF + f'auth = "jwt"\nconsumer_key = "ck"\nusername = "u"\nprivate_key_file = "{key}"\n')
    with pytest.raises(ConfigError) as err:
        salesforce_provider(cfg.salesforce, tmp_path)  # type: ignore[attr-defined]
    assert str(err.value) == f"salesforce: {key}: not an unencrypted PEM private key"
    assert "secret-looking" not in str(err.value)


def test_a_secret_is_replaced_atomically_and_only_the_owner_can_read_it(tmp_path: Path) -> None:
    path = tmp_path / "refresh"
    path.write_text("old\n")
    os.chmod(path, 0o644)
    write_secret(path, "new")
    assert path.read_text() == "new\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["refresh"]  # no temp file left behind
