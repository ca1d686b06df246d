"""The format layer against docs/FORMAT.md: pinned vectors, an independent decoder (both
file formats, XAES-256-GCM included), the C2SP XAES-256-GCM vectors, bad input."""

from __future__ import annotations

import base64
import struct

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from support.format_vectors import load_vectors

from kmsfs.errors import ConfigError, FormatError, IntegrityError, WrongKeyError
from kmsfs.format.content import (
    CIPHERS,
    OVERHEADS,
    BlockCipher,
    GcmBlockCipher,
    Layout,
    XaesBlockCipher,
    derive_content_key,
    format_of_mode,
    mode_for_format,
)
from kmsfs.format.header import FORMAT_1, FORMAT_2, MAX_HEADER_SIZE, FileHeader, WrappedKey
from kmsfs.format.volume_config import KeyConfig, VolumeConfig
from kmsfs.keys.local import LocalProvider, parse_key_file
from kmsfs.keys.provider import KeyContext

PLAINTEXT = (b"kmsfs test vector: the quick brown fox jumps over the lazy dog.\n" * 10)[:600]

V = load_vectors("test-vectors")


def h(name: str) -> bytes:
    return bytes.fromhex(V[name])


def hkdf(key: bytes, info: bytes, length: int = 32) -> bytes:
    return HKDF(hashes.SHA256(), length, salt=None, info=info).derive(key)


# -- an independent decoder written from docs/FORMAT.md alone ------------------


def spec_aes(key: bytes, block: bytes) -> bytes:
    """AES-256 of one 16-byte block (the ECB of one block)."""
    return Cipher(algorithms.AES(key), modes.ECB()).encryptor().update(block)


def spec_xaes_key(key: bytes, nonce: bytes) -> bytes:
    """K_X of XAES-256-GCM, step by step as docs/FORMAT.md writes it."""
    top = spec_aes(key, bytes(16))
    shifted = bytearray(
        (top[i] << 1 | (top[i + 1] >> 7 if i < 15 else 0)) & 0xFF for i in range(16)
    )
    if top[0] & 0x80:
        shifted[15] ^= 0x87
    k1 = bytes(shifted)
    m1 = b"\x00\x01X\x00" + nonce[:12]
    m2 = b"\x00\x02X\x00" + nonce[:12]
    xor = lambda a, b: bytes(x ^ y for x, y in zip(a, b, strict=True))  # noqa: E731
    return spec_aes(key, xor(m1, k1)) + spec_aes(key, xor(m2, k1))


def spec_decrypt(master: bytes, header: bytes, body: bytes) -> bytes:
    magic, version, suite, flags, bs, volume_id, file_id, count = struct.unpack_from(
        ">4sBBHI16s16sB", header
    )
    assert (magic, suite, flags, count) == (b"KMFH", version, 0, 1)
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
    label = b"kmsfs/v%d/content" % version
    content_key = hkdf(file_key, label + struct.pack(">BI", suite, bs) + file_id)
    nonce_size = {1: 12, 2: 24}[version]
    bbs = bs + nonce_size + 16
    full, rest = divmod(len(body), bbs)
    nblocks = full + (1 if rest else 0)
    out = b""
    for i in range(nblocks):
        block = body[i * bbs : (i + 1) * bbs]
        last = i == nblocks - 1
        block_aad = file_id + i.to_bytes(8, "big") + bytes([last])
        nonce, sealed = block[:nonce_size], block[nonce_size:]
        if version == 1:
            out += AESGCM(content_key).decrypt(nonce, sealed, block_aad)
        else:
            out += AESGCM(spec_xaes_key(content_key, nonce)).decrypt(nonce[12:], sealed, block_aad)
    return out


def test_spec_decoder_reads_the_vector() -> None:
    assert spec_decrypt(h("master_key"), h("header"), h("ciphertext")) == PLAINTEXT


def test_spec_decoder_reads_the_format_2_vector() -> None:
    assert spec_decrypt(h("master_key"), h("v2_header"), h("v2_ciphertext")) == PLAINTEXT


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
    assert (header.version, header.suite) == (FORMAT_1, 1)
    assert derive_content_key(h("file_key"), header) == h("content_key")
    cipher = BlockCipher.for_file(h("file_key"), header)
    assert isinstance(cipher, GcmBlockCipher)
    assert bytes(cipher.open(0, h("ciphertext"), 1, "vector")) == PLAINTEXT
    assert Layout(512, FORMAT_1).plain_size(len(h("ciphertext"))) == len(PLAINTEXT)


def test_kmsfs_matches_every_format_2_vector() -> None:
    from kmsfs.format.xaes import Xaes256Gcm, cmac_subkey

    provider = LocalProvider(h("master_key"), {})
    context = KeyContext(h("volume_id"), h("v2_file_id"))
    assert context.aad() == h("v2_context_aad")
    wrapped = WrappedKey("local", V["key_ref"], h("v2_wrapped_file_key"))
    assert bytes(provider.unwrap(wrapped, context)) == h("file_key")
    header = FileHeader.parse(h("v2_header"))
    assert header.pack() == h("v2_header")
    assert (header.version, header.suite, header.file_id) == (FORMAT_2, 2, h("v2_file_id"))
    assert header == FileHeader.new(h("volume_id"), h("v2_file_id"), 512, (wrapped,))
    assert derive_content_key(h("file_key"), header) == h("v2_content_key")
    prefix = bytes([0x74]) * 12
    assert cmac_subkey(spec_aes(h("v2_content_key"), bytes(16))) == h("v2_xaes_k1")
    assert spec_xaes_key(h("v2_content_key"), prefix) == h("v2_derived_key")
    assert bytes(Xaes256Gcm(h("v2_content_key")).derive_key(prefix)) == h("v2_derived_key")
    cipher = BlockCipher.for_file(h("file_key"), header)
    assert isinstance(cipher, XaesBlockCipher)
    assert bytes(cipher.open(0, h("v2_ciphertext"), 1, "vector")) == PLAINTEXT
    assert Layout(512, FORMAT_2).plain_size(len(h("v2_ciphertext"))) == len(PLAINTEXT)
    # the two blocks share the prefix they were sealed under, not their own bytes
    body = h("v2_ciphertext")
    assert body[:12] == body[552 : 552 + 12] == prefix
    assert body[12:24] != body[564:576]


def spec_config_tags(volume_key: bytes, config: dict[str, object]) -> dict[str, bytes]:
    """Every tag of a format-2, 3 or 4 config, computed from docs/FORMAT.md alone."""
    import hashlib
    import hmac
    import json

    def canon(value: object) -> bytes:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    volume_id = bytes.fromhex(str(config["volume_id"]))
    k_mac = hkdf(volume_key, b"kmsfs/v2/config-mac" + volume_id)
    tags = {}
    names = ["kmsfs_volume", "volume_id", "suite", "block_size", "created"]
    if config["kmsfs_volume"] in (3, 4):
        names += ["generation", "chain"]
    if config["kmsfs_volume"] == 4:
        names += ["names"]
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

    from kmsfs.format.volume_config import config_mac_key

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


def test_volume_config_v4_vector() -> None:
    """Format 4: the names field, its tag, and the name secret sealed under the volume key."""
    import json

    from kmsfs.format.name_secret import SealedNameSecret, name_secret_aad, name_secret_key
    from kmsfs.format.volume_config import canonical_json

    text = V["volume_config_v4"]
    data = json.loads(text)
    assert (data["kmsfs_volume"], data["generation"]) == (4, 3)
    volume_id, volume_key = h("volume_id"), h("volume_key")
    want = spec_config_tags(volume_key, data)
    assert set(data["tags"]) == set(want) - {"keys[0]"}
    for name, tag in data["tags"].items():
        assert base64.b64decode(tag) == want[name], name
    # every other field is the format-3 config's, with the same tags
    v3 = json.loads(V["volume_config"])
    assert {k: v for k, v in data.items() if k not in ("names", "kmsfs_volume", "tags")} == {
        k: v for k, v in v3.items() if k not in ("kmsfs_volume", "tags")
    }
    assert data["names"]["mode"] == "encrypted" and set(data["names"]) == {"mode", "sealed"}
    sealed = base64.b64decode(data["names"]["sealed"])
    assert sealed == h("sealed_name_secret") and len(sealed) == 60
    assert sealed[:12] == b"\x77" * 12
    key = hkdf(volume_key, b"kmsfs/v4/name-secret" + volume_id)
    assert key == h("name_secret_key")
    assert b"kmsfs/v4/name-secret" + volume_id == h("name_secret_aad")
    spec_secret = AESGCM(key).decrypt(sealed[:12], sealed[12:], h("name_secret_aad"))
    assert spec_secret == h("name_secret")
    # kmsfs agrees with every line
    assert name_secret_key(volume_key, volume_id) == h("name_secret_key")
    assert name_secret_aad(volume_id) == h("name_secret_aad")
    again = SealedNameSecret.seal(h("name_secret"), volume_key, volume_id, b"\x77" * 12)
    assert again.sealed == sealed
    config = VolumeConfig.loads(text)
    config.verify(volume_key)
    assert config.version == 4 and config.encrypted_names
    assert config.names is not None
    assert bytes(config.names.open(volume_key, volume_id)) == h("name_secret")
    assert canonical_json(config.to_json()) == text.encode()


def test_a_format_4_config_without_its_names_field_is_refused() -> None:
    """The downgrade to plain names by whoever writes the backing directory, without the
    volume key: removing the names field and its tag, and relabelling the format."""
    import json

    data = json.loads(V["volume_config_v4"])
    stripped = dict(data, tags={k: v for k, v in data["tags"].items() if k != "names"})
    del stripped["names"]
    with pytest.raises(ConfigError, match="names must be an object"):
        VolumeConfig.loads(json.dumps(stripped))
    relabelled = dict(stripped, kmsfs_volume=3)
    config = VolumeConfig.loads(json.dumps(relabelled))  # parses as format 3 ...
    with pytest.raises(ConfigError, match=r"kmsfs_volume \(now 3\)"):
        config.verify(h("volume_key"))  # ... but its format's tag is format 4's
    moved = dict(json.loads(V["volume_config"]), names=data["names"])
    with pytest.raises(ConfigError, match="unknown fields names"):
        VolumeConfig.loads(json.dumps(moved))  # a names field is not format 3's


def test_name_secret_resealed_under_a_new_volume_key() -> None:
    from kmsfs.format.name_secret import SealedNameSecret

    volume_id = h("volume_id")
    sealed = SealedNameSecret(h("sealed_name_secret"))
    new_key = bytes(range(32))
    moved = sealed.resealed(h("volume_key"), new_key, volume_id)
    assert moved.sealed != sealed.sealed
    assert bytes(moved.open(new_key, volume_id)) == h("name_secret")
    with pytest.raises(ConfigError, match="does not open"):
        moved.open(h("volume_key"), volume_id)  # the old key does not open the new seal
    with pytest.raises(ConfigError, match="does not open"):
        sealed.open(h("volume_key"), bytes(16))  # another volume's ID


FORMATS = pytest.mark.parametrize("version", [FORMAT_1, FORMAT_2])


@FORMATS
def test_seal_round_trip_and_fresh_nonces(version: int) -> None:
    cipher = CIPHERS[version](bytes(32), bytes(16), 512)
    sealed = cipher.seal(0, PLAINTEXT, 1)
    assert len(sealed) == len(PLAINTEXT) + 2 * OVERHEADS[version]
    assert bytes(cipher.open(0, sealed, 1, "x")) == PLAINTEXT
    assert cipher.seal(0, PLAINTEXT, 1) != sealed  # random nonces


def test_format_2_shares_a_nonce_prefix_for_prefix_blocks_blocks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One random 12-byte prefix for PREFIX_BLOCKS blocks sealed in a row, across calls
    (one key derivation for them), 12 random bytes of each block's own; then another."""
    from kmsfs.format import content

    monkeypatch.setattr(content, "PREFIX_BLOCKS", 4)
    cipher = XaesBlockCipher(bytes(32), bytes(16), 512)
    bbs = 512 + 40

    def nonces(sealed: bytearray) -> list[bytes]:
        return [bytes(sealed[i : i + 24]) for i in range(0, len(sealed), bbs)]

    calls = [
        cipher.seal(0, bytes(512 * 3), 2),  # blocks 1-3 of prefix A
        cipher.seal(3, bytes(512), 3),  # the 4th of A
        cipher.seal(4, bytes(512 * 2), 5),  # 4 + 2 > 4: prefix B
        cipher.seal(0, bytes(512 * 9), 8),  # 2 + 4 > 4: C for 4 blocks, D for 4, E for 1
    ]
    prefixes = [n[:12] for call in calls for n in nonces(call)]
    assert len(prefixes) == 15
    runs = [prefixes[:4], prefixes[4:6], prefixes[6:10], prefixes[10:14], prefixes[14:]]
    assert all(len(set(run)) == 1 for run in runs)
    assert len({run[0] for run in runs}) == 5
    own = [n[12:] for call in calls for n in nonces(call)]
    assert len(set(own)) == 15
    assert bytes(cipher.open(0, calls[3], 8, "x")) == bytes(512 * 9)
    other = XaesBlockCipher(bytes(32), bytes(16), 512)  # another open: another prefix
    assert bytes(other.seal(0, b"", 0)[:12]) not in prefixes


def test_format_2_open_derives_one_key_per_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading blocks written by two opens (two prefixes) derives two keys: consecutive
    blocks of one prefix reuse the key, and a block read again finds it kept."""
    from kmsfs.format.xaes import Xaes256Gcm

    key = bytes(range(32))
    first, second = (XaesBlockCipher(key, bytes(16), 512) for _ in range(2))
    data = first.seal(0, PLAINTEXT[:512] * 3, 3) + second.seal(3, PLAINTEXT[512:], 3)
    reader = XaesBlockCipher(key, bytes(16), 512)
    derived: list[bytes] = []
    original = Xaes256Gcm._derive_into
    monkeypatch.setattr(
        Xaes256Gcm,
        "_derive_into",
        lambda self, p, out: derived.append(p) or original(self, p, out),
    )
    assert bytes(reader.open(0, data, 3, "x")) == PLAINTEXT[:512] * 3 + PLAINTEXT[512:]
    assert derived == [bytes(data[:12]), bytes(data[3 * 552 : 3 * 552 + 12])]
    reader.open(1, data[552:1104], 3, "x")
    reader.open(3, data[3 * 552 :], 3, "x")
    assert len(derived) == 2  # kept


# -- tampering at the block level ---------------------------------------------


@pytest.fixture(params=[FORMAT_1, FORMAT_2], ids=["format-1", "format-2"])
def sealed(request: pytest.FixtureRequest) -> tuple[BlockCipher, bytes]:
    prefix = "" if request.param == FORMAT_1 else "v2_"
    cipher = BlockCipher.for_file(h("file_key"), FileHeader.parse(h(f"{prefix}header")))
    return cipher, h(f"{prefix}ciphertext")


def block_offsets(cipher: BlockCipher) -> list[int]:
    """Bytes to flip: nonce (first, last), ciphertext, tag of both blocks."""
    bbs, nonce = cipher.layout.backing_block, cipher.layout.overhead - 16
    return [0, nonce - 1, nonce, 300, bbs - 1, bbs, bbs + nonce + 40, bbs + nonce + 88 + 15]


@pytest.mark.parametrize("which", range(8))
def test_bit_flip_anywhere_fails(sealed: tuple[BlockCipher, bytes], which: int) -> None:
    cipher, data = sealed
    flipped = bytearray(data)
    flipped[block_offsets(cipher)[which]] ^= 0x01
    with pytest.raises(IntegrityError, match=r"f: block [01]"):
        cipher.open(0, flipped, 1, "f")


def test_swapped_position_fails(sealed: tuple[BlockCipher, bytes]) -> None:
    cipher, data = sealed
    first = data[: cipher.layout.backing_block]
    with pytest.raises(IntegrityError, match="block 1"):
        cipher.open(1, first, 1, "f")


def test_truncation_at_block_boundary_fails(sealed: tuple[BlockCipher, bytes]) -> None:
    cipher, data = sealed
    with pytest.raises(IntegrityError, match="final"):
        cipher.open(0, data[: cipher.layout.backing_block], 0, "f")


def test_other_file_id_fails(sealed: tuple[BlockCipher, bytes]) -> None:
    real, data = sealed
    header = FileHeader.parse(h("v2_header" if real.version == FORMAT_2 else "header"))
    other = FileHeader.new(h("volume_id"), bytes(16), 512, header.entries, header.version)
    cipher = BlockCipher.for_file(h("file_key"), other)
    with pytest.raises(IntegrityError):
        cipher.open(0, data, 1, "f")


def test_other_format_fails(sealed: tuple[BlockCipher, bytes]) -> None:
    """A header edited to say the other format: another content key, another layout."""
    real, data = sealed
    header = FileHeader.parse(h("v2_header" if real.version == FORMAT_2 else "header"))
    other_version = FORMAT_1 if real.version == FORMAT_2 else FORMAT_2
    other = FileHeader.new(h("volume_id"), header.file_id, 512, header.entries, other_version)
    cipher = BlockCipher.for_file(h("file_key"), other)
    with pytest.raises(IntegrityError):
        cipher.open(0, data, cipher.layout.final_index(cipher.layout.plain_size(len(data))), "f")


def test_zeroed_middle_block_is_a_hole_but_final_is_not(sealed: tuple[BlockCipher, bytes]) -> None:
    cipher, data = sealed
    bbs = cipher.layout.backing_block
    holed = bytes(bbs) + data[bbs:]
    assert bytes(cipher.open(0, holed, 1, "f")) == bytes(512) + PLAINTEXT[512:]
    with pytest.raises(IntegrityError, match="zeroed"):
        cipher.open(0, data[:bbs] + bytes(len(data) - bbs), 1, "f")


@FORMATS
def test_middle_block_sealed_as_final_is_tolerated(version: int) -> None:
    cipher = CIPHERS[version](bytes(32), bytes(16), 512)
    first = cipher.seal(0, PLAINTEXT[:512], 0)  # sealed when it was the final block
    second = cipher.seal(1, PLAINTEXT[512:], 1)
    assert bytes(cipher.open(0, first + second, 1, "f")) == PLAINTEXT


# -- sizes ----------------------------------------------------------------------


@FORMATS
@pytest.mark.parametrize("size", [0, 1, 511, 512, 513, 1024, 5000])
def test_layout_round_trip(size: int, version: int) -> None:
    layout = Layout(512, version)
    backing = layout.backing_size(size)
    blocks = max(-(-size // 512), 1)
    assert backing == size + blocks * OVERHEADS[version]
    assert layout.plain_size(backing) == size
    layout.check_backing_size(backing, "f")


def test_overheads_are_the_documented_ones() -> None:
    assert OVERHEADS == {FORMAT_1: 28, FORMAT_2: 40}
    # 1080 backing bytes: 1000 plaintext bytes in format 2, 1024 in format 1 (a wrong marker
    # shows the one for the other)
    assert Layout(512, FORMAT_2).backing_size(1000) == 552 + 488 + 40 == 1080
    assert Layout(512, FORMAT_1).backing_size(1024) == 2 * 540 == 1080
    assert Layout(512, FORMAT_1).plain_size(1080) == 1024
    assert Layout(512, FORMAT_2).plain_size(1080) == 1000


@FORMATS
@pytest.mark.parametrize("what", ["empty", "inside a block header", "unexpected empty block"])
def test_layout_rejects_impossible_sizes(version: int, what: str) -> None:
    overhead = OVERHEADS[version]
    backing = {"empty": 0, "inside a block header": overhead - 1}.get(what, 512 + 2 * overhead)
    with pytest.raises(IntegrityError, match=what):
        Layout(512, version).check_backing_size(backing, "f")


def test_the_format_marker_is_the_sticky_bit() -> None:
    assert format_of_mode(0o100644) == FORMAT_1
    assert format_of_mode(0o101644) == FORMAT_2
    assert mode_for_format(0o101755, FORMAT_1) == 0o755
    assert mode_for_format(0o100644, FORMAT_2) == 0o1644
    assert mode_for_format(0o104600, FORMAT_2) == 0o5600  # set-user-ID kept


# -- header parsing ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b[:10], "at least 45"),
        (lambda b: b"XXXX" + b[4:], "magic"),
        (lambda b: b[:4] + b"\x03" + b[5:], "version 3: this kmsfs reads versions 1 and 2"),
        (lambda b: b[:4] + b"\x02" + b[5:], "suite 1: file format 2 uses suite 2"),
        (lambda b: b[:5] + b"\x02" + b[6:], "suite 2: file format 1 uses suite 1"),
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
        ('{"kmsfs_volume": 5}', "reads 1, 2, 3 and 4"),
        (config.dumps().replace('"generation": 1', '"generation": 0'), "generation 0 out of"),
        (config.dumps().replace('"generation": 1', '"generation": true'), "must be a int"),
        (config.dumps().replace('"chain": []', '"chain": {}'), "chain must be a list"),
        (config.dumps().replace('"block_size": 4096', '"block_size": 3'), "block size 3"),
        (config.dumps().replace(bytes(range(16)).hex(), "zz"), "32 hex digits"),
    ]:
        with pytest.raises(ConfigError, match=message):
            VolumeConfig.loads(text)
