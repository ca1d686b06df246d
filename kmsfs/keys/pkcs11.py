"""The PKCS#11 key provider: data keys wrapped inside an HSM by a key that never leaves it.

The master key is a token object found by token label and key label (plus the
CKA_ID recorded at init): an AES key, used with AES-GCM (preferred) or AES key
wrap, or an RSA key pair, used with RSA-OAEP.  Data keys come from the token's
random generator (C_GenerateRandom) and are wrapped and unwrapped on the token.

Wrapped data key (docs/PROVIDERS-PKCS11.md has the full description)::

    0x01 || nonce (12) || AES-GCM(K, nonce, data key, AAD = context.aad())  || tag (16)   61 bytes
    0x02 || AES-KWP(K, data key || SHA-256(context.aad()))   (RFC 5649)                   73 bytes
    0x03 || AES-KW(K,  data key || SHA-256(context.aad()))   (RFC 3394)                   73 bytes
    0x04 || RSA-OAEP-SHA1(pub, data key || SHA-256(context.aad()))        1 + modulus bytes

key_ref is an RFC 7512 PKCS#11 URI:
``pkcs11:token=<token label>;object=<key label>;id=<%xx CKA_ID>;type=secret-key|private-key``.
Init creates keys with a random 16-byte CKA_ID, so a key re-created under the
same label has another key_ref; the volume's key-check value, unwrapped at
every mount, catches any other substitution.

Threads: SoftHSM2 (and other modules initialised without locking) crash when
two threads call into them at once, so every PKCS#11 call in this process,
for every provider instance, runs under one module-level lock.  One logged-in
session is kept per provider; a lost session or a removed and reinserted token
is re-opened and logged into again at most MAX_REOPEN times per call.  A wrong
PIN is never retried: once refused, every later call fails at once.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import quote

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11e
from pkcs11.mechanisms import MGF, GCMParams

from kmsfs.errors import (
    ConfigError,
    KeyAccessDenied,
    KeyUnavailable,
    ProviderError,
    WrongKeyError,
)
from kmsfs.format.header import WrappedKey
from kmsfs.keys.provider import DATA_KEY_SIZE, KeyContext, KeyProvider
from kmsfs.keys.secrets import Prompt, get_text_secret
from kmsfs.keys.settings import Pkcs11Settings, ProviderEntry

log = logging.getLogger("kmsfs.keys.pkcs11")
T = TypeVar("T")

PIN_CREDENTIAL = "kmsfs-pin"

MECH_GCM = "aes-gcm"
MECH_KWP = "aes-kwp"
MECH_KW = "aes-kw"
MECH_OAEP = "rsa-oaep-sha1"
AES_MECHANISMS = (MECH_GCM, MECH_KWP, MECH_KW)
ALGORITHM_BYTE = {MECH_GCM: 0x01, MECH_KWP: 0x02, MECH_KW: 0x03, MECH_OAEP: 0x04}
MECHANISM_OF_BYTE = {value: name for name, value in ALGORITHM_BYTE.items()}
P11_MECHANISM = {
    MECH_GCM: Mechanism.AES_GCM,
    MECH_KWP: Mechanism.AES_KEY_WRAP_PAD,
    MECH_KW: Mechanism.AES_KEY_WRAP,
    MECH_OAEP: Mechanism.RSA_PKCS_OAEP,
}
NONCE_SIZE = 12
TAG_SIZE = 16
BINDING_SIZE = 32
GCM_BLOB_SIZE = 1 + NONCE_SIZE + DATA_KEY_SIZE + TAG_SIZE
KW_BLOB_SIZE = 1 + DATA_KEY_SIZE + BINDING_SIZE + 8
OAEP_PARAMS = (Mechanism.SHA_1, MGF.SHA1, None)
NEW_KEY_ID_BYTES = 16
NEW_KEY_BITS = 256

MAX_REOPEN = 3
REOPEN_DELAYS = (0.0, 0.2, 1.0)
DOWN_SECONDS = 2.0

# One lock for every PKCS#11 call in the process (see the module docstring).
_LOCK = threading.RLock()

# Errors after which the session (or the token behind it) is gone: re-open and log in again.
_LOST = (
    p11e.SessionHandleInvalid,
    p11e.SessionClosed,
    p11e.DeviceRemoved,
    p11e.TokenNotPresent,
    p11e.TokenNotRecognised,
    p11e.UserNotLoggedIn,
    p11e.KeyHandleInvalid,
    p11e.ObjectHandleInvalid,
    p11e.WrappingKeyHandleInvalid,
    p11e.UnwrappingKeyHandleInvalid,
    p11e.DeviceError,
)
# Errors of a decrypt/unwrap that mean "not made by this key for this context".
_NOT_OURS = (
    p11e.GeneralError,  # SoftHSM2's answer to a failed GCM tag or key-wrap check
    p11e.EncryptedDataInvalid,
    p11e.EncryptedDataLenRange,
    p11e.WrappedKeyInvalid,
    p11e.WrappedKeyLenRange,
    p11e.DataInvalid,
    p11e.DataLenRange,
)
_MECHANISM_REFUSED = (
    p11e.MechanismInvalid,
    p11e.MechanismParamInvalid,
    p11e.FunctionNotSupported,
    p11e.KeyTypeInconsistent,
    p11e.WrappingKeyTypeInconsistent,
    p11e.UnwrappingKeyTypeInconsistent,
    p11e.KeyNotWrappable,
    p11e.KeyUnextractable,
)
_BUSY = (p11e.DeviceMemory, p11e.HostMemory, p11e.FunctionFailed, p11e.SessionCount)


def _name(exc: BaseException) -> str:
    """python-pkcs11 exceptions mostly have empty messages: name the class."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def binding(context: KeyContext) -> bytes:
    """The context binding wrapped beside the data key when the mechanism has no AAD."""
    return hashlib.sha256(context.aad()).digest()


def make_key_ref(token: str, key: str, key_id: bytes, key_type: str) -> str:
    """The RFC 7512 URI naming the master key (labels and CKA_ID percent-encoded)."""
    parts = [f"token={quote(token, safe='')}", f"object={quote(key, safe='')}"]
    if key_id:
        parts.append("id=" + "".join(f"%{b:02x}" for b in key_id))
    parts.append("type=" + ("private-key" if key_type == "rsa" else "secret-key"))
    return "pkcs11:" + ";".join(parts)


def _load_library(module: str) -> Any:
    if os.sep in module and not os.path.isfile(module):
        raise ConfigError(f"PKCS#11 module {module} does not exist")
    try:
        return pkcs11.lib(module)
    except p11e.PKCS11Error as exc:
        hint = " (SoftHSM2: check SOFTHSM2_CONF and its tokendir)" if "softhsm" in module else ""
        raise ConfigError(f"cannot load PKCS#11 module {module}: {_name(exc)}{hint}") from None


class Pkcs11Provider(KeyProvider):
    """Wraps data keys under an AES key or RSA key pair on a PKCS#11 token.

    Attributes:
        module, token_label, key_label: where the key is.
        key_id: the key's CKA_ID (b"" if it has none).
        key_type: "aes" or "rsa".
        mechanism: the mechanism used for new wraps (AES_MECHANISMS or MECH_OAEP).

    Every call may block on the token and raises KeyAccessDenied (PIN refused),
    KeyUnavailable (token gone after MAX_REOPEN re-opens), WrongKeyError, or
    ProviderError (mechanism refused, other token errors).
    """

    name = "pkcs11"
    inline = False

    def __init__(
        self,
        module: str,
        token_label: str,
        key_label: str,
        pin: str,
        key_id: bytes | None = None,
        key_type: str | None = None,
        mechanism: str | None = None,
        create_key: bool = False,
    ) -> None:
        self.module = module
        self.token_label = token_label
        self.key_label = key_label
        self._pin = pin
        self.key_id = key_id or b""
        self._want_id = key_id
        self.key_type = key_type or ""
        self.mechanism = mechanism or ""
        self._lib: Any = None
        self._session: Any = None
        self._logged_in = False
        self._secret: Any = None  # AES key
        self._public: Any = None  # RSA
        self._private: Any = None
        self._refused: str | None = None
        self._down_until = 0.0
        self._closed = False
        with _LOCK:
            self._lib = _load_library(module)
            try:
                self._connect(create_key=create_key, first=True)
            except BaseException:
                self._drop()
                raise
        if not self.mechanism:
            raise ConfigError(f"{self.describe()}: no mechanism chosen")

    # -- identity ----------------------------------------------------------

    @property
    def key_ref(self) -> str:
        return make_key_ref(self.token_label, self.key_label, self.key_id, self.key_type)

    def settings(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "token": self.token_label,
            "key": self.key_label,
            "key_id": self.key_id.hex(),
            "key_type": self.key_type,
            "mechanism": self.mechanism,
        }

    def describe(self) -> str:
        return f"pkcs11 key {self.key_label!r} on token {self.token_label!r}"

    def public_wrap(self) -> str | None:
        if self.key_type != "rsa":
            return None
        return (
            f"{self.describe()} is an RSA key: anyone who can read the token's public key"
            " (no PIN needed) can wrap a key under it"
        )

    # -- session -----------------------------------------------------------

    def _connect(self, create_key: bool = False, first: bool = False) -> None:
        """Find the token, open a session, log in, find (or create) the key.  Holds _LOCK."""
        token = self._find_token()
        session, self._logged_in = self._open_session(token, rw=create_key)
        self._session = session
        try:
            self._find_key(session, create_key)
            if first and not self.mechanism:
                self.mechanism = self._choose_mechanism(token)
            elif first:
                self._check_mechanism(token, self.mechanism)
        except BaseException:
            self._drop()
            raise
        if self.key_id:
            self._want_id = self.key_id  # re-opens find this very key again

    def _find_token(self) -> Any:
        try:
            return self._lib.get_token(token_label=self.token_label)
        except p11e.NoSuchToken:
            try:
                present = sorted(t.label for t in self._lib.get_tokens() if t.label)
            except p11e.PKCS11Error:
                present = []
            raise KeyUnavailable(
                f"no PKCS#11 token labelled {self.token_label!r} in {self.module}"
                f" (tokens present: {', '.join(map(repr, present)) or 'none'})",
                code="TokenNotPresent",
            ) from None
        except p11e.MultipleTokensReturned:
            raise ConfigError(
                f"several PKCS#11 tokens are labelled {self.token_label!r} in {self.module}:"
                " give each token a unique label"
            ) from None

    def _open_session(self, token: Any, rw: bool) -> tuple[Any, bool]:
        if self._refused is not None:
            raise KeyAccessDenied(self._refused, code="PinIncorrect")
        where = f"token {self.token_label!r}"
        try:
            return token.open(rw=rw, user_pin=self._pin), True
        except p11e.UserAlreadyLoggedIn:
            # Another session of this process logged in; sessions share the login.
            return token.open(rw=rw), False
        except p11e.PinIncorrect:
            self._refused = (
                f"wrong PIN for {where} (not retried: repeated failures can lock the token)"
            )
            raise KeyAccessDenied(self._refused, code="PinIncorrect") from None
        except p11e.PinLocked:
            self._refused = f"the user PIN of {where} is locked: the security officer must reset it"
            raise KeyAccessDenied(self._refused, code="PinLocked") from None
        except p11e.PinExpired:
            self._refused = f"the user PIN of {where} has expired: set a new one"
            raise KeyAccessDenied(self._refused, code="PinExpired") from None
        except (p11e.PinInvalid, p11e.PinLenRange):
            self._refused = f"the PIN given for {where} has invalid characters or length"
            raise KeyAccessDenied(self._refused, code="PinInvalid") from None
        except p11e.UserPinNotInitialized:
            raise ConfigError(f"{where} has no user PIN: initialise it first") from None

    def _find_key(self, session: Any, create_key: bool) -> None:
        template: dict[Any, Any] = {Attribute.LABEL: self.key_label}
        if self._want_id:
            template[Attribute.ID] = self._want_id
        secrets = list(session.get_objects({**template, Attribute.CLASS: ObjectClass.SECRET_KEY}))
        privates = list(session.get_objects({**template, Attribute.CLASS: ObjectClass.PRIVATE_KEY}))
        found = secrets + privates
        what = f"key {self.key_label!r}" + (
            f" (CKA_ID {self._want_id.hex()})" if self._want_id else ""
        )
        where = f"token {self.token_label!r}"
        if not found:
            if create_key:
                self._create_aes_key(session)
                return
            hint = " (init --pkcs11-create-key creates an AES-256 key)" if not self._want_id else ""
            raise ConfigError(f"no {what} on {where}{hint}")
        if len(found) > 1:
            raise ConfigError(
                f"{len(found)} keys labelled {self.key_label!r} on {where}: give the key a"
                " unique label"
            )
        key = found[0]
        attrs = key.get_attributes([Attribute.KEY_TYPE, Attribute.ID])
        p11_type = attrs.get(Attribute.KEY_TYPE)
        if secrets and p11_type == KeyType.AES:
            key_type = "aes"
        elif privates and p11_type == KeyType.RSA:
            key_type = "rsa"
        else:
            kind = "secret" if secrets else "private"
            type_name = getattr(p11_type, "name", str(p11_type))
            raise ConfigError(
                f"{what} on {where} is a {type_name} {kind} key: want an AES key or an RSA key pair"
            )
        if self.key_type and key_type != self.key_type:
            raise ConfigError(
                f"{what} on {where} is an {key_type.upper()} key, this volume's key is"
                f" {self.key_type.upper()}"
            )
        self.key_type = key_type
        self.key_id = bytes(attrs.get(Attribute.ID) or b"")
        if key_type == "aes":
            self._secret = key
            return
        public_template: dict[Any, Any] = {
            Attribute.LABEL: self.key_label,
            Attribute.CLASS: ObjectClass.PUBLIC_KEY,
        }
        if self.key_id:
            public_template[Attribute.ID] = self.key_id
        publics = list(session.get_objects(public_template))
        if len(publics) != 1:
            raise ConfigError(
                f"{what} on {where} is an RSA private key, but {len(publics)} public keys"
                " carry its label and ID: want exactly one"
            )
        self._private, self._public = key, publics[0]

    def _create_aes_key(self, session: Any) -> None:
        key_id = bytes(session.generate_random(NEW_KEY_ID_BYTES * 8))
        try:
            key = session.generate_key(
                KeyType.AES,
                NEW_KEY_BITS,
                label=self.key_label,
                id=key_id,
                store=True,
                template={
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: True,
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                    Attribute.ENCRYPT: True,
                    Attribute.DECRYPT: True,
                    Attribute.WRAP: True,
                    Attribute.UNWRAP: True,
                    Attribute.SIGN: False,
                    Attribute.VERIFY: False,
                    Attribute.DERIVE: False,
                },
            )
        except p11e.PKCS11Error as exc:
            raise ProviderError(
                f"cannot create AES-256 key {self.key_label!r} on token {self.token_label!r}:"
                f" {_name(exc)}"
            ) from None
        log.info("created AES-256 key %r (CKA_ID %s)", self.key_label, key_id.hex())
        self._secret, self.key_type, self.key_id = key, "aes", key_id

    def _usable(self, token: Any) -> list[str]:
        """The mechanisms the token offers and the key's attributes allow, best first."""
        offered = set(token.slot.get_mechanisms())
        if self.key_type == "rsa":
            ok = (
                Mechanism.RSA_PKCS_OAEP in offered
                and self._public[Attribute.WRAP]
                and self._private[Attribute.UNWRAP]
            )
            return [MECH_OAEP] if ok else []
        attrs = self._secret.get_attributes(
            [Attribute.ENCRYPT, Attribute.DECRYPT, Attribute.WRAP, Attribute.UNWRAP]
        )
        crypt = attrs.get(Attribute.ENCRYPT) and attrs.get(Attribute.DECRYPT)
        wrap = attrs.get(Attribute.WRAP) and attrs.get(Attribute.UNWRAP)
        usable = []
        for name in AES_MECHANISMS:
            if P11_MECHANISM[name] in offered and (crypt if name == MECH_GCM else wrap):
                usable.append(name)
        return usable

    def _choose_mechanism(self, token: Any) -> str:
        usable = self._usable(token)
        if not usable:
            raise ConfigError(self._no_mechanism_message())
        return usable[0]

    def _check_mechanism(self, token: Any, mechanism: str) -> None:
        if mechanism not in ALGORITHM_BYTE:
            raise ConfigError(f"unknown PKCS#11 mechanism {mechanism!r} (known: {_KNOWN})")
        if mechanism not in self._usable(token):
            raise ConfigError(
                f"mechanism {mechanism} is not supported for {self.describe()}: "
                + self._no_mechanism_message()
            )

    def _no_mechanism_message(self) -> str:
        if self.key_type == "rsa":
            return (
                f"token {self.token_label!r} does not offer CKM_RSA_PKCS_OAEP for RSA key"
                f" {self.key_label!r}, or the key pair lacks CKA_WRAP/CKA_UNWRAP"
            )
        return (
            f"token {self.token_label!r} offers none of CKM_AES_GCM (with CKA_ENCRYPT and"
            " CKA_DECRYPT), CKM_AES_KEY_WRAP_PAD or CKM_AES_KEY_WRAP (with CKA_WRAP and"
            f" CKA_UNWRAP) for AES key {self.key_label!r}: mechanism unsupported"
        )

    def _drop(self) -> None:
        """Forget the session (best effort close).  Holds _LOCK."""
        session, self._session = self._session, None
        self._secret = self._public = self._private = None
        if session is not None:
            try:
                session.close()
            except p11e.PKCS11Error:
                pass  # the session or token is gone already

    def _reopen(self, attempt: int) -> None:
        """Connect again after a lost session; from the third try, reinitialise the module."""
        if attempt > 0:
            time.sleep(REOPEN_DELAYS[min(attempt, len(REOPEN_DELAYS)) - 1])
        if attempt >= 2:
            try:
                self._lib.reinitialize()  # some modules list a reinserted token only then
            except p11e.PKCS11Error as exc:
                raise KeyUnavailable(f"reinitialising {self.module}: {_name(exc)}") from None
        self._connect()
        log.info("%s: session re-opened", self.describe())

    def _run(self, operation: str, func: Callable[[], T]) -> T:
        """Run *func* with a live session, re-opening it at most MAX_REOPEN times."""
        with _LOCK:
            if self._closed:
                raise ProviderError(f"{self.describe()}: provider is closed")
            if self._refused is not None:
                raise KeyAccessDenied(self._refused, code="PinIncorrect")
            if time.monotonic() < self._down_until:
                raise KeyUnavailable(
                    f"{self.describe()}: token unreachable (re-open failed moments ago)"
                )
            last: BaseException | None = None
            for attempt in range(MAX_REOPEN + 1):
                try:
                    if self._session is None:
                        self._reopen(attempt)
                    return func()
                except (*_LOST, KeyUnavailable) as exc:  # KeyUnavailable: token not back yet
                    last = exc
                log.warning(
                    "%s: %s: session lost (%s); re-opening (%d of %d)",
                    self.describe(),
                    operation,
                    _name(last),
                    attempt + 1,
                    MAX_REOPEN,
                )
                self._drop()
            self._down_until = time.monotonic() + DOWN_SECONDS
            raise KeyUnavailable(
                f"{self.describe()}: {operation}: token unreachable after {MAX_REOPEN}"
                f" re-opens ({_name(last) if last else 'unknown'})",
                code="TokenNotPresent",
            )

    # -- operations (all under _run) --------------------------------------

    def _random(self, nbytes: int) -> bytes:
        return bytes(self._session.generate_random(nbytes * 8))

    def _seal(self, mechanism: str, plaintext: bytes, context: KeyContext, nonce: bytes) -> bytes:
        try:
            if mechanism == MECH_GCM:
                params = GCMParams(nonce, context.aad(), TAG_SIZE * 8)
                sealed = self._secret.encrypt(
                    plaintext, mechanism=Mechanism.AES_GCM, mechanism_param=params
                )
                return bytes([ALGORITHM_BYTE[mechanism]]) + nonce + bytes(sealed)
            wrapping = self._public if mechanism == MECH_OAEP else self._secret
            param = OAEP_PARAMS if mechanism == MECH_OAEP else None
            obj = self._session.create_object(_payload_template(plaintext + binding(context)))
            try:
                wrapped = wrapping.wrap_key(
                    obj, mechanism=P11_MECHANISM[mechanism], mechanism_param=param
                )
            finally:
                _destroy(obj)
            return bytes([ALGORITHM_BYTE[mechanism]]) + bytes(wrapped)
        except _MECHANISM_REFUSED + _BUSY as exc:
            raise self._token_failure(exc, mechanism) from None

    def _token_failure(self, exc: BaseException, mechanism: object) -> ProviderError:
        """The error for a token that refused a mechanism (permanent) or is busy (temporary)."""
        if isinstance(exc, _BUSY):
            return KeyUnavailable(
                f"{self.describe()}: token busy: {_name(exc)}", code=type(exc).__name__
            )
        return ProviderError(
            f"{self.describe()}: token refused {mechanism}: {_name(exc)}",
            code=type(exc).__name__,
        )

    def _open(self, blob: bytes, context: KeyContext) -> bytes:
        mechanism = MECHANISM_OF_BYTE.get(blob[0]) if blob else None
        if mechanism is None:
            raise WrongKeyError(f"pkcs11 wrapped key with unknown algorithm byte {blob[:1].hex()}")
        if (mechanism == MECH_OAEP) != (self.key_type == "rsa"):
            raise WrongKeyError(
                f"key wrapped with {mechanism}, but {self.describe()} is an"
                f" {self.key_type.upper()} key"
            )
        want = {MECH_GCM: GCM_BLOB_SIZE, MECH_KWP: KW_BLOB_SIZE, MECH_KW: KW_BLOB_SIZE}
        if mechanism in want and len(blob) != want[mechanism]:
            raise WrongKeyError(
                f"{mechanism} wrapped key of {len(blob)} bytes: want {want[mechanism]}"
            )
        refused = WrongKeyError(
            f"{self.describe()} cannot unwrap this key: other master key or other volume/file"
        )
        try:
            if mechanism == MECH_GCM:
                params = GCMParams(blob[1 : 1 + NONCE_SIZE], context.aad(), TAG_SIZE * 8)
                return bytes(
                    self._secret.decrypt(
                        blob[1 + NONCE_SIZE :], mechanism=Mechanism.AES_GCM, mechanism_param=params
                    )
                )
            unwrapping = self._private if mechanism == MECH_OAEP else self._secret
            obj = unwrapping.unwrap_key(
                ObjectClass.SECRET_KEY,
                KeyType.GENERIC_SECRET,
                blob[1:],
                mechanism=P11_MECHANISM[mechanism],
                mechanism_param=OAEP_PARAMS if mechanism == MECH_OAEP else None,
                template=_UNWRAP_TEMPLATE,
            )
            try:
                value = bytes(obj[Attribute.VALUE])
            finally:
                _destroy(obj)
        except _NOT_OURS:
            raise refused from None
        except _MECHANISM_REFUSED + _BUSY as exc:
            raise self._token_failure(exc, mechanism) from None
        if len(value) != DATA_KEY_SIZE + BINDING_SIZE or not hmac.compare_digest(
            value[DATA_KEY_SIZE:], binding(context)
        ):
            raise refused
        return value[:DATA_KEY_SIZE]

    def _generate(self, context: KeyContext) -> tuple[bytes, bytes]:
        def call() -> tuple[bytes, bytes]:
            extra = NONCE_SIZE if self.mechanism == MECH_GCM else 0
            rnd = self._random(DATA_KEY_SIZE + extra)
            key, nonce = rnd[:DATA_KEY_SIZE], rnd[DATA_KEY_SIZE:]
            return key, self._seal(self.mechanism, key, context, nonce)

        return self._run("generate", call)

    def _wrap(self, plaintext: bytes, context: KeyContext) -> bytes:
        def call() -> bytes:
            nonce = self._random(NONCE_SIZE) if self.mechanism == MECH_GCM else b""
            return self._seal(self.mechanism, plaintext, context, nonce)

        return self._run("wrap", call)

    def _unwrap(self, wrapped: WrappedKey, context: KeyContext) -> bytes:
        return self._run("unwrap", lambda: self._open(wrapped.blob, context))

    def self_test(self) -> None:
        """Wrap and unwrap a random key under a throwaway context (init: mechanism works?)."""
        context = KeyContext(os.urandom(16), os.urandom(16), "self-test")
        try:
            plain, wrapped = self.generate_data_key(context)
            if self.unwrap(wrapped, context) != plain:
                raise ProviderError("unwrapped key differs")
        except ProviderError as exc:
            raise ConfigError(
                f"mechanism {self.mechanism} does not work with {self.describe()}: {exc}"
            ) from None

    def close(self) -> None:
        with _LOCK:
            self._closed = True
            self._drop()
            self._pin = ""


_KNOWN = ", ".join(ALGORITHM_BYTE)
_UNWRAP_TEMPLATE = {
    Attribute.TOKEN: False,
    Attribute.EXTRACTABLE: True,
    Attribute.SENSITIVE: False,
    Attribute.ENCRYPT: False,
    Attribute.DECRYPT: False,
    Attribute.SIGN: False,
    Attribute.VERIFY: False,
}


def _payload_template(value: bytes) -> dict[Any, Any]:
    """A session-only generic secret holding *value*, extractable so it can be wrapped."""
    return {
        Attribute.CLASS: ObjectClass.SECRET_KEY,
        Attribute.KEY_TYPE: KeyType.GENERIC_SECRET,
        Attribute.VALUE: value,
        Attribute.TOKEN: False,
        Attribute.EXTRACTABLE: True,
        Attribute.SENSITIVE: False,
    }


def _destroy(obj: Any) -> None:
    try:
        obj.destroy()
    except p11e.PKCS11Error as exc:  # a lost session takes its objects with it
        log.debug("could not destroy a session object: %s", _name(exc))


def _get_pin(host: Pkcs11Settings, token: str, prompt: Prompt | None) -> str:
    return get_text_secret(host.pin_file, PIN_CREDENTIAL, f"PIN of token {token!r}", prompt)


def _required(host: Pkcs11Settings, settings: dict[str, Any], name: str) -> str:
    """This host's setting *name*, else the recorded hint; ConfigError naming its flag."""
    value = getattr(host, name) or settings.get(name)
    if not value or not isinstance(value, str):
        raise ConfigError(f"the pkcs11 provider needs {host.flag_of(name)}")
    return value


def create(host: Pkcs11Settings, prompt: Prompt | None) -> Pkcs11Provider:
    """The master key for a new volume: find the key on the token, or create it if asked.

    *host*: module, token, key (required), pin_file, create_key, and mechanism
    (one of aes-gcm, aes-kwp, aes-kw, rsa-oaep-sha1; default: the best the token
    and key allow).
    """
    module = _required(host, {}, "module")
    token = _required(host, {}, "token")
    key = _required(host, {}, "key")
    mechanism = host.mechanism or None
    if mechanism is not None and mechanism not in ALGORITHM_BYTE:
        raise ConfigError(f"unknown PKCS#11 mechanism {mechanism!r} (known: {_KNOWN})")
    pin = _get_pin(host, token, prompt)
    provider = Pkcs11Provider(
        module,
        token,
        key,
        pin,
        mechanism=mechanism,
        create_key=bool(host.create_key),
    )
    try:
        provider.self_test()
    except BaseException:
        provider.close()
        raise
    return provider


def open_provider(
    settings: dict[str, Any], host: Pkcs11Settings, prompt: Prompt | None
) -> Pkcs11Provider:
    """The provider for an existing volume: --pkcs11-module/-token/-key, else *settings*.

    *settings* carries the module, token and key only when the caller trusts the
    recorded hints (kmsfs.keys.registry); the key's CKA_ID, type and mechanism
    are used to find the same key again, and the key_ref and key check verify it.
    """
    module = _required(host, settings, "module")
    token = _required(host, settings, "token")
    key = _required(host, settings, "key")
    same_key = settings.get("key") in (None, key) and settings.get("token") in (None, token)
    try:
        key_id = bytes.fromhex(str(settings.get("key_id") or "")) if same_key else None
    except ValueError:
        raise ConfigError("volume config: pkcs11 key_id is not hex") from None
    key_type = settings.get("key_type") if same_key else None
    mechanism = settings.get("mechanism") if same_key else None
    if key_type not in (None, "aes", "rsa") or not isinstance(mechanism, str | None):
        raise ConfigError("volume config: pkcs11 key_type or mechanism is missing or malformed")
    pin = _get_pin(host, token, prompt)
    return Pkcs11Provider(
        module, token, key, pin, key_id=key_id or None, key_type=key_type, mechanism=mechanism
    )


ENTRY = ProviderEntry(create=create, open=open_provider)
