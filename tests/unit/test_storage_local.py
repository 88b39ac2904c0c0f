"""Local result store: round-trips, key safety, metadata-before-image, jobs, URI parsing."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import pytest

from serve.errors import InvalidRequestError, NotFoundError, StorageError
from serve.storage import (
    LocalStore,
    ResultStore,
    S3Store,
    StoredImage,
    guess_content_type,
    is_valid_job_id,
    open_store,
    validate_key,
)

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "outputs")


def all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# --- round trips ------------------------------------------------------------------------


def test_bytes_round_trip_creates_folders(store: LocalStore) -> None:
    store.put_bytes("a/b/c/blob.bin", b"\x00\x01hello", "application/octet-stream")
    assert store.get_bytes("a/b/c/blob.bin") == b"\x00\x01hello"
    assert (store.root / "a/b/c/blob.bin").read_bytes() == b"\x00\x01hello"
    assert store.exists("a/b/c/blob.bin")
    assert not store.exists("a/b/c/other.bin")
    assert not store.exists("a/b")  # a folder is not an object


def test_put_replaces_atomically_and_leaves_no_temp_files(store: LocalStore) -> None:
    store.put_bytes("x.txt", b"one", "text/plain")
    store.put_bytes("x.txt", b"two", "text/plain")
    assert store.get_bytes("x.txt") == b"two"
    assert all_files(store.root) == ["x.txt"]


def test_failed_write_leaves_no_temp_file(store: LocalStore, monkeypatch: pytest.MonkeyPatch) -> None:
    store.put_bytes("x.txt", b"old", "text/plain")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(StorageError) as info:
        store.put_bytes("x.txt", b"new", "text/plain")
    assert info.value.transient is True
    assert store.get_bytes("x.txt") == b"old"
    assert all_files(store.root) == ["x.txt"]


def test_get_missing_raises_not_found(store: LocalStore) -> None:
    with pytest.raises(NotFoundError):
        store.get_bytes("images/2024/01/01/nothere.png")
    store.put_bytes("dir/file.png", PNG, "image/png")
    with pytest.raises(NotFoundError):
        store.get_bytes("dir")  # a folder
    with pytest.raises(NotFoundError):
        store.get_bytes("dir/file.png/child")  # below a file


def test_delete_is_idempotent(store: LocalStore) -> None:
    store.put_bytes("k.bin", b"1", "application/octet-stream")
    store.delete("k.bin")
    assert not store.exists("k.bin")
    store.delete("k.bin")  # second delete: no error, as in S3
    with pytest.raises(NotFoundError):
        store.get_bytes("k.bin")


def test_json_round_trip(store: LocalStore) -> None:
    obj = {"prompt": "a café at night ☕", "seed": 42, "nested": {"steps": [1, 2]}, "none": None}
    store.put_json("meta/x.json", obj)
    assert store.get_json("meta/x.json") == obj


def test_corrupt_json_is_permanent_storage_error(store: LocalStore) -> None:
    store.put_bytes("bad.json", b"{not json", "application/json")
    store.put_bytes("list.json", b"[1, 2]", "application/json")
    for key in ("bad.json", "list.json"):
        with pytest.raises(StorageError) as info:
            store.get_json(key)
        assert info.value.transient is False


def test_put_bytes_rejects_non_bytes(store: LocalStore) -> None:
    with pytest.raises(TypeError):
        store.put_bytes("a.txt", "text", "text/plain")  # type: ignore[arg-type]


# --- key validation ---------------------------------------------------------------------

BAD_KEYS = [
    "",
    "../x",
    "..",
    ".",
    "./x",
    "a/../../b",
    "a/..",
    "a/./b",
    "/etc/passwd",
    "//etc/passwd",
    "a\\b",
    "..\\..\\windows",
    "a//b",
    "a/",
    "%2e%2e/x",
    "%2e%2e%2fx",
    "a b",
    "a\x00b",
    "a\nb",
    "x.png\n",
    "images/ünïcode.png",
    "C:/x",
    "a?b",
    "a#b",
    "~/x",
    "x" * 513,
    None,
    b"bytes",
    123,
]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_bad_keys_are_not_found_everywhere(store: LocalStore, key: object) -> None:
    with pytest.raises(NotFoundError):
        validate_key(key)
    with pytest.raises(NotFoundError):
        store.get_bytes(key)  # type: ignore[arg-type]
    with pytest.raises(NotFoundError):
        store.put_bytes(key, b"x", "text/plain")  # type: ignore[arg-type]
    with pytest.raises(NotFoundError):
        store.delete(key)  # type: ignore[arg-type]
    with pytest.raises(NotFoundError):
        store.url(key)  # type: ignore[arg-type]
    with pytest.raises(NotFoundError):
        store.get_json(key)  # type: ignore[arg-type]
    assert store.exists(key) is False  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "key", ["a", "a.png", "images/2024/05/06/0123abcd.png", "x-y_z/.hidden", "a..b/c...d", "A/B/C.JSON"]
)
def test_good_keys_pass(key: str) -> None:
    assert validate_key(key) == key


def test_traversal_cannot_read_outside_root(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    store = LocalStore(tmp_path / "outputs")
    store.put_bytes("ok.txt", b"ok", "text/plain")
    for key in ["../secret.txt", "a/../../secret.txt", str(secret), "%2e%2e/secret.txt"]:
        with pytest.raises(NotFoundError):
            store.get_bytes(key)
    assert secret.read_text() == "top secret"


def test_symlink_escaping_root_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("top secret")
    store = LocalStore(tmp_path / "outputs")
    store.root.mkdir()
    (store.root / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(NotFoundError):
        store.get_bytes("link/secret.txt")
    with pytest.raises(NotFoundError):
        store.put_bytes("link/new.txt", b"x", "text/plain")
    assert not store.exists("link/secret.txt")
    assert not (outside / "new.txt").exists()


def test_job_id_pattern() -> None:
    assert is_valid_job_id("job_ABC-123")
    assert is_valid_job_id("a" * 64)
    for bad in ["", "a" * 65, "../x", "a/b", "a.b", "a b", "a\n", None, 5]:
        assert not is_valid_job_id(bad)


# --- images ------------------------------------------------------------------------------

IMAGE_KEY = re.compile(r"images/\d{4}/\d{2}/\d{2}/[0-9a-f]{32}\.(png|jpg|webp)")


@pytest.mark.parametrize(
    "fmt, ext, content_type",
    [("png", "png", "image/png"), ("jpeg", "jpg", "image/jpeg"), ("WEBP", "webp", "image/webp")],
)
def test_save_image_writes_image_and_metadata(store: LocalStore, fmt: str, ext: str, content_type: str) -> None:
    meta = {"prompt": "a red fox", "seed": 7, "model": "tiny"}
    stored = store.save_image(PNG, fmt, meta)
    assert isinstance(stored, StoredImage)
    assert IMAGE_KEY.fullmatch(stored.key), stored.key
    assert stored.key.endswith("." + ext)
    assert stored.metadata_key == stored.key.rsplit(".", 1)[0] + ".json"
    assert stored.content_type == content_type
    assert stored.size_bytes == len(PNG)
    assert store.get_bytes(stored.key) == PNG
    assert store.get_json(stored.metadata_key) == meta
    assert all_files(store.root) == sorted([stored.key, stored.metadata_key])
    with pytest.raises(AttributeError):
        stored.key = "other"  # type: ignore[misc]  # frozen


def test_save_image_keys_are_unique(store: LocalStore) -> None:
    keys = {store.save_image(b"x", "png", {}).key for _ in range(20)}
    assert len(keys) == 20


def test_save_image_rejects_unknown_format(store: LocalStore) -> None:
    with pytest.raises(InvalidRequestError) as info:
        store.save_image(PNG, "gif", {})
    assert info.value.field == "output_format"
    assert not store.root.exists() or all_files(store.root) == []


def test_metadata_is_written_before_image(store: LocalStore, monkeypatch: pytest.MonkeyPatch) -> None:
    order: list[str] = []
    real_put = LocalStore._put

    def recording_put(self: LocalStore, key: str, data: bytes, content_type: str) -> None:
        order.append(key)
        real_put(self, key, data, content_type)

    monkeypatch.setattr(LocalStore, "_put", recording_put)
    stored = store.save_image(PNG, "png", {"seed": 1})
    assert order == [stored.metadata_key, stored.key]


@pytest.mark.parametrize("failure", [OSError(5, "Input/output error"), RuntimeError("boom")])
def test_failed_image_write_removes_metadata(
    store: LocalStore, monkeypatch: pytest.MonkeyPatch, failure: Exception
) -> None:
    real_put = LocalStore._put
    seen: list[str] = []

    def failing_image_put(self: LocalStore, key: str, data: bytes, content_type: str) -> None:
        seen.append(key)
        if key.endswith(".png"):
            if isinstance(failure, OSError):
                # What a real disk failure looks like from inside _put: the temp file is
                # written, then the rename fails.
                def broken_replace(src: str, dst: str) -> None:
                    raise failure

                monkeypatch.setattr(os, "replace", broken_replace)
            else:
                raise failure
        real_put(self, key, data, content_type)

    monkeypatch.setattr(LocalStore, "_put", failing_image_put)
    with pytest.raises(StorageError):
        store.save_image(PNG, "png", {"seed": 1})
    assert [k.rsplit(".", 1)[1] for k in seen] == ["json", "png"]  # metadata was written first
    assert all_files(store.root) == []  # ...and removed again: no image, no metadata


def test_failed_metadata_write_writes_no_image(store: LocalStore, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_put(self: LocalStore, key: str, data: bytes, content_type: str) -> None:
        raise StorageError("disk gone")

    monkeypatch.setattr(LocalStore, "_put", failing_put)
    with pytest.raises(StorageError, match="disk gone"):
        store.save_image(PNG, "png", {})
    assert not store.root.exists() or all_files(store.root) == []


# --- jobs --------------------------------------------------------------------------------


def test_job_round_trip_and_update(store: LocalStore) -> None:
    store.put_job("job-1", {"status": "queued"})
    assert store.get_job("job-1") == {"status": "queued"}
    store.put_job("job-1", {"status": "succeeded", "urls": ["u"]})
    assert store.get_job("job-1") == {"status": "succeeded", "urls": ["u"]}
    assert (store.root / "jobs" / "job-1.json").is_file()
    assert json.loads((store.root / "jobs" / "job-1.json").read_text()) == {
        "status": "succeeded",
        "urls": ["u"],
    }


@pytest.mark.parametrize("job_id", ["unknown", "../jobs/job-1", "job-1.json", "a/b", "", "x" * 65])
def test_get_job_unknown_or_invalid_is_not_found(store: LocalStore, job_id: str) -> None:
    store.put_job("job-1", {"status": "queued"})
    with pytest.raises(NotFoundError):
        store.get_job(job_id)


def test_put_job_rejects_bad_id(store: LocalStore) -> None:
    with pytest.raises(InvalidRequestError) as info:
        store.put_job("../evil", {})
    assert info.value.field == "job_id"


# --- URLs and readiness ------------------------------------------------------------------


def test_url_without_public_base_is_file_uri(store: LocalStore) -> None:
    stored = store.save_image(PNG, "png", {})
    url = store.url(stored.key)
    assert url == (store.root / stored.key).as_uri()
    assert url.startswith("file:///")


def test_url_with_public_base(tmp_path: Path) -> None:
    store = LocalStore(tmp_path, public_base_url="https://img.example.com/")
    assert store.url("images/2024/01/02/ab.png") == "https://img.example.com/v1/files/images/2024/01/02/ab.png"


def test_check_creates_root_and_passes(store: LocalStore) -> None:
    assert not store.root.exists()
    store.check()
    assert store.root.is_dir()
    assert all_files(store.root) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_check_fails_on_read_only_root(tmp_path: Path) -> None:
    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(0o500)
    try:
        with pytest.raises(StorageError) as info:
            LocalStore(root).check()
        assert info.value.transient is False
    finally:
        root.chmod(0o700)


def test_permission_errors_are_permanent(store: LocalStore, monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    for call in (store.check, lambda: store.put_bytes("a.txt", b"x", "text/plain")):
        with pytest.raises(StorageError) as info:
            call()
        assert info.value.transient is False


def test_check_fails_when_root_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError):
        LocalStore(tmp_path / "file").check()


def test_guess_content_type() -> None:
    assert guess_content_type("a/b.png") == "image/png"
    assert guess_content_type("a/b.jpg") == "image/jpeg"
    assert guess_content_type("a/b.webp") == "image/webp"
    assert guess_content_type("a/b.json") == "application/json"
    assert guess_content_type("a/b") == "application/octet-stream"


# --- open_store --------------------------------------------------------------------------


def test_open_store_default_is_local_outputs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    store = open_store()
    assert isinstance(store, LocalStore)
    assert store.root == (tmp_path / "outputs").resolve()
    assert not store.root.exists()  # opening touches nothing


def test_open_store_paths_and_file_uris(tmp_path: Path) -> None:
    for uri in [str(tmp_path / "o"), f"file://{tmp_path}/o", f"file://localhost{tmp_path}/o"]:
        store = open_store(uri)
        assert isinstance(store, LocalStore), uri
        assert store.root == (tmp_path / "o").resolve(), uri
    spaced = open_store(f"file://{tmp_path}/with%20space")
    assert isinstance(spaced, LocalStore)
    assert spaced.root == (tmp_path / "with space").resolve()


def test_open_store_passes_public_base_url(tmp_path: Path) -> None:
    store = open_store(str(tmp_path), public_base_url="http://localhost:8000")
    assert store.url("a.png") == "http://localhost:8000/v1/files/a.png"


def test_open_store_s3(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    store = open_store("s3://my-bucket/some/prefix/", url_expiry_s=120)
    assert isinstance(store, S3Store)
    assert isinstance(store, ResultStore)
    assert (store.bucket, store.prefix, store.url_expiry_s) == ("my-bucket", "some/prefix", 120)
    bare = open_store("s3://my-bucket")
    assert isinstance(bare, S3Store)
    assert bare.prefix == ""


@pytest.mark.parametrize(
    "uri",
    [
        "",
        "gs://bucket/x",
        "http://example.com/x",
        "s3:/bucket/x",
        "s3://",
        "s3:///prefix",
        "s3://b/x",  # bucket too short
        "s3://bucket/../x",
        "s3://bucket/a b",
        "s3://bucket/x?versionId=1",
        "file://outputs",
        "file://host/x",
        "file://",
    ],
)
def test_open_store_rejects_bad_uris(uri: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        open_store(uri)
    assert info.value.field == "storage"
    assert info.value.value == uri


@pytest.mark.parametrize("expiry", [0, -1, 7 * 24 * 3600 + 1, 1.5, True])
def test_open_store_rejects_bad_expiry(expiry: object) -> None:
    with pytest.raises(InvalidRequestError) as info:
        open_store("s3://bucket/x", url_expiry_s=expiry)  # type: ignore[arg-type]
    assert info.value.field == "url_expiry_s"


def test_open_store_rejects_bad_public_base_url() -> None:
    with pytest.raises(InvalidRequestError) as info:
        open_store("./outputs", public_base_url="example.com")
    assert info.value.field == "public_base_url"
