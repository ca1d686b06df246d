"""Domain exceptions shared by every layer, with the CLI exit code of each.

Lower layers (format, keys) raise these; the FUSE operations layer maps them to
an errno (``kmsfs.fs.operations``) and the CLI maps them to an exit code and a
one-line message (``kmsfs.cli``).  Exit codes are part of the CLI contract and
are listed in README.md.
"""

from __future__ import annotations

from typing import Self


class KmsfsError(Exception):
    """Root of every kmsfs error.  ``str(exc)`` is a complete one-line message:
    ``WHERE: REASON`` when the error is about one file or object.

    Attributes:
        reason: what went wrong, without the place.
        where: the file or object it went wrong on (a path, ``inode N``), or None.
    """

    exit_code = 1

    def __init__(self, reason: str = "", *, where: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.where = where or None

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}" if self.where else self.reason

    def located(self, where: str) -> Self:
        """This error, naming *where* as its place (replacing the one it named)."""
        self.where = where or None
        return self


class UsageError(KmsfsError):
    """A command was called with options that do not fit together."""

    exit_code = 2


class ConfigError(KmsfsError):
    """A volume config, key file or settings file is missing, malformed or refused."""

    exit_code = 3


class ConfigTampered(ConfigError):
    """The volume config fails authentication: edited without a master key, or damaged.

    Attributes:
        changed: the fields and key entries whose tags do not match, as words.
    """

    exit_code = 5

    def __init__(
        self, message: str, *, changed: list[str] | None = None, where: str | None = None
    ) -> None:
        super().__init__(message, where=where)
        self.changed = changed or []


class PinMismatch(ConfigError):
    """The volume config is valid but is not what this host pinned for that backing path:
    another volume, an older generation or format, or a volume key no recorded
    rotation leads to (docs/FORMAT.md, "Host pin").  The message names both values
    and the ``kmsfs pin set`` command that accepts the change on purpose.
    """

    exit_code = 8


class FormatError(KmsfsError):
    """Bytes that should follow the kmsfs format do not (header, block layout)."""

    exit_code = 4


class IntegrityError(KmsfsError):
    """Authenticated decryption failed: the data was modified, moved or truncated."""

    exit_code = 5


class EncryptedNameError(IntegrityError):
    """An encrypted name, long-name sidecar, symlink target or extended attribute read
    from the backing directory is malformed or fails authentication: edited, moved to
    another directory or volume, or damaged.  The message names the backing bytes and
    what failed; the caller names the directory or file (``located``)."""


class PlaintextTooLong(FormatError):
    """A name, symlink target or extended attribute is too long for its encrypted form
    (a longer symlink target or xattr name than a volume with encrypted names stores)."""


class ProviderError(KmsfsError):
    """A key provider could not produce or unwrap a key.

    Attributes:
        code: the provider's own error code (e.g. an AWS error code), if any.
        temporary: True when retrying later may succeed (throttling, outage).
    """

    exit_code = 6
    temporary = False

    def __init__(self, message: str, *, code: str | None = None, where: str | None = None) -> None:
        super().__init__(message, where=where)
        self.code = code


class WrongKeyError(ProviderError):
    """The key offered cannot unwrap this wrapped key (other key, other context)."""


class KeyAccessDenied(ProviderError):
    """The provider refuses the operation: permission, disabled or deleted key, wrong PIN."""


class KeyUnavailable(ProviderError):
    """The provider cannot be reached or is overloaded; retrying may succeed."""

    temporary = True


class LifecycleError(KmsfsError):
    """A lifecycle tool cannot start or finish (mounted volume, journal of another run)."""

    exit_code = 1


class VolumeMounted(LifecycleError):
    """The tool needs the volume unmounted."""

    exit_code = 7


class HeaderChanged(LifecycleError):
    """A header was not what the tool read a moment before: it was left as it is."""


class MountError(KmsfsError):
    """Mounting or unmounting failed."""

    exit_code = 7


def reason_of(exc: BaseException) -> str:
    """*exc*'s message without the place it names: a KmsfsError's ``reason``, else
    ``str(exc)`` (for callers that name the place themselves, as fsck's findings do)."""
    return exc.reason if isinstance(exc, KmsfsError) else str(exc)
