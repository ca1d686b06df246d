"""The host pin as the trust anchor: every open of a volume is compared with it.

After a volume config's tags verify (kmsfs/volume_open.py), ``enforce_pin`` compares
it with this host's pin of the backing path (kmsfs/pins.py) and refuses, with
PinMismatch naming both values and the ``kmsfs pin set`` command that accepts
the change on purpose:

- another volume ID at that path (another volume's config copied in);
- a lower config format than pinned (format 1 or 2 restored over format 3);
- an older generation than pinned (an older config restored: a rollback);
- another volume key, unless the config's rotation chain leads from the
  pinned one (kmsfs/format/volume_key.py), through a rotation made after the
  generation this host pinned.

A newer generation with the same key, or a rotation the chain proves, is
accepted and the pin updated (a log line).  An unpinned volume is pinned on
first use with a log line showing its fingerprint, or only if that
fingerprint is the one the operator expects (``--expect-fingerprint``,
``expect_fingerprint`` in the TOML file).  Writes by this host's tools update
the pin (``record_pin``).  docs/FORMAT.md, "Host pin", has the threat model.
"""

from __future__ import annotations

import logging
import os
import shlex

from kmsfs.errors import PinMismatch
from kmsfs.format.volume_config import VolumeConfig
from kmsfs.format.volume_key import find_in_chain, fingerprint, show_fingerprint
from kmsfs.pins import Pin, PinWriter, backing_key, now, pin_store

log = logging.getLogger("kmsfs.pins")


def repin_command(backing: str | os.PathLike[str], key_flags: str, value: bytes) -> str:
    """The command that re-pins *backing* at the fingerprint *value* on purpose."""
    flags = f" {key_flags}" if key_flags else ""
    return (
        f"kmsfs pin set {shlex.quote(backing_key(backing))}{flags}"
        f" --expect-fingerprint {show_fingerprint(value)}"
    )


def enforce_pin(
    backing: str | os.PathLike[str],
    config: VolumeConfig,
    volume_key: bytes | bytearray | None,
    expect: bytes | None = None,
    key_flags: str = "",
) -> None:
    """Compare the authenticated *config* (and its *volume_key*; None for format 1)
    with this host's pin of *backing*; pin or update it, or raise PinMismatch.

    Also ConfigError if the pin store fails its owner and mode checks.  A
    format-1 config is never pinned here (it has no volume key): it is pinned
    once migrated (``record_pin``).
    """
    value = fingerprint(volume_key, config.volume_id) if volume_key is not None else None
    with pin_store(backing) as (pin, write):
        if pin is None:
            if value is None:
                return
            _first_use(backing, config, value, expect, write)
            return
        if value is None:  # format 1, over a pin (at format 2 or 3)
            raise PinMismatch(
                f"{backing_key(backing)}: the volume config is format {config.version}, but this"
                f" host pinned format {pin.format}: an older config restored over a migrated"
                " volume (a downgrade). Restore the current config from a backup (a format-1"
                " config cannot be pinned)"
            )
        refusal = _compare(config, value, volume_key, pin)
        if refusal is not None:
            reason, hint = refusal
            raise PinMismatch(
                f"{backing_key(backing)}: {reason}. {hint}:"
                f" {repin_command(backing, key_flags, value)}"
            )
        if (value, config.generation, config.version) == (
            pin.fingerprint,
            pin.generation,
            pin.format,
        ):
            return
        if value != pin.fingerprint:
            log.warning(
                "volume %s at %s: followed a volume-key rotation from %s to %s (generation %d"
                " to %d)",
                config.volume_id.hex(),
                pin.backing,
                show_fingerprint(pin.fingerprint),
                show_fingerprint(value),
                pin.generation,
                config.generation,
            )
            by = "followed a volume-key rotation"
        else:
            log.info(
                "volume %s at %s: config generation %d (format %d), pinned was %d (format %d)",
                config.volume_id.hex(),
                pin.backing,
                config.generation,
                config.version,
                pin.generation,
                pin.format,
            )
            by = "newer generation"
        write(
            pin.updated(by, format=config.version, fingerprint=value, generation=config.generation)
        )


def _first_use(
    backing: str | os.PathLike[str],
    config: VolumeConfig,
    value: bytes,
    expect: bytes | None,
    write: PinWriter,
) -> None:
    """Pin an unpinned volume (trust on first use, or the fingerprint expected)."""
    if expect is not None and expect != value:
        raise PinMismatch(
            f"{backing_key(backing)}: the volume key has fingerprint {show_fingerprint(value)},"
            f" not {show_fingerprint(expect)} as expected (--expect-fingerprint or"
            " expect_fingerprint): this is not the volume you provisioned, or its config was"
            " made with another volume key; nothing was pinned"
        )
    how = "first use" if expect is None else "expected fingerprint"
    write(_new_pin(backing, config, value, how))
    if expect is None:
        log.warning(
            "pinned volume %s at %s on first use: volume-key fingerprint %s, generation %d"
            " (trust on first use: compare this fingerprint with 'kmsfs pin show' on a host"
            " that knows the volume, or give --expect-fingerprint next time)",
            config.volume_id.hex(),
            backing_key(backing),
            show_fingerprint(value),
            config.generation,
        )
    else:
        log.info(
            "pinned volume %s at %s: volume-key fingerprint %s as expected",
            config.volume_id.hex(),
            backing_key(backing),
            show_fingerprint(value),
        )


def _compare(
    config: VolumeConfig, value: bytes, volume_key: bytes | bytearray | None, pin: Pin
) -> tuple[str, str] | None:
    """Why *config* (with FP *value*) is refused against *pin*: (reason, hint), or None."""
    restored = "If you restored it on purpose, accept it with"
    if config.volume_id != pin.volume_id:
        return (
            f"this host pinned volume {pin.volume_id.hex()} at this path, but the volume config"
            f" is of volume {config.volume_id.hex()} (another volume's config copied in, or a"
            " new volume made here)",
            "If the new volume is meant to be here, accept it with",
        )
    if config.version < pin.format:
        return (
            f"the volume config is format {config.version}, but this host pinned format"
            f" {pin.format}: an older config restored over a migrated volume (a downgrade)",
            restored,
        )
    if config.generation < pin.generation:
        return (
            f"the volume config is generation {config.generation}, older than generation"
            f" {pin.generation} that this host pinned: an older config restored (a rollback,"
            " which would bring back removed keys)",
            restored,
        )
    if value == pin.fingerprint:
        return None
    assert volume_key is not None
    entry = find_in_chain(volume_key, config.volume_id, config.chain, pin.fingerprint)
    if entry is None:
        return (
            f"the volume key has fingerprint {show_fingerprint(value)}, but this host pinned"
            f" {show_fingerprint(pin.fingerprint)} and no volume-key rotation recorded in the"
            " config leads from it: a config made with another volume key (forged by someone"
            " who can wrap a key under this host's master key, or the volume was re-created,"
            " or rotated more than the config remembers)",
            f"Check {show_fingerprint(value)} with the host that last changed the volume's keys"
            " ('kmsfs pin show BACKING' there); only if it is the same, run",
        )
    if entry.generation <= pin.generation:
        return (
            f"the config says the volume key this host pinned was replaced at generation"
            f" {entry.generation}, but this host pinned it at generation {pin.generation}:"
            " the two histories disagree (a config forged by a former holder of that key)",
            "If you know why, accept the current config with",
        )
    return None


def _new_pin(backing: str | os.PathLike[str], config: VolumeConfig, value: bytes, how: str) -> Pin:
    return Pin(
        backing_key(backing),
        config.volume_id,
        config.version,
        value,
        config.generation,
        now(),
        how,
    )


def record_pin(
    backing: str | os.PathLike[str],
    config: VolumeConfig,
    volume_key: bytes | bytearray,
    by: str,
) -> None:
    """Pin what this host just wrote or migrated (*by*: ``init``, or why it changed).

    A pin of another volume at that path is replaced only by ``init`` (which
    creates a volume in an empty directory on purpose); a pin another process of
    this host moved past *config*'s generation meanwhile is left as it is.
    """
    value = fingerprint(volume_key, config.volume_id)
    with pin_store(backing) as (pin, write):
        if by == "init":
            if pin is not None and pin.volume_id != config.volume_id:
                log.warning(
                    "replaced this host's pin of volume %s at %s: init made volume %s there",
                    pin.volume_id.hex(),
                    pin.backing,
                    config.volume_id.hex(),
                )
            write(_new_pin(backing, config, value, "init"))
            return
        if pin is None:
            _first_use(backing, config, value, None, write)
            return
        if pin.volume_id != config.volume_id or pin.generation > config.generation:
            return
        write(
            pin.updated(by, format=config.version, fingerprint=value, generation=config.generation)
        )


def set_pin(
    backing: str | os.PathLike[str], config: VolumeConfig, volume_key: bytes | bytearray
) -> tuple[Pin | None, Pin]:
    """Re-pin *backing* at this authenticated *config* on purpose; returns (old, new)."""
    value = fingerprint(volume_key, config.volume_id)
    with pin_store(backing) as (old, write):
        new = _new_pin(backing, config, value, "re-pin")
        write(new)
    return old, new
