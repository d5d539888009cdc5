"""The [realms.NAME] tables of config.toml: round trip, defaults, and a clear error for every bad setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.auth.realms import load_realms
from services.auth.realms.ldap import LdapRealm
from services.auth.realms.radius import RadiusRealm
from services.config import ConfigError, LdapRealmConfig, RadiusRealmConfig, ServerConfig, load_config

LDAP = """
[realms.corp]
kind = "ldap"
url = "ldap://ldap.example.org"
base_dn = "ou=people,dc=example,dc=org"
"""

RADIUS = """
[realms.radius]
kind = "radius"
server = "radius.example.org"
secret = "s3cret"
"""


def load(tmp_path: Path, text: str) -> ServerConfig:
    (tmp_path / "config.toml").write_text(text)
    return load_config(tmp_path)


def test_defaults_and_load_realms(tmp_path: Path) -> None:
    config = load(tmp_path, LDAP + RADIUS)
    corp, radius = config.realms
    assert corp == LdapRealmConfig(name="corp", url="ldap://ldap.example.org", base_dn="ou=people,dc=example,dc=org")
    assert (corp.user_attribute, corp.starttls, corp.bind_dn, corp.timeout) == ("uid", False, "", 3.0)
    assert radius == RadiusRealmConfig(name="radius", server="radius.example.org", secret="s3cret")
    assert (radius.port, radius.retries, radius.timeout, radius.require_message_authenticator) == (1812, 2, 2.0, True)
    realms = load_realms(config)
    assert sorted(realms) == ["corp", "radius"]
    assert isinstance(realms["corp"], LdapRealm) and realms["corp"].kind == "ldap"
    assert isinstance(realms["radius"], RadiusRealm) and realms["radius"].kind == "radius"
    assert realms["corp"].name == "corp" and realms["radius"].name == "radius"


def test_no_realms_table_means_no_realms(tmp_path: Path) -> None:
    config = load(tmp_path, "[server]\nport = 7000\n")
    assert config.realms == () and load_realms(config) == {}


def test_round_trip(tmp_path: Path) -> None:
    config = ServerConfig(
        directory=tmp_path,
        realms=(
            LdapRealmConfig(
                name="corp",
                url="ldaps://ldap.example.org:636",
                base_dn="dc=example,dc=org",
                user_filter="(&(objectClass=person)(!(loginDisabled=TRUE)))",
                bind_dn="cn=reader,dc=example,dc=org",
                bind_password="pw",
                ca_file="corp-ca.pem",
                timeout=2.5,
            ),
            RadiusRealmConfig(name="radius", server="10.0.0.5", secret="x", port=11812, retries=0, timeout=1),
        ),
    )
    assert load(tmp_path, config.to_toml()) == config


def test_ca_file_is_relative_to_the_config_dir(tmp_path: Path) -> None:
    config = load(tmp_path, LDAP + 'starttls = true\nca_file = "tls/ca.pem"\n')
    realm = load_realms(config)["corp"]
    assert isinstance(realm, LdapRealm) and realm.ca_file == str(tmp_path / "tls" / "ca.pem")


@pytest.mark.parametrize(
    "text, reason",
    [
        ("realms = 3\n", "[realms] must be a table"),
        ('[realms.Corp]\nkind = "ldap"\n', "realms.Corp: a realm name is lower-case"),
        ('[realms."a@b"]\nkind = "ldap"\n', "a realm name is lower-case"),
        ("[realms.corp]\nurl = 'ldap://x'\n", "realms.corp.kind must be one of ['ldap', 'radius'], got None"),
        ('[realms.corp]\nkind = "kerberos"\n', "got 'kerberos'"),
        (LDAP + 'bind_passwrd = "x"\n', "realms.corp: unknown key(s) bind_passwrd"),
        ('[realms.corp]\nkind = "ldap"\nurl = "ldap://x"\n', "realms.corp: missing base_dn"),
        (RADIUS.replace('secret = "s3cret"\n', ""), "realms.radius: missing secret"),
        (LDAP.replace("ldap://ldap", "http://ldap"), "realms.corp.url must be ldap://"),
        (LDAP.replace("ldap://ldap.example.org", "ldap://"), "realms.corp.url must be ldap://"),
        (LDAP.replace("ldap://", "ldaps://") + "starttls = true\n", "starttls applies to ldap:// only"),
        (LDAP.replace("ou=people,dc=example,dc=org", "people"), "realms.corp.base_dn is not a valid DN"),
        (LDAP.replace('"ou=people,dc=example,dc=org"', '""'), "realms.corp.base_dn"),
        (LDAP + 'user_attribute = "uid)(x"\n', "realms.corp.user_attribute must be an attribute name"),
        (LDAP + 'user_filter = "objectClass=*"\n', "realms.corp.user_filter must be one parenthesised"),
        (LDAP + 'user_filter = "(a=1))(b=2"\n', "realms.corp.user_filter must be one parenthesised"),
        (LDAP + 'user_filter = "(a=1)(b=2)"\n', "realms.corp.user_filter must be one parenthesised"),
        (LDAP + 'bind_dn = "cn=reader,dc=example,dc=org"\n', "set both bind_dn and bind_password"),
        (LDAP + 'bind_password = "pw"\n', "set both bind_dn and bind_password"),
        (LDAP + "starttls = 1\n", "realms.corp.starttls must be bool, got 1"),
        (LDAP + "timeout = 0\n", "realms.corp.timeout must be more than 0"),
        (LDAP + "timeout = 600\n", "at most 60 seconds"),
        (LDAP + 'timeout = "5"\n', "realms.corp.timeout must be float"),
        (RADIUS + 'port = "1812"\n', "realms.radius.port must be int, got '1812'"),
        (RADIUS + "port = true\n", "realms.radius.port must be int, got True"),
        (RADIUS + "port = 70000\n", "realms.radius.port must be 1..65535"),
        (RADIUS.replace('"s3cret"', '""'), "realms.radius.secret must not be empty"),
        (RADIUS + "retries = 11\n", "realms.radius.retries must be 0..10"),
        (RADIUS + "retries = 3\ntimeout = 20\n", "realms.radius: (retries + 1) x timeout must be at most 60"),
        (RADIUS.replace('"radius.example.org"', '" "'), "realms.radius.server must not be empty"),
        (RADIUS + 'nas_identifier = ""\n', "nas_identifier must not be empty"),
        (RADIUS + 'require_message_authenticator = "no"\n', "require_message_authenticator must be bool"),
    ],
)
def test_bad_realm_settings_are_refused_with_a_reason(tmp_path: Path, text: str, reason: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text)
    assert reason in str(caught.value)
    assert str(tmp_path / "config.toml") in str(caught.value)
