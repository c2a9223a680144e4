"""Archive bombs against a real builder registry process: a 1 MB npz that inflates to 1 GiB, a zip of
thousands of members, zip and .npy headers that lie, safetensors headers that point past the file
or declare terabytes. Each upload gets its exact status and message, nothing is stored, and the
registry's peak memory (VmHWM of its own process) stays within a few MB of where it was.

The registry runs as ``python -m services.builder_registry`` (as in its pod), so /proc/<pid>/status
measures it alone; its peak is reset before each bomb (``clear_refs``), so each number is that
upload's own."""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest
from safetensors.numpy import save as save_safetensors

from ftps.common import archives, grpcutil
from ftps.common.auth import TokenSigner
from ftps.common.settings import StorageSettings
from ftps.common.storage import ObjectStore
from ftps.v1 import common_pb2, registry_pb2, registry_pb2_grpc
from tests.test_archives import (Member, deflate_bomb, deflate_zeros, many_members, npy_header, safetensors_raw,
                                 zip_of)

ROOT = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024
SHAPE = [1, 4, 4]
# What one refused bomb may add to the registry's peak memory (the old reader added ~1.5 GB).
MAX_PEAK_GROWTH = 200 * MiB
DATA, BASE = common_pb2.BLOB_KIND_BUILDER_DATA, common_pb2.BLOB_KIND_BASE_MODEL


# -- the registry as its own process --------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak) of a process, bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak(pid: int) -> bool:
    """Set VmHWM back to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class RegistryProcess:
    """``python -m services.builder_registry`` from ``root`` on a fresh bucket, with a signing key;
    ``stub`` calls it as builder ``acme``."""

    def __init__(self, s3_endpoint: str, log_path: Path, *, root: Path = ROOT, **settings: str) -> None:
        key = secrets.token_hex(32)
        self.bucket = "t-" + uuid.uuid4().hex[:12]
        self.address = f"127.0.0.1:{_free_port()}"
        storage = dict(s3_endpoint=s3_endpoint, s3_bucket=self.bucket, s3_access_key="test",
                       s3_secret_key="test-secret")
        env = {k: v for k, v in os.environ.items() if not k.startswith("FTPS_")}
        env.update({f"FTPS_{k.upper()}": v for k, v in storage.items()})
        env.update({"FTPS_LISTEN": self.address, "FTPS_AUTH_KEY": key, "FTPS_LOG_LEVEL": "WARNING",
                    "FTPS_DATABASE_URL": f"sqlite:///{log_path.parent}/registry.db",
                    "PYTHONUNBUFFERED": "1", grpcutil.PARENT_PID_ENV: str(os.getpid())})
        env.update({f"FTPS_{k.upper()}": v for k, v in settings.items()})
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH", "")]))
        self.log_path = log_path
        with open(log_path, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "services.builder_registry"], cwd=root, env=env,
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        self.store = ObjectStore(StorageSettings(**storage))
        token = TokenSigner(bytes.fromhex(key)).issue("acme", "builder")
        self.channel = grpcutil.make_channel(self.address, token=token)
        self.stub = registry_pb2_grpc.BuilderRegistryServiceStub(self.channel)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the registry exited: {log_path.read_text()[-2000:]}")
            try:
                grpcutil.wait_healthy(self.channel, timeout=1)
                break
            except (grpc.FutureTimeoutError, grpc.RpcError, RuntimeError):
                if time.monotonic() > deadline:
                    raise
        # Bring in every code path of an upload before measuring: the first one imports and warms.
        warm = self.task()
        self.upload(warm.task_id, DATA, archives.records_to_npz(np.zeros((8, *SHAPE), np.float32), np.arange(8) % 3))
        self.upload(warm.task_id, BASE, save_safetensors({"w": np.ones((4, 4), np.float32)}))

    def task(self) -> registry_pb2.Task:
        return self.stub.CreateTask(registry_pb2.CreateTaskRequest(name="bombs", settings=common_pb2.TaskSettings(
            record_shape=SHAPE, num_classes=3)), timeout=10)

    def upload(self, task_id: str, kind: int, data: bytes) -> common_pb2.BlobRef:
        def messages():
            yield registry_pb2.UploadBlobRequest(header=registry_pb2.UploadHeader(
                task_id=task_id, kind=kind, size=len(data), sha256=hashlib.sha256(data).hexdigest()))
            for i in range(0, len(data), 256 * 1024):
                yield registry_pb2.UploadBlobRequest(chunk=data[i:i + 256 * 1024])
        return self.stub.UploadBlob(messages(), timeout=120)

    def refused(self, kind: int, data: bytes) -> tuple[grpc.StatusCode, str, int]:
        """Upload ``data`` to a fresh task -> (status, details, growth of the peak memory in bytes);
        asserts that nothing was stored."""
        t = self.task()
        before = memory(self.proc.pid)
        assert reset_peak(self.proc.pid), "cannot reset the registry's VmHWM"
        with pytest.raises(grpc.RpcError) as e:
            self.upload(t.task_id, kind, data)
        growth = memory(self.proc.pid)["VmHWM"] - before["VmRSS"]
        after = self.stub.GetTask(registry_pb2.GetTaskRequest(task_id=t.task_id), timeout=5)
        assert not after.base_model.key and not after.builder_data.key
        assert list(self.store.list_keys(f"registry/tasks/{t.task_id}/")) == []  # the task is a database row
        return e.value.code(), e.value.details(), growth

    def stop(self) -> None:
        self.channel.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def registry(s3_endpoint, tmp_path_factory):
    r = RegistryProcess(s3_endpoint, tmp_path_factory.mktemp("bombs") / "registry.log")
    yield r
    r.stop()


# -- the bombs ------------------------------------------------------------------------------------

def _understated_zip() -> bytes:
    """A 1 GiB member whose zip header declares 200 bytes (its .npy header is honest)."""
    raw, crc = deflate_zeros(npy_header((2**24, *SHAPE)), 2**30)
    return zip_of([Member("x.npy", raw, 200, crc)])


def _lying_zip() -> bytes:
    """Both headers declare one record (192 bytes); the stream inflates to 1 GiB."""
    xh, yh = npy_header((1, *SHAPE)), npy_header((1,), "<i8")
    raw, crc = deflate_zeros(xh, 2**30)
    y_raw, y_crc = deflate_zeros(yh, 8)
    return zip_of([Member("x.npy", raw, len(xh) + 64, crc), Member("y.npy", y_raw, len(yh) + 8, y_crc)])


def _huge_shape() -> bytes:
    xh = npy_header((2**40, *SHAPE))
    return zip_of([Member("x.npy", xh, len(xh), 0, method=0)])


def _tensor(shape, offsets) -> dict:
    return {"w": {"dtype": "F32", "shape": list(shape), "data_offsets": list(offsets)}}


BOMBS = {
    "deflate bomb, 1 MB -> 1 GiB": (
        DATA, lambda: deflate_bomb(2**24),
        "builder_data: member x.npy expands to 1073741952 bytes (its zip header says); the limit is 536870912 bytes"),
    "5000 members": (DATA, lambda: many_members(5000), "builder_data has 5000 members; the limit is 64"),
    "zip header understates a 1 GiB member": (
        DATA, _understated_zip,
        "builder_data: member x.npy expands to 1073741952 bytes; the limit is 536870912 bytes"),
    "zip and npy headers understate a 1 GiB stream": (
        DATA, _lying_zip, "builder_data: member x.npy expands past the 192 bytes its headers declare"),
    "npy header declares 64 TiB": (
        DATA, _huge_shape, "builder_data: member x.npy expands to 70368744177792 bytes; the limit is 536870912 bytes"),
    "safetensors header length 2^60": (
        BASE, lambda: safetensors_raw(_tensor((2,), (0, 8)), bytes(8), length=2**60),
        "base_model: safetensors header of 1152921504606846976 bytes; the limit is 2097152"),
    "safetensors offsets past the file": (
        BASE, lambda: safetensors_raw(_tensor((2**20,), (0, 4 * 2**20)), bytes(8)),
        "base_model: tensor w: data_offsets [0, 4194304] run past the 8 bytes of data"),
    "safetensors shape of 4 TiB": (
        BASE, lambda: safetensors_raw(_tensor((2**20, 2**20), (0, 4 * 2**40)), bytes(8)),
        "base_model: tensor w: [1048576, 1048576] of F32 is 4398046511104 bytes, 4398046511104 with the "
        "tensors before it; the limit is 536870912 bytes"),
}


@pytest.mark.parametrize("name", list(BOMBS))
def test_bomb_is_refused_unread_and_stored_nowhere(registry, name):
    kind, make, message = BOMBS[name]
    data = make()
    assert len(data) < 2 * MiB
    code, details, growth = registry.refused(kind, data)
    print(f"\n{name}: {len(data)} bytes uploaded, registry peak +{growth / MiB:.1f} MiB")
    assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT, message)
    assert growth < MAX_PEAK_GROWTH, f"{name}: the registry's peak memory grew by {growth / MiB:.0f} MiB"


def test_limit_is_the_setting_and_good_data_still_passes(s3_endpoint, tmp_path):
    """FTPS_MAX_EXPANDED_MB is what bounds builder data (here 1 MiB): just under it is stored, just
    over it is refused naming the limit."""
    r = RegistryProcess(s3_endpoint, tmp_path / "registry.log", max_expanded_mb="1")
    try:
        t = r.task()
        m = (MiB - 2 * 128) // (64 + 8)  # records that fit: x and y, headers included
        ok = archives.records_to_npz(np.zeros((m, *SHAPE), np.float32), np.zeros(m, np.int64))
        assert r.upload(t.task_id, DATA, ok).size == len(ok)
        big = archives.records_to_npz(np.zeros((m + 1, *SHAPE), np.float32), np.zeros(m + 1, np.int64))
        code, details, _ = r.refused(DATA, big)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert details == (f"builder_data: its members expand to more than {MiB} bytes together (the limit), "
                           f"{128 * 2 + (m + 1) * 72} with y.npy")
    finally:
        r.stop()

