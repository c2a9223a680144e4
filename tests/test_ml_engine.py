"""ftps.ml: data, the strategy contract, the statistic phi, fine-tuning (in-process, digits)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ftps.ml import datasets
from ftps.ml.datasets import (
    demo_split_indices,
    load_digits,
    load_fashion_mnist,
)
from ftps.ml.engine import (
    configure_threads,
    finetune_and_score,
    load_weights,
    run_job,
    save_weights,
)
from ftps.ml.jobs import CHECK_ONLY, FinetuneJob, JobResult, ModelSpec
from ftps.ml.pretrain import accuracy, pretrain_base_model
from ftps.ml.strategy import (
    EngineError,
    StrategyError,
    WeightsError,
    load_strategy,
)
from ftps.ml.training import batch_bounds, compute_phi
from ftps.records import RecordsError
from ftps.records.npz import Records
from ftps.records.npz import load as load_records
from ftps.records.npz import save as save_records
from tests.conftest import ROOT, digits_records

FMNIST_PRESENT = (datasets.FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file()

TINY = """
from torch import nn
INPUT_SHAPE = (1, 8, 8)
def build_model():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
"""
TINY_RECIPE = TINY + 'RECIPE = {"optimizer": "sgd", "lr": 0.1, "epochs": 2, "batch_size": 8}\n'


def _halves(m: int, pairs: int, seed: int = 0) -> list[tuple[int, int, np.ndarray]]:
    """Complementary random halves: model 2k and 2k+1 split the m records between them."""
    rng = np.random.default_rng(seed)
    models = []
    for k in range(pairs):
        half = np.zeros(m, dtype=bool)
        half[rng.permutation(m)[: m // 2]] = True
        models += [(2 * k, 100 + 2 * k, half), (2 * k + 1, 101 + 2 * k, ~half)]
    return models


@pytest.fixture(scope="module")
def records(digits_splits):
    return digits_records(digits_splits, 60, seed=1)


@pytest.fixture(scope="module")
def tiny_weights() -> bytes:
    torch.manual_seed(0)
    return save_weights(load_strategy(TINY_RECIPE).build_model())


def _job(strategy, weights, x, y, models, *, builder_x=None, builder_y=None, builder_mix=0,
         progress=None):
    """``run_job`` evaluating on the train records -> PHI."""
    builder = None if builder_x is None else Records.of(builder_x, builder_y)
    job = FinetuneJob(strategy_source=strategy, base_weights=weights, train_records=Records.of(x, y),
                      models=models, builder_records=builder, builder_mix=builder_mix)
    return run_job(job, progress=progress).phi


# --------------------------------------------------------------------------- data


def test_digits_shapes_and_ranges():
    x, y = load_digits()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == np.float32
    assert y.shape == (1797,) and y.dtype == np.int64
    assert x.min() == 0.0 and x.max() == 1.0
    assert set(np.unique(y)) == set(range(10))
    assert x.strides == (256, 256, 32, 4)  # plain row-major, see training.owned_tensor


def test_digits_splits_partition_the_data(digits_splits):
    idx = demo_split_indices("digits", seed=0)
    sizes = {role: len(rows) for role, (_, rows) in idx.items()}
    assert sizes == {"pretrain": 600, "builder": 500, "contributors": 697}
    allrows = np.concatenate([rows for _, rows in idx.values()])
    assert np.array_equal(np.sort(allrows), np.arange(1797))
    x, y = load_digits()
    for role, (_, rows) in idx.items():
        np.testing.assert_array_equal(digits_splits[role][0], x[rows])
        np.testing.assert_array_equal(digits_splits[role][1], y[rows])
    assert not np.array_equal(demo_split_indices("digits", seed=1)["pretrain"][1], idx["pretrain"][1])


@pytest.mark.skipif(not FMNIST_PRESENT, reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_shapes_and_splits():
    x, y = load_fashion_mnist("test")
    assert x.shape == (10000, 1, 28, 28) and x.dtype == np.float32
    assert y.shape == (10000,) and y.dtype == np.int64
    assert x.min() == 0.0 and x.max() == 1.0 and set(np.unique(y)) == set(range(10))
    idx = demo_split_indices("fashion-mnist", seed=0)
    assert [len(r) for _, r in idx.values()] == [20000, 10000, 10000]
    assert idx["pretrain"][0] == idx["builder"][0] == "train" and idx["contributors"][0] == "test"
    assert not set(idx["pretrain"][1]) & set(idx["builder"][1])
    assert idx["pretrain"][1].max() < 60000
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("validation")


def test_missing_fashion_mnist_names_the_package(monkeypatch, tmp_path):
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIR", tmp_path)
    datasets._fashion_mnist_raw.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
            load_fashion_mnist("test")
    finally:
        datasets._fashion_mnist_raw.cache_clear()


def test_records_roundtrip_and_validation():
    x = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    y = np.arange(5, dtype=np.int64)
    buf = io.BytesIO()
    save_records(buf, x, y)
    x2, y2 = load_records(buf.getvalue())
    np.testing.assert_array_equal(x2, x)
    np.testing.assert_array_equal(y2, y)

    def npz(**arrays) -> bytes:
        b = io.BytesIO()
        np.savez(b, **arrays)
        return b.getvalue()

    bad = {
        "float32": npz(x=x.astype(np.float64), y=y),
        "int64": npz(x=x, y=y.astype(np.int32)),
        "1-D": npz(x=x, y=y[:, None]),
        "labels": npz(x=x, y=y[:4]),
        "NaN": npz(x=np.where(x > 0.5, np.nan, x).astype(np.float32), y=y),
        "exactly arrays x and y": npz(x=x, y=y, z=y),
        "not a valid npz": b"definitely not a zip file",
    }
    for message, data in bad.items():
        with pytest.raises(ValueError, match=message):
            load_records(data)
    # Object arrays would need pickle: refused, never unpickled.
    with pytest.raises(RecordsError, match="not a valid npz"):
        load_records(npz(x=np.array([object()], dtype=object), y=y))
    with pytest.raises(ValueError, match="float32"):
        save_records(io.BytesIO(), x.astype(np.float64), y)


# --------------------------------------------------------------------------- the statistic


class _LogitsAreInputs(nn.Module):
    """A model whose logits are its input, flattened: phi can be checked by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return x.flatten(1)


def _phi_by_hand(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    out = []
    for row, label in zip(z, y):
        others = np.delete(row, label)
        peak = others.max()
        out.append(row[label] - (peak + np.log(np.exp(others - peak).sum())))
    return np.array(out)


def test_phi_matches_hand_computation_including_extreme_logits():
    z = np.array([
        [2.0, 1.0, 0.1],
        [0.0, 0.0, 0.0],          # uniform: p = 1/3, phi = log(1/2)
        [60.0, 0.0, -5.0],        # p rounds to 1 in float64: naive log(p/(1-p)) = inf
        [-80.0, 30.0, 29.0],      # p rounds to 0: naive gives -inf
        [3e38, -3e38, 0.0],       # float32 extremes
        [1e4, 1e4, -1e4],
    ], dtype=np.float32)
    y = np.array([0, 2, 0, 0, 0, 1], dtype=np.int64)
    phi = compute_phi(_LogitsAreInputs(), z, y)
    assert phi.dtype == np.float64 and phi.shape == (6,)
    assert np.isfinite(phi).all()
    np.testing.assert_allclose(phi, _phi_by_hand(z, y), rtol=1e-12, atol=1e-12)
    assert phi[1] == pytest.approx(np.log(0.5))
    assert phi[2] == pytest.approx(60.0 - np.log1p(np.exp(-5.0)))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.floats(-10, 10, width=32), min_size=2, max_size=6), min_size=1,
                max_size=8).filter(lambda rows: len({len(r) for r in rows}) == 1),
       st.integers(0, 2**31))
def test_phi_is_log_odds_of_the_softmax(rows, seed):
    # Moderate logits: the naive reference log(p) - log(1 - p) is itself only accurate there.
    z = np.array(rows, dtype=np.float32)
    y = np.random.default_rng(seed).integers(0, z.shape[1], len(z))
    p = torch.softmax(torch.tensor(z, dtype=torch.float64), 1).numpy()[np.arange(len(z)), y]
    phi = compute_phi(_LogitsAreInputs(), z, y, batch_size=3)
    np.testing.assert_allclose(phi, np.log(p) - np.log1p(-p), atol=1e-6)


def test_tta_averages_the_queries():
    z = np.array([[[[2.0, 0.0, -1.0]]], [[[0.5, 1.5, 0.0]]]], dtype=np.float32)  # [2,1,1,3]
    y = np.array([0, 1], dtype=np.int64)
    flat = z.reshape(2, 3)
    expected = (_phi_by_hand(flat, y) + _phi_by_hand(flat[:, ::-1], y)) / 2
    np.testing.assert_allclose(compute_phi(_LogitsAreInputs(), z, y, tta=["hflip"]), expected)


def test_phi_is_nan_where_logits_are_not_finite():
    # The record's statistic is NaN (the scorer traces it to the record); the others are kept.
    z = np.array([[np.inf, 0.0], [1.0, 0.0], [np.nan, 2.0]], dtype=np.float32)
    phi = compute_phi(_LogitsAreInputs(), z, np.array([0, 0, 1]))
    assert np.isnan(phi[0]) and np.isnan(phi[2]) and phi[1] == pytest.approx(1.0)


# --------------------------------------------------------------------------- fine-tuning


def test_finetuning_is_deterministic(digits_strategy, digits_base_weights, records):
    x, y = records
    models = _halves(len(x), 1)
    a = _job(digits_strategy, digits_base_weights, x, y, models)
    b = _job(digits_strategy, digits_base_weights, x, y, models)
    assert a.shape == (2, len(x)) and a.dtype == np.float64
    np.testing.assert_array_equal(a, b)
    # The same model alone gives the same row; another seed another one.
    np.testing.assert_array_equal(_job(digits_strategy, digits_base_weights, x, y, models[1:])[0], a[1])
    other = [(0, 999, models[0][2])]
    assert not np.array_equal(_job(digits_strategy, digits_base_weights, x, y, other)[0], a[0])


def test_membership_signal_on_digits(digits_strategy, digits_base_weights, digits_splits):
    x, y = digits_records(digits_splits, 100, seed=2)
    models = _halves(len(x), 2)
    progress = []
    phi = _job(digits_strategy, digits_base_weights, x, y, models,
               progress=lambda d, t: progress.append((d, t)))
    assert progress == [(1, 4), (2, 4), (3, 4), (4, 4)]
    g = np.stack([m[2] for m in models])
    mean_in, mean_out = phi[g].mean(), phi[~g].mean()
    assert mean_in > mean_out + 0.3, (mean_in, mean_out)
    # Per record, IN models mostly score higher than OUT models.
    per_record = np.where(g, phi, 0).sum(0) / g.sum(0) - np.where(~g, phi, 0).sum(0) / (~g).sum(0)
    assert (per_record > 0).mean() > 0.6


def test_builder_mix_is_sampled_by_seed(tiny_weights, records, digits_splits):
    x, y = records
    bx, by = digits_splits["builder"]
    models = _halves(len(x), 1)
    kw = dict(builder_x=bx, builder_y=by)
    mixed = _job(TINY_RECIPE, tiny_weights, x, y, models, builder_mix=20, **kw)
    np.testing.assert_array_equal(mixed, _job(TINY_RECIPE, tiny_weights, x, y, models, builder_mix=20, **kw))
    assert not np.array_equal(mixed, _job(TINY_RECIPE, tiny_weights, x, y, models, **kw))
    with pytest.raises(RecordsError, match="exceeds the 500 builder records"):
        _job(TINY_RECIPE, tiny_weights, x, y, models, builder_mix=501, **kw)
    with pytest.raises(RecordsError, match="no builder data"):
        _job(TINY_RECIPE, tiny_weights, x, y, models, builder_mix=5)


def test_recipe_options_run_and_stay_deterministic(tiny_weights, records):
    x, y = records
    source = TINY + (
        'RECIPE = {"optimizer": "adamw", "lr": 0.01, "epochs": 2, "batch_size": 7,'
        ' "weight_decay": 0.01, "train": ["1."], "augment": ["hflip", "random-crop:1"],'
        ' "tta": ["hflip"]}\n'
    )
    models = _halves(len(x), 1)
    a = _job(source, tiny_weights, x, y, models)
    np.testing.assert_array_equal(a, _job(source, tiny_weights, x, y, models))
    assert np.isfinite(a).all()


def test_free_form_finetune(tiny_weights, records):
    x, y = records
    source = TINY + """
import torch
TTA = ["hflip"]
def finetune(model, x, y, *, seed, device):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(20):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model
"""
    models = _halves(len(x), 1)
    phi = _job(source, tiny_weights, x, y, models)
    g = np.stack([m[2] for m in models])
    assert phi[g].mean() > phi[~g].mean()
    with pytest.raises(StrategyError, match="must return the fine-tuned torch.nn.Module, got NoneType"):
        _job(TINY + "def finetune(model, x, y, *, seed, device):\n    pass\n", tiny_weights, x, y, models)


def test_pretrain_gives_a_useful_base_model(digits_strategy, digits_base_weights, digits_splits):
    model = load_strategy(digits_strategy).build_model()
    load_weights(model, digits_base_weights)
    assert accuracy(model, *digits_splits["contributors"]) > 0.85
    with pytest.raises(StrategyError, match="neither RECIPE nor PRETRAIN"):
        pretrain_base_model(TINY + "def finetune(m, x, y, *, seed, device):\n    return m\n",
                            *digits_splits["pretrain"])


def test_torch_threads_follow_the_environment(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("FTPS_TORCH_THREADS", "1")
        assert configure_threads() == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("FTPS_TORCH_THREADS", "zero")
        with pytest.raises(EngineError, match="FTPS_TORCH_THREADS"):
            configure_threads()
    finally:
        torch.set_num_threads(before)


def test_batches_never_leave_a_single_record():
    assert batch_bounds(65, 32) == [(0, 32), (32, 65)]
    assert batch_bounds(64, 32) == [(0, 32), (32, 64)]
    assert batch_bounds(1, 32) == [(0, 1)]
    assert batch_bounds(0, 32) == []


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("source", "message"), [
    ("RECIPE = {}\n", "strategy defines no build_model()"),
    ("def build_model():\n    pass\n", "defines neither RECIPE nor finetune()"),
    (TINY_RECIPE + "def finetune(m, x, y, *, seed, device):\n    return m\n", "defines both"),
    (TINY_RECIPE.replace('"sgd"', '"lbfgs"'), r"RECIPE\['optimizer'\] must be one of"),
    (TINY_RECIPE.replace('"lr": 0.1', '"lr": -1'), r"RECIPE\['lr'\] must be a number > 0, got -1"),
    (TINY_RECIPE.replace('"lr": 0.1', '"lr": 0'), r"RECIPE\['lr'\]"),
    (TINY_RECIPE.replace('"epochs": 2', '"epochs": 0'), r"RECIPE\['epochs'\]"),
    (TINY_RECIPE.replace('"batch_size": 8', '"batch_size": 0'), r"RECIPE\['batch_size'\]"),
    (TINY_RECIPE.replace('"batch_size": 8', '"batch_size": "8"'), r"RECIPE\['batch_size'\]"),
    (TINY_RECIPE.replace('"batch_size": 8', '"batch_size": 8, "lr_decay": 1'), "unknown key.*lr_decay"),
    (TINY_RECIPE.replace('"batch_size": 8', '"batch_size": 8, "augment": ["mixup"]'), r"RECIPE\['augment'\]"),
    (TINY_RECIPE.replace('"batch_size": 8', '"batch_size": 8, "tta": ["vflip"]'), r"RECIPE\['tta'\]"),
    (TINY_RECIPE + 'PRETRAIN = {"epochs": -2}\n', r"PRETRAIN\['epochs'\]"),
    ("def build_model(:\n", "does not compile"),
    ("import os\nraise RuntimeError('no way')\n", "raised while loading: RuntimeError: no way"),
    ("import sys\nsys.exit(3)\n", "raised while loading: SystemExit"),
])
def test_invalid_strategies_are_strategy_errors(source, message):
    with pytest.raises(StrategyError, match=message):
        load_strategy(source)


def test_strategy_runtime_failures(tiny_weights, records):
    x, y = records
    models = _halves(len(x), 1)
    with pytest.raises(StrategyError, match=r"RECIPE\['train'\] prefix 'head' matches no parameter"):
        _job(TINY_RECIPE.replace('"batch_size": 8', '"batch_size": 8, "train": ["head"]'),
             tiny_weights, x, y, models)
    raising = TINY + "def finetune(model, x, y, *, seed, device):\n    raise KeyError('oops')\n"
    with pytest.raises(StrategyError, match="finetune\\(\\) raised KeyError: 'oops' \\(strategy line"):
        _job(raising, tiny_weights, x, y, models)
    not_module = "def build_model():\n    return 3\nRECIPE = {'optimizer': 'sgd', 'lr': 1, 'epochs': 1, 'batch_size': 1}\n"
    with pytest.raises(StrategyError, match="build_model\\(\\) must return a torch.nn.Module, got int"):
        _job(not_module, tiny_weights, x, y, models)


def test_bad_weights_are_weights_errors(digits_strategy, tiny_weights, records):
    x, y = records
    models = _halves(len(x), 1)
    with pytest.raises(WeightsError, match="not a valid safetensors file"):
        _job(TINY_RECIPE, b"\x80\x04pickle? no", x, y, models)
    # digits_cnn weights for the tiny model: names and shapes listed.
    torch.manual_seed(0)
    digits = save_weights(load_strategy(digits_strategy).build_model())
    with pytest.raises(WeightsError, match=r"missing keys \['1.bias', '1.weight'\].*unexpected keys \['0.bias'"):
        _job(TINY_RECIPE, digits, x, y, models)
    wide = save_weights(nn.Sequential(nn.Flatten(), nn.Linear(64, 12)))
    with pytest.raises(WeightsError, match=r"shape mismatches \['1.bias: file \(12,\) vs model \(10,\)'"):
        _job(TINY_RECIPE, wide, x, y, models)
    nan = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with torch.no_grad():
        nan[1].weight[0, 0] = float("nan")
    with pytest.raises(WeightsError, match="NaN or infinite values in \\['1.weight'\\]"):
        _job(TINY_RECIPE, save_weights(nan), x, y, models)


def test_bad_records_are_records_errors(tiny_weights, records):
    x, y = records
    models = _halves(len(x), 1)
    big = np.zeros((len(x), 1, 9, 9), dtype=np.float32)
    with pytest.raises(RecordsError, match=r"shape \(1, 9, 9\) but the strategy's model expects INPUT_SHAPE \(1, 8, 8\)"):
        _job(TINY_RECIPE, tiny_weights, big, y, models)
    no_shape = TINY_RECIPE.replace("INPUT_SHAPE = (1, 8, 8)\n", "")
    with pytest.raises(RecordsError, match=r"records of shape \(1, 9, 9\) do not fit the model"):
        _job(no_shape, tiny_weights, big, y, models)
    with pytest.raises(RecordsError, match=r"labels must be in \[0, 10\), got 10"):
        _job(TINY_RECIPE, tiny_weights, x, np.where(y == y[0], 10, y), models)
    with pytest.raises(RecordsError, match="float32"):
        _job(TINY_RECIPE, tiny_weights, x.astype(np.float64), y, models)
    with pytest.raises(RecordsError, match="inclusion mask of model 0 must be bool"):
        _job(TINY_RECIPE, tiny_weights, x, y, [(0, 1, np.ones(len(x) - 1, dtype=bool))])
    with pytest.raises(RecordsError, match="train records have shape"):
        finetune_and_score(strategy_source=TINY_RECIPE, base_weights=tiny_weights, train_x=x,
                           train_y=y, eval_x=big, eval_y=y, models=models)


# --------------------------------------------------------------------------- the job and its result


def _npz(x, y, *, compressed=False) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, x=x, y=y)
    return buf.getvalue()


def test_records_are_validated_where_they_are_built_and_keep_their_blob(records):
    x, y = records
    with pytest.raises(RecordsError, match="train records: x must be float32"):
        Records.of(x.astype(np.float64), y, what="train records")
    with pytest.raises(RecordsError, match="not a valid npz"):
        Records.load(b"PK not really")
    blob = _npz(x, y, compressed=True)
    loaded = Records.load(blob)
    assert loaded.to_npz() is blob and len(loaded) == len(x) and loaded.record_shape == (1, 8, 8)
    np.testing.assert_array_equal(loaded.x, x)
    assert Records.load(blob, keep_npz=False).npz is None
    # Records built from arrays are written once, as an npz load_records reads back.
    again = Records.load(Records.of(x, y).to_npz())
    np.testing.assert_array_equal(again.x, x)
    np.testing.assert_array_equal(again.y, y)


def test_a_job_checks_its_models_against_its_train_records(tiny_weights, records):
    x, y = records
    train = Records.of(x, y)

    def job(models):
        return FinetuneJob(strategy_source=TINY_RECIPE, base_weights=tiny_weights, train_records=train,
                           models=models)

    built = job([(3, 5, np.arange(len(x)) % 2 == 0)])
    (m,) = built.models
    assert isinstance(m, ModelSpec) and (m.index, m.seed) == (3, 5)
    assert built.evaluated is train and built.masks.shape == (1, len(x))
    with pytest.raises(RecordsError, match=f"inclusion mask of model 0 must be bool \\[{len(x)}\\]"):
        job([(0, 1, np.ones(len(x), dtype=np.uint8))])
    with pytest.raises(RecordsError, match="inclusion mask of model 2"):
        job([ModelSpec(2, 1, np.ones(len(x) + 1, dtype=bool))])
    with pytest.raises(RecordsError, match="seed of model 0 must be an integer"):
        job([(0, -1, np.ones(len(x), dtype=bool))])
    with pytest.raises(RecordsError, match="seed of model 0 must be an integer"):
        job([(0, 1.5, np.ones(len(x), dtype=bool))])


def test_a_job_as_files_round_trips_with_its_blobs_as_they_came(tiny_weights, records, digits_splits):
    x, y = records
    bx, by = digits_splits["builder"]
    train_blob, eval_blob = _npz(x, y, compressed=True), _npz(x[:7], y[:7], compressed=True)
    models = _halves(len(x), 1)
    job = FinetuneJob(strategy_source=TINY_RECIPE, base_weights=tiny_weights,
                      train_records=Records.load(train_blob), models=models,
                      eval_records=Records.load(eval_blob), builder_records=Records.of(bx, by),
                      builder_mix=None, engine="sequential")
    files = job.to_files()
    assert files["train.npz"] is train_blob and files["eval.npz"] is eval_blob
    back = FinetuneJob.from_files(files.__getitem__)
    assert (back.strategy_source, back.base_weights) == (TINY_RECIPE, tiny_weights)
    assert (back.builder_mix, back.engine) == (None, "sequential")
    assert [(m.index, m.seed) for m in back.models] == [(i, s) for i, s, _ in models]
    np.testing.assert_array_equal(back.masks, np.stack([m for _, _, m in models]))
    np.testing.assert_array_equal(back.evaluated.x, x[:7])
    np.testing.assert_array_equal(back.builder_records.y, by)
    assert back.train_records.npz is None  # read once, not kept
    # Without eval or builder records: none are written, and the train records are evaluated.
    plain = FinetuneJob.from_files(FinetuneJob(strategy_source=TINY_RECIPE, base_weights=tiny_weights,
                                               train_records=Records.of(x, y), models=models).to_files().__getitem__)
    assert plain.eval_records is None and plain.builder_records is None


def test_records_are_validated_once_per_process(tiny_weights, records, digits_splits, validations):
    """A job read from files validates each records blob once; the engine does not again."""
    x, y = records
    bx, by = digits_splits["builder"]
    files = FinetuneJob(strategy_source=TINY_RECIPE, base_weights=tiny_weights,
                        train_records=Records.of(x, y), models=_halves(len(x), 1),
                        eval_records=Records.of(x[:9], y[:9]), builder_records=Records.of(bx, by),
                        builder_mix=3).to_files()
    validations.clear()  # building the job above validated them in this (the writing) process
    result = run_job(FinetuneJob.from_files(files.__getitem__))
    assert sorted(validations) == sorted([len(x), 9, len(bx)])
    assert result.phi.shape == (2, 9)


def test_run_job_returns_how_it_ran(tiny_weights, records):
    x, y = records
    job = FinetuneJob(strategy_source=TINY_RECIPE, base_weights=tiny_weights,
                      train_records=Records.of(x, y), models=_halves(len(x), 1), engine="sequential")
    result = run_job(job)
    assert result.phi.shape == (2, len(x)) and result.phi.dtype == np.float64
    assert (result.engine, result.engine_reason, result.device) == ("sequential", "requested", "cpu")
    assert result.classes is None and result.cpu_limit_s is None
    check = run_job(FinetuneJob(strategy_source=TINY_RECIPE, base_weights=tiny_weights,
                                train_records=Records.of(x, y), models=_halves(len(x), 1),
                                engine=CHECK_ONLY))
    assert (check.engine, check.classes, check.parameters) == (CHECK_ONLY, 10, 64 * 10 + 10)
    assert not check.phi.any() and check.phi.shape == (2, len(x))
    # The in-process wrapper on arrays gives the same result.
    wrapped = finetune_and_score(strategy_source=TINY_RECIPE, base_weights=tiny_weights, train_x=x,
                                 train_y=y, eval_x=x, eval_y=y, models=_halves(len(x), 1),
                                 engine="sequential")
    np.testing.assert_array_equal(wrapped.phi, result.phi)
    assert wrapped.engine == "sequential" and wrapped.classes is None


def test_a_result_report_round_trips_and_untrusted_fields_are_dropped():
    phi = np.zeros((1, 3))
    full = JobResult(phi, engine="cached", engine_reason="rule for cpu", device="cpu",
                     channels_last=True, precision="bf16", features_s=1.5, train_s=2.0, phi_s=0.25, seconds=4.0,
                     classes=10, parameters=650, cpu_limit_s=99)
    back = JobResult.from_report(phi, full.report())
    assert back.report() == full.report() and back.phi is phi
    assert set(full.report()) == {f for f in JobResult.__dataclass_fields__ if f != "phi"}
    # A sandbox child's report is not trusted: a field of the wrong type is left out.
    hostile = {"engine": 5, "classes": True, "parameters": "650", "channels_last": 1,
               "seconds": "4", "train_s": 3, "cpu_limit_s": 2.5, "extra": "ignored"}
    got = JobResult.from_report(phi, hostile)
    assert got.report() == {"engine": "", "engine_reason": "", "device": "", "channels_last": False, "precision": "",
                            "features_s": 0.0, "train_s": 3.0, "phi_s": 0.0, "seconds": 0.0,
                            "dp_epsilon": 0.0, "dp_noise_multiplier": 0.0, "dp_delta": 0.0}
    assert JobResult.from_report(phi, ["not", "a", "dict"]).report() == JobResult(phi).report()


def test_default_strategies_load():
    for name, shape in (("fmnist_cnn.py", (1, 28, 28)), ("digits_cnn.py", (1, 8, 8))):
        strategy = load_strategy((ROOT / "clients" / "strategies" / name).read_text())
        assert strategy.input_shape == shape and strategy.num_classes == 10
        out = strategy.build_model()(torch.zeros(2, *shape))
        assert out.shape == (2, 10)
        assert strategy.pretrain_recipe is not None and strategy.recipe.optimizer == "adam"
