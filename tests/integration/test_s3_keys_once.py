"""Result-store operations the leases and the idempotent decode rely on, on the S3 protocol
(moto's server): a key written only if absent, and listing a folder."""

from __future__ import annotations

from typing import Any

import pytest

from serve.storage import open_store
from serve.storage.base import result_image_key

pytestmark = pytest.mark.integration


def test_save_image_under_a_result_key_stores_once(s3_bucket: str, s3_client: Any) -> None:
    store = open_store(s3_bucket)
    key = result_image_key("job42", 0, "png", 1_700_000_000)
    first = store.save_image(b"first", "png", {"try": 1}, key=key)
    second = store.save_image(b"second", "png", {"try": 2}, key=key)  # the same request, tried again
    assert first.key == second.key == key
    bucket, prefix = s3_bucket.removeprefix("s3://").split("/", 1)
    assert s3_client.get_object(Bucket=bucket, Key=f"{prefix}/{key}")["Body"].read() == b"first"
    assert store.get_json(first.metadata_key) == {"try": 1}


def test_list_keys_lists_one_folder(s3_bucket: str) -> None:
    store = open_store(s3_bucket)
    for name in ("b", "a"):
        store.put_json(f"jobs/active/{name}.json", {})
    store.put_json("jobs/active/nested/c.json", {})
    store.put_json("jobs/other.json", {})
    assert store.list_keys("jobs/active/") == ["jobs/active/a.json", "jobs/active/b.json"]
    assert store.list_keys("jobs/none/") == []
