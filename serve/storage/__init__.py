"""Result storage: generated images, their metadata and async job records.

``open_store(uri)`` picks the backend from a URI: a path or ``file://...`` (local folder,
the default ``./outputs``) or ``s3://bucket/prefix`` (S3 via boto3).
"""

from serve.storage.base import (
    IMAGE_FORMATS,
    ResultStore,
    StoredImage,
    guess_content_type,
    is_valid_job_id,
    validate_key,
)
from serve.storage.factory import open_store
from serve.storage.local import LocalStore
from serve.storage.s3 import S3Store, default_botocore_config

__all__ = [
    "IMAGE_FORMATS",
    "LocalStore",
    "ResultStore",
    "S3Store",
    "StoredImage",
    "default_botocore_config",
    "guess_content_type",
    "is_valid_job_id",
    "open_store",
    "validate_key",
]
