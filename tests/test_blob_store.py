"""The BlobStore contract (ftps.common.storage), one test class run against every backend: the S3
protocol server (moto, as embedded; MinIO speaks the same protocol) and a local folder."""

from __future__ import annotations

import io
import threading
import uuid

import pytest

from ftps.common.errors import DataLoss, InvalidArgument, NotFound, Unavailable
from ftps.common.settings import StorageSettings
from ftps.common.storage import (
    BlobStore,
    FileBlobStore,
    ObjectStore,
    file_url,
    open_blob_store,
    sha256_hex,
)


def _tamper_s3(store: ObjectStore, key: str, data: bytes, sha256: str | None) -> None:
    """Put bytes behind the store's back, with the given checksum (or none) in the metadata."""
    store.client.put_object(store.bucket, key, io.BytesIO(data), len(data),
                            metadata={"sha256": sha256} if sha256 else None)


def _tamper_file(store: FileBlobStore, key: str, data: bytes, sha256: str | None) -> None:
    path = store.root / store.bucket / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((f"FTPS-BLOB sha256={sha256}\n".encode() if sha256 else b"") + data)


@pytest.fixture(params=["s3", "file"])
def backend(request, tmp_path):
    """(a fresh empty store, tamper(store, key, data, sha256)) of each backend, built through the
    factory the services use."""
    bucket = "t-" + uuid.uuid4().hex[:12]
    if request.param == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        settings = StorageSettings(s3_endpoint=endpoint, s3_bucket=bucket, s3_access_key="test",
                                   s3_secret_key="test-secret")
        tamper = _tamper_s3
    else:
        settings = StorageSettings(s3_endpoint=file_url(tmp_path / "blobs"), s3_bucket=bucket)
        tamper = _tamper_file
    store = open_blob_store(settings)
    assert isinstance(store, ObjectStore if request.param == "s3" else FileBlobStore)
    store.ensure_bucket()
    store.ensure_bucket()  # idempotent
    return store, tamper


@pytest.fixture
def store(backend) -> BlobStore:
    return backend[0]


class TestBlobStoreContract:
    def test_round_trip_with_reference(self, store):
        ref = store.put_bytes("a/b.bin", b"hello", version=3)
        assert (ref.bucket, ref.key, ref.sha256, ref.size, ref.version) == \
            (store.bucket, "a/b.bin", sha256_hex(b"hello"), 5, 3)
        assert store.get_bytes("a/b.bin") == b"hello"
        assert store.get_bytes("a/b.bin", sha256=sha256_hex(b"hello")) == b"hello"
        assert store.get_ref(ref) == b"hello"
        assert store.exists("a/b.bin") and not store.exists("a/c.bin") and not store.exists("a")

    def test_empty_and_binary_objects(self, store):
        assert store.get_ref(store.put_bytes("empty", b"")) == b""
        blob = bytes(range(256)) * 1000
        assert store.get_ref(store.put_bytes("bin/all-bytes", blob)) == blob

    def test_overwrite_replaces(self, store):
        store.put_bytes("k.bin", b"first")
        ref = store.put_bytes("k.bin", b"second, longer")
        assert store.get_bytes("k.bin") == b"second, longer" == store.get_ref(ref)

    def test_json_round_trip(self, store):
        ref = store.put_json("j/state.json", {"b": [1, 2], "a": None})
        assert store.get_json("j/state.json") == {"b": [1, 2], "a": None}
        assert store.get_ref(ref) == b'{"a": null, "b": [1, 2]}'

    def test_missing_is_not_found(self, store):
        with pytest.raises(NotFound):
            store.get_bytes("nope")
        with pytest.raises(NotFound):
            store.get_bytes("no/such/folder/x.bin")
        store.put_bytes("file.bin", b"x")
        with pytest.raises(NotFound):  # a key below an object's key
            store.get_bytes("file.bin/below")

    def test_reference_with_another_checksum_is_data_loss(self, store):
        ref = store.put_bytes("x.bin", b"original")
        store.put_bytes("x.bin", b"replaced")  # a stale reference reads nothing wrong
        with pytest.raises(DataLoss, match="corrupt"):
            store.get_ref(ref)

    def test_tampered_bytes_are_data_loss(self, backend):
        store, tamper = backend
        ref = store.put_bytes("x.bin", b"original")
        tamper(store, "x.bin", b"tampered", ref.sha256)  # the old checksum kept beside new bytes
        with pytest.raises(DataLoss, match="corrupt"):
            store.get_bytes("x.bin")
        with pytest.raises(DataLoss, match="corrupt"):
            store.get_ref(ref)

    def test_object_without_checksum_is_refused(self, backend):
        store, tamper = backend
        tamper(store, "raw.bin", b"abc", None)
        with pytest.raises(DataLoss, match="no checksum"):
            store.get_bytes("raw.bin")
        assert store.get_bytes("raw.bin", sha256=sha256_hex(b"abc")) == b"abc"

    def test_size_mismatch_is_data_loss(self, store):
        ref = store.put_bytes("s.bin", b"1234")
        ref.size = 5
        with pytest.raises(DataLoss, match="bytes"):
            store.get_ref(ref)

    def test_listing_is_by_string_prefix_in_order(self, store):
        keys = ["r/t-2/b.json", "r/t-1/a.json", "r/t-1/sub/c.npz", "r/t-10/d.json", "s/x.json", "r0.json"]
        for key in keys:
            store.put_bytes(key, key.encode())
        assert list(store.list_keys("r/")) == sorted(k for k in keys if k.startswith("r/"))
        assert list(store.list_keys("r/t-1")) == ["r/t-1/a.json", "r/t-1/sub/c.npz", "r/t-10/d.json"]
        assert list(store.list_keys("r/t-1/")) == ["r/t-1/a.json", "r/t-1/sub/c.npz"]
        assert list(store.list_keys("r")) == sorted(k for k in keys if k.startswith("r"))
        assert list(store.list_keys("")) == sorted(keys)
        assert list(store.list_keys("nothing/")) == []

    def test_delete(self, store):
        store.put_bytes("d/one.bin", b"1")
        store.put_bytes("d/two.bin", b"2")
        store.delete("d/one.bin")
        store.delete("d/one.bin")  # again: no error
        store.delete("d/never.bin")
        assert not store.exists("d/one.bin") and store.exists("d/two.bin")
        assert list(store.list_keys("d/")) == ["d/two.bin"]
        with pytest.raises(NotFound):
            store.get_bytes("d/one.bin")

    def test_concurrent_writers_of_one_key_leave_one_whole_object(self, store):
        # Different sizes: a mixed or torn write would fail its checksum or be none of these.
        values = [bytes([i]) * (1000 + 5000 * i) for i in range(8)]
        refs = {}
        seen: list[bytes] = []
        errors: list[BaseException] = []
        start = threading.Barrier(len(values) + 1)
        done = threading.Event()

        def write(i: int) -> None:
            try:
                start.wait()
                for _ in range(5):
                    refs[i] = store.put_bytes("hot/key.bin", values[i])
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        def read() -> None:  # a reader during the writes sees one whole object or none
            try:
                start.wait()
                while not done.is_set():
                    try:
                        seen.append(store.get_bytes("hot/key.bin"))
                    except NotFound:
                        pass
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        writers = [threading.Thread(target=write, args=(i,)) for i in range(len(values))]
        reader = threading.Thread(target=read)
        for t in [*writers, reader]:
            t.start()
        for t in writers:
            t.join()
        done.set()
        reader.join()
        assert not errors, errors
        final = store.get_bytes("hot/key.bin")
        assert final in values
        assert store.get_ref(refs[values.index(final)]) == final
        assert all(v in values for v in seen)
        assert list(store.list_keys("hot/")) == ["hot/key.bin"]  # no temporary file shows


class TestFileBlobStore:
    """What only the folder backend has: keys become paths, and the folder is the whole truth."""

    @pytest.mark.parametrize("bad", ["", "/abs", "../x", "a/../../x", "a/./b", "a//b", "a/", ".hidden",
                                     "a/.tmp", "a\\b", "a\x00b", "x" * 1025])
    def test_path_like_keys_are_refused(self, tmp_path, bad):
        store = FileBlobStore(tmp_path, "b")
        for call in (lambda: store.put_bytes(bad, b"x"), lambda: store.get_bytes(bad),
                     lambda: store.exists(bad), lambda: store.delete(bad)):
            with pytest.raises(InvalidArgument):
                call()
        assert list(tmp_path.rglob("x")) == []

    def test_listing_prefix_cannot_leave_the_folder(self, tmp_path):
        store = FileBlobStore(tmp_path / "blobs", "b")
        (tmp_path / "secret").write_text("s")
        with pytest.raises(InvalidArgument):
            list(store.list_keys("../"))

    def test_a_second_store_on_the_folder_sees_everything(self, tmp_path):
        """What a restart (or another process of the stack) relies on."""
        first = FileBlobStore(tmp_path, "b")
        first.ensure_bucket()
        ref = first.put_bytes("t/1/weights.safetensors", b"w" * 100)
        again = open_blob_store(StorageSettings(s3_endpoint=file_url(tmp_path), s3_bucket="b"))
        assert again.get_ref(ref) == b"w" * 100
        assert list(again.list_keys("t/")) == ["t/1/weights.safetensors"]

    def test_an_unwritable_folder_is_unavailable(self, tmp_path):
        (tmp_path / "blobs").write_text("a file where the folder should be")
        store = FileBlobStore(tmp_path / "blobs", "b")
        with pytest.raises(Unavailable, match="retry") as e:
            store.put_bytes("k", b"x")
        assert str(tmp_path) not in str(e.value)  # paths go to the log, not to callers

    @pytest.mark.parametrize("url", ["file://relative/x", "file://host/abs", "file:rel"])
    def test_only_absolute_local_folders(self, url):
        with pytest.raises(InvalidArgument):
            open_blob_store(StorageSettings(s3_endpoint=url, s3_bucket="b"))
