"""The adapter repository: a folder or ``s3://bucket/prefix`` of ``<name>.safetensors`` files.

Listed on demand, so a file dropped in is usable without a restart: the listing is reused for
``ttl_s`` seconds (``listing_is_stale``, a pure function of the time), and a name the listing
lacks relists at once unless the listing is younger than ``miss_ttl_s`` (so a burst of requests
for a missing name costs one listing, not one each). Each adapter has a *version* -- its ETag on
S3, its size and mtime in a folder -- so a replaced file is a new adapter to every cache keyed by
it. S3 adapters are downloaded once per ETag into the cache folder (temporary file, then rename,
like model repositories); headers are read with a ranged GET, without the weights.

Ray-free and torch-free: the Ingress lists and checks adapters with it; the stages fetch files.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from serve.errors import InvalidRequestError, ModelLoadError
from serve.lora.files import Header, HeaderError, header_length, parse_header, read_header

logger = logging.getLogger(__name__)

SUFFIX = ".safetensors"


@dataclass(frozen=True)
class AdapterEntry:
    """One adapter file: its name (the file's stem), where it is, its size and version."""

    name: str
    location: str  # a local path or an S3 key
    size: int
    version: str  # ETag (S3) or "<mtime_ns>-<size>" (folder): changes when the file does


def listing_is_stale(listed_at: float | None, now: float, *, ttl_s: float, missing: bool, miss_ttl_s: float) -> bool:
    """Whether to list again: never listed, older than ``ttl_s``, or (looking for a name the listing
    lacks) older than ``miss_ttl_s``. Worked example with ttl 5 s, miss 0.5 s: a name dropped in
    at t=0 after a listing at t=0 is found by the first request for it after t=0.5."""
    if listed_at is None:
        return True
    age = now - listed_at
    return age >= ttl_s or (missing and age >= miss_ttl_s)


class LoraRepository:
    """Lists adapters and gives each one's header and local file."""

    def __init__(
        self,
        uri: str,
        cache_dir: str | os.PathLike[str] | None = None,
        *,
        ttl_s: float = 5.0,
        miss_ttl_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.uri = str(uri)
        self.ttl_s = ttl_s
        self.miss_ttl_s = miss_ttl_s
        self.clock = clock
        self._entries: dict[str, AdapterEntry] = {}
        self._listed_at: float | None = None
        self._headers: dict[tuple[str, str], Header] = {}
        self._lock = threading.Lock()
        self.listings = 0  # how often the repository was listed (tests)
        if self.uri.startswith("s3://"):
            parts = urlsplit(self.uri)
            self.bucket, self.prefix = parts.netloc, parts.path.strip("/")
            if not self.bucket:
                raise ModelLoadError(f"an s3 adapter repository is s3://bucket[/prefix], not {self.uri}")
            if cache_dir is None:
                from serve.settings import Settings

                cache_dir = Settings.from_env().cache_dir
            self.cache = Path(cache_dir).expanduser() / "loras"
            self.folder: Path | None = None
        else:
            path = self.uri[len("file://") :] if self.uri.startswith("file://") else self.uri
            self.folder = Path(path).expanduser().resolve()
            if not self.folder.is_dir():
                raise ModelLoadError(f"adapter repository {self.uri} is not a folder")
            self.bucket = self.prefix = ""
            self.cache = self.folder

    def __repr__(self) -> str:
        return f"LoraRepository({self.uri})"

    # -- listing ---------------------------------------------------------------------------------
    def _client(self):
        import boto3
        import botocore.config

        config = botocore.config.Config(signature_version="s3v4", retries={"mode": "standard", "max_attempts": 5})
        return boto3.session.Session().client("s3", config=config)

    def _list(self) -> dict[str, AdapterEntry]:
        found: dict[str, AdapterEntry] = {}
        if self.folder is not None:
            with os.scandir(self.folder) as it:
                for e in it:
                    if e.name.endswith(SUFFIX) and not e.name.startswith(".") and e.is_file():
                        st = e.stat()
                        name = e.name[: -len(SUFFIX)]
                        found[name] = AdapterEntry(name, e.path, st.st_size, f"{st.st_mtime_ns}-{st.st_size}")
            return found
        from botocore import exceptions as bexc

        prefix = f"{self.prefix}/" if self.prefix else ""
        try:
            for page in self._client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                for o in page.get("Contents", []):
                    rel = o["Key"][len(prefix) :]
                    if "/" in rel or not rel.endswith(SUFFIX) or rel.startswith("."):
                        continue  # adapters sit directly under the prefix
                    name = rel[: -len(SUFFIX)]
                    found[name] = AdapterEntry(name, o["Key"], int(o["Size"]), str(o.get("ETag", "")).strip('"'))
        except (bexc.BotoCoreError, bexc.ClientError) as exc:
            raise ModelLoadError(f"cannot list adapter repository {self.uri}: {exc}") from exc
        return found

    def entries(self, *, missing: bool = False) -> dict[str, AdapterEntry]:
        """Every adapter by name (relisting per ``listing_is_stale``)."""
        now = self.clock()
        with self._lock:
            stale = listing_is_stale(
                self._listed_at, now, ttl_s=self.ttl_s, missing=missing, miss_ttl_s=self.miss_ttl_s
            )
        if stale:
            listed = self._list()
            with self._lock:
                self._entries, self._listed_at = listed, now
                self.listings += 1
        with self._lock:
            return dict(self._entries)

    def entry(self, name: str, field_name: str = "loras[0].name") -> AdapterEntry:
        """The adapter called ``name``; a 400 naming ``field_name`` when there is none."""
        found = self.entries().get(name)
        if found is None:
            found = self.entries(missing=True).get(name)
        if found is None:
            raise InvalidRequestError(field_name, name, f"no adapter of that name in {self.uri}")
        return found

    # -- reading ---------------------------------------------------------------------------------
    def header(self, entry: AdapterEntry) -> Header:
        """The adapter's safetensors header (S3: a ranged GET, not the whole file), cached per version."""
        key = (entry.name, entry.version)
        with self._lock:
            cached = self._headers.get(key)
        if cached is not None:
            return cached
        try:
            if self.folder is not None:
                with open(entry.location, "rb") as f:
                    header = read_header(f)
            else:
                header = self._s3_header(entry)
        except HeaderError as exc:
            raise InvalidRequestError("loras", entry.name, f"adapter file is unreadable: {exc}") from None
        with self._lock:
            self._headers[key] = header
        return header

    def _s3_header(self, entry: AdapterEntry) -> Header:
        from botocore import exceptions as bexc

        client = self._client()
        try:
            first = client.get_object(Bucket=self.bucket, Key=entry.location, Range="bytes=0-7")["Body"].read()
            n = header_length(first)
            raw = client.get_object(Bucket=self.bucket, Key=entry.location, Range=f"bytes=8-{7 + n}")["Body"].read()
        except (bexc.BotoCoreError, bexc.ClientError) as exc:
            raise ModelLoadError(f"cannot read adapter {entry.name} from {self.uri}: {exc}") from exc
        return parse_header(raw)

    def local_path(self, entry: AdapterEntry) -> Path:
        """A local file with the adapter's bytes: the file itself, or the S3 object downloaded once
        per ETag into the cache folder."""
        if self.folder is not None:
            return Path(entry.location)
        from botocore import exceptions as bexc

        digest = hashlib.sha256(f"{self.bucket}/{entry.location}\0{entry.version}".encode()).hexdigest()[:24]
        dest = self.cache / f"{entry.name}-{digest}{SUFFIX}"
        if dest.is_file() and dest.stat().st_size == entry.size:
            return dest
        self.cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=self.cache)
        os.close(fd)
        try:
            self._client().download_file(self.bucket, entry.location, tmp)
            os.replace(tmp, dest)  # atomic: a concurrent replica sees the old name or the whole file
        except (bexc.BotoCoreError, bexc.ClientError) as exc:
            raise ModelLoadError(f"cannot download adapter {entry.name} from {self.uri}: {exc}") from exc
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        logger.info("fetched adapter %s (%d bytes) from %s", entry.name, entry.size, self.uri)
        return dest


__all__ = ["SUFFIX", "AdapterEntry", "LoraRepository", "listing_is_stale"]
