"""Model repositories under ``s3://bucket/prefix``: downloaded once per content into a local cache.

The cache folder is named by a digest of the listing (every key, size and ETag under the
prefix), so a changed repository is fetched again and an unchanged one never is — whatever
files happen to exist locally. Download goes to a temporary folder renamed into place, so
concurrent replicas on one node never see a half-written repository.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from serve.errors import ModelLoadError, ModelNotFoundError, NotFoundError
from serve.storage.base import validate_key

logger = logging.getLogger(__name__)
COMPLETE = ".darkroom-complete"


def fetch_s3_repository(uri: str, cache_dir: str | os.PathLike[str]) -> Path:
    """The local copy of the repository at ``uri`` (downloading it if this content is new)."""
    import boto3
    import botocore.config
    from botocore import exceptions as bexc

    parts = urlsplit(uri)
    bucket, prefix = parts.netloc, parts.path.strip("/")
    if not bucket or not prefix:
        raise ModelNotFoundError("model", uri, "an s3 model repository is s3://bucket/prefix")
    config = botocore.config.Config(signature_version="s3v4", retries={"mode": "standard", "max_attempts": 5})
    client = boto3.session.Session().client("s3", config=config)
    try:
        objects = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
            objects += [o for o in page.get("Contents", []) if not o["Key"].endswith("/")]
    except (bexc.BotoCoreError, bexc.ClientError) as exc:
        raise ModelLoadError(f"cannot list model repository {uri}: {exc}") from exc
    if not objects:
        raise ModelNotFoundError("model", uri, "no objects under this s3 prefix")
    listing = sorted((o["Key"], o["Size"], o.get("ETag", "")) for o in objects)
    digest = hashlib.sha256(repr(listing).encode()).hexdigest()[:20]
    dest = Path(cache_dir).expanduser() / "repositories" / f"{bucket}-{digest}"
    if (dest / COMPLETE).is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        for key, size, _ in listing:
            rel = key[len(prefix) + 1 :]
            try:
                validate_key(rel)  # no "..", no absolute paths: the repository stays in its folder
            except NotFoundError:
                raise ModelLoadError(f"refusing object with an unsafe name in {uri}: {key!r}") from None
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, key, str(target))
            logger.info("fetched s3://%s/%s (%d bytes)", bucket, key, size)
        (tmp / COMPLETE).write_text(uri)
        try:
            os.replace(tmp, dest)
        except OSError:  # another replica finished first: use its copy
            shutil.rmtree(tmp, ignore_errors=True)
    except (bexc.BotoCoreError, bexc.ClientError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelLoadError(f"cannot download model repository {uri}: {exc}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
