"""The AWS KMS key provider: every file key is a KMS data key (envelope encryption).

- generate: ``GenerateDataKey(KeySpec=AES_256)``; the header entry holds the
  CiphertextBlob, ``key_ref`` is the KMS key ARN.
- wrap: ``Encrypt`` of an existing 32-byte key (extra master keys, key check).
- unwrap: ``Decrypt`` with ``KeyId`` pinned to the ARN; the KeyId KMS returns
  must be that ARN too.
- reencrypt (rewrap from another aws-kms key): ``ReEncrypt`` with the source
  pinned to the entry's key ARN, the same context on both sides and this key
  as destination, so the plaintext key never leaves KMS.

Every call carries the encryption context ``KeyContext.as_dict()``: volume ID
and file ID (never the path, which CloudTrail would log in the clear and which
renames would invalidate).  See docs/FORMAT.md, "AWS KMS provider".

Error mapping (``classify``):

- AccessDenied, Disabled, KMSInvalidState (pending deletion...), NotFound,
  InvalidKeyUsage, bad or expired credentials -> KeyAccessDenied (EACCES)
- InvalidCiphertext, IncorrectKey, a foreign KeyId in the answer -> WrongKeyError (EIO)
- throttling, 5xx, KMS internal/dependency errors, timeouts, refused
  connections -> KeyUnavailable (temporary, EIO)

``code`` on the raised error is the AWS error code.  botocore retries
throttling, 5xx and connection errors itself (standard mode: exponential
backoff with jitter) within ``MAX_ATTEMPTS`` attempts and bounded connect/read
timeouts, so one call fails in at most about ten seconds whatever the
endpoint does.  boto3 is imported only in this module.
"""

from __future__ import annotations

import logging
from typing import Any

import boto3
import botocore.exceptions
from botocore.config import Config

from kmsfs.errors import (
    ConfigError,
    KeyAccessDenied,
    KeyUnavailable,
    ProviderError,
    WrongKeyError,
)
from kmsfs.format.header import WrappedKey
from kmsfs.keys.provider import KeyContext, KeyProvider, wipe
from kmsfs.keys.secrets import Prompt
from kmsfs.keys.settings import AwsKmsSettings, ProviderEntry

log = logging.getLogger("kmsfs.keys.aws_kms")

CONNECT_TIMEOUT = 1.0
READ_TIMEOUT = 2.0
MAX_ATTEMPTS = 3  # worst case about 3 x 2 s read timeouts + < 3 s of backoff
MAX_POOL_CONNECTIONS = 16
METHODS = {
    "GenerateDataKey": "generate_data_key",
    "Encrypt": "encrypt",
    "Decrypt": "decrypt",
    "ReEncrypt": "re_encrypt",
}
INIT_TEST_PURPOSE = "init-test"  # context purpose of the test GenerateDataKey made by init

DENIED_CODES = frozenset(
    {
        "AccessDeniedException",
        "DisabledException",
        "KMSInvalidStateException",
        "NotFoundException",
        "InvalidKeyUsageException",
        "InvalidGrantTokenException",
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "IncompleteSignature",
        "ExpiredTokenException",
        "InvalidClientTokenId",
    }
)
WRONG_KEY_CODES = frozenset({"InvalidCiphertextException", "IncorrectKeyException"})
TEMPORARY_CODES = frozenset(
    {
        "ThrottlingException",
        "Throttling",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "LimitExceededException",
        "KMSInternalException",
        "DependencyTimeoutException",
        "KeyUnavailableException",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "InternalFailure",
        "RequestTimeout",
        "RequestTimeoutException",
    }
)


def client_config() -> Config:
    """Bounded timeouts and retries (standard mode: jittered exponential backoff)."""
    return Config(
        connect_timeout=CONNECT_TIMEOUT,
        read_timeout=READ_TIMEOUT,
        retries={"mode": "standard", "total_max_attempts": MAX_ATTEMPTS},
        max_pool_connections=MAX_POOL_CONNECTIONS,
        user_agent_extra="kmsfs",
    )


def classify(exc: Exception, key: str, operation: str) -> ProviderError:
    """The kmsfs error for a botocore exception raised by *operation* on *key*."""
    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code") or "Unknown")
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        detail = str(error.get("Message") or "").strip()
        message = f"aws-kms key {key}: {operation} failed: {code}" + (
            f" ({detail})" if detail else ""
        )
        if code in WRONG_KEY_CODES:
            return WrongKeyError(message, code=code)
        if code in DENIED_CODES:
            return KeyAccessDenied(message, code=code)
        if code in TEMPORARY_CODES or status >= 500 or status == 429:
            return KeyUnavailable(message, code=code)
        return ProviderError(message, code=code)
    if isinstance(
        exc, botocore.exceptions.NoCredentialsError | botocore.exceptions.PartialCredentialsError
    ):
        return KeyUnavailable(
            f"aws-kms key {key}: {operation} failed: no AWS credentials ({exc})",
            code="NoCredentials",
        )
    if isinstance(exc, botocore.exceptions.HTTPClientError | botocore.exceptions.ConnectionError):
        return KeyUnavailable(
            f"aws-kms key {key}: {operation} failed: KMS endpoint unreachable"
            f" after {MAX_ATTEMPTS} attempts ({type(exc).__name__}: {exc})",
            code=type(exc).__name__,
        )
    return ProviderError(
        f"aws-kms key {key}: {operation} failed: {type(exc).__name__}: {exc}",
        code=type(exc).__name__,
    )


class AwsKmsProvider(KeyProvider):
    """Data keys generated and unwrapped by one AWS KMS symmetric key.

    Attributes:
        key_arn: the KMS key's full ARN (also ``key_ref``).
        region, endpoint_url, profile: how the client was built (recorded by init).
    """

    name = "aws-kms"
    inline = False

    def __init__(
        self,
        client: Any,
        key_arn: str,
        region: str,
        endpoint_url: str | None = None,
        profile: str | None = None,
    ) -> None:
        self._client = client
        self.key_arn = key_arn
        self.region = region
        self.endpoint_url = endpoint_url
        self.profile = profile

    @property
    def key_ref(self) -> str:
        return self.key_arn

    def public_wrap(self) -> str | None:
        return (
            f"aws-kms key {self.key_arn}: a principal allowed kms:Encrypt on it (without"
            " kms:Decrypt) can wrap a key under it"
        )

    def settings(self) -> dict[str, Any]:
        settings: dict[str, Any] = {"key_arn": self.key_arn, "region": self.region}
        if self.endpoint_url:
            settings["endpoint_url"] = self.endpoint_url
        if self.profile:
            settings["profile"] = self.profile
        return settings

    def _request(self, operation: str, **kwargs: Any) -> dict[str, Any]:
        """Call the KMS API *operation* (e.g. "Decrypt"); errors converted by ``classify``."""
        method = getattr(self._client, METHODS[operation])
        try:
            response: dict[str, Any] = method(**kwargs)
        except botocore.exceptions.BotoCoreError as exc:
            raise classify(exc, self.key_arn, operation) from None
        except botocore.exceptions.ClientError as exc:
            raise classify(exc, self.key_arn, operation) from None
        return response

    def _check_key_id(self, response: dict[str, Any], operation: str) -> None:
        returned = response.get("KeyId")
        if returned != self.key_arn:
            raise WrongKeyError(
                f"aws-kms key {self.key_arn}: {operation} answered for key {returned}",
                code="IncorrectKeyException",
            )

    def _generate(self, context: KeyContext) -> tuple[bytes, bytes]:
        response = self._request(
            "GenerateDataKey",
            KeyId=self.key_arn,
            KeySpec="AES_256",
            EncryptionContext=context.as_dict(),
        )
        self._check_key_id(response, "GenerateDataKey")
        return response["Plaintext"], response["CiphertextBlob"]

    def _wrap(self, plaintext: bytes, context: KeyContext) -> bytes:
        response = self._request(
            "Encrypt",
            KeyId=self.key_arn,
            Plaintext=plaintext,
            EncryptionContext=context.as_dict(),
        )
        self._check_key_id(response, "Encrypt")
        blob: bytes = response["CiphertextBlob"]
        return blob

    def _unwrap(self, wrapped: WrappedKey, context: KeyContext) -> bytes:
        response = self._request(
            "Decrypt",
            CiphertextBlob=wrapped.blob,
            KeyId=self.key_arn,
            EncryptionContext=context.as_dict(),
        )
        self._check_key_id(response, "Decrypt")
        plaintext: bytes = response["Plaintext"]
        return plaintext

    def reencrypt(self, wrapped: WrappedKey, context: KeyContext) -> WrappedKey:
        """*wrapped*, made by another aws-kms key for *context*, re-encrypted under this key.

        One ``ReEncrypt``: KMS decrypts with the source key and encrypts with
        this one, so the plaintext key never leaves KMS (kmsfs rewrap between
        KMS keys).  The source is pinned to the entry's key ARN, which must be
        a full key ARN in this key's partition and account: a key reference
        read from a header is the backing directory's to choose, and must not
        make KMS accept a blob from a key someone else owns.  Raises
        WrongKeyError for any other entry (the caller then unwraps and wraps
        instead) or a blob KMS rejects for that key and context, and
        KeyAccessDenied / KeyUnavailable as the other calls do.
        """
        if wrapped.provider != self.name:
            raise WrongKeyError(f"{self.describe()}: cannot re-encrypt a {wrapped.provider} key")
        if not _same_owner(wrapped.key_ref, self.key_arn):
            raise WrongKeyError(
                f"{self.describe()}: will not re-encrypt from {wrapped.key_ref}: not a key ARN"
                " of this key's account"
            )
        blob = self._call("reencrypt", self._reencrypt, wrapped, context)
        return WrappedKey(self.name, self.key_ref, bytes(blob))

    def _reencrypt(self, wrapped: WrappedKey, context: KeyContext) -> bytes:
        encryption_context = context.as_dict()
        response = self._request(
            "ReEncrypt",
            CiphertextBlob=wrapped.blob,
            SourceKeyId=wrapped.key_ref,
            SourceEncryptionContext=encryption_context,
            DestinationKeyId=self.key_arn,
            DestinationEncryptionContext=encryption_context,
        )
        self._check_key_id(response, "ReEncrypt")
        source = response.get("SourceKeyId")
        if source != wrapped.key_ref:
            raise WrongKeyError(
                f"aws-kms key {self.key_arn}: ReEncrypt answered for source key {source},"
                f" not {wrapped.key_ref}",
                code="IncorrectKeyException",
            )
        blob: bytes = response["CiphertextBlob"]
        return blob

    def close(self) -> None:
        close = getattr(self._client, "close", None)
        if close is not None:
            close()


def _client(
    region: str | None, endpoint_url: str | None, profile: str | None, key_id: str
) -> tuple[Any, str]:
    """A KMS client with bounded timeouts; ConfigError if profile, region or credentials lack."""
    try:
        session = boto3.session.Session(profile_name=profile)
    except botocore.exceptions.ProfileNotFound:
        raise ConfigError(f"AWS profile {profile!r} not found (--kms-profile)") from None
    region = region or _arn_region(key_id) or session.region_name
    if not region:
        raise ConfigError(
            "no AWS region for the KMS key: give --kms-region, a key ARN, or set AWS_REGION"
        )
    try:
        credentials = session.get_credentials()
    except botocore.exceptions.BotoCoreError as exc:
        raise ConfigError(f"cannot load AWS credentials: {exc}") from None
    if credentials is None:
        raise ConfigError(
            f"no AWS credentials found for KMS key {key_id}: set AWS_ACCESS_KEY_ID and"
            " AWS_SECRET_ACCESS_KEY, a profile (--kms-profile, AWS_PROFILE), or run with an"
            " instance or container role"
        )
    client = session.client(
        "kms", region_name=region, endpoint_url=endpoint_url, config=client_config()
    )
    return client, region


def _same_owner(key_ref: str, key_arn: str) -> bool:
    """True if *key_ref* is a KMS key ARN (not an alias) in *key_arn*'s partition and account."""
    parts, ours = key_ref.split(":"), key_arn.split(":")
    return (
        len(parts) == 6
        and parts[0] == "arn"
        and parts[2] == "kms"
        and parts[5].startswith("key/")
        and parts[1] == ours[1]
        and parts[4] == ours[4]
    )


def _arn_region(key_id: str) -> str | None:
    parts = key_id.split(":")
    if len(parts) >= 6 and parts[0] == "arn" and parts[2] == "kms":
        return parts[3] or None
    return None


def _describe(client: Any, key_id: str) -> str:
    """The ARN of *key_id* (ID, ARN, alias); KeyAccessDenied unless it is an enabled
    symmetric encryption key."""
    try:
        metadata = client.describe_key(KeyId=key_id)["KeyMetadata"]
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        raise classify(exc, key_id, "DescribeKey") from None
    arn = str(metadata["Arn"])
    state = metadata.get("KeyState", "Enabled")
    if state != "Enabled":
        code = "DisabledException" if state == "Disabled" else "KMSInvalidStateException"
        raise KeyAccessDenied(f"aws-kms key {arn}: key state is {state}", code=code)
    usage = metadata.get("KeyUsage", "ENCRYPT_DECRYPT")
    spec = metadata.get("KeySpec", "SYMMETRIC_DEFAULT")
    if usage != "ENCRYPT_DECRYPT" or spec != "SYMMETRIC_DEFAULT":
        raise ConfigError(
            f"aws-kms key {arn} is a {spec} {usage} key: kmsfs needs a symmetric"
            " encryption key (SYMMETRIC_DEFAULT, ENCRYPT_DECRYPT)"
        )
    return arn


def create(host: AwsKmsSettings, prompt: Prompt | None) -> AwsKmsProvider:
    """The provider for a new volume: resolve --kms-key-id and check it can make data keys."""
    key_id = host.key_id
    if not key_id:
        flag = host.flag_of("key_id")
        raise ConfigError(f"--provider aws-kms needs {flag} (key ID, ARN or alias)")
    endpoint_url = host.endpoint_url
    profile = host.profile
    client, region = _client(host.region, endpoint_url, profile, key_id)
    try:
        arn = _describe(client, key_id)
        provider = AwsKmsProvider(client, arn, region, endpoint_url, profile)
        test_context = KeyContext(bytes(16), bytes(16), INIT_TEST_PURPOSE)
        plaintext, _ = provider.generate_data_key(test_context)
        wipe(plaintext)
    except BaseException:
        client.close()
        raise
    log.info("aws-kms key %s in %s usable", arn, region)
    return provider


def open_provider(
    settings: dict[str, Any], host: AwsKmsSettings, prompt: Prompt | None
) -> AwsKmsProvider:
    """The provider of an existing volume: this host's --kms-* settings, else *settings*
    (trusted hints).

    No KMS call when the key is named by its ARN (the recorded one, or an ARN
    on the command line); otherwise DescribeKey resolves the ID or alias.  The
    keyring's key check makes the first Decrypt.
    """
    recorded = settings.get("key_arn")
    key_id = host.key_id or recorded
    if not isinstance(key_id, str) or not key_id:
        flag = host.flag_of("key_id")
        raise ConfigError(f"the aws-kms provider needs {flag} (key ARN, ID or alias)")
    endpoint_url = host.endpoint_url or settings.get("endpoint_url")
    profile = host.profile or settings.get("profile")
    region = host.region or settings.get("region")
    client, region = _client(region, endpoint_url, profile, key_id)
    try:
        arn = key_id if key_id == recorded or _arn_region(key_id) else _describe(client, key_id)
    except BaseException:
        client.close()
        raise
    return AwsKmsProvider(client, arn, region, endpoint_url, profile)


ENTRY = ProviderEntry(create=create, open=open_provider)
