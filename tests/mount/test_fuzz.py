"""Bad-input fuzzing: parsers raise only their documented exception, quickly;
a mounted daemon served fuzzed headers keeps serving every other file.

Parsers (hypothesis): ``FileHeader.parse`` raises FormatError,
``VolumeConfig.loads`` and ``kmsfs.keys.local.parse_key_file`` raise
ConfigError; anything else (IndexError, RecursionError, UnicodeError, ...) is
a bug.  Inputs are random bytes/text, random JSON trees, and mutations of
valid inputs (which reach the deep branches).  Each example must finish within
the hypothesis deadline.  Counts: KMSFS_FUZZ_EXAMPLES (default 400 per
property x KMSFS_RELIABILITY_SCALE).
"""

from __future__ import annotations

import base64
import errno
import json
import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.fuse import requires_fuse
from support.reliability_util import env_int, mount_pid, scaled
from support.volumes import Volume

from kmsfs.errors import ConfigError, FormatError
from kmsfs.format.header import XATTR_NAME, FileHeader, WrappedKey
from kmsfs.format.volume_config import KeyConfig, VolumeConfig
from kmsfs.keys.local import format_key_file, parse_key_file

EXAMPLES = env_int("KMSFS_FUZZ_EXAMPLES", scaled(400))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=500,  # ms per example: "bounded time"
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)

VALID_HEADER = FileHeader(
    bytes(range(16)),
    bytes(range(16, 32)),
    4096,
    (
        WrappedKey("local", "local:0011223344556677", bytes(61)),
        WrappedKey("aws-kms", "arn:aws:kms:us-east-1:1:key/x", bytes(range(200))),
    ),
).pack()
VALID_CONFIG = VolumeConfig(
    bytes(16),
    4096,
    [KeyConfig("local", "local:0011223344556677", {"key_file": "/k"}, bytes(60))],
).dumps()
VALID_KEY_FILE = format_key_file(bytes(range(32)))


def mutate(data: bytes, rng: random.Random, rounds: int) -> bytes:
    """Flip, insert, delete, truncate and splice bytes of *data*."""
    out = bytearray(data)
    for _ in range(rounds):
        kind = rng.randrange(6)
        pos = rng.randrange(len(out) + 1)
        if kind == 0 and out:
            out[min(pos, len(out) - 1)] ^= 1 << rng.randrange(8)
        elif kind == 1:
            out[pos:pos] = rng.randbytes(rng.randrange(1, 8))
        elif kind == 2:
            del out[pos : pos + rng.randrange(1, 8)]
        elif kind == 3:
            del out[pos:]
        elif kind == 4 and out:
            out[min(pos, len(out) - 1)] = rng.choice([0, 1, 0x7F, 0x80, 0xFF])
        else:
            out[pos:pos] = out[: rng.randrange(len(out) + 1)]
    return bytes(out)


# -- header --------------------------------------------------------------------


def _parse_header(data: bytes) -> None:
    try:
        header = FileHeader.parse(data)
    except FormatError as exc:
        assert str(exc)  # a message saying what was expected
        return
    assert header.pack() == data  # what parses re-packs to the same bytes


@pytest.mark.nomount
@FUZZ
@given(st.binary(max_size=600))
def test_header_random_bytes(data: bytes) -> None:
    _parse_header(data)


@pytest.mark.nomount
@FUZZ
@given(st.randoms(use_true_random=False), st.integers(1, 8))
def test_header_mutations(rng: random.Random, rounds: int) -> None:
    _parse_header(mutate(VALID_HEADER, rng, rounds))


@pytest.mark.nomount
@FUZZ
@given(st.binary(min_size=0, max_size=40))
def test_header_valid_prefix_then_garbage(tail: bytes) -> None:
    _parse_header(VALID_HEADER[:45] + tail)
    _parse_header(VALID_HEADER + tail)


@pytest.mark.nomount
def test_header_oversized_input_is_refused_quickly() -> None:
    with pytest.raises(FormatError):
        FileHeader.parse(VALID_HEADER + bytes(10_000_000))


# -- volume config -------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)
config_fields = st.fixed_dictionaries(
    {},
    optional={
        "kmsfs_volume": json_values | st.just(1),
        "volume_id": json_values | st.just("00" * 16) | st.text(max_size=40),
        "suite": json_values | st.just("AES-256-GCM/HKDF-SHA256"),
        "block_size": json_values | st.integers(-5, 2**21) | st.just(4096),
        "created": json_values,
        "keys": json_values
        | st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    "provider": json_values | st.just("local"),
                    "key_ref": json_values | st.just("local:00"),
                    "settings": json_values,
                    "check": json_values | st.just("AAAA") | st.text(max_size=10),
                },
            ),
            max_size=3,
        ),
    },
)


def _load_config(text: str) -> None:
    try:
        config = VolumeConfig.loads(text)
    except ConfigError as exc:
        assert str(exc)
        return
    VolumeConfig.loads(config.dumps())  # what loads also round-trips


@pytest.mark.nomount
@FUZZ
@given(st.text(max_size=400))
def test_config_random_text(text: str) -> None:
    _load_config(text)


@pytest.mark.nomount
@FUZZ
@given(json_values | config_fields)
def test_config_random_json(value: object) -> None:
    _load_config(json.dumps(value))


@pytest.mark.nomount
@FUZZ
@given(st.randoms(use_true_random=False), st.integers(1, 6))
def test_config_mutations(rng: random.Random, rounds: int) -> None:
    raw = mutate(VALID_CONFIG.encode(), rng, rounds)
    _load_config(raw.decode("utf-8", errors="replace"))


@pytest.mark.nomount
@pytest.mark.parametrize("text", ["[" * 100_000, '{"a":' * 100_000, "1" * 100_000])
def test_config_deep_or_huge_json(text: str) -> None:
    with pytest.raises(ConfigError):
        VolumeConfig.loads(text)


# -- key file ----------------------------------------------------------------------


def _parse_key(data: bytes) -> None:
    try:
        key = parse_key_file(data, "fuzz.key")
    except ConfigError as exc:
        assert str(exc)
        return
    assert len(key) == 32


@pytest.mark.nomount
@FUZZ
@given(st.binary(max_size=200))
def test_key_file_random_bytes(data: bytes) -> None:
    _parse_key(data)


@pytest.mark.nomount
@FUZZ
@given(st.randoms(use_true_random=False), st.integers(1, 6))
def test_key_file_mutations(rng: random.Random, rounds: int) -> None:
    _parse_key(mutate(VALID_KEY_FILE, rng, rounds))


@pytest.mark.nomount
@FUZZ
@given(st.binary(max_size=64), st.sampled_from([" ", "\t", "\n", "  ", "\r\n"]))
def test_key_file_any_key_bytes(key: bytes, sep: str) -> None:
    _parse_key(f"kmsfs-local-key-v1{sep}{base64.b64encode(key).decode()}\n".encode())


# -- a mounted daemon served fuzzed headers -----------------------------------------


@requires_fuse
@pytest.mark.mount
def test_daemon_serves_other_files_despite_fuzzed_headers(volume: Volume) -> None:
    """Random bytes, mutated, truncated and foreign headers: EIO for those files only."""
    count = env_int("KMSFS_FUZZ_MOUNT_FILES", scaled(40))
    rng = random.Random(77)
    mount_pid(volume)
    contents = {f"f{i}": rng.randbytes(rng.randrange(0, 3 * 4096)) for i in range(2 * count)}
    for name, content in contents.items():
        volume.path(name).write_bytes(content)
    volume.umount()
    headers = {name: os.getxattr(volume.backing_path(name), XATTR_NAME) for name in contents}
    names = sorted(contents)
    fuzzed = {}
    for i, name in enumerate(names[:count]):
        original = headers[name]
        kind = i % 5
        if kind == 0:
            value = rng.randbytes(rng.randrange(1, 300))
        elif kind == 1:
            value = mutate(original, rng, rng.randrange(1, 4))
        elif kind == 2:
            value = original[: rng.randrange(0, len(original))]
        elif kind == 3:
            value = headers[names[-1 - i]]  # another file's header
        else:
            value = original[:-1] + bytes([original[-1] ^ 1])  # wrapped key tag bit
        if value == original:
            continue
        if value:
            os.setxattr(volume.backing_path(name), XATTR_NAME, value)
        else:
            os.removexattr(volume.backing_path(name), XATTR_NAME)
        fuzzed[name] = value
    pid = mount_pid(volume)
    for round_ in range(2):  # twice: a failure is not cached as success, or vice versa
        for name in names:
            try:
                got = volume.path(name).read_bytes()
            except OSError as exc:
                assert exc.errno == errno.EIO, f"{name}: {exc}"
                assert name in fuzzed, f"{name} has its own header but gave EIO"
                continue
            assert name not in fuzzed, f"{name}: opened with a fuzzed header"
            assert got == contents[name], f"{name}: wrong bytes served (round {round_})"
    assert os.path.exists(f"/proc/{pid}"), "daemon died"
    log = volume.log_text()
    for name in fuzzed:
        assert f"/{name}:" in log or f"/{name} " in log, f"log does not name {name}"
    # The good files are still writable and the daemon still answers.
    volume.path(names[-1]).write_bytes(b"still alive")
    assert volume.path(names[-1]).read_bytes() == b"still alive"
    print(f"mounted fuzz: {len(fuzzed)} fuzzed headers, {len(names) - len(fuzzed)} good files")
