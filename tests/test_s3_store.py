"""The S3 blob store against a real Ceph RADOS Gateway: streaming multipart uploads of
ciphertext, ranged reads, nothing visible before commit, deletion by prefix."""

from __future__ import annotations

import hashlib
import os

import pytest

from emix_core.errors import ConfigError, NotFoundError, StorageUnavailable, UnsafePathError
from emix_core.store.s3 import PART_SIZE, S3BlobStore, parse_s3_url

MIB = 1024 * 1024


def test_s3_urls_are_checked():
    assert parse_s3_url("s3://bucket/region/hub-1/") == ("bucket", "region/hub-1/")
    assert parse_s3_url("s3://bucket") == ("bucket", "")
    for bad in ("s3:///prefix", "http://bucket/prefix", "s3:bucket"):
        with pytest.raises(ConfigError, match="s3://BUCKET/PREFIX"):
            parse_s3_url(bad)


def test_hostile_keys_never_reach_the_bucket():
    store = S3BlobStore("s3://bucket/p", client=object())
    for key in ("../etc/passwd", "a/../../b", "A/1", "", "a/b/c", "a/.."):
        with pytest.raises(UnsafePathError):
            store.writer(key)


@pytest.fixture
def store(ceph_rgw, monkeypatch):
    for name, value in ceph_rgw.env.items():
        monkeypatch.setenv(name, value)
    bucket = ceph_rgw.new_bucket()
    return S3BlobStore(f"s3://{bucket}/hub"), bucket


@pytest.mark.e2e
def test_large_blob_streams_as_multipart_and_appears_only_on_commit(store, ceph_rgw):
    s3, bucket = store
    data = os.urandom(2 * PART_SIZE + 3 * MIB)  # three parts
    writer = s3.writer("abc123/1")
    for offset in range(0, len(data), MIB):  # written the way the hub writes: in segments
        writer.write(data[offset : offset + MIB])
        assert len(writer.buffer) < PART_SIZE  # memory stays flat: full parts are sent
    assert not s3.exists("abc123/1")  # parts uploaded, object not visible yet
    assert ceph_rgw.objects(bucket) == []
    writer.commit()
    head = ceph_rgw.client().head_object(Bucket=bucket, Key="hub/abc123/1")
    assert head["ETag"].strip('"').endswith("-3")  # a real three-part multipart upload
    assert s3.size("abc123/1") == len(data)
    got = hashlib.sha256()
    for chunk in s3.read("abc123/1", chunk_size=MIB):
        assert len(chunk) <= MIB
        got.update(chunk)
    assert got.digest() == hashlib.sha256(data).digest()
    assert s3.read_range("abc123/1", PART_SIZE - 10, 20) == data[PART_SIZE - 10 : PART_SIZE + 10]


@pytest.mark.e2e
def test_small_blob_and_aborted_upload(store, ceph_rgw):
    s3, bucket = store
    small = s3.writer("abc123/manifest")
    small.write(b"ciphertext")
    small.commit()
    assert b"".join(s3.read("abc123/manifest")) == b"ciphertext"

    aborted = s3.writer("abc123/2")
    aborted.write(os.urandom(PART_SIZE + MIB))  # one part already sent
    aborted.abort()
    assert not s3.exists("abc123/2")
    uploads = ceph_rgw.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert uploads == []  # the sent part is gone too


@pytest.mark.e2e
def test_delete_prefix_removes_one_package_and_its_unfinished_uploads(store, ceph_rgw):
    s3, bucket = store
    for key in ("aaa/1", "aaa/2", "aaa/manifest", "aab/1"):
        w = s3.writer(key)
        w.write(b"x" * 100)
        w.commit()
    crashed = s3.writer("aaa/3")  # as a killed instance leaves it: parts, no completion
    crashed.write(os.urandom(PART_SIZE))
    assert s3.delete_prefix("aaa") == 3
    assert ceph_rgw.objects(bucket) == ["hub/aab/1"]  # the neighbour with a shared stem stays
    assert ceph_rgw.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    with pytest.raises(NotFoundError):
        list(s3.read("aaa/1"))


@pytest.mark.e2e
def test_wrong_credentials_are_a_clear_error_without_secrets(ceph_rgw, monkeypatch):
    for name, value in ceph_rgw.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value")
    bucket = ceph_rgw.new_bucket()
    s3 = S3BlobStore(f"s3://{bucket}/hub")
    with pytest.raises(StorageUnavailable) as info:
        s3.check()
    assert "credentials" in info.value.message
    assert "wrong-secret-value" not in info.value.message
    w = s3.writer("abc/1")
    w.write(b"x")
    with pytest.raises(StorageUnavailable):
        w.commit()


@pytest.mark.e2e
def test_readiness_names_the_object_store_when_its_bucket_is_missing(
    ceph_rgw, monkeypatch, tmp_path
):
    from emix_core.hub import create_app
    from emix_core.hub.context import init_hub_home

    for name, value in ceph_rgw.env.items():
        monkeypatch.setenv(name, value)
    home = tmp_path / "hub"
    init_hub_home(home, blob_url=f"s3://{ceph_rgw.new_bucket()}/emix")
    client = create_app(home).test_client()
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json["database"] == ready.json["blobs"] == "ok"

    monkeypatch.setenv("EMIX_BLOB_URL", "s3://no-such-bucket/emix")
    client = create_app(home).test_client()
    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json == {
        "ready": False,
        "instance": ready.json["instance"],
        "database": "ok",
        "blobs": "unavailable",
    }
    assert client.get("/healthz").status_code == 200  # alive, just not ready
