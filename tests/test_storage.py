"""Storage resolver: local and s3:// round trips on a real HTTP S3 endpoint, clear redacted errors."""

from __future__ import annotations

import os
import socket
import time

import pytest

from histodiff.storage import Store
from histodiff import storage
from histodiff.config import StorageConfig

from conftest import free_port


def _round_trip(root: str, cfg: StorageConfig | None = None) -> None:
    Store(cfg).write_bytes(storage.join(root, "a", "x.png"), b"png")
    Store(cfg).write_bytes(storage.join(root, "a", "y.TIF"), b"tif")
    Store(cfg).write_bytes(storage.join(root, "b", "notes.txt"), b"txt")
    Store(cfg).write_json(storage.join(root, "meta.json"), {"n": 3, "k": [1, 2]})
    assert Store(cfg).read_bytes(storage.join(root, "a", "x.png")) == b"png"
    assert Store(cfg).read_json(storage.join(root, "meta.json")) == {"n": 3, "k": [1, 2]}
    images = Store(cfg).list_files(root, [".png", ".tif"])
    assert [u.rsplit("/", 2)[-2:] for u in images] == [["a", "x.png"], ["a", "y.TIF"]]
    assert len(Store(cfg).list_files(root)) == 4
    assert Store(cfg).list_dirs(root) == ["a", "b"]
    assert Store(cfg).exists(storage.join(root, "a", "x.png"))
    assert not Store(cfg).exists(storage.join(root, "a", "nope.png"))
    Store(cfg).check_readable(storage.join(root, "a"))  # a "directory" (S3: a prefix)
    stream = Store(cfg).open_input(storage.join(root, "b", "notes.txt"))
    assert stream.read() == b"txt"
    stream.close()
    assert Store(cfg).sha256_file(storage.join(root, "a", "x.png")) == storage.sha256_bytes(b"png")
    Store(cfg).delete(storage.join(root, "b"))
    assert Store(cfg).list_dirs(root) == ["a"]


def test_local_round_trip_is_atomic(tmp_path):
    root = str(tmp_path / "store")
    _round_trip(root)
    assert not [p for p in os.listdir(os.path.join(root, "a")) if ".tmp-" in p]  # no temporary leftovers
    assert Store().resolve("file://" + root).path == root
    with pytest.raises(storage.StorageError, match="does not exist"):
        Store().check_readable(str(tmp_path / "missing"))
    with pytest.raises(storage.StorageError, match="unsupported URI scheme"):
        Store().resolve("gs://bucket/x")


@pytest.mark.slow
def test_s3_round_trip(s3_bucket):
    _round_trip(f"{s3_bucket}/data")
    with pytest.raises(storage.StorageError, match="does not exist"):
        Store().check_readable(f"{s3_bucket}/absent/prefix")
    with pytest.raises(storage.StorageError, match="bucket 'hd-missing-bucket' .* does not exist"):
        Store().check_readable("s3://hd-missing-bucket/tiles")
    with pytest.raises(storage.StorageError, match="names no bucket"):
        Store().resolve("s3://")


def test_redact_replaces_every_known_secret(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-1234")
    cfg = StorageConfig(secret_access_key="cfg-secret-5678", access_key_id="AKIACFGKEY")
    text = storage.redact("a env-secret-1234 b cfg-secret-5678 c AKIACFGKEY", cfg)
    assert text == "a *** b *** c ***"


@pytest.mark.slow
def test_wrong_credentials_error_is_clear_and_redacted(s3_bucket, monkeypatch):
    from moto import settings

    Store().write_bytes(f"{s3_bucket}/tiles/a.png", b"x")
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGKEY0000")
    # moto checks credentials only in its IAM mode; turn it on for this test alone.
    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    for call in (Store().check_readable, Store().list_files, Store().read_bytes):
        with pytest.raises(storage.StorageError) as info:
            call(f"{s3_bucket}/tiles/a.png")
        assert "Check the S3 credentials" in str(info.value)
        assert secret not in str(info.value) and "AKIAWRONGKEY0000" not in str(info.value)
    cfg = StorageConfig(access_key_id="AKIACONFIGKEY", secret_access_key="config-secret-xyz")
    with pytest.raises(storage.StorageError) as info:
        Store(cfg).read_bytes(f"{s3_bucket}/tiles/a.png")
    assert "config-secret-xyz" not in str(info.value) and secret not in str(info.value)


@pytest.mark.slow
def test_unreachable_endpoint_fails_within_seconds(s3_server):
    cfg = StorageConfig(endpoint_url=f"http://127.0.0.1:{free_port()}", connect_timeout_s=1, max_attempts=2)
    start = time.monotonic()
    with pytest.raises(storage.StorageError, match="unreachable; check storage.endpoint_url") as info:
        Store(cfg).check_readable("s3://bucket/tiles")
    assert time.monotonic() - start < 10
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in str(info.value)


@pytest.mark.slow
def test_silent_endpoint_times_out_within_seconds(s3_server):
    # A server that accepts connections but never answers: only request_timeout_s ends it.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        port = sock.getsockname()[1]
        cfg = StorageConfig(endpoint_url=f"http://127.0.0.1:{port}", connect_timeout_s=1,
                            request_timeout_s=1, max_attempts=1)
        start = time.monotonic()
        with pytest.raises(storage.StorageError, match="unreachable"):
            Store(cfg).read_bytes("s3://bucket/tiles/a.png")
        assert time.monotonic() - start < 15
