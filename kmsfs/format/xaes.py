"""XAES-256-GCM (https://c2sp.org/XAES-256-GCM): AES-256-GCM with 192-bit nonces.

The C2SP specification, from its "Detailed key derivation algorithm"::

    L   = AES-256_K(0^128)
    K1  = L << 1, xor 0x87 into the last byte if MSB(L) = 1    (the CMAC subkey)
    M1  = 00 01 58 00 || N[:12]          M2 = 00 02 58 00 || N[:12]
    K_X = AES-256_K(M1 xor K1) || AES-256_K(M2 xor K1)
    N_X = N[12:]

then AES-256-GCM with key K_X and nonce N_X.  The derived key depends only on
the first 12 nonce bytes (the *prefix*), so messages that share a prefix share
one K_X: ``aead_for`` derives it once and keeps the AES-GCM object of the last
few prefixes (``CACHE_ENTRIES``, least recently used first out), and ``encrypt``
/ ``decrypt`` are the whole AEAD (for the specification's test vectors).

Pure (no I/O).  Thread-safe: the AES-ECB context and the cache are used under a
lock; AES-GCM objects hold no state between calls.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_SIZE = 32
NONCE_SIZE = 24
PREFIX_SIZE = 12  # the nonce bytes the derived key depends on
CACHE_ENTRIES = 16  # derived AES-GCM objects kept per key (about 2.5 KiB each)

_M1 = b"\x00\x01\x58\x00"  # counter 1, label "X", separator
_M2 = b"\x00\x02\x58\x00"  # counter 2
_R128 = 0x87  # the CMAC doubling polynomial's low byte
_ZEROS = bytes(48)


def cmac_subkey(ecb_zero: bytes) -> bytes:
    """K1 = dbl(L) for L = AES-256_K(0^128) (NIST SP 800-38B, section 6.1)."""
    value = int.from_bytes(ecb_zero, "big") << 1
    if value >> 128:
        value = (value & ((1 << 128) - 1)) ^ _R128
    return value.to_bytes(16, "big")


class Xaes256Gcm:
    """XAES-256-GCM under one 256-bit key.

    Raises ValueError for a key that is not 32 bytes, a nonce that is not 24
    bytes, or a prefix that is not 12; ``decrypt`` raises
    cryptography's InvalidTag when the message does not authenticate.
    """

    def __init__(self, key: bytes | bytearray, cache_entries: int = CACHE_ENTRIES) -> None:
        if len(key) != KEY_SIZE:
            raise ValueError(f"XAES-256-GCM key of {len(key)} bytes: want {KEY_SIZE}")
        self._ecb = Cipher(algorithms.AES(bytes(key)), modes.ECB()).encryptor()
        k1 = int.from_bytes(cmac_subkey(self._ecb.update(bytes(16))), "big")
        # M1 xor K1 and M2 xor K1 with a zero prefix: the prefix is xored in per nonce
        self._m1k1 = int.from_bytes(_M1 + bytes(PREFIX_SIZE), "big") ^ k1
        self._m2k1 = int.from_bytes(_M2 + bytes(PREFIX_SIZE), "big") ^ k1
        self._lock = threading.Lock()
        self._cache: OrderedDict[bytes, AESGCM] = OrderedDict()
        self._cache_entries = cache_entries

    def _derive_into(self, prefix: bytes, out: bytearray) -> None:
        """K_X for *prefix* into the first 32 bytes of *out* (48 bytes: update_into wants
        room for a block more than it is given).  Call with the lock held."""
        if len(prefix) != PREFIX_SIZE:
            raise ValueError(f"nonce prefix of {len(prefix)} bytes: want {PREFIX_SIZE}")
        p = int.from_bytes(prefix, "big")
        blocks = (self._m1k1 ^ p) << 128 | (self._m2k1 ^ p)
        self._ecb.update_into(blocks.to_bytes(32, "big"), out)

    def derive_key(self, prefix: bytes) -> bytearray:
        """K_X for a nonce beginning with the 12 bytes *prefix* (the caller wipes it)."""
        out = bytearray(48)
        with self._lock:
            self._derive_into(prefix, out)
        key = out[:32]
        out[:] = _ZEROS
        return key

    def aead_for(self, prefix: bytes) -> AESGCM:
        """The AES-256-GCM object under K_X for nonces beginning with *prefix*, from the
        cache when it was derived lately."""
        with self._lock:
            aead = self._cache.get(prefix)
            if aead is not None:
                self._cache.move_to_end(prefix)
                return aead
            out = bytearray(48)
            try:
                self._derive_into(prefix, out)
                aead = AESGCM(memoryview(out)[:32])  # copies the key into OpenSSL
            finally:
                out[:] = _ZEROS
            self._cache[prefix] = aead
            if len(self._cache) > self._cache_entries:
                self._cache.popitem(last=False)
            return aead

    def encrypt(self, nonce: bytes, plaintext: bytes, aad: bytes | None) -> bytes:
        """ciphertext || tag of *plaintext* under the 24-byte *nonce*."""
        self._check_nonce(nonce)
        return self.aead_for(nonce[:PREFIX_SIZE]).encrypt(nonce[PREFIX_SIZE:], plaintext, aad)

    def decrypt(self, nonce: bytes, sealed: bytes, aad: bytes | None) -> bytes:
        """The plaintext of ciphertext || tag *sealed*; InvalidTag if it does not
        authenticate."""
        self._check_nonce(nonce)
        return self.aead_for(nonce[:PREFIX_SIZE]).decrypt(nonce[PREFIX_SIZE:], sealed, aad)

    @staticmethod
    def _check_nonce(nonce: bytes) -> None:
        if len(nonce) != NONCE_SIZE:
            raise ValueError(f"XAES-256-GCM nonce of {len(nonce)} bytes: want {NONCE_SIZE}")
