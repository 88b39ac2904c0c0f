"""S3 result store against moto's S3 server on loopback (the real HTTP protocol, no mocks)."""

from __future__ import annotations

import json
import socket
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import botocore.config
import botocore.exceptions
import httpx
import pytest
from botocore.stub import Stubber

from serve.errors import NotFoundError, StorageError
from serve.storage import S3Store, open_store

pytestmark = pytest.mark.integration

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8


def split_uri(uri: str) -> tuple[str, str]:
    parts = urlsplit(uri)
    return parts.netloc, parts.path.strip("/")


def test_open_store_s3_uses_prefix(s3_bucket: str, s3_client: Any) -> None:
    bucket, prefix = split_uri(s3_bucket)
    store = open_store(s3_bucket)
    assert isinstance(store, S3Store)
    store.put_bytes("a/b.txt", b"hello", "text/plain")
    obj = s3_client.get_object(Bucket=bucket, Key=f"{prefix}/a/b.txt")
    assert obj["Body"].read() == b"hello"
    assert obj["ContentType"] == "text/plain"
    assert store.get_bytes("a/b.txt") == b"hello"
    assert store.exists("a/b.txt")
    assert not store.exists("a/c.txt")
    store.delete("a/b.txt")
    store.delete("a/b.txt")  # idempotent
    assert not store.exists("a/b.txt")


def test_save_image_writes_both_objects(s3_bucket: str, s3_client: Any) -> None:
    bucket, prefix = split_uri(s3_bucket)
    store = open_store(s3_bucket)
    meta = {"prompt": "a lighthouse", "seed": 1234, "steps": 4}
    stored = store.save_image(PNG, "png", meta)

    listed = s3_client.list_objects_v2(Bucket=bucket)
    keys = sorted(item["Key"] for item in listed.get("Contents", []))
    assert keys == sorted([f"{prefix}/{stored.key}", f"{prefix}/{stored.metadata_key}"])

    image = s3_client.get_object(Bucket=bucket, Key=f"{prefix}/{stored.key}")
    assert image["Body"].read() == PNG
    assert image["ContentType"] == "image/png"
    assert stored.size_bytes == len(PNG)

    raw_meta = s3_client.get_object(Bucket=bucket, Key=f"{prefix}/{stored.metadata_key}")
    assert raw_meta["ContentType"] == "application/json"
    assert json.loads(raw_meta["Body"].read()) == meta


def test_failed_image_put_removes_metadata(s3_bucket: str, s3_client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    bucket, _ = split_uri(s3_bucket)
    store = open_store(s3_bucket)
    assert isinstance(store, S3Store)
    real_put = store.client.put_object

    def put_object(**kwargs: Any) -> Any:
        if kwargs["Key"].endswith(".webp"):
            # The same request sent to a bucket that does not exist: a real S3 error response.
            return real_put(**{**kwargs, "Bucket": "no-such-bucket-here"})
        return real_put(**kwargs)

    monkeypatch.setattr(store.client, "put_object", put_object)
    with pytest.raises(StorageError) as info:
        store.save_image(PNG, "webp", {"seed": 1})
    assert info.value.transient is False
    assert s3_client.list_objects_v2(Bucket=bucket).get("KeyCount") == 0


def test_presigned_url_serves_image(s3_bucket: str, s3_server: str) -> None:
    store = open_store(s3_bucket, url_expiry_s=900)
    stored = store.save_image(PNG, "jpeg", {"seed": 3})
    url = store.url(stored.key)

    parts = urlsplit(url)
    assert url.startswith(s3_server)
    query = parse_qs(parts.query)
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]  # SigV4, not SigV2's "Signature="
    assert query["X-Amz-Expires"] == ["900"]
    assert "X-Amz-Signature" in query
    assert parts.path.endswith(f"/results/{stored.key}")

    response = httpx.get(url, timeout=10.0)
    assert response.status_code == 200
    assert response.content == PNG
    assert response.headers["content-type"] == "image/jpeg"


def test_presigning_needs_no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    # Port 9 (discard) on loopback: nothing listens, so any request would fail.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    store = open_store("s3://offline-bucket/p", url_expiry_s=60)
    start = time.monotonic()
    url = store.url("images/2024/01/01/abc.png")
    assert time.monotonic() - start < 2.0
    query = parse_qs(urlsplit(url).query)
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    assert query["X-Amz-Expires"] == ["60"]


def test_job_round_trip(s3_bucket: str, s3_client: Any) -> None:
    bucket, prefix = split_uri(s3_bucket)
    store = open_store(s3_bucket)
    store.put_job("job_42", {"status": "running", "progress": 0.5})
    assert store.get_job("job_42") == {"status": "running", "progress": 0.5}
    store.put_job("job_42", {"status": "succeeded"})
    assert store.get_job("job_42") == {"status": "succeeded"}
    raw = s3_client.get_object(Bucket=bucket, Key=f"{prefix}/jobs/job_42.json")
    assert json.loads(raw["Body"].read()) == {"status": "succeeded"}
    with pytest.raises(NotFoundError):
        store.get_job("job_43")
    with pytest.raises(NotFoundError):
        store.get_job("../results/jobs/job_42")


def test_missing_key_is_not_found(s3_bucket: str) -> None:
    store = open_store(s3_bucket)
    with pytest.raises(NotFoundError):
        store.get_bytes("images/2024/01/01/missing.png")
    with pytest.raises(NotFoundError):
        store.get_json("nothing.json")
    with pytest.raises(NotFoundError):
        store.get_bytes("../escape")  # never reaches S3


def test_check_passes_for_existing_bucket(s3_bucket: str) -> None:
    open_store(s3_bucket).check()


def test_missing_bucket_is_permanent_error(s3_bucket: str) -> None:
    store = open_store("s3://bucket-that-does-not-exist/x")
    with pytest.raises(StorageError) as info:
        store.check()
    assert info.value.transient is False
    with pytest.raises(StorageError) as info:
        store.put_bytes("a.txt", b"x", "text/plain")
    assert info.value.transient is False
    assert not isinstance(info.value, NotFoundError)


def test_stopped_server_is_transient_error(s3_bucket: str, moto_server: Any) -> None:
    fast = botocore.config.Config(connect_timeout=1, read_timeout=2, retries={"max_attempts": 1})
    bucket, prefix = split_uri(s3_bucket)
    store = S3Store(bucket, prefix, botocore_config=fast)
    stored = store.save_image(PNG, "png", {"seed": 9})

    moto_server.stop()
    try:
        start = time.monotonic()
        for call in (
            lambda: store.get_bytes(stored.key),
            lambda: store.put_bytes("x.bin", b"x", "application/octet-stream"),
            lambda: store.exists(stored.key),
            store.check,
        ):
            with pytest.raises(StorageError) as info:
                call()
            assert info.value.transient is True
            assert isinstance(info.value.__cause__, botocore.exceptions.EndpointConnectionError)
        assert time.monotonic() - start < 10.0
    finally:
        moto_server.start()

    # The outage lost nothing: moto's state lives in this process.
    assert store.get_bytes(stored.key) == PNG
    store.check()


def test_unresponsive_server_is_transient_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # A socket that listens but never answers: the kernel completes the connection, the
    # request goes out, and no response ever comes back -> a read timeout.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{silent.getsockname()[1]}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        store = S3Store("some-bucket", "p", max_attempts=0, connect_timeout=1, read_timeout=0.5)
        with pytest.raises(StorageError) as info:
            store.get_bytes("a.png")
    assert info.value.transient is True
    assert isinstance(info.value.__cause__, botocore.exceptions.ReadTimeoutError)


def test_user_config_keeps_sigv4_and_standard_retries() -> None:
    user = botocore.config.Config(signature_version="s3", retries={"max_attempts": 2})
    store = S3Store("some-bucket", "p", botocore_config=user)
    config = store.client.meta.config
    assert config.signature_version == "s3v4"
    # botocore's max_attempts counts retries: 2 retries = 3 attempts in all.
    assert config.retries == {"mode": "standard", "total_max_attempts": 3}
    default = S3Store("some-bucket").client.meta.config
    assert default.retries["mode"] == "standard"
    assert default.connect_timeout and default.read_timeout


@pytest.mark.parametrize(
    "code, status, expected",
    [
        ("NoSuchKey", 404, NotFoundError),
        ("SlowDown", 503, "transient"),
        ("InternalError", 500, "transient"),
        ("ServiceUnavailable", 503, "transient"),
        ("Throttling", 400, "transient"),
        ("AccessDenied", 403, "permanent"),
        ("NoSuchBucket", 404, "permanent"),
        ("InvalidAccessKeyId", 403, "permanent"),
    ],
)
def test_client_error_mapping(code: str, status: int, expected: object) -> None:
    store = S3Store("some-bucket", "p")
    with Stubber(store.client) as stub:
        stub.add_client_error("get_object", service_error_code=code, http_status_code=status)
        if expected is NotFoundError:
            with pytest.raises(NotFoundError):
                store.get_bytes("a.png")
            return
        with pytest.raises(StorageError) as info:
            store.get_bytes("a.png")
    assert info.value.transient is (expected == "transient")
    assert code in info.value.message
