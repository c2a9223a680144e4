"""The tabular demo: the breast-cancer data and its splits, the shipped ``tabular_mlp`` strategy
through the real engine, ``ftps-stack demo --dataset breast-cancer`` on the embedded stack, and
``bench.attacks`` on the same task."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from rich.console import Console

from ftps.ml import datasets
from ftps.ml.datasets import (
    BREAST_CANCER_CLASSES,
    BREAST_CANCER_FEATURES,
    demo_split_indices,
    demo_splits,
    demo_tabular,
    load_breast_cancer,
)
from ftps.records import tabular
from tests.conftest import ROOT

STRATEGY = (ROOT / "clients" / "strategies" / "tabular_mlp.py").read_text()
SIZES = {"pretrain": 150, "builder": 150, "contributors": 269}


@pytest.fixture(scope="module")
def base_cache(tmp_path_factory):
    """One base-model cache for the module: the strategy pretrains once, the demo and the bench
    read it (``cached_base_model`` keys it by the data and the strategy, as they ask for it)."""
    path = tmp_path_factory.mktemp("base-models")
    mp = pytest.MonkeyPatch()
    mp.setenv("FTPS_CACHE_DIR", str(path))
    yield path
    mp.undo()


@pytest.fixture(scope="module")
def splits():
    return demo_splits("breast-cancer", seed=0)


@pytest.fixture(scope="module")
def base_weights(base_cache, splits) -> bytes:
    from ftps.ml.pretrain import cached_base_model

    weights, cached = cached_base_model("breast-cancer", STRATEGY, *splits["pretrain"], seed=0)
    assert not cached
    return weights


# --------------------------------------------------------------------------- data


def test_breast_cancer_is_the_real_data():
    x, y = load_breast_cancer()
    assert x.shape == (569, 30) and x.dtype == np.float64 and y.dtype == np.int64
    assert np.bincount(y).tolist() == [212, 357]  # 212 malignant, 357 benign
    assert len(BREAST_CANCER_FEATURES) == 30 and BREAST_CANCER_FEATURES[0] == "mean radius"
    assert BREAST_CANCER_FEATURES[29] == "worst fractal dimension" and BREAST_CANCER_CLASSES == ("malignant", "benign")
    # raw measurements, not standardised: mean radius in millimetres, every value >= 0
    assert 6 < x[:, 0].min() < x[:, 0].max() < 30 and (x >= 0).all()
    assert "breast-cancer" in datasets.DATASETS


def test_splits_partition_the_data_and_encode_with_the_builders_schema(splits):
    idx = demo_split_indices("breast-cancer", seed=0)
    assert {role: len(rows) for role, (_, rows) in idx.items()} == SIZES
    every = np.concatenate([rows for _, rows in idx.values()])
    assert sorted(every.tolist()) == list(range(569))  # disjoint and complete
    assert not np.array_equal(demo_split_indices("breast-cancer", seed=1)["pretrain"][1], idx["pretrain"][1])

    schema, raw = demo_tabular("breast-cancer", seed=0)
    x, y = load_breast_cancer()
    for role, (_, rows) in idx.items():
        np.testing.assert_array_equal(raw[role][0], x[rows])
        np.testing.assert_array_equal(raw[role][1], y[rows])
        ex, ey = splits[role]
        assert ex.dtype == np.float32 and ex.shape == (SIZES[role], schema.width) and np.isfinite(ex).all()
        np.testing.assert_array_equal(ex, schema.encode(raw[role][0]))
        np.testing.assert_array_equal(ey, y[rows])
    assert schema.width == 30 and schema.names == list(BREAST_CANCER_FEATURES)
    assert schema.label_column == "diagnosis" and schema.class_names == BREAST_CANCER_CLASSES
    # The normalisation is the builder's own rows', never the contributors'.
    own = np.concatenate([raw["pretrain"][0], raw["builder"][0]])
    np.testing.assert_allclose([f.mean for f in schema.features], own.mean(0))
    np.testing.assert_allclose([f.std for f in schema.features], own.std(0))
    assert [f.range for f in schema.features] == [(0.0, 10 * m) for m in own.max(0).tolist()]
    schema.check(num_classes=2)
    schema.check_rows(raw["contributors"][0])  # every real patient passes the builder's ranges
    assert tabular.Schema.from_proto(schema.to_proto()) == schema


# --------------------------------------------------------------------------- the strategy


def test_strategy_pretrains_a_useful_base_model(base_weights, splits):
    from ftps.ml.engine import load_weights
    from ftps.ml.pretrain import accuracy
    from ftps.ml.strategy import load_strategy

    strategy = load_strategy(STRATEGY)
    assert strategy.input_shape == (30,) and strategy.num_classes == 2 and strategy.recipe is not None
    model = strategy.build_model()
    load_weights(model, base_weights)
    # held-out patients (the contributors' split); chance is 0.62 (always "benign")
    assert accuracy(model, *splits["contributors"]) > 0.85


def test_fine_tuning_memorises_members_and_still_generalises(base_weights, splits):
    from ftps.ml.engine import finetune_and_score, load_weights
    from ftps.ml.strategy import load_strategy
    from ftps.ml.training import compute_phi
    from ftps.privacy.masks import make_masks

    cx, cy = splits["contributors"]
    x, y, held_x, held_y = cx[:80], cy[:80], cx[80:], cy[80:]
    member = make_masks(16, len(x), seed=0)  # 8 IN and 8 OUT models per record
    models = [(i, 100 + i, member[i]) for i in range(16)]
    result = finetune_and_score(strategy_source=STRATEGY, base_weights=base_weights, train_x=x, train_y=y,
                                eval_x=np.concatenate([x, held_x]), eval_y=np.concatenate([y, held_y]),
                                models=models)
    phi = result.phi
    assert phi.shape == (16, len(x) + len(held_x)) and np.isfinite(phi).all()
    on_batch = phi[:, :len(x)]
    # phi > 0 is a correct prediction (two classes): every member is fitted, other patients stay right.
    assert (on_batch[member] > 0).all()
    assert (phi[:, len(x):] > 0).mean() > 0.9
    # Most rows are classified with near certainty whether IN or OUT, so the signal is in the rows the
    # base model is unsure of (picked by the base model, not by the models measured): members push them up.
    base = load_strategy(STRATEGY).build_model()
    load_weights(base, base_weights)
    unsure = compute_phi(base, x, y) < 2.0
    gap = (np.where(member, on_batch, 0).sum(0) - np.where(~member, on_batch, 0).sum(0)) / 8
    assert unsure.sum() >= 3 and (gap[unsure] > 2.0).all(), (gap[unsure], unsure.sum())


# --------------------------------------------------------------------------- the demo, end to end


def test_demo_on_the_embedded_stack_scores_every_submitted_row(base_cache, base_weights, tmp_path):
    from stack.demo import print_report, run_demo, write_report
    from tests.stacks import builder, embedded_stack

    stack = embedded_stack(tmp_path / "data")
    try:
        signer = stack.signer()
        out = run_demo(stack.addresses, dataset="breast-cancer", records=40, models=8, shadow_models=4,
                       method="online-per-record", seed=0, console=Console(file=io.StringIO()), signer=signer)
        b = builder(stack.addresses, signer.issue("builder", "builder"))
        try:
            task = b.get_task(out["task"])
        finally:
            b.close()
    finally:
        stack.stop()
    s = task.settings
    assert s.HasField("schema") and not s.HasField("value_range")
    assert list(s.record_shape) == [30] and s.num_classes == 2  # filled by the registry from the schema
    assert tabular.Schema.from_proto(s.schema) == demo_tabular("breast-cancer", seed=0)[0]

    recs = out["records"]
    assert sorted(r["index"] for r in recs) == list(range(40)) and len({r["record_id"] for r in recs}) == 40
    assert {who: c["records"] for who, c in out["contributors"].items()} == {"alice": 20, "bob": 20}
    for r in recs:
        assert r["n_in"] == r["n_out"] == 4
        assert -1 <= r["score_ci_low"] <= r["score"] <= r["score_ci_high"] <= 1
    assert {m["method"] for m in out["methods"]} >= {"offline-global", "online-per-record"}
    assert out["offline"]["k"] == 4 and out["offline"]["sigma"] > 0
    json.loads(json.dumps(out))  # what --json prints

    printed = io.StringIO()
    print_report(out, Console(file=printed, width=200))
    assert "Privacy scores" in printed.getvalue() and "online-per-record *" in printed.getvalue()
    names = {p.name for p in write_report(out, tmp_path / "report")}
    assert names == {"result.json", "scores.csv", "roc.png", "scores.png"}
    assert json.loads((tmp_path / "report" / "result.json").read_text())["dataset"] == "breast-cancer"


def test_demo_command_takes_the_dataset():
    from stack.cli import DEMO_DATASETS, build_parser

    assert DEMO_DATASETS == datasets.DATASETS
    args = build_parser().parse_args(["demo", "--dataset", "breast-cancer"])
    assert (args.dataset, args.records, args.models) == ("breast-cancer", 200, 32)
    # the defaults fit the data: 200 of the 269 contributors' rows
    assert args.records <= SIZES["contributors"]


# --------------------------------------------------------------------------- bench.attacks


def test_bench_attacks_runs_on_the_tabular_task(base_cache, base_weights, tmp_path):
    from bench import attacks

    argv = ["--dataset", "breast-cancer", "--records", "30", "--models", "16", "--sizes", "4,8",
            "--shadow-models", "2", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out")]
    assert attacks.main(argv) == 0
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["dataset"] == "breast-cancer" and meta["pool_models"] == 16
    with np.load(tmp_path / "out" / "phi_pool.npz") as f:
        assert f["phi"].shape == f["member"].shape == (16, 30) and np.isfinite(f["phi"]).all()
        assert np.all(f["member"].sum(0) == 8)
    for heading in ("(a) Attack", "(b) Stability", "(c) Fidelity", "(d) Coverage"):
        assert heading in (tmp_path / "out" / "results.md").read_text()
