"""Blob storage: one interface (:class:`BlobStore`), two backends.

- :class:`ObjectStore` (also :data:`S3BlobStore`): a bucket through the ``minio`` SDK (real MinIO in
  Kubernetes, moto's S3 server embedded and in tests);
- :class:`FileBlobStore`: a folder on local disk (``ftps-stack up``: blobs that outlive a restart
  with no server at all).

:func:`open_blob_store` picks one from the settings: ``s3_endpoint = file:///abs/path`` is a folder,
anything else ``host:port`` of an S3 server. Every service builds its store through it, so the
worker reads what the registry and the gateway wrote, whichever backend they share.

Every object is written with its sha256 and verified on read: moto does not verify checksums, and a
half-written or corrupted object must never be read as valid (:class:`DataLoss`).
"""

from __future__ import annotations

import abc
import hashlib
import io
import json
import logging
import os
import re
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import urllib3
from minio import Minio
from minio.error import MinioException, S3Error

from ftps.common import tracing
from ftps.common.errors import DataLoss, InvalidArgument, NotFound, Unavailable
from ftps.common.settings import StorageSettings
from ftps.v1 import common_pb2

log = logging.getLogger(__name__)
T = TypeVar("T")

_SHA_META = "x-amz-meta-sha256"
# Matched whole (fullmatch): with match() and "$", "t-1\n" passed ("$" also matches before a final newline).
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")

# S3 answers the callers below handle themselves (a missing key, a bucket that already exists).
_S3_ANSWERS = frozenset({"NoSuchKey", "NoSuchObject", "NotFound", "BucketAlreadyOwnedByYou",
                         "BucketAlreadyExists"})
# S3 errors worth another try, like a connection that failed.
_S3_TRANSIENT = frozenset({"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout",
                           "XMinioServerNotInitialized"})
# What a caller is told: the details (endpoint, object key, the store's own message) go to the log.
STORE_UNREACHABLE = "object store unreachable, retry"
STORE_FAILING = "object store unavailable, retry"


def check_id(value: str, field: str) -> str:
    """IDs become parts of object keys: refuse anything path-like or oversized."""
    if not value:
        raise InvalidArgument(f"{field} is required", reason="FIELD_REQUIRED", field=field)
    if not _ID_RE.fullmatch(value) or ".." in value:
        raise InvalidArgument(
            f"{field} {value[:80]!r} is not a valid id (1-64 of letters, digits, '_', '-', '.')",
            reason="INVALID_ID", field=field)
    return value


def _span(op: str, key: str, size: int | None = None):
    """One span per blob read or write (``storage.get`` / ``storage.put``): its key and size."""
    return tracing.span(f"storage.{op}", ftps__key=key, ftps__bytes=size)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _verified(key: str, data: bytes, expected: str | None) -> bytes:
    """``data`` if it hashes to ``expected`` (the caller's or the stored checksum); DataLoss if not,
    or if there is no checksum to check against (every backend reads this way)."""
    if expected is None:
        raise DataLoss(f"object {key} has no checksum; refusing to read it", reason="BLOB_CORRUPT")
    actual = sha256_hex(data)
    if actual != expected:
        raise DataLoss(f"object {key} is corrupt: sha256 {actual[:12]}... != {expected[:12]}...", reason="BLOB_CORRUPT")
    return data


class BlobStore(abc.ABC):
    """A flat namespace of checksummed blobs (one bucket), keys ``a/b/c.ext``.

    The contract every backend keeps (tests/test_blob_store.py runs it against each):

    - a write is all or nothing: a reader sees the old object, the new one, or none; never part of
      one. Of concurrent writers of one key exactly one wins, whole;
    - every object carries the sha256 of its bytes, written with it; a read verifies the bytes
      against the caller's sha256 (a :class:`BlobRef`'s) or else the stored one, and raises
      :class:`DataLoss` on a mismatch or when there is no checksum to verify against;
    - a missing key is :class:`NotFound` on read, ``False`` for :meth:`exists`, and no error for
      :meth:`delete`;
    - a backend that cannot be reached or fails is :class:`Unavailable` with a message that names no
      endpoint, path or key (those go to the log), after the backend's own retries.
    """

    bucket: str

    @abc.abstractmethod
    def ensure_bucket(self) -> None:
        """Create the bucket (folder) if it does not exist yet; idempotent, safe to race."""

    @abc.abstractmethod
    def put_bytes(self, key: str, data: bytes, *, content_type: str = "application/octet-stream",
                  version: int = 0) -> common_pb2.BlobRef:
        """Store ``data`` under ``key`` (replacing any object there) with its sha256; once this
        returns the object is durable. -> its reference (bucket, key, sha256, size, ``version``)."""

    @abc.abstractmethod
    def get_bytes(self, key: str, *, sha256: str | None = None) -> bytes:
        """Read ``key``; the bytes must hash to ``sha256`` (or to the sha256 stored with them)."""

    def get_ref(self, ref: common_pb2.BlobRef) -> bytes:
        """Read the object a reference names, verified against its sha256 and size."""
        data = self.get_bytes(ref.key, sha256=ref.sha256 or None)
        if ref.size and len(data) != ref.size:
            raise DataLoss(f"object {ref.key} has {len(data)} bytes, expected {ref.size}", reason="BLOB_CORRUPT")
        return data

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object is stored under ``key``."""

    @abc.abstractmethod
    def list_keys(self, prefix: str) -> Iterator[str]:
        """Every key starting with ``prefix`` (a string prefix, not a folder: ``"a/b"`` matches
        ``"a/bc"``), in ascending order."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; removing a key that is not there is no error."""

    # -- json ----------------------------------------------------------------------------------
    def put_json(self, key: str, value: Any) -> common_pb2.BlobRef:
        return self.put_bytes(key, json.dumps(value, sort_keys=True).encode(),
                              content_type="application/json")

    def get_json(self, key: str) -> Any:
        return json.loads(self.get_bytes(key))


class ObjectStore(BlobStore):
    """A bucket of an S3-protocol server, with checksummed reads and writes (the sha256 in the
    object's metadata) and retries with backoff when unreachable."""

    def __init__(self, settings: StorageSettings, *, retries: int = 5, backoff_s: float = 0.2) -> None:
        self.bucket = settings.s3_bucket
        self._retries = retries
        self._backoff = backoff_s
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=5, read=60), maxsize=16,
            retries=urllib3.Retry(total=0),  # we retry ourselves, with backoff, below
        )
        self.client = Minio(settings.s3_endpoint, access_key=settings.s3_access_key,
                            secret_key=settings.s3_secret_key, secure=settings.s3_secure,
                            region=settings.s3_region, http_client=http)

    # -- retries -------------------------------------------------------------------------------
    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()``, retried with backoff while the store is unreachable or failing; then
        Unavailable. Only the S3 answers in ``_S3_ANSWERS`` come out as S3Error."""
        delay = self._backoff
        for attempt in range(self._retries + 1):
            try:
                return fn()
            except S3Error as exc:
                if exc.code in _S3_ANSWERS:
                    raise
                failure, transient, message = exc, exc.code in _S3_TRANSIENT, STORE_FAILING
            except MinioException as exc:  # a 5xx or a response that is not S3's XML
                failure, transient, message = exc, True, STORE_FAILING
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                failure, transient, message = exc, True, STORE_UNREACHABLE
            if not transient or attempt == self._retries:
                log.error("object store %s failed: %s: %s", what, type(failure).__name__, failure)
                raise Unavailable(message, reason="STORE_UNAVAILABLE") from failure
            log.warning("object store %s failed (%s); retrying in %.1fs", what, failure, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
        raise AssertionError("unreachable")

    @staticmethod
    def _failing(what: str, exc: S3Error) -> Unavailable:
        log.error("object store %s failed: %s", what, exc)
        return Unavailable(STORE_FAILING, reason="STORE_UNAVAILABLE")

    def ensure_bucket(self) -> None:
        if not self._call("bucket check", lambda: self.client.bucket_exists(self.bucket)):
            try:
                self._call("bucket create", lambda: self.client.make_bucket(self.bucket))
            except S3Error as exc:
                if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise self._failing("bucket create", exc) from exc

    # -- bytes ---------------------------------------------------------------------------------
    def put_bytes(self, key: str, data: bytes, *, content_type: str = "application/octet-stream",
                  version: int = 0) -> common_pb2.BlobRef:
        digest = sha256_hex(data)
        with _span("put", key, len(data)):
            self._call(f"put {key}", lambda: self.client.put_object(
                self.bucket, key, io.BytesIO(data), len(data), content_type=content_type,
                metadata={"sha256": digest}))
        return common_pb2.BlobRef(bucket=self.bucket, key=key, sha256=digest, size=len(data),
                                  version=version)

    def get_bytes(self, key: str, *, sha256: str | None = None) -> bytes:
        """Read ``key``; the bytes must hash to ``sha256`` (or to the sha256 stored with them)."""

        def fetch() -> tuple[bytes, str | None]:
            resp = self.client.get_object(self.bucket, key)
            try:
                return resp.read(), resp.headers.get(_SHA_META)
            finally:
                resp.close()
                resp.release_conn()

        with _span("get", key) as span:
            try:
                data, stored = self._call(f"get {key}", fetch)
            except S3Error as exc:
                if exc.code in ("NoSuchKey", "NoSuchObject"):
                    raise NotFound(f"object {key} not found", reason="OBJECT_NOT_FOUND") from exc
                raise self._failing(f"get {key}", exc) from exc
            span.set_attribute("ftps.bytes", len(data))
        return _verified(key, data, sha256 or stored)

    def exists(self, key: str) -> bool:
        try:
            self._call(f"stat {key}", lambda: self.client.stat_object(self.bucket, key))
            return True
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                return False
            raise self._failing(f"stat {key}", exc) from exc

    def list_keys(self, prefix: str) -> Iterator[str]:
        objs = self._call(f"list {prefix}",
                          lambda: list(self.client.list_objects(self.bucket, prefix=prefix,
                                                                recursive=True)))
        for obj in objs:
            yield obj.object_name

    def delete(self, key: str) -> None:
        self._call(f"delete {key}", lambda: self.client.remove_object(self.bucket, key))


S3BlobStore = ObjectStore  # the S3 backend by what it is; ObjectStore is the name most code knows

FILE_SCHEME = "file:"
# One part of a key: never "", "." or ".." and never a leading "." (temporary files start with one).
_KEY_PART_RE = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-=+@]{0,254}")
_MAX_KEY_CHARS = 1024
# A file object is this header, then the bytes: one rename makes data and checksum visible together
# (a checksum file beside the object could pair one writer's bytes with another's sha256).
_FILE_MAGIC = b"FTPS-BLOB sha256="
_FILE_HEADER_LEN = len(_FILE_MAGIC) + 64 + 1  # magic, 64 hex digits, "\n"


def check_key(key: str) -> str:
    """Keys become paths under a :class:`FileBlobStore`'s folder: refuse anything that could leave
    it (absolute, ``..``, backslashes, empty parts) or name one of its temporary files."""
    if not key or len(key) > _MAX_KEY_CHARS or not all(_KEY_PART_RE.fullmatch(p) for p in key.split("/")):
        raise InvalidArgument(f"object key {key[:80]!r} is not valid (parts of letters, digits, "
                              "'_', '-', '.', '=', '+', '@' joined by '/', none starting with '.')",
                              reason="OBJECT_KEY_INVALID")
    return key


def file_url_path(url: str) -> Path:
    """``file:///abs/path`` -> ``/abs/path``; anything else (relative, another host) is refused."""
    parsed = urllib.parse.urlparse(url)
    path = Path(urllib.parse.unquote(parsed.path))
    if parsed.scheme != "file" or parsed.netloc not in ("", "localhost") or not path.is_absolute():
        raise InvalidArgument(f"blob folder {url!r} must be an absolute file URL: file:///path/to/folder",
                              reason="OBJECT_KEY_INVALID")
    return path


def file_url(path: str | os.PathLike) -> str:
    """The ``s3_endpoint`` value that puts blobs in the folder ``path``."""
    return Path(path).resolve().as_uri()


class FileBlobStore(BlobStore):
    """Blobs as files under ``root/bucket/<key>`` (each a checksum header, then the bytes).

    Writes go to a temporary file in the target's folder, are fsynced, renamed over the target (an
    atomic replace: concurrent writers of one key leave exactly one of them) and the folder fsynced:
    once ``put_bytes`` returns the object survives a crash. Any number of processes on one machine
    may share the folder; there is no lock. Disk errors are :class:`Unavailable` at once (nothing to
    wait out, unlike a network). Folders are created 0700 and files 0600: other uids (a root
    worker's sandboxed strategies run under fresh ones) cannot read other tasks' blobs."""

    def __init__(self, root: str | os.PathLike, bucket: str) -> None:
        self.bucket = check_id(bucket, "s3_bucket")
        self.root = Path(root)
        self._dir = self.root / bucket

    def _path(self, key: str) -> Path:
        return self._dir / check_key(key)

    @staticmethod
    def _failing(what: str, exc: OSError) -> Unavailable:
        log.error("blob store %s failed: %s: %s", what, type(exc).__name__, exc)
        return Unavailable(STORE_FAILING, reason="STORE_UNAVAILABLE")

    def _makedirs(self, folder: Path) -> None:
        """``mkdir -p`` that also fsyncs the parent of each folder it creates."""
        missing = []
        while not folder.is_dir():
            missing.append(folder)
            folder = folder.parent
        for d in reversed(missing):
            try:
                d.mkdir(mode=0o700)
            except FileExistsError:  # another writer made it first
                continue
            _fsync_dir(d.parent)

    def ensure_bucket(self) -> None:
        try:
            self._makedirs(self._dir)
        except OSError as exc:
            raise self._failing("bucket create", exc) from exc

    def put_bytes(self, key: str, data: bytes, *, content_type: str = "application/octet-stream",
                  version: int = 0) -> common_pb2.BlobRef:
        with _span("put", key, len(data)):
            return self._put_file(key, data, version)

    def _put_file(self, key: str, data: bytes, version: int) -> common_pb2.BlobRef:
        path = self._path(key)
        digest = sha256_hex(data)
        try:
            self._makedirs(path.parent)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(_FILE_MAGIC + digest.encode() + b"\n")
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise
            _fsync_dir(path.parent)
        except OSError as exc:
            raise self._failing(f"put {key}", exc) from exc
        return common_pb2.BlobRef(bucket=self.bucket, key=key, sha256=digest, size=len(data),
                                  version=version)

    def get_bytes(self, key: str, *, sha256: str | None = None) -> bytes:
        with _span("get", key) as span:
            data, stored = self._get_file(key)
            span.set_attribute("ftps.bytes", len(data))
        return _verified(key, data, sha256 or stored)

    def _get_file(self, key: str) -> tuple[bytes, str | None]:
        """The object's bytes and the sha256 stored with them (None: a file put_bytes did not write)."""
        path = self._path(key)
        try:
            raw = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            raise NotFound(f"object {key} not found", reason="OBJECT_NOT_FOUND") from exc
        except OSError as exc:
            raise self._failing(f"get {key}", exc) from exc
        stored = None
        if raw.startswith(_FILE_MAGIC) and raw[_FILE_HEADER_LEN - 1:_FILE_HEADER_LEN] == b"\n":
            stored = raw[len(_FILE_MAGIC):_FILE_HEADER_LEN - 1].decode("ascii", "replace")
            data = raw[_FILE_HEADER_LEN:]
        else:  # not written by put_bytes: all of it is the object, with no checksum
            data = raw
        return data, stored

    def exists(self, key: str) -> bool:
        try:
            return self._path(key).is_file()
        except OSError as exc:
            raise self._failing(f"stat {key}", exc) from exc

    def list_keys(self, prefix: str) -> Iterator[str]:
        # Walk only the deepest folder the prefix names; a prefix is a string prefix, as in S3.
        folder = prefix.rpartition("/")[0]
        start = self._dir / check_key(folder) if folder else self._dir
        errors: list[OSError] = []

        def failed(exc: OSError) -> None:
            if not isinstance(exc, (FileNotFoundError, NotADirectoryError)):
                errors.append(exc)

        keys = []
        for dirpath, dirnames, filenames in os.walk(start, onerror=failed):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = Path(dirpath).relative_to(self._dir).as_posix()
            for name in filenames:
                key = name if rel == "." else f"{rel}/{name}"
                if not name.startswith(".") and key.startswith(prefix):
                    keys.append(key)
        if errors:
            raise self._failing(f"list {prefix}", errors[0]) from errors[0]
        return iter(sorted(keys))

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
            _fsync_dir(path.parent)
        except (FileNotFoundError, NotADirectoryError):
            pass
        except OSError as exc:
            raise self._failing(f"delete {key}", exc) from exc


def _fsync_dir(folder: Path) -> None:
    """Make a rename, create or unlink in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_blob_store(settings: StorageSettings, **s3_options: Any) -> BlobStore:
    """The store the settings name: ``s3_endpoint = file:///abs/path`` -> :class:`FileBlobStore`
    in that folder; ``host:port`` -> :class:`ObjectStore` (S3), built with ``s3_options``
    (``retries``, ``backoff_s``)."""
    if settings.s3_endpoint.startswith(FILE_SCHEME):
        return FileBlobStore(file_url_path(settings.s3_endpoint), settings.s3_bucket)
    return ObjectStore(settings, **s3_options)
