"""Object storage through the minio SDK against a real S3-protocol server."""

from __future__ import annotations

import pytest

from ftps.common.errors import DataLoss, InvalidArgument, NotFound, Unavailable
from ftps.common.settings import StorageSettings
from ftps.common.storage import ObjectStore, check_id, sha256_hex


def test_put_get_verifies_checksum(store):
    ref = store.put_bytes("a/b.bin", b"hello", version=3)
    assert ref.sha256 == sha256_hex(b"hello") and ref.size == 5 and ref.version == 3
    assert store.get_bytes("a/b.bin") == b"hello"
    assert store.get_ref(ref) == b"hello"
    assert store.exists("a/b.bin") and not store.exists("a/c.bin")
    assert list(store.list_keys("a/")) == ["a/b.bin"]


def test_corrupt_object_is_never_read_as_valid(store):
    ref = store.put_bytes("x.bin", b"original")
    # Overwrite the bytes behind our back, keeping the old checksum in the reference.
    store.client.put_object(store.bucket, "x.bin", __import__("io").BytesIO(b"tampered"), 8,
                            metadata={"sha256": ref.sha256})
    with pytest.raises(DataLoss, match="corrupt"):
        store.get_ref(ref)


def test_object_without_checksum_is_refused(store):
    import io

    store.client.put_object(store.bucket, "raw.bin", io.BytesIO(b"abc"), 3)
    with pytest.raises(DataLoss, match="no checksum"):
        store.get_bytes("raw.bin")
    assert store.get_bytes("raw.bin", sha256=sha256_hex(b"abc")) == b"abc"


def test_missing_object_is_not_found(store):
    with pytest.raises(NotFound):
        store.get_bytes("nope")


def test_json_round_trip(store):
    store.put_json("j.json", {"a": [1, 2]})
    assert store.get_json("j.json") == {"a": [1, 2]}


def test_unreachable_store_is_unavailable_after_retries():
    s = ObjectStore(StorageSettings(s3_endpoint="127.0.0.1:9"), retries=2, backoff_s=0.01)
    with pytest.raises(Unavailable, match="unreachable"):
        s.get_bytes("k")


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "x" * 65, "-lead", "a..b", "a b"])
def test_path_like_ids_are_refused(bad):
    with pytest.raises(InvalidArgument):
        check_id(bad, "task_id")


def test_good_ids_pass():
    assert check_id("t-0123abc.v1_x", "task_id") == "t-0123abc.v1_x"
