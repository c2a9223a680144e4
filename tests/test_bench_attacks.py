"""Tests of ``bench/attacks.py``: the pure measurement code on synthetic statistics, and one end-
to-end run on a tiny digits configuration (real pretraining and fine-tuning, a few seconds)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from bench import attacks
from ftps.privacy.masks import make_masks


def _pool(n=64, m=40, seed=0, effect=3.0):
    rng = np.random.default_rng(seed)
    member = np.concatenate([make_masks(32, m, seed=seed + c) for c in range(n // 32)])
    phi = rng.normal(size=(n, m)) + member * effect * rng.uniform(0, 1, m) + rng.normal(0, 2, m)
    return phi, member


def test_blocks_are_disjoint_whole_pairs():
    bl = attacks.blocks(70, 16)
    assert [b.tolist() for b in bl] == [list(range(s, s + 16)) for s in (0, 16, 32, 48)]
    assert attacks.blocks(10, 16) == []


@pytest.mark.parametrize("text", ["16,x", "3", "6,15", ""])
def test_sizes_rejects_bad_values(text):
    with pytest.raises(SystemExit):
        attacks.parse_args(["--sizes", text])


def test_parse_args_defaults_and_limits():
    args = attacks.parse_args([])
    assert (args.models, args.sizes, args.records, args.shadow_models) == (512, [16, 32, 64], 200, 16)
    assert attacks.parse_args(["--quick"]).models == 128
    with pytest.raises(SystemExit):
        attacks.parse_args(["--models", "100"])  # needs two blocks of the largest size
    with pytest.raises(SystemExit):
        attacks.parse_args(["--models", "129", "--sizes", "16"])


def test_measure_on_synthetic_pool():
    phi, member = _pool()
    res = attacks.measure(phi, member, sizes=[8, 16], offline=(float(phi.mean()), float(phi.std())),
                          log=lambda _: None)
    n_variants = len(attacks.VARIANTS)
    assert len(res["attack"]) == len(res["stability"]) == 2 * n_variants
    assert len(res["fidelity"]) == 2 * n_variants * len(attacks.SCORES)
    assert [r["blocks"] for r in res["attack"][:: n_variants]] == [8, 4]
    assert [r["pairs"] for r in res["stability"][:: n_variants]] == [4, 2]
    for r in res["attack"]:
        assert 0.5 < r["auc"] <= 1 and 0 <= r["tpr_at_0_1pct_fpr"] <= r["tpr_at_1pct_fpr"] <= 1
    online = {(r["n"], r["score"]): r for r in res["fidelity"] if r["method"] == "online-per-record"}
    assert online[(16, "model")]["spearman"] > 0.5  # a real per-record effect is tracked
    for r in res["coverage"]:
        assert 0 <= r["covers_reference"] <= 1 and r["mean_width"] > 0
    assert {(r["score"]) for r in res["coverage"]} == {"P", "model"}
    assert [s["n"] for s in res["scatter"]] == [8, 16]
    assert len(res["roc"]) == n_variants  # ROC at the largest size when 32 is not measured
    text = attacks.tables(res)
    for v in attacks.VARIANTS:
        assert f"| {v.label} | 16 |" in text["attack"]
    assert set(text) == {"attack", "stability", "fidelity", "coverage"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One run of the whole benchmark on digits: 32 models x 40 records, blocks of 8 and 16."""
    tmp = tmp_path_factory.mktemp("bench")
    mp = pytest.MonkeyPatch()
    mp.setenv("FTPS_CACHE_DIR", str(tmp / "base"))  # the demo's base-model cache
    mp.setenv("FTPS_TORCH_THREADS", "1")
    argv = ["--dataset", "digits", "--records", "40", "--models", "32", "--sizes", "8,16",
            "--shadow-models", "4", "--cache-dir", str(tmp / "cache"), "--out", str(tmp / "out")]
    try:
        code = attacks.main(argv)
    finally:
        mp.undo()
    return code, tmp, argv


def test_tiny_digits_run_writes_every_figure(tiny_run, capsys):
    code, tmp, _ = tiny_run
    assert code == 0
    out = tmp / "out"
    for name in ("attack.csv", "stability.csv", "fidelity.csv", "coverage.csv", "results.md",
                 "meta.json", "phi_pool.npz"):
        assert (out / name).stat().st_size > 0, name
    for name in ("fidelity.png", "roc.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    with (out / "attack.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert {r["method"] for r in rows} == {v.label for v in attacks.VARIANTS}
    assert {r["n"] for r in rows} == {"8", "16"}
    meta = json.loads((out / "meta.json").read_text())
    assert meta["pool_models"] == 32 and meta["fine_tuned_this_run"] == 32
    with np.load(out / "phi_pool.npz") as f:  # the input format of ftps-score
        assert f["phi"].shape == f["member"].shape == (32, 40)
        assert np.all(f["member"].sum(0) == 16) and float(f["offline_sigma"]) > 0
    text = (out / "results.md").read_text()
    for heading in ("(a) Attack", "(b) Stability", "(c) Fidelity", "(d) Coverage"):
        assert heading in text


def test_tiny_digits_rerun_is_cached(tiny_run, tmp_path):
    _, tmp, argv = tiny_run
    mp = pytest.MonkeyPatch()
    mp.setenv("FTPS_CACHE_DIR", str(tmp / "base"))
    try:
        assert attacks.main([*argv[:-1], str(tmp_path / "again")]) == 0
    finally:
        mp.undo()
    meta = json.loads((tmp_path / "again" / "meta.json").read_text())
    assert meta["fine_tuned_this_run"] == 0
    with np.load(tmp / "out" / "phi_pool.npz") as a, np.load(tmp_path / "again" / "phi_pool.npz") as b:
        np.testing.assert_array_equal(a["phi"], b["phi"])


@pytest.mark.slow
def test_quick_mode_on_the_demo_task(tmp_path):
    """``python -m bench.attacks --quick`` as documented: Fashion-MNIST, 128 models (about a
    minute of fine-tuning on one core when nothing is cached; the pool cache is shared)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(attacks.__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "bench.attacks", "--quick", "--out", str(tmp_path)],
                          cwd=root, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for heading in ("(a) Attack", "(b) Stability", "(c) Fidelity", "(d) Coverage"):
        assert heading in proc.stdout
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["pool_models"] == 128 and meta["dataset"] == "fashion-mnist"
    with (tmp_path / "attack.csv").open() as fh:
        auc = {(r["method"], r["n"]): float(r["auc"]) for r in csv.DictReader(fh)}
    # The demo task leaks: per-record online LiRA beats the paper's global Gaussian clearly.
    assert auc[("online-per-record", "32")] > auc[("offline-global", "32")] + 0.1
