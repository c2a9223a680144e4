"""Object storage through the ``minio`` SDK (real MinIO in Kubernetes, moto's S3 server embedded).

Every object is written with its sha256 in the object's metadata and verified on read: moto does
not verify checksums, and a half-written or corrupted object must never be read as valid.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import time
from typing import Any, Callable, Iterator, TypeVar

import urllib3
from minio import Minio
from minio.error import MinioException, S3Error

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
        raise InvalidArgument(f"{field} is required")
    if not _ID_RE.fullmatch(value) or ".." in value:
        raise InvalidArgument(
            f"{field} {value[:80]!r} is not a valid id (1-64 of letters, digits, '_', '-', '.')")
    return value


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ObjectStore:
    """A bucket, with checksummed reads and writes and retries with backoff when unreachable."""

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
                raise Unavailable(message) from failure
            log.warning("object store %s failed (%s); retrying in %.1fs", what, failure, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
        raise AssertionError("unreachable")

    @staticmethod
    def _failing(what: str, exc: S3Error) -> Unavailable:
        log.error("object store %s failed: %s", what, exc)
        return Unavailable(STORE_FAILING)

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

        try:
            data, stored = self._call(f"get {key}", fetch)
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject"):
                raise NotFound(f"object {key} not found") from exc
            raise self._failing(f"get {key}", exc) from exc
        expected = sha256 or stored
        if expected is None:
            raise DataLoss(f"object {key} has no checksum; refusing to read it")
        actual = sha256_hex(data)
        if actual != expected:
            raise DataLoss(f"object {key} is corrupt: sha256 {actual[:12]}... != {expected[:12]}...")
        return data

    def get_ref(self, ref: common_pb2.BlobRef) -> bytes:
        data = self.get_bytes(ref.key, sha256=ref.sha256 or None)
        if ref.size and len(data) != ref.size:
            raise DataLoss(f"object {ref.key} has {len(data)} bytes, expected {ref.size}")
        return data

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

    # -- json ----------------------------------------------------------------------------------
    def put_json(self, key: str, value: Any) -> common_pb2.BlobRef:
        return self.put_bytes(key, json.dumps(value, sort_keys=True).encode(),
                              content_type="application/json")

    def get_json(self, key: str) -> Any:
        return json.loads(self.get_bytes(key))
