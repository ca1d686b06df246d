"""Each provider's host settings, declared once: the command line, the TOML volume config
and the registry are generated from these declarations.

A provider's settings are a frozen dataclass whose fields are declared with
``setting(...)``: the field name is the key in the TOML ``[provider]`` table,
and the ``Setting`` in its metadata gives the command-line option, the help
text, the kind of value (text, path, flag, choice), whether the path names a
file holding a secret (the secret itself never goes on a command line or in a
config file), and the field's role for recorded hints (``kmsfs.keys.registry``).
The SDK modules (``PROVIDERS[name].module``) receive these objects; nothing
here imports an SDK, click or cryptography, so ``kmsfs --help`` stays light.

``HostOptions`` carries what one command's host gave: every provider's typed
settings, and apart from them the control flags (``--trust-volume-settings``,
``--expect-fingerprint``...) that no provider reads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, NamedTuple

if TYPE_CHECKING:
    from kmsfs.keys.provider import KeyProvider
    from kmsfs.keys.secrets import Prompt

Kind = Literal["text", "path", "flag", "choice"]


class Setting(NamedTuple):
    """One declared host setting of a provider (a named tuple: many are made at import,
    and ``kmsfs --help`` reads them).

    Attributes:
        option: the command-line parameter (``kms_key_id`` is ``--kms-key-id``).
        help: its help text.
        kind: text, path (a file on this host: absolute and existing in the TOML
            volume config), flag (on or off) or choice (one of *choices*).
        secret_file: a path to a file holding a secret (key, passphrase, PIN): the
            command line wants it to exist unless *created* says init makes it.
        created: init creates the file when it is absent (a new local key file).
        in_toml: accepted in the TOML ``[provider]`` table (under the field name).
        init_only: only for commands that make a key (init, rewrap, keys add).
        hint: the recorded hint (in the volume config's key settings) this setting
            gives on this host, or None.
        required: with untrusted hints, the host must give it if the volume records
            the hint.
        compared: refused when the host gives another value than the recorded hint.
        identity: the hint names the key itself: when the host names another key,
            the other recorded hints describe another key and are dropped.
        names_key: given on this host, it names a key of this provider.
        old_help: help of ``--old-OPTION`` (naming the current key in rewrap and keys
            add); None: no such option (a shared setting serves the current key too,
            unless *init_only*).
        choices: the values of a choice.
    """

    option: str
    help: str
    kind: Kind = "text"
    secret_file: bool = False
    created: bool = False
    in_toml: bool = True
    init_only: bool = False
    hint: str | None = None
    required: bool = False
    compared: bool = False
    identity: bool = False
    names_key: bool = False
    old_help: str | None = None
    choices: tuple[str, ...] = ()

    @property
    def flag(self) -> str:
        """``--kms-key-id`` for ``kms_key_id``."""
        return "--" + self.option.replace("_", "-")

    @property
    def shared(self) -> bool:
        """The one option serves both the new and the current key (rewrap, keys add)."""
        return self.old_help is None and not self.init_only

    @property
    def old_option(self) -> str | None:
        return "old_" + self.option if self.old_help is not None else None


def setting(option: str, help: str, **roles: Any) -> Any:
    """A settings dataclass field declared as ``Setting(option, help, **roles)``; unset: None
    (False for a flag)."""
    declared = Setting(option, help, **roles)
    default = False if declared.kind == "flag" else None
    return field(default=default, metadata={"kmsfs": declared})


class ProviderSettings:
    """Base of the per-provider settings dataclasses (the fields are ``setting(...)``)."""

    provider: ClassVar[str]

    @classmethod
    def declared(cls) -> tuple[tuple[str, Setting], ...]:
        """(field name, Setting) of every field, in declaration order."""
        return tuple(
            (f.name, f.metadata["kmsfs"])
            for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        )

    @classmethod
    def flag_of(cls, name: str) -> str:
        """The command-line flag of field *name* (``--pkcs11-module`` for ``module``)."""
        return dict(cls.declared())[name].flag

    def given(self) -> Iterator[tuple[str, Setting, Any]]:
        """(field name, Setting, value) of every field this host gave (not None, not off)."""
        for name, declared in self.declared():
            value = getattr(self, name)
            if value is not None and value is not False:
                yield name, declared, value


@dataclass(frozen=True)
class LocalSettings(ProviderSettings):
    """The local provider: a key file, or a passphrase key unlocked from a passphrase file."""

    provider: ClassVar[str] = "local"
    key_file: str | None = setting(
        "key_file",
        "Local master key file (created 0600 by init if absent).",
        kind="path",
        secret_file=True,
        created=True,
        hint="key_file",
        required=True,
        names_key=True,
        old_help="Current local key file.",
    )
    passphrase_file: str | None = setting(
        "passphrase_file",
        "File holding the passphrase of a local passphrase volume.",
        kind="path",
        secret_file=True,
        names_key=True,
        old_help="File holding the current passphrase.",
    )


@dataclass(frozen=True)
class AwsKmsSettings(ProviderSettings):
    """The aws-kms provider: a KMS key and how to reach it (credentials come from AWS's
    own chain: environment, profile, instance role)."""

    provider: ClassVar[str] = "aws-kms"
    key_id: str | None = setting(
        "kms_key_id",
        "AWS KMS key ID, ARN or alias.",
        hint="key_arn",
        required=True,
        names_key=True,
        old_help="Current AWS KMS key (ARN, ID or alias).",
    )
    region: str | None = setting(
        "kms_region", "AWS region of the KMS key.", hint="region", compared=True
    )
    endpoint_url: str | None = setting(
        "kms_endpoint_url",
        "KMS endpoint URL (regional, VPC, test).",
        hint="endpoint_url",
        required=True,
        compared=True,
    )
    profile: str | None = setting(
        "kms_profile", "AWS profile for credentials.", hint="profile", compared=True
    )


PKCS11_MECHANISMS = ("aes-gcm", "aes-kwp", "aes-kw", "rsa-oaep-sha1")


@dataclass(frozen=True)
class Pkcs11Settings(ProviderSettings):
    """The pkcs11 provider: a module, a token, a key on it and the token's PIN file."""

    provider: ClassVar[str] = "pkcs11"
    module: str | None = setting(
        "pkcs11_module",
        "PKCS#11 module (.so) path.",
        kind="path",
        hint="module",
        required=True,
        compared=True,
        names_key=True,
        old_help="PKCS#11 module of the current key.",
    )
    token: str | None = setting(
        "pkcs11_token",
        "PKCS#11 token label.",
        hint="token",
        required=True,
        identity=True,
        names_key=True,
        old_help="Token label of the current key.",
    )
    key: str | None = setting(
        "pkcs11_key",
        "Label of the wrapping key on the token.",
        hint="key",
        required=True,
        identity=True,
        names_key=True,
        old_help="Label of the current key on its token.",
    )
    pin_file: str | None = setting(
        "pkcs11_pin_file",
        "File holding the token user PIN.",
        kind="path",
        secret_file=True,
        old_help="File holding the current PKCS#11 token PIN.",
    )
    create_key: bool = setting(
        "pkcs11_create_key",
        "Create the wrapping key on the token if missing.",
        kind="flag",
        in_toml=False,
        init_only=True,
    )
    mechanism: str | None = setting(
        "pkcs11_mechanism",
        "Wrapping mechanism (default: the first the token and key support).",
        kind="choice",
        choices=PKCS11_MECHANISMS,
        in_toml=False,
        init_only=True,
    )


class ProviderEntry(NamedTuple):
    """What an SDK module gives the registry (its ``ENTRY``).

    Attributes:
        create: (this host's settings, prompt) -> the provider of a new key (init,
            rewrap, keys add: it may create the key, as the settings ask).
        open: (recorded hints the registry passes on, this host's settings, prompt)
            -> the provider of an existing volume's key.
    """

    create: Callable[[Any, Prompt | None], KeyProvider]
    open: Callable[[dict[str, Any], Any, Prompt | None], KeyProvider]


class ProviderDecl(NamedTuple):
    """One provider: its settings and where its SDK part lives (imported on use).

    Attributes: name, settings (its ProviderSettings dataclass), module (the
    module whose ``ENTRY`` is its ProviderEntry), extra (the pip extra installing
    its SDK; None: no SDK).
    """

    name: str
    settings: type[ProviderSettings]
    module: str
    extra: str | None

    @property
    def host_settings(self) -> dict[str, str]:
        """Recorded hint -> the option giving it on this host."""
        return {s.hint: s.option for _, s in self.settings.declared() if s.hint is not None}

    def hints(self, role: str) -> tuple[str, ...]:
        """The hints of the settings with *role* (required, compared, identity)."""
        return tuple(
            s.hint for _, s in self.settings.declared() if s.hint is not None and getattr(s, role)
        )

    @property
    def toml_settings(self) -> dict[str, Setting]:
        """TOML ``[provider]`` key -> the setting it gives."""
        return {name: s for name, s in self.settings.declared() if s.in_toml}


# The providers, by name: the one table of what exists (no module is looked for).
PROVIDERS: dict[str, ProviderDecl] = {
    "local": ProviderDecl("local", LocalSettings, "kmsfs.keys.local", None),
    "aws-kms": ProviderDecl("aws-kms", AwsKmsSettings, "kmsfs.keys.aws_kms", "aws"),
    "pkcs11": ProviderDecl("pkcs11", Pkcs11Settings, "kmsfs.keys.pkcs11", "pkcs11"),
}
PROVIDER_NAMES = tuple(PROVIDERS)


def all_settings() -> Iterator[tuple[ProviderDecl, str, Setting]]:
    """(provider, field name, Setting) of every declared setting, in the table's order."""
    for decl in PROVIDERS.values():
        for name, declared in decl.settings.declared():
            yield decl, name, declared


# Control flags: what the host says about how to open the volume, read by no provider.
CONTROL_OPTIONS = ("trust_volume_settings", "expect_fingerprint")


@dataclass(frozen=True)
class HostOptions:
    """What this host gives to open or make keys: each provider's settings, and the
    control flags.

    Attributes:
        settings: provider name -> its settings (every provider has one; unset: empty).
        trust_volume_settings: find keys the host does not name with the recorded hints.
        expect_fingerprint: the volume-key fingerprint an unpinned volume must have.
        accept_changed_hints: a host value that differs from a compared hint is used
            (``kmsfs keys update`` records it) instead of refused.
        flag_names: option -> the flag that gave it, where a command renamed it
            (``--old-key-file``), for error messages.
    """

    settings: Mapping[str, ProviderSettings] = field(
        default_factory=lambda: {name: decl.settings() for name, decl in PROVIDERS.items()}
    )
    trust_volume_settings: bool = False
    expect_fingerprint: str | None = None
    accept_changed_hints: bool = False
    flag_names: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, values: Mapping[str, Any], **control: Any) -> HostOptions:
        """Options from {option name: value} (click's parameters; None: not given).

        Raises ValueError for a name that is neither a declared setting's option nor a
        control flag.
        """
        by_option = {s.option: (decl.name, name) for decl, name, s in all_settings()}
        fields: dict[str, dict[str, Any]] = {name: {} for name in PROVIDERS}
        for option, value in values.items():
            if option in CONTROL_OPTIONS:
                control.setdefault(option, value)
            elif option in by_option:
                provider, name = by_option[option]
                if value is not None:
                    fields[provider][name] = value
            else:
                raise ValueError(f"{option!r} is not a declared key option")
        control["trust_volume_settings"] = bool(control.get("trust_volume_settings"))
        settings = {name: PROVIDERS[name].settings(**fields[name]) for name in PROVIDERS}
        return cls(settings, **control)

    def of(self, provider: str) -> Any:
        """The settings of *provider* (its ProviderSettings dataclass)."""
        return self.settings[provider]

    def given(self) -> Iterator[tuple[Setting, Any]]:
        """(Setting, value) of every setting this host gave, in the declared order."""
        for settings in self.settings.values():
            for _, declared, value in settings.given():
                yield declared, value

    def value(self, option: str) -> Any:
        """The value this host gave for *option* (None: not given)."""
        return next((value for s, value in self.given() if s.option == option), None)

    def without_hints(self, provider: str) -> HostOptions:
        """These options less *provider*'s settings that give a recorded hint (so that the
        entry's own authenticated hints find it)."""
        current: Any = self.settings[provider]
        cleared = {name: None for name, s in current.declared() if s.hint is not None}
        settings = {**self.settings, provider: dataclasses.replace(current, **cleared)}
        return dataclasses.replace(self, settings=settings)


def host_options(options: HostOptions | Mapping[str, Any]) -> HostOptions:
    """*options*, or a mapping of option names read as ``HostOptions.parse``."""
    return options if isinstance(options, HostOptions) else HostOptions.parse(options)
