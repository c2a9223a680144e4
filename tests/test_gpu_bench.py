"""``bench/gpu.py``: its ``--tiny`` mode runs the GPU bench's code on CPU, on a machine that has
only what a bare CUDA box has (no gRPC, protobuf, object store, database or web stack); its
helpers (CIFAR-shaped records, device peaks, records export)."""

from __future__ import annotations

import csv
import json
import sys

import numpy as np
import pytest

from tests.conftest import ROOT, run_without_service_stack

def _run_blocked(argv: list[str]):
    return run_without_service_stack(
        f"import runpy\nsys.argv = ['bench/gpu.py', *{argv!r}]\n"
        f"runpy.run_path({str(ROOT / 'bench' / 'gpu.py')!r}, run_name='__main__')\n")


def test_tiny_mode_runs_the_round_on_both_engines_and_precisions_without_the_service_stack(tmp_path):
    proc = _run_blocked(["--tiny", "--out", str(tmp_path)])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert any(f"records: {name}" in out for name in ("CIFAR-10", "Fashion-MNIST", "scikit-learn digits"))
    with (tmp_path / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["engine"], r["precision"]) for r in rows] == [
        ("sequential", "fp32"), ("stacked", "fp32"), ("sequential", "bf16"), ("stacked", "bf16")]
    for r in rows:
        assert r["skipped"] == ""
        assert float(r["round_s"]) > 0 and float(r["s_per_model"]) > 0 and float(r["models_per_s"]) > 0
        assert float(r["s_per_record"]) == pytest.approx(4 * float(r["s_per_model"]) / 4)
        assert float(r["tflops"]) > 0 and float(r["peak_mem_gib"]) > 0
        assert 0.0 <= float(r["auc"]) <= 1.0
    assert rows[0]["phi_pearson_vs_first"] == ""  # the reference itself
    # Same models, same batches: the float32 engines agree; bf16 is close to them.
    assert float(rows[1]["phi_pearson_vs_first"]) > 0.999
    assert rows[2]["precision_ran"] == "bf16" and float(rows[2]["phi_pearson_vs_first"]) > 0.9
    # The stacked engine says which precision it ran in (autocast does not reach inside vmap on CPU).
    assert rows[3]["precision_ran"] in ("bf16", "fp32")
    record = json.loads((tmp_path / "results.jsonl").read_text().splitlines()[-1])
    assert record["device"]["device"] == "cpu" and record["settings"]["tiny"] is True
    assert record["round_tflop"] > 0 and len(record["rows"]) == 4
    assert "fastest:" in out


def test_full_mode_refuses_a_machine_without_cuda(tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the full mode would run")
    proc = _run_blocked(["--out", str(tmp_path)])
    assert proc.returncode == 2 and "no CUDA device here" in proc.stderr


def test_records_are_made_cifar_shaped_and_exported(tmp_path):
    sys.path.insert(0, str(ROOT))
    from bench import gpu
    from ftps.ml.datasets import cifar_shaped

    grey = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
    shaped = cifar_shaped(grey)
    assert shaped.shape == (3, 3, 32, 32) and shaped.dtype == np.float32
    np.testing.assert_array_equal(shaped[:, 1, 2:30, 2:30], grey[:, 0])  # padded, not resampled
    assert shaped[:, :, :2].max() == 0 and np.array_equal(shaped[:, 0], shaped[:, 2])
    digits = cifar_shaped(np.ones((2, 1, 8, 8), dtype=np.float32))  # 8x8 -> 4x upscaled
    assert digits.shape == (2, 3, 32, 32) and digits.min() == 1.0
    with pytest.raises(ValueError, match="CIFAR-shaped"):
        cifar_shaped(np.zeros((1, 2, 28, 28), dtype=np.float32))

    path = tmp_path / "records.npz"
    gpu.export_records(path, 50, None)
    x, y, what = gpu.load_records(str(path), None)
    assert x.shape == (50, 1, 28, 28) and y.shape == (50,) and "Fashion-MNIST" in what
    assert 0.0 <= x.min() and x.max() <= 1.0


def test_device_peaks_are_matched_by_name():
    sys.path.insert(0, str(ROOT))
    from bench import gpu

    def peak(name: str):
        return next(((bf16, fp32) for key, bf16, fp32 in gpu.PEAKS if key in name), None)

    assert peak("NVIDIA H200") == (989.4, 66.9)
    assert peak("NVIDIA H100 PCIe") == (756.0, 51.2)
    assert peak("NVIDIA H100 80GB HBM3") == (989.4, 66.9)
    assert peak("NVIDIA A100-SXM4-80GB") == (312.0, 19.5)
    assert peak("NVIDIA L40S")[0] == 362.1 and peak("NVIDIA L4")[0] == 121.0
    assert peak("Some Future GPU") is None
