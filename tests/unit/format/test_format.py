"""The format layer against docs/FORMAT.md: pinned vectors, an independent decoder, bad input."""

from __future__ import annotations

import base64
import struct

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from support.format_vectors import load_vectors

from kmsfs.errors import ConfigError, FormatError, IntegrityError, WrongKeyError
from kmsfs.format.content import OVERHEAD, BlockCipher, Layout, derive_content_key
from kmsfs.format.header import MAX_HEADER_SIZE, FileHeader, WrappedKey
from kmsfs.format.volume import KeyConfig, VolumeConfig
from kmsfs.keys.local import LocalProvider, parse_key_file
from kmsfs.keys.provider import KeyContext

PLAINTEXT = (b"kmsfs test vector: the quick brown fox jumps over the lazy dog.\n" * 10)[:600]

V = load_vectors("test-vectors")


def h(name: str) -> bytes:
    return bytes.fromhex(V[name])


def hkdf(key: bytes, info: bytes, length: int = 32) -> bytes:
    return HKDF(hashes.SHA256(), length, salt=None, info=info).derive(key)


# -- an independent decoder written from docs/FORMAT.md alone ------------------


def spec_decrypt(master: bytes, header: bytes, body: bytes) -> bytes:
    magic, version, suite, flags, bs, volume_id, file_id, count = struct.unpack_from(
        ">4sBBHI16s16sB", header
    )
    assert (magic, version, suite, flags, count) == (b"KMFH", 1, 1, 0, 1)
    pos = 45
    plen = header[pos]
    provider = header[pos + 1 : pos + 1 + plen]
    pos += 1 + plen
    rlen = int.from_bytes(header[pos : pos + 2], "big")
    pos += 2 + rlen
    wlen = int.from_bytes(header[pos : pos + 2], "big")
    blob = header[pos + 2 : pos + 2 + wlen]
    assert provider == b"local" and blob[0] == 1
    context = {"kmsfs:volume-id": volume_id.hex(), "kmsfs:file-id": file_id.hex()}
    aad = b"kmsfs-context-v1"
    for key, value in sorted(context.items()):
        for part in (key.encode(), value.encode()):
            aad += len(part).to_bytes(2, "big") + part
    file_key = AESGCM(hkdf(master, b"kmsfs/v1/local-wrap")).decrypt(blob[1:13], blob[13:], aad)
    content_key = hkdf(file_key, b"kmsfs/v1/content" + struct.pack(">BI", suite, bs) + file_id)
    full, rest = divmod(len(body), bs + 28)
    nblocks = full + (1 if rest else 0)
    out = b""
    for i in range(nblocks):
        block = body[i * (bs + 28) : (i + 1) * (bs + 28)]
        last = i == nblocks - 1
        block_aad = file_id + i.to_bytes(8, "big") + bytes([last])
        out += AESGCM(content_key).decrypt(block[:12], block[12:], block_aad)
    return out


def test_spec_decoder_reads_the_vector() -> None:
    assert spec_decrypt(h("master_key"), h("header"), h("ciphertext")) == PLAINTEXT


def test_kmsfs_matches_every_vector() -> None:
    master = parse_key_file(V["key_file"].encode(), "vector")
    assert master == h("master_key")
    provider = LocalProvider(master, {})
    assert provider.key_ref == V["key_ref"]
    context = KeyContext(h("volume_id"), h("file_id"))
    assert context.aad() == h("context_aad")
    assert hkdf(master, b"kmsfs/v1/local-wrap") == h("wrapping_key")
    wrapped = WrappedKey("local", V["key_ref"], h("wrapped_file_key"))
    assert bytes(provider.unwrap(wrapped, context)) == h("file_key")

    header = FileHeader.parse(h("header"))
    assert header.pack() == h("header")
    assert (header.volume_id, header.file_id, header.block_size) == (
        h("volume_id"),
        h("file_id"),
        512,
    )
    assert header.entries == (wrapped,)
    assert derive_content_key(h("file_key"), header) == h("content_key")
    cipher = BlockCipher.for_file(h("file_key"), header)
    assert bytes(cipher.open(0, h("ciphertext"), 1, "vector")) == PLAINTEXT
    assert Layout(512).plain_size(len(h("ciphertext"))) == len(PLAINTEXT)


def spec_config_tags(volume_key: bytes, config: dict[str, object]) -> dict[str, bytes]:
    """Every tag of a format-2 or format-3 config, computed from docs/FORMAT.md alone."""
    import hashlib
    import hmac
    import json

    def canon(value: object) -> bytes:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    volume_id = bytes.fromhex(str(config["volume_id"]))
    k_mac = hkdf(volume_key, b"kmsfs/v2/config-mac" + volume_id)
    tags = {}
    names = ["kmsfs_volume", "volume_id", "suite", "block_size", "created"]
    if config["kmsfs_volume"] == 3:
        names += ["generation", "chain"]
    for name in names:
        message = b"field\0" + name.encode() + b"\0" + canon(config[name])
        tags[name] = hmac.new(k_mac, message, hashlib.sha256).digest()
    entry_tags = b""
    for index, entry in enumerate(config["keys"]):  # type: ignore[arg-type]
        body = {k: entry[k] for k in ("provider", "key_ref", "settings", "check")}
        tag = hmac.new(k_mac, b"key\0" + canon(body), hashlib.sha256).digest()
        tags[f"keys[{index}]"] = tag
        entry_tags += tag
    tags["keys"] = hmac.new(k_mac, b"keys\0" + entry_tags, hashlib.sha256).digest()
    return tags


def test_volume_config_v2_vector() -> None:
    import json

    from kmsfs.format.volume import config_mac_key

    text = V["volume_config_v2"]
    data = json.loads(text)
    assert hkdf(h("volume_key"), b"kmsfs/v2/config-mac" + h("volume_id")) == h("config_mac_key")
    assert config_mac_key(h("volume_key"), h("volume_id")) == h("config_mac_key")
    want = spec_config_tags(h("volume_key"), data)
    for name, tag in data["tags"].items():
        assert base64.b64decode(tag) == want[name], name
    assert base64.b64decode(data["keys"][0]["tag"]) == want["keys[0]"]
    # the check value is the volume key wrapped for the volume-key context (spec AAD)
    check = base64.b64decode(data["keys"][0]["check"])
    assert check == h("wrapped_volume_key")
    context = KeyContext.key_check(h("volume_id"))
    assert context.aad() == h("volume_key_aad")
    wrapping = AESGCM(hkdf(h("master_key"), b"kmsfs/v1/local-wrap"))
    assert wrapping.decrypt(check[1:13], check[13:], h("volume_key_aad")) == h("volume_key")
    config = VolumeConfig.loads(text)
    config.verify(h("volume_key"))  # kmsfs agrees
    config.block_size = 1024
    with pytest.raises(ConfigError, match="block_size"):
        config.verify(h("volume_key"))


def spec_fingerprint(volume_key: bytes, volume_id: bytes) -> bytes:
    return hkdf(volume_key, b"kmsfs/v3/volume-key-fingerprint" + volume_id, 16)


def spec_open_chain_entry(later_key: bytes, volume_id: bytes, entry: dict[str, object]) -> bytes:
    """The previous volume key of one chain entry, from docs/FORMAT.md alone."""
    label = b"kmsfs/v3/volume-key-chain"
    previous = bytes.fromhex(str(entry["previous"]))
    aad = label + volume_id + struct.pack(">Q", entry["generation"]) + previous
    sealed = base64.b64decode(str(entry["sealed"]))
    key = AESGCM(hkdf(later_key, label + volume_id)).decrypt(sealed[:12], sealed[12:], aad)
    assert spec_fingerprint(key, volume_id) == previous
    return key


def test_volume_config_vector() -> None:
    """Format 3: the generation and chain tags, the fingerprint, the chain entry."""
    import json

    from kmsfs.format.volume_key import (
        chain_aad,
        chain_key,
        find_in_chain,
        fingerprint,
        show_fingerprint,
    )

    text = V["volume_config"]
    data = json.loads(text)
    assert (data["kmsfs_volume"], data["generation"]) == (3, 3)
    volume_id, volume_key = h("volume_id"), h("volume_key")
    want = spec_config_tags(volume_key, data)
    assert set(data["tags"]) == set(want) - {"keys[0]"}
    for name, tag in data["tags"].items():
        assert base64.b64decode(tag) == want[name], name
    assert spec_fingerprint(volume_key, volume_id) == h("volume_key_fingerprint")
    assert spec_fingerprint(h("previous_volume_key"), volume_id) == h("previous_fingerprint")
    (entry,) = data["chain"]
    assert (entry["generation"], entry["previous"]) == (2, V["previous_fingerprint"])
    sealed = base64.b64decode(entry["sealed"])
    assert sealed == h("chain_sealed") and sealed[:12] == b"\x73" * 12
    assert hkdf(volume_key, b"kmsfs/v3/volume-key-chain" + volume_id) == h("chain_key")
    label_aad = b"kmsfs/v3/volume-key-chain" + volume_id + (2).to_bytes(8, "big")
    assert label_aad + h("previous_fingerprint") == h("chain_aad")
    assert spec_open_chain_entry(volume_key, volume_id, entry) == h("previous_volume_key")
    # kmsfs agrees with every line
    assert fingerprint(volume_key, volume_id) == h("volume_key_fingerprint")
    shown = show_fingerprint(h("volume_key_fingerprint"))
    assert shown == "1270-30ff-35ac-2c20-30f3-8ce6-a7ed-7c45"  # as FORMAT.md writes it
    assert chain_key(volume_key, volume_id) == h("chain_key")
    assert chain_aad(volume_id, 2, h("previous_fingerprint")) == h("chain_aad")
    config = VolumeConfig.loads(text)
    config.verify(volume_key)
    found = find_in_chain(volume_key, volume_id, config.chain, h("previous_fingerprint"))
    assert found is config.chain[0]
    assert base64.b64decode(data["keys"][0]["check"]) == h("wrapped_volume_key")
    config.generation = 4
    with pytest.raises(ConfigError, match="generation"):
        config.verify(volume_key)


def test_seal_round_trip_and_fresh_nonces() -> None:
    cipher = BlockCipher(bytes(32), bytes(16), 512)
    sealed = cipher.seal(0, PLAINTEXT, 1)
    assert len(sealed) == len(PLAINTEXT) + 2 * OVERHEAD
    assert bytes(cipher.open(0, sealed, 1, "x")) == PLAINTEXT
    assert cipher.seal(0, PLAINTEXT, 1) != sealed  # random nonces


# -- tampering at the block level ---------------------------------------------


@pytest.fixture
def sealed() -> tuple[BlockCipher, bytes]:
    cipher = BlockCipher.for_file(h("file_key"), FileHeader.parse(h("header")))
    return cipher, h("ciphertext")


@pytest.mark.parametrize("offset", [0, 11, 12, 300, 539, 540, 600, 655])
def test_bit_flip_anywhere_fails(sealed: tuple[BlockCipher, bytes], offset: int) -> None:
    cipher, data = sealed
    flipped = bytearray(data)
    flipped[offset] ^= 0x01
    with pytest.raises(IntegrityError, match=r"f: block [01]"):
        cipher.open(0, flipped, 1, "f")


def test_swapped_position_fails(sealed: tuple[BlockCipher, bytes]) -> None:
    cipher, data = sealed
    first = data[:540]
    with pytest.raises(IntegrityError, match="block 1"):
        cipher.open(1, first, 1, "f")


def test_truncation_at_block_boundary_fails(sealed: tuple[BlockCipher, bytes]) -> None:
    cipher, data = sealed
    with pytest.raises(IntegrityError, match="final"):
        cipher.open(0, data[:540], 0, "f")


def test_other_file_id_fails(sealed: tuple[BlockCipher, bytes]) -> None:
    _, data = sealed
    other = FileHeader(h("volume_id"), bytes(16), 512, FileHeader.parse(h("header")).entries)
    cipher = BlockCipher.for_file(h("file_key"), other)
    with pytest.raises(IntegrityError):
        cipher.open(0, data, 1, "f")


def test_zeroed_middle_block_is_a_hole_but_final_is_not(sealed: tuple[BlockCipher, bytes]) -> None:
    cipher, data = sealed
    holed = bytes(540) + data[540:]
    assert bytes(cipher.open(0, holed, 1, "f")) == bytes(512) + PLAINTEXT[512:]
    with pytest.raises(IntegrityError, match="zeroed"):
        cipher.open(0, data[:540] + bytes(len(data) - 540), 1, "f")


def test_middle_block_sealed_as_final_is_tolerated() -> None:
    cipher = BlockCipher(bytes(32), bytes(16), 512)
    first = cipher.seal(0, PLAINTEXT[:512], 0)  # sealed when it was the final block
    second = cipher.seal(1, PLAINTEXT[512:], 1)
    assert bytes(cipher.open(0, first + second, 1, "f")) == PLAINTEXT


# -- sizes ----------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 511, 512, 513, 1024, 5000])
def test_layout_round_trip(size: int) -> None:
    layout = Layout(512)
    backing = layout.backing_size(size)
    assert layout.plain_size(backing) == size
    layout.check_backing_size(backing, "f")


@pytest.mark.parametrize(
    ("backing", "message"),
    [(0, "empty"), (10, "inside a block header"), (540 + 28, "unexpected empty block")],
)
def test_layout_rejects_impossible_sizes(backing: int, message: str) -> None:
    with pytest.raises(IntegrityError, match=message):
        Layout(512).check_backing_size(backing, "f")


# -- header parsing ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b[:10], "at least 45"),
        (lambda b: b"XXXX" + b[4:], "magic"),
        (lambda b: b[:4] + b"\x02" + b[5:], "version 2"),
        (lambda b: b[:5] + b"\x07" + b[6:], "suite 7"),
        (lambda b: b[:6] + b"\x00\x01" + b[8:], "flags"),
        (lambda b: b[:8] + (1000).to_bytes(4, "big") + b[12:], "block size 1000"),
        (lambda b: b[:44] + b"\x00" + b[45:], "0 wrapped-key entries"),
        (lambda b: b[:44] + b"\x02" + b[45:], "entry 1"),
        (lambda b: b[:-1], "needs 61 bytes"),
        (lambda b: b + b"\x00", "unexpected bytes"),
        (lambda b: b + bytes(MAX_HEADER_SIZE), "at most"),
    ],
)
def test_header_parse_errors(mutate: object, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        FileHeader.parse(mutate(h("header")))  # type: ignore[operator]


# -- local provider and volume config ----------------------------------------------


def test_local_provider_refuses_other_context_and_key() -> None:
    provider = LocalProvider(h("master_key"), {})
    wrapped = WrappedKey("local", V["key_ref"], h("wrapped_file_key"))
    with pytest.raises(WrongKeyError, match="other master key or other volume/file"):
        provider.unwrap(wrapped, KeyContext(h("volume_id"), bytes(16)))
    other = LocalProvider(bytes(32), {})
    with pytest.raises(WrongKeyError, match="not by local"):
        other.unwrap(wrapped, KeyContext(h("volume_id"), h("file_id")))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"", "not a kmsfs key file"),
        (b"other-tag AAAA", "tag"),
        (b"kmsfs-local-key-v1 !!!", "base64"),
        (b"kmsfs-local-key-v1 " + base64.b64encode(bytes(16)), "16 bytes"),
    ],
)
def test_key_file_errors(text: bytes, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_key_file(text, "k")


def test_volume_config_round_trip_and_errors() -> None:
    config = VolumeConfig(bytes(range(16)), 4096, [KeyConfig("local", "local:00", {}, b"chk")])
    again = VolumeConfig.loads(config.dumps())
    assert again.to_json() == config.to_json()
    for text, message in [
        ("{", "not valid JSON"),
        ("[]", "JSON object"),
        ('{"kmsfs_volume": 4}', "reads 1, 2 and 3"),
        (config.dumps().replace('"generation": 1', '"generation": 0'), "generation 0 out of"),
        (config.dumps().replace('"generation": 1', '"generation": true'), "must be a int"),
        (config.dumps().replace('"chain": []', '"chain": {}'), "chain must be a list"),
        (config.dumps().replace('"block_size": 4096', '"block_size": 3'), "block size 3"),
        (config.dumps().replace(bytes(range(16)).hex(), "zz"), "32 hex digits"),
    ]:
        with pytest.raises(ConfigError, match=message):
            VolumeConfig.loads(text)
