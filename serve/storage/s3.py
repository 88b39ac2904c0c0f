"""S3 result store on boto3.

Endpoint, region and credentials come only from boto3's own environment and config files
(``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``, ``AWS_PROFILE``, ...), so the same code talks to
AWS, MinIO or moto without Darkroom-specific variables.
"""

from __future__ import annotations

import logging
from typing import Any, NoReturn

import boto3
import botocore.config
import botocore.exceptions as bexc

from serve.errors import InvalidRequestError, NotFoundError, StorageError
from serve.storage.base import ResultStore

logger = logging.getLogger(__name__)

# Error codes that mean "this object is not there". NoSuchBucket is deliberately absent: a
# missing bucket is a deployment mistake (StorageError), not a missing object (404).
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}
# Codes worth retrying later even though they are not 5xx.
_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequests",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
}
# Network-level failures: connection refused/reset, connect and read timeouts, streams cut
# short. botocore.exceptions.ConnectionError covers EndpointConnectionError and
# ConnectTimeoutError; HTTPClientError covers ReadTimeoutError, ConnectionClosedError and
# ResponseStreamingError.
_TRANSIENT_EXCEPTIONS: tuple[type[Exception], ...] = (bexc.ConnectionError, bexc.HTTPClientError)

# SigV4 presigned URLs cannot outlive 7 days.
MAX_URL_EXPIRY_S = 7 * 24 * 3600


def default_botocore_config(
    *, max_attempts: int = 5, connect_timeout: float = 5.0, read_timeout: float = 30.0
) -> botocore.config.Config:
    """The client config we use: SigV4 (the default presigner came out SigV2 in a check here)
    and ``standard`` retries (boto3's default ``legacy`` mode retries fewer error kinds)."""
    return botocore.config.Config(
        signature_version="s3v4",
        retries={"mode": "standard", "max_attempts": max_attempts},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
    )


def _raise_mapped(exc: Exception, action: str, where: str) -> NoReturn:
    """Translate a boto error into a Darkroom error and raise it.

    ``NoSuchKey``/404 -> NotFoundError; network failures, 5xx and throttling ->
    StorageError(transient=True); anything else (AccessDenied, NoSuchBucket, bad credentials,
    invalid parameters) -> StorageError(transient=False), since retrying will not help.
    """
    if isinstance(exc, bexc.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if code in _NOT_FOUND_CODES:
            raise NotFoundError(f"no such object: {where}") from None
        transient = status >= 500 or status == 429 or code in _TRANSIENT_CODES
        message = f"S3 {action} {where} failed: {code or status} {error.get('Message', '')}".rstrip()
        raise StorageError(message, transient=transient) from exc
    transient = isinstance(exc, _TRANSIENT_EXCEPTIONS)
    raise StorageError(f"S3 {action} {where} failed: {exc}", transient=transient) from exc


class S3Store(ResultStore):
    """Objects in ``bucket`` under ``prefix/``; :meth:`url` gives SigV4 presigned GET URLs.

    ``botocore_config`` (merged over :func:`default_botocore_config`) or ``max_attempts`` /
    timeouts let tests and operators tune retries; ``signature_version`` is always ``s3v4``.
    ``client`` injects a ready boto3 S3 client (tests, shared clients).
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        url_expiry_s: int = 3600,
        max_attempts: int = 5,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        botocore_config: botocore.config.Config | None = None,
        client: Any | None = None,
    ) -> None:
        if not 1 <= url_expiry_s <= MAX_URL_EXPIRY_S:
            raise InvalidRequestError("url_expiry_s", url_expiry_s, f"must be in [1, {MAX_URL_EXPIRY_S}]")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url_expiry_s = url_expiry_s
        if client is None:
            config = default_botocore_config(
                max_attempts=max_attempts, connect_timeout=connect_timeout, read_timeout=read_timeout
            )
            if botocore_config is not None:
                merged = config.merge(botocore_config)
                # merge() replaces the retries dict whole; keep "standard" mode unless overridden.
                if botocore_config.retries:
                    merged = merged.merge(
                        botocore.config.Config(retries={**(config.retries or {}), **botocore_config.retries})
                    )
                config = merged
            config = config.merge(botocore.config.Config(signature_version="s3v4"))
            # A session of our own: boto3's default session is shared module state and not
            # thread-safe to create clients from. The client itself is thread-safe.
            client = boto3.session.Session().client("s3", config=config)
        self.client = client

    def __repr__(self) -> str:
        return f"S3Store(bucket={self.bucket!r}, prefix={self.prefix!r})"

    def _object_key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _where(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._object_key(key)}"

    def _put(self, key: str, data: bytes, content_type: str) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._object_key(key), Body=data, ContentType=content_type)
        except (bexc.BotoCoreError, bexc.ClientError) as exc:
            _raise_mapped(exc, "put", self._where(key))

    def _put_if_absent(self, key: str, data: bytes, content_type: str) -> bool:
        try:
            self.client.put_object(
                Bucket=self.bucket, Key=self._object_key(key), Body=data, ContentType=content_type, IfNoneMatch="*"
            )
            return True
        except bexc.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return False
            _raise_mapped(exc, "put", self._where(key))
        except bexc.BotoCoreError as exc:
            _raise_mapped(exc, "put", self._where(key))
        return False  # unreachable: _raise_mapped always raises

    def _get(self, key: str) -> bytes:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._object_key(key))
            body = response["Body"]
            try:
                return body.read()  # the body streams: read errors surface here, not above
            finally:
                body.close()
        except (bexc.BotoCoreError, bexc.ClientError) as exc:
            _raise_mapped(exc, "get", self._where(key))

    def _exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._object_key(key))
        except (bexc.BotoCoreError, bexc.ClientError) as exc:
            try:
                _raise_mapped(exc, "head", self._where(key))
            except NotFoundError:
                return False
        return True

    def _delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._object_key(key))
        except (bexc.BotoCoreError, bexc.ClientError) as exc:
            try:
                _raise_mapped(exc, "delete", self._where(key))
            except NotFoundError:
                return  # already gone

    def _list(self, prefix: str) -> list[str]:
        """One folder level (``Delimiter="/"``), every page."""
        keys: list[str] = []
        full = self._object_key(prefix)
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full, Delimiter="/"
            )
            for page in pages:
                keys += [obj["Key"][len(full) - len(prefix) :] for obj in page.get("Contents", [])]
        except (bexc.BotoCoreError, bexc.ClientError) as exc:
            _raise_mapped(exc, "list", self._where(prefix))
        return sorted(keys)

    def _url(self, key: str) -> str:
        """A presigned GET URL; signing is local computation, no request is made."""
        try:
            return self.client.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.bucket, "Key": self._object_key(key)},
                ExpiresIn=self.url_expiry_s,
            )
        except (bexc.BotoCoreError, bexc.ClientError) as exc:  # e.g. NoCredentialsError
            _raise_mapped(exc, "presign", self._where(key))

    def check(self) -> None:
        """HEAD the bucket: proves endpoint, credentials and bucket in one request."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (bexc.BotoCoreError, bexc.ClientError) as exc:
            if isinstance(exc, bexc.ClientError) and exc.response.get("Error", {}).get("Code") in (
                "404",
                "NoSuchBucket",
                "NotFound",
            ):
                raise StorageError(f"S3 bucket {self.bucket!r} does not exist", transient=False) from exc
            _raise_mapped(exc, "head bucket", f"s3://{self.bucket}")
