"""Shared fixtures: a real S3-protocol server (moto) on 127.0.0.1:0, one bucket per test, the
digits data and strategy, and in-process gRPC servers on 127.0.0.1:0."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("FTPS_TORCH_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]

# What a bare CUDA machine with PyTorch lacks (issue 18): the compute core (ftps.ml, ftps.records,
# ftps.privacy) and bench/gpu.py must import none of it.
SERVICE_ONLY = ("grpc", "google", "ftps.v1", "minio", "boto3", "botocore", "sqlalchemy", "alembic",
                "psycopg", "starlette", "fastapi", "pydantic", "pydantic_settings", "prometheus_client",
                "opentelemetry", "pyarrow", "opacus", "ffcv", "jinja2", "rich")

_WITHOUT_SERVICE_STACK = """
import sys
blocked = {blocked!r}
class Block:
    def find_spec(self, name, path=None, target=None):
        if name in blocked or name.split(".")[0] in blocked:
            raise ImportError(f"{{name}} is not on a bare CUDA machine")
sys.meta_path.insert(0, Block())
"""


def run_without_service_stack(body: str, *, timeout: float = 600):
    """Python ``body`` in a fresh interpreter (cwd: the repository) where importing anything of
    ``SERVICE_ONLY`` fails -> its CompletedProcess (text output captured)."""
    import subprocess
    import sys

    code = _WITHOUT_SERVICE_STACK.format(blocked=SERVICE_ONLY) + body
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)


@pytest.fixture(scope="session")
def s3_endpoint():
    from ftps.common.embedded_s3 import EmbeddedS3

    server = EmbeddedS3("127.0.0.1", 0)
    endpoint = server.start()
    yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def pg_server():
    """One throwaway PostgreSQL server for the session (tests/pg.py); each test takes a database."""
    from tests.pg import PostgresServer

    server = PostgresServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    """A fresh, empty metadata database on each backend: the store contract tests run on both."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/meta.db"
    return request.getfixturevalue("pg_server").create_database()


@pytest.fixture
def storage_kwargs(s3_endpoint, tmp_path):
    """Settings fields pointing a service at a fresh bucket of the shared S3 server and a fresh
    SQLite metadata database (shared by the services of one test, as in the embedded stack), with auth
    switched off explicitly (services refuse to start with no key and no ``auth_disabled``; the
    tests of auth run with keys: test_auth.py, tests/hardening/test_auth_refusals.py)."""
    return dict(s3_endpoint=s3_endpoint, s3_bucket="t-" + uuid.uuid4().hex[:12],
                s3_access_key="test", s3_secret_key="test-secret", listen="127.0.0.1:0",
                auth_disabled=True, database_url=f"sqlite:///{tmp_path}/meta.db")


@pytest.fixture
def store(storage_kwargs):
    from ftps.common.settings import StorageSettings
    from ftps.common.storage import ObjectStore

    s = ObjectStore(StorageSettings(**storage_kwargs))
    s.ensure_bucket()
    return s


@pytest.fixture(scope="module")
def module_stack(tmp_path_factory):
    """The embedded stack for a test module (``tests.stacks.running_stack``): addresses, ``signer``,
    ``bucket``."""
    from tests.stacks import running_stack

    with running_stack(tmp_path_factory.mktemp("data")) as s:
        yield s


@pytest.fixture(scope="session")
def digits_splits():
    from ftps.ml.datasets import demo_splits

    return demo_splits("digits", seed=0)


@pytest.fixture(scope="session")
def digits_strategy() -> str:
    return (ROOT / "clients" / "strategies" / "digits_cnn.py").read_text()


@pytest.fixture(scope="session")
def digits_base_weights(digits_splits, digits_strategy) -> bytes:
    from ftps.ml.pretrain import pretrain_base_model

    x, y = digits_splits["pretrain"]
    return pretrain_base_model(digits_strategy, x, y, seed=0)


@pytest.fixture
def serve():
    """serve(server) -> "127.0.0.1:PORT"; every server is stopped at the end of the test."""
    from ftps.common import grpcutil

    servers = []
    channels = []

    def _serve(server: grpcutil.Server) -> str:
        port = server.start("127.0.0.1:0")
        servers.append(server)
        addr = f"127.0.0.1:{port}"
        ch = grpcutil.make_channel(addr)
        channels.append(ch)
        grpcutil.wait_healthy(ch, timeout=10)
        return addr

    yield _serve
    for ch in channels:
        ch.close()
    for s in reversed(servers):
        s.stop(grace=0.5)


def digits_records(splits, n: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    x, y = splits["contributors"]
    idx = np.random.default_rng(seed).choice(len(x), size=n, replace=False)
    return x[idx], y[idx]


@pytest.fixture
def validations(monkeypatch) -> list[int]:
    """Counts record validations (``ftps.records.checks.validate`` wherever records are loaded or
    built, ``ftps.records.npz``): one entry, the number of records, per call made in this process."""
    from ftps.records import npz

    calls: list[int] = []
    validate = npz.validate

    def counted(x, y, **kw):
        calls.append(len(x))
        return validate(x, y, **kw)

    monkeypatch.setattr(npz, "validate", counted)
    return calls
