"""``open_store``: turn a storage URI from config or the CLI into a :class:`ResultStore`."""

from __future__ import annotations

import logging
import re
from typing import Any
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

from serve.errors import InvalidRequestError, NotFoundError
from serve.storage.base import ResultStore, validate_key
from serve.storage.local import LocalStore
from serve.storage.s3 import MAX_URL_EXPIRY_S, S3Store

logger = logging.getLogger(__name__)

# Something that looks like "scheme:" (two or more letters, so a Windows drive letter is not
# one). A mistyped "s3:/bucket" or "gs://bucket" must fail loudly, not become a local folder.
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:")
# Lenient on purpose (legacy us-east-1 buckets allow upper case and "_"); S3 has the last word.
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,254}")


def open_store(
    uri: str = "./outputs",
    *,
    url_expiry_s: int = 3600,
    public_base_url: str | None = None,
    s3_options: dict[str, Any] | None = None,
) -> ResultStore:
    """Open the store a URI names: a path or ``file://...`` (local folder) or ``s3://bucket/prefix``.

    ``url_expiry_s`` is the lifetime of S3 presigned URLs. ``public_base_url`` (e.g.
    ``https://images.example.com``) makes local-store URLs ``{base}/v1/files/{key}``, served by
    the API; S3 URLs are presigned and ignore it. Nothing here touches the network or the
    disk; call :meth:`ResultStore.check` for that. ``s3_options`` are ``S3Store`` keyword
    arguments (``max_attempts``, ``connect_timeout``, ``read_timeout``).
    """
    if isinstance(url_expiry_s, bool) or not isinstance(url_expiry_s, int):
        raise InvalidRequestError("url_expiry_s", url_expiry_s, "must be an integer number of seconds")
    if not 1 <= url_expiry_s <= MAX_URL_EXPIRY_S:
        raise InvalidRequestError("url_expiry_s", url_expiry_s, f"must be in [1, {MAX_URL_EXPIRY_S}]")
    if public_base_url is not None and not re.match(r"https?://[^/]", public_base_url):
        raise InvalidRequestError("public_base_url", public_base_url, "must be an http(s):// URL")
    if not isinstance(uri, str) or not uri or "\x00" in uri:
        raise InvalidRequestError("storage", uri, "must be a path, file://... or s3://bucket/prefix")

    lowered = uri.lower()
    if lowered.startswith("s3://"):
        return _open_s3(uri, url_expiry_s, s3_options or {})
    if lowered.startswith("file://"):
        return LocalStore(_file_uri_path(uri), public_base_url=public_base_url)
    if _SCHEME.match(uri):
        raise InvalidRequestError("storage", uri, "unsupported scheme; use a path, file://... or s3://bucket/prefix")
    return LocalStore(uri, public_base_url=public_base_url)


def _file_uri_path(uri: str) -> str:
    parts = urlsplit(uri)
    # file://outputs would silently mean host "outputs": only an empty host or localhost is a path.
    if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
        raise InvalidRequestError("storage", uri, "file URIs must look like file:///absolute/path")
    path = url2pathname(unquote(parts.path))
    if not path:
        raise InvalidRequestError("storage", uri, "file URI has no path")
    return path


def _open_s3(uri: str, url_expiry_s: int, options: dict[str, Any]) -> S3Store:
    parts = urlsplit(uri)
    bucket = parts.netloc
    if not _BUCKET.fullmatch(bucket or ""):
        raise InvalidRequestError("storage", uri, "s3 URI needs a valid bucket: s3://bucket/prefix")
    if parts.query or parts.fragment:
        raise InvalidRequestError("storage", uri, "s3 URI must not have a query or fragment")
    prefix = parts.path.strip("/")
    if prefix:
        try:
            validate_key(prefix)  # the prefix obeys the same rules as keys
        except NotFoundError:
            raise InvalidRequestError(
                "storage", uri, "s3 prefix may only use [A-Za-z0-9._-] segments separated by '/'"
            ) from None
    return S3Store(bucket, prefix, url_expiry_s=url_expiry_s, **options)
