"""The result-store interface and the key rules every backend shares.

Keys reach a store from two directions: the server makes image keys itself, and clients send
keys back (``GET /v1/files/{key}``) and job ids (``GET /v1/images/jobs/{id}``). Everything a
client can send is checked here, once, against a small allow-list, so no backend ever sees a
path like ``../../etc/passwd``. A bad key answers :class:`NotFoundError`: such an object cannot
exist, and a 404 tells a prober nothing more.
"""

from __future__ import annotations

import abc
import datetime as _dt
import json
import logging
import mimetypes
import re
import uuid
from dataclasses import dataclass
from typing import Any

from serve.errors import InvalidRequestError, NotFoundError, StorageError

logger = logging.getLogger(__name__)

# Allow-list, not deny-list: percent signs, spaces, colons, backslashes and non-ASCII never
# pass, so "%2e%2e/x" stays a literal (invalid) key instead of being decoded somewhere later.
_KEY_CHARS = re.compile(r"[A-Za-z0-9._/-]+")
_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
# S3 caps object keys at 1024 bytes; the prefix takes part of that, so keep keys well below.
MAX_KEY_LENGTH = 512

# output_format -> (file extension, content type)
IMAGE_FORMATS: dict[str, tuple[str, str]] = {
    "png": ("png", "image/png"),
    "jpeg": ("jpg", "image/jpeg"),
    "jpg": ("jpg", "image/jpeg"),
    "webp": ("webp", "image/webp"),
}
JSON_CONTENT_TYPE = "application/json"


def _shown(value: object) -> str:
    shown = repr(value)
    return shown if len(shown) <= 80 else shown[:77] + "..."


def validate_key(key: object) -> str:
    """Return ``key`` if it is a safe relative key, else raise :class:`NotFoundError`.

    Rejects: non-strings, empty keys, over-long keys, absolute paths, backslashes, NUL, any
    character outside ``[A-Za-z0-9._/-]``, and empty, ``.`` or ``..`` segments
    (``a//b``, ``a/./b``, ``a/../b``, trailing ``/``).
    """
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH:
        raise NotFoundError(f"no such object: {_shown(key)}")
    # fullmatch, not match + "$": "$" also matches before a trailing newline.
    if not _KEY_CHARS.fullmatch(key):
        raise NotFoundError(f"no such object: {_shown(key)}")
    for segment in key.split("/"):  # a leading "/" gives an empty first segment
        if segment in ("", ".", ".."):
            raise NotFoundError(f"no such object: {_shown(key)}")
    return key


def is_valid_job_id(job_id: object) -> bool:
    """Whether ``job_id`` could name a job (``[A-Za-z0-9_-]{1,64}``)."""
    return isinstance(job_id, str) and _JOB_ID.fullmatch(job_id) is not None


def job_key(job_id: str) -> str:
    """The key of a job record. An id that cannot exist raises :class:`NotFoundError`."""
    if not is_valid_job_id(job_id):
        raise NotFoundError(f"no such job: {_shown(job_id)}")
    return f"jobs/{job_id}.json"


def image_format(output_format: str) -> tuple[str, str]:
    """``(extension, content_type)`` for an output format name (``png``, ``jpeg``, ``webp``)."""
    fmt = output_format.lower() if isinstance(output_format, str) else output_format
    if fmt not in IMAGE_FORMATS:
        raise InvalidRequestError(
            "output_format", output_format, f"must be one of {sorted(set(IMAGE_FORMATS) - {'jpg'})}"
        )
    return IMAGE_FORMATS[fmt]


def new_image_key(extension: str, *, now: _dt.datetime | None = None) -> str:
    """A fresh server-made key ``images/YYYY/MM/DD/<uuid4hex>.<ext>`` (UTC date).

    Date folders keep listings and lifecycle rules cheap; the uuid makes keys unguessable and
    collision-free without any coordination between replicas.
    """
    now = now or _dt.datetime.now(_dt.timezone.utc)
    return f"images/{now:%Y/%m/%d}/{uuid.uuid4().hex}.{extension}"


def result_image_key(result_id: str, index: int, extension: str, created: float) -> str:
    """Image ``index`` of the request whose results are ``result_id``:
    ``images/YYYY/MM/DD/<result_id>-<index>.<ext>``, the date from the request's ``created`` time.

    The same request gives the same key on every try (a retried decode, a resumed job), so a
    create-if-absent write stores each image once. ``result_id`` is server-made (a uuid or a job
    id), never the client's X-Request-Id: clients must not be able to aim at each other's keys.
    """
    if not is_valid_job_id(result_id):
        raise InvalidRequestError("result_id", result_id, "must match [A-Za-z0-9_-]{1,64}")
    day = _dt.datetime.fromtimestamp(created, _dt.timezone.utc)
    return f"images/{day:%Y/%m/%d}/{result_id}-{int(index)}.{extension}"


def metadata_key_for(image_key: str) -> str:
    """The metadata key beside an image: same stem, ``.json``."""
    stem, _, _ = image_key.rpartition(".")
    return f"{stem}.json"


def guess_content_type(key: str) -> str:
    """Content type from a key's extension, for serving files; unknown -> octet-stream."""
    guessed, _ = mimetypes.guess_type(key, strict=False)
    return guessed or "application/octet-stream"


@dataclass(frozen=True)
class StoredImage:
    """Where :meth:`ResultStore.save_image` put an image and its metadata."""

    key: str
    metadata_key: str
    content_type: str
    size_bytes: int


class ResultStore(abc.ABC):
    """A flat key -> bytes store for images, their metadata and job records.

    Public methods validate keys and hold the shared logic (JSON, image naming and ordering,
    job records); backends implement only the ``_``-prefixed primitives, which receive keys
    already validated. Methods are blocking; call them from a thread in async code.
    """

    # --- backend primitives -------------------------------------------------------------
    @abc.abstractmethod
    def _put(self, key: str, data: bytes, content_type: str) -> None: ...

    @abc.abstractmethod
    def _get(self, key: str) -> bytes:
        """Return the object's bytes; raise NotFoundError when it does not exist."""

    @abc.abstractmethod
    def _exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def _delete(self, key: str) -> None:
        """Delete the object; deleting a missing object is not an error (as in S3)."""

    @abc.abstractmethod
    def _url(self, key: str) -> str: ...

    @abc.abstractmethod
    def _put_if_absent(self, key: str, data: bytes, content_type: str) -> bool:
        """Create the object only if no object has the key; False when one already does."""

    @abc.abstractmethod
    def check(self) -> None:
        """Raise :class:`StorageError` unless the store can take writes now (readiness probes)."""

    def _list(self, prefix: str) -> list[str]:
        """Keys under ``prefix`` (a folder, ending in ``/``), sorted. Backends that can list override it."""
        raise NotImplementedError(f"{type(self).__name__} cannot list keys")

    # --- public API ---------------------------------------------------------------------
    def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        """Store ``data`` under ``key``, replacing any previous object."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"data must be bytes, not {type(data).__name__}")
        self._put(validate_key(key), bytes(data), content_type)

    def get_bytes(self, key: str) -> bytes:
        """The object's bytes; :class:`NotFoundError` if missing or the key is invalid."""
        return self._get(validate_key(key))

    def exists(self, key: str) -> bool:
        """Whether an object exists; an invalid key simply does not."""
        try:
            valid = validate_key(key)
        except NotFoundError:
            return False
        return self._exists(valid)

    def delete(self, key: str) -> None:
        """Delete an object; a missing one is fine (idempotent, like S3)."""
        self._delete(validate_key(key))

    def url(self, key: str) -> str:
        """A URL a client can fetch the object from (see the backend for its form)."""
        return self._url(validate_key(key))

    def put_json(self, key: str, obj: dict[str, Any]) -> None:
        """Store a dict as UTF-8 JSON. Values json cannot encode raise TypeError (a bug)."""
        if not isinstance(obj, dict):
            raise TypeError(f"obj must be a dict, not {type(obj).__name__}")
        data = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        self.put_bytes(key, data, JSON_CONTENT_TYPE)

    def list_keys(self, prefix: str) -> list[str]:
        """Keys of the objects under the folder ``prefix`` (e.g. ``jobs/active/``), sorted."""
        if not prefix.endswith("/"):
            raise ValueError(f"prefix must name a folder (end with '/'), got {prefix!r}")
        validate_key(prefix.rstrip("/"))
        return self._list(prefix)

    def put_json_if_absent(self, key: str, obj: dict[str, Any]) -> bool:
        """Atomically create a JSON object unless the key exists (a claim: one caller wins)."""
        data = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        return self._put_if_absent(validate_key(key), data, JSON_CONTENT_TYPE)

    def get_json(self, key: str) -> dict[str, Any]:
        """Load a JSON object; a corrupt one is a (non-transient) :class:`StorageError`."""
        data = self.get_bytes(key)
        try:
            obj = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StorageError(f"stored JSON {key!r} is corrupt: {exc}", transient=False) from exc
        if not isinstance(obj, dict):
            raise StorageError(f"stored JSON {key!r} is not an object", transient=False)
        return obj

    def save_image(
        self, data: bytes, output_format: str, metadata: dict[str, Any], *, key: str | None = None
    ) -> StoredImage:
        """Store an encoded image with its metadata beside it: under a fresh server-made key, or
        under ``key`` (:func:`result_image_key`) written only if absent.

        Metadata goes first and the image second, so a crash between the two leaves at worst an
        orphan ``.json`` (harmless, easy to sweep), never an image without its metadata. If the
        image write fails we try to remove the metadata too and raise :class:`StorageError`.

        With ``key``, both writes are create-if-absent: a second call for the same key (the same
        request tried again) finds the first call's objects and stores nothing twice.
        """
        extension, content_type = image_format(output_format)
        once = key is not None
        if key is None:
            key = new_image_key(extension)
        elif not key.endswith("." + extension):
            raise ValueError(f"key {key!r} does not end in .{extension}")
        key = validate_key(key)
        meta_key = metadata_key_for(key)
        # A False from a create-if-absent write: an earlier try of this request stored it already.
        if once:
            fresh_meta = self.put_json_if_absent(meta_key, metadata)
        else:
            self.put_json(meta_key, metadata)
            fresh_meta = True
        try:
            if once:
                self._put_if_absent(key, bytes(data), content_type)
            else:
                self.put_bytes(key, data, content_type)
        except BaseException as exc:
            if fresh_meta:
                self._discard_after_failure(meta_key)
            if isinstance(exc, StorageError) or not isinstance(exc, Exception):
                raise  # already typed, or a cancellation / interrupt that must propagate as is
            raise StorageError(f"could not store image {key}: {exc}", transient=False) from exc
        logger.debug("stored image %s (%d bytes) with metadata %s", key, len(data), meta_key)
        return StoredImage(key=key, metadata_key=meta_key, content_type=content_type, size_bytes=len(data))

    def _discard_after_failure(self, key: str) -> None:
        try:
            self._delete(key)
        except Exception:  # the original failure matters more; leave an orphan behind
            logger.warning("could not remove %s after a failed image write", key, exc_info=True)

    def put_job(self, job_id: str, record: dict[str, Any]) -> None:
        """Store (or replace) a job record at ``jobs/<job_id>.json``."""
        if not is_valid_job_id(job_id):
            raise InvalidRequestError("job_id", job_id, "must match [A-Za-z0-9_-]{1,64}")
        self.put_json(job_key(job_id), record)

    def get_job(self, job_id: str) -> dict[str, Any]:
        """A job record; :class:`NotFoundError` for unknown or impossible ids."""
        key = job_key(job_id)
        try:
            return self.get_json(key)
        except NotFoundError:
            raise NotFoundError(f"no such job: {_shown(job_id)}") from None
