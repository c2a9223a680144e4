"""The committed generated code matches protos/, and messages round-trip."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ftps.common import serde
from ftps.common.errors import InvalidArgument
from ftps.v1 import common_pb2, gateway_pb2, registry_pb2, scorer_pb2, worker_pb2

ROOT = Path(__file__).resolve().parents[1]


def test_generated_code_does_not_drift(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PY=sys.executable)
    subprocess.run(["bash", str(ROOT / "scripts" / "protoc.sh")], check=True, env=env, cwd=ROOT)
    generated = sorted(p.name for p in (tmp_path / "ftps" / "v1").iterdir() if p.suffix in (".py", ".pyi"))
    committed = sorted(p.name for p in (ROOT / "ftps" / "v1").iterdir() if p.suffix in (".py", ".pyi"))
    assert generated == committed
    drifted = [n for n in generated if not filecmp.cmp(tmp_path / "ftps" / "v1" / n, ROOT / "ftps" / "v1" / n,
                                                       shallow=False)]
    assert not drifted, f"regenerate with `make protos`: {drifted} differ from protos/"


def test_every_service_is_declared():
    assert set(registry_pb2.DESCRIPTOR.services_by_name) == {"BuilderRegistry"}
    assert set(gateway_pb2.DESCRIPTOR.services_by_name) == {"ContributorGateway"}
    assert set(worker_pb2.DESCRIPTOR.services_by_name) == {"FinetuneWorker"}
    assert set(scorer_pb2.DESCRIPTOR.services_by_name) == {"LiraScorer"}


@pytest.mark.parametrize("dtype", ["float32", "float64", "uint8", "int64", "bool"])
def test_tensor_round_trip(dtype):
    a = (np.arange(24).reshape(2, 3, 4) % 3).astype(dtype)
    t = serde.tensor_from_array(a)
    back = serde.array_from_tensor(common_pb2.Tensor.FromString(t.SerializeToString()))
    assert back.dtype == a.dtype and back.shape == a.shape
    np.testing.assert_array_equal(back, a)


def test_tensor_with_wrong_byte_count_names_the_field():
    t = serde.tensor_from_array(np.zeros((2, 2), np.float32))
    t.data = t.data[:-1]
    with pytest.raises(InvalidArgument, match="records.x.data"):
        serde.array_from_tensor(t, field="records.x")


def test_tensor_with_unset_dtype_is_refused():
    with pytest.raises(InvalidArgument, match="dtype"):
        serde.array_from_tensor(common_pb2.Tensor(shape=[1], data=b"\0"))


def test_job_round_trip():
    job = worker_pb2.FinetuneJob(task_id="t-1", job_id="r-1-j0", builder_mix=3,
                                 models=[worker_pb2.ModelSpec(index=5, seed=2**63 - 1, mask=b"\x01\x00")])
    back = worker_pb2.FinetuneJob.FromString(job.SerializeToString())
    assert back == job and back.models[0].seed == 2**63 - 1


def test_npz_refuses_pickled_object_arrays():
    import io

    buf = io.BytesIO()
    np.savez(buf, x=np.array([{"evil": 1}], dtype=object), y=np.zeros(1, np.int64))
    with pytest.raises(InvalidArgument, match="pickle"):
        serde.npz_arrays(buf.getvalue())


def test_method_names_cover_the_enum():
    names = {v.name for v in common_pb2.Method.DESCRIPTOR.values if v.number}
    assert {f"METHOD_{n.upper().replace('-', '_')}" for n in serde.METHOD_ENUMS} == names


def test_records_npz_is_deterministic_and_loadable():
    x = np.random.default_rng(0).random((3, 1, 2, 2), dtype=np.float32)
    y = np.arange(3)
    a = serde.records_to_npz(x, y)
    assert a == serde.records_to_npz(x.copy(), y.copy())  # content-addressed: same arrays, same sha256
    back = serde.npz_arrays(a)
    np.testing.assert_array_equal(back["x"], x)
    np.testing.assert_array_equal(back["y"], y)
