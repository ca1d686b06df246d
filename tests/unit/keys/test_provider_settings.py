"""Provider settings declared once (kmsfs/keys/settings.py) drive the command line, the
TOML volume config and the registry's hints: a setting declared for a provider is a
click option, a ``[provider]`` key and a recorded hint the host must give, with no
other table to edit; an undeclared key is refused as before."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import click
import pytest
from click.testing import CliRunner

from kmsfs.cli.common import key_option_values, key_options, old_key_options, old_option_values
from kmsfs.errors import ConfigError
from kmsfs.format.volume_config import KeyConfig
from kmsfs.keys.registry import host_names, host_settings, provider_entry
from kmsfs.keys.settings import (
    PROVIDERS,
    AwsKmsSettings,
    HostOptions,
    LocalSettings,
    ProviderDecl,
    ProviderSettings,
    setting,
)
from kmsfs.server.config import parse_server_config


@dataclass(frozen=True)
class VaultSettings(ProviderSettings):
    """A provider that exists only in this test."""

    provider: ClassVar[str] = "vault"
    url: str | None = setting(
        "vault_url",
        "Vault server URL.",
        hint="url",
        required=True,
        compared=True,
        names_key=True,
        old_help="Vault server of the current key.",
    )
    token_file: str | None = setting(
        "vault_token_file", "File holding the Vault token.", kind="path", secret_file=True
    )


@pytest.fixture
def vault(monkeypatch: pytest.MonkeyPatch) -> ProviderDecl:
    decl = ProviderDecl("vault", VaultSettings, "kmsfs.keys.no_such_vault_module", "vault")
    monkeypatch.setitem(PROVIDERS, "vault", decl)
    return decl


def _command(*decorators: Any) -> click.Command:
    def body(**kwargs: Any) -> None:
        click.echo(repr(key_option_values(kwargs)))

    for decorate in reversed(decorators):
        body = decorate(body)
    return click.command()(body)


def _flags(command: click.Command) -> dict[str, click.Parameter]:
    return {flag: param for param in command.params for flag in param.opts}


def test_a_declared_setting_is_an_option_a_toml_key_and_a_hint(
    vault: ProviderDecl, tmp_path: Path
) -> None:
    """One declaration: the click option (with its help, and its --old- twin), the TOML
    key giving that option, and the hint the registry makes the host give."""
    flags = _flags(_command(key_options(for_init=False), old_key_options))
    assert flags["--vault-url"].help == "Vault server URL."
    assert flags["--old-vault-url"].help == "Vault server of the current key."
    token_type = flags["--vault-token-file"].type
    assert isinstance(token_type, click.Path) and token_type.exists

    data = {"provider": {"type": "vault", "url": "https://vault:8200"}}
    config = parse_server_config(data, tmp_path / "v.toml")
    assert config.provider_type == "vault"
    assert config.cli_defaults()["vault_url"] == "https://vault:8200"

    assert vault.host_settings == {"url": "vault_url"}
    key = KeyConfig("vault", "vault:1", {"url": "https://vault:8200"}, b"")
    with pytest.raises(ConfigError, match=r"give --vault-url on the command line .* url"):
        host_settings(key, HostOptions.parse({}), trusted=False)
    given = HostOptions.parse({"vault_url": "https://vault:8200"})
    assert host_names(key, given)
    assert host_settings(key, given, trusted=False) == {}
    with pytest.raises(ConfigError, match="gives url 'https://other' .--vault-url. but"):
        host_settings(key, HostOptions.parse({"vault_url": "https://other"}), trusted=False)
    with pytest.raises(ConfigError, match=r"provider vault needs .*kmsfs\[vault\]"):
        provider_entry("vault")


def test_a_toml_key_no_provider_declares_is_refused(tmp_path: Path) -> None:
    """The existing messages: the provider's own keys listed, and the provider a key
    belongs to named."""
    where = tmp_path / "v.toml"
    with pytest.raises(ConfigError) as raised:
        parse_server_config({"provider": {"type": "local", "key_id": "alias/x"}}, where)
    assert str(raised.value) == (
        f"{where}: provider.key_id is not an option of the local provider (it belongs to the"
        " aws-kms provider); its options: key_file, passphrase_file"
    )
    with pytest.raises(ConfigError) as raised:
        parse_server_config({"provider": {"type": "pkcs11", "mechanism": "aes-gcm"}}, where)
    assert str(raised.value) == (
        f"{where}: provider.mechanism is not an option of the pkcs11 provider; its options:"
        " key, module, pin_file, token"
    )


def test_a_declared_path_must_exist_in_the_toml_file(tmp_path: Path) -> None:
    where = tmp_path / "v.toml"
    missing = tmp_path / "absent.pin"
    provider = {"type": "pkcs11", "pin_file": str(missing)}
    with pytest.raises(ConfigError, match=f"provider.pin_file: {missing} does not exist"):
        parse_server_config({"provider": provider}, where)


def test_the_command_line_gives_typed_settings_and_control_flags_apart() -> None:
    """Providers get their own dataclass; --trust-volume-settings and
    --expect-fingerprint are not among any provider's settings."""
    seen: list[HostOptions] = []

    @click.command()
    @key_options(for_init=False)
    def command(**kwargs: Any) -> None:
        seen.append(key_option_values(kwargs))
        assert kwargs == {}

    args = ["--key-file", "/k", "--kms-region", "eu-west-1", "--trust-volume-settings"]
    result = CliRunner().invoke(command, args)
    assert result.exit_code == 0, result.output
    (options,) = seen
    assert options.of("local") == LocalSettings(key_file="/k")
    assert options.of("aws-kms").region == "eu-west-1"
    assert options.trust_volume_settings is True
    assert options.expect_fingerprint is None
    with pytest.raises(ValueError, match="not a declared key option"):
        HostOptions.parse({"kms_secret": "x"})


def test_old_options_name_the_current_key_and_share_the_rest() -> None:
    """rewrap and keys add: --old-X gives X for the current key; a setting without an
    --old- twin (the KMS region) serves both keys; errors name the --old- flag."""
    seen: list[tuple[HostOptions, HostOptions]] = []

    @click.command()
    @key_options(for_init=True)
    @old_key_options
    def command(**kwargs: Any) -> None:
        new = key_option_values(kwargs)
        seen.append((new, old_option_values(kwargs, new)))

    args = ["--kms-key-id", "alias/new", "--old-kms-key-id", "arn:old", "--kms-region", "r"]
    result = CliRunner().invoke(command, args)
    assert result.exit_code == 0, result.output
    ((new, old),) = seen
    assert (new.of("aws-kms").key_id, old.of("aws-kms").key_id) == ("alias/new", "arn:old")
    assert old.of("aws-kms").region == "r"
    assert old.flag_names["kms_key_id"] == "--old-kms-key-id"
    key = KeyConfig("aws-kms", "arn:old", {"key_arn": "arn:old"}, b"")
    unnamed = dataclasses.replace(old, settings={**old.settings, "aws-kms": AwsKmsSettings()})
    with pytest.raises(ConfigError, match="give --old-kms-key-id on the command line"):
        host_settings(key, unnamed, False)


def test_the_hint_roles_are_the_registry_s() -> None:
    """The roles the registry had in its own table, now read from the declarations."""
    roles = {
        name: (
            decl.host_settings,
            decl.hints("required"),
            decl.hints("compared"),
            decl.hints("identity"),
            tuple(s.option for _, s in decl.settings.declared() if s.names_key),
        )
        for name, decl in PROVIDERS.items()
    }
    assert roles == {
        "local": (
            {"key_file": "key_file"},
            ("key_file",),
            (),
            (),
            ("key_file", "passphrase_file"),
        ),
        "aws-kms": (
            {
                "key_arn": "kms_key_id",
                "region": "kms_region",
                "endpoint_url": "kms_endpoint_url",
                "profile": "kms_profile",
            },
            ("key_arn", "endpoint_url"),
            ("region", "endpoint_url", "profile"),
            (),
            ("kms_key_id",),
        ),
        "pkcs11": (
            {"module": "pkcs11_module", "token": "pkcs11_token", "key": "pkcs11_key"},
            ("module", "token", "key"),
            ("module",),
            ("token", "key"),
            ("pkcs11_module", "pkcs11_token", "pkcs11_key"),
        ),
    }
