"""ftps.ml.engines: the engine rule, stacked (torch.func) and cached-feature training agree with
the sequential engine, the cache_features contract, and the shipped strategies (in-process)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ftps.ml import engine as engine_mod
from ftps.ml import engines
from ftps.ml.engine import run_job, save_weights
from ftps.ml.engines import EnginePlan, plan_engine, plan_precision
from ftps.ml.jobs import FinetuneJob
from ftps.records.npz import Records
from ftps.ml.strategy import EngineError, StrategyError, load_strategy, parse_recipe
from ftps.ml.training import make_optimizer, prefer_channels_last
from tests.conftest import ROOT, digits_records

NET = """
from torch import nn
INPUT_SHAPE = (1, 8, 8)
def build_model():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(128, 32), nn.ReLU(),
                         nn.Linear(32, 10))
def split_model(model):
    return model[:5], model[5:]
"""
# BatchNorm, augmentation, test-time queries: everything the stacked engine must get right.
FULL = NET + ('RECIPE = {"optimizer": "sgd", "momentum": 0.9, "lr": 0.05, "epochs": 3,'
              ' "batch_size": 8, "augment": ["hflip", "random-crop:1"], "tta": ["hflip"]}\n')
CACHED = NET + ('RECIPE = {"optimizer": "adam", "lr": 0.01, "epochs": 3, "batch_size": 8,'
                ' "train": ["5.", "7."], "cache_features": True, "tta": ["hflip"]}\n')
UNCACHED = CACHED.replace('"cache_features": True', '"cache_features": False')
FREE_FORM = NET + "def finetune(model, x, y, *, seed, device):\n    return model\n"
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture(scope="module")
def weights() -> bytes:
    torch.manual_seed(0)
    return save_weights(load_strategy(FULL).build_model())


@pytest.fixture(scope="module")
def job(digits_splits):
    """41 records (odd: two training-set sizes, so two stacked groups), 6 models, a builder mix."""
    x, y = digits_records(digits_splits, 41, seed=5)
    rng = np.random.default_rng(0)
    models = []
    for k in range(3):
        half = rng.random(len(x)) < 0.5
        models += [(2 * k, 10 + 2 * k, half), (2 * k + 1, 11 + 2 * k, ~half)]
    bx, by = digits_splits["builder"]
    return dict(train_x=x, train_y=y, eval_x=x, eval_y=y, models=models, builder_x=bx,
                builder_y=by, builder_mix=5)


def run(source, weights, job, engine=None, precision=None, **kw):
    """``run_job`` on the arrays of ``job`` -> (PHI, its JobResult)."""
    a = {**job, **kw}
    train = Records.of(a["train_x"], a["train_y"])
    result = run_job(FinetuneJob(
        strategy_source=source, base_weights=weights, train_records=train, models=a["models"],
        eval_records=None if a["eval_x"] is a["train_x"] else Records.of(a["eval_x"], a["eval_y"]),
        builder_records=Records.of(a["builder_x"], a["builder_y"]) if "builder_x" in a else None,
        builder_mix=a.get("builder_mix", 0), engine=engine, precision=precision))
    return result.phi, result


# --------------------------------------------------------------------------- the rule


def test_engine_rule_by_device_and_strategy(monkeypatch):
    monkeypatch.delenv("FTPS_ENGINE", raising=False)
    full, cached, free = load_strategy(FULL), load_strategy(CACHED), load_strategy(FREE_FORM)
    assert plan_engine(full, CPU).name == "sequential"
    assert plan_engine(full, CUDA).name == "stacked"
    assert plan_engine(cached, CPU).name == "cached"
    assert plan_engine(cached, CUDA).name == "cached-stacked"
    assert plan_engine(free, CPU).name == plan_engine(free, CUDA).name == "sequential"
    # Requests choose how the models train; caching follows the recipe either way.
    assert plan_engine(full, CPU, "stacked") == EnginePlan("stacked", "requested")
    assert plan_engine(cached, CUDA, "sequential").name == "cached"
    monkeypatch.setenv("FTPS_ENGINE", "stacked")
    assert plan_engine(full, CPU).name == "stacked"
    with pytest.raises(EngineError, match="engine must be one of"):
        plan_engine(full, CPU, "fastest")
    with pytest.raises(StrategyError, match="stacked engine needs a RECIPE"):
        plan_engine(free, CPU, "stacked")


def test_precision_rule_by_device_and_recipe(monkeypatch):
    monkeypatch.delenv("FTPS_PRECISION", raising=False)
    full, free = load_strategy(FULL), load_strategy(FREE_FORM)
    dp = load_strategy(FULL.replace('"tta": ["hflip"]}', '"tta": ["hflip"], "dp": {"max_grad_norm": 1.0, '
                                    '"noise_multiplier": 1.0}}'))
    assert dp.recipe.dp is not None
    assert plan_precision(full, CPU) == "fp32"  # bf16 autocast on CPU is slow on most parts
    assert plan_precision(full, CPU, "bf16") == "bf16"  # asked for: the CPU twin of the GPU path
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert plan_precision(full, CUDA) == "bf16"
    assert plan_engine(full, CUDA) == EnginePlan("stacked", "rule for cuda", "bf16")
    assert plan_precision(full, CUDA, "fp32") == "fp32"
    # DP-SGD's per-record clipping and a free-form finetune() stay float32, whatever was asked.
    assert plan_precision(dp, CUDA, "bf16") == plan_precision(free, CUDA) == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # pre-Ampere
    assert plan_precision(full, CUDA) == "fp32"
    with pytest.raises(EngineError, match="no bfloat16 support"):
        plan_precision(full, CUDA, "bf16")
    monkeypatch.setenv("FTPS_PRECISION", "bf16")
    assert plan_precision(full, CPU) == "bf16"
    with pytest.raises(EngineError, match="precision must be one of"):
        plan_precision(full, CPU, "fp8")


def test_fused_optimizers_on_cpu():
    params = [torch.nn.Parameter(torch.zeros(3))]
    for name in ("adam", "adamw", "sgd"):
        recipe = parse_recipe({"optimizer": name, "lr": 0.1, "epochs": 1, "batch_size": 1})
        assert make_optimizer(params, recipe).defaults["fused"] is True


def test_channels_last_only_where_it_works():
    x = torch.rand(2, 1, 8, 8)
    assert prefer_channels_last(load_strategy(FULL).build_model(), x)
    assert not prefer_channels_last(load_strategy(FULL).build_model(), x.flatten(1))

    class Viewing(torch.nn.Module):  # .view cannot take a channels-last tensor
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
            self.fc = torch.nn.Linear(256, 10)

        def forward(self, x):
            z = self.conv(x)
            return self.fc(z.view(z.shape[0], -1))

    assert not prefer_channels_last(Viewing(), x)


# --------------------------------------------------------------------------- engines agree


def test_stacked_matches_sequential(weights, job):
    seq, seq_info = run(FULL, weights, job, "sequential")
    stacked, info = run(FULL, weights, job, "stacked")
    assert (seq_info.engine, info.engine) == ("sequential", "stacked")
    # Same batches, augmentation and optimizer maths per model: equal up to float rounding.
    np.testing.assert_allclose(stacked, seq, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(stacked, run(FULL, weights, job, "stacked")[0])
    # Adam's normalisation amplifies rounding (BatchNorm too); still the same models.
    adam = FULL.replace('"optimizer": "sgd", "momentum": 0.9, "lr": 0.05',
                        '"optimizer": "adamw", "lr": 0.003')
    assert adam != FULL
    a, b = run(adam, weights, job, "sequential")[0], run(adam, weights, job, "stacked")[0]
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99


def test_bf16_autocast_trains_the_same_models_on_both_engines(weights, job):
    """The GPU's default path (bf16 autocast) on CPU: deterministic, on both engines, and the
    models are the float32 models up to bfloat16 rounding (phi itself is float32 either way)."""
    fp32, _ = run(FULL, weights, job, "sequential")
    seq, seq_info = run(FULL, weights, job, "sequential", precision="bf16")
    stacked, info = run(FULL, weights, job, "stacked", precision="bf16")
    assert (seq_info.precision, seq_info.engine, info.engine) == ("bf16", "sequential", "stacked")
    assert np.isfinite(seq).all() and not np.array_equal(seq, fp32)  # autocast did act
    np.testing.assert_array_equal(seq, run(FULL, weights, job, "sequential", precision="bf16")[0])
    assert np.corrcoef(seq.ravel(), fp32.ravel())[0, 1] > 0.95
    # Where autocast does not reach inside vmap (CPU convolutions), the stacked models train in
    # float32 and the result says so, instead of claiming a precision they did not have.
    stacked_fp32 = run(FULL, weights, job, "stacked")[0]
    if info.precision == "bf16":
        assert not np.array_equal(stacked, stacked_fp32)
        assert np.corrcoef(stacked.ravel(), seq.ravel())[0, 1] > 0.95
    else:
        assert info.precision == "fp32" and "does not reach inside vmap" in info.engine_reason
        np.testing.assert_array_equal(stacked, stacked_fp32)
    # The job's files carry the precision to the sandbox child.
    files = FinetuneJob(strategy_source=FULL, base_weights=weights,
                        train_records=Records.of(job["train_x"], job["train_y"]),
                        models=job["models"], precision="bf16").to_files()
    assert FinetuneJob.from_files(files.__getitem__).precision == "bf16"


def test_cached_features_match_recomputed_features(weights, job, monkeypatch):
    calls = []
    features = engines._features
    monkeypatch.setattr(engines, "_features",
                        lambda trunk, x: calls.append(len(x)) or features(trunk, x))
    cached, info = run(CACHED, weights, job, "sequential")
    assert info.engine == "cached" and info.features_s > 0
    # The trunk ran once per job: train records, the builder rows some model samples, the
    # flipped eval records (the unflipped ones are the train records' features).
    assert len(calls) == 3 and calls[0] == len(job["train_x"]) and calls[1] <= 6 * 5
    recomputed, info = run(UNCACHED, weights, job, "sequential")
    assert info.engine == "sequential"
    np.testing.assert_allclose(cached, recomputed, rtol=1e-5, atol=1e-5)
    stacked, info = run(CACHED, weights, job, "stacked")
    assert info.engine == "cached-stacked"
    np.testing.assert_allclose(stacked, cached, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(cached, run(CACHED, weights, job)[0])  # deterministic


def test_a_model_vmap_cannot_run_falls_back_or_fails(weights, job, monkeypatch):
    source = FULL.replace("def split_model", """
class Item(nn.Module):
    def forward(self, x):
        return x * float(x.sum().item() > -1e9)  # .item(): data-dependent, vmap refuses
_build = build_model
def build_model():
    return nn.Sequential(Item(), *_build())
def split_model""")
    with pytest.raises(StrategyError, match="stacked engine cannot run this model"):
        run(source, weights_for(source), job, "stacked")
    # Under the rule ("auto" on CUDA) the job runs sequentially instead.
    monkeypatch.setattr(engines, "plan_engine",
                        lambda strategy, device, requested, precision: EnginePlan("stacked", "rule for cuda"))
    phi, info = run(source, weights_for(source), job)
    assert info.engine == "sequential" and "vmap cannot run" in info.engine_reason
    assert np.isfinite(phi).all()


def weights_for(source: str) -> bytes:
    torch.manual_seed(0)
    return save_weights(load_strategy(source).build_model())


def test_free_form_strategies_run_sequentially(weights, job):
    phi, info = run(FREE_FORM, weights, job)
    assert info.engine == "sequential" and not info.channels_last
    assert phi.shape == (6, 41)


# --------------------------------------------------------------------------- the contract


@pytest.mark.parametrize(("source", "message"), [
    (NET + 'RECIPE = {"optimizer": "sgd", "lr": 0.1, "epochs": 1, "batch_size": 8,'
     ' "cache_features": True}\n', r"RECIPE\['cache_features'\] freezes the trunk"),
    (CACHED.replace('"tta": ["hflip"]', '"augment": ["hflip"]'),
     r"cannot be combined with augment \['hflip'\]"),
    (CACHED.replace('"cache_features": True', '"cache_features": 1'),
     r"RECIPE\['cache_features'\] must be true or false"),
    (CACHED.replace("def split_model", "def _unused"), r"needs split_model\(model\)"),
    (CACHED + "split_model = 3\n", "split_model is not callable"),
])
def test_invalid_cache_features_recipes(source, message):
    with pytest.raises(StrategyError, match=message):
        load_strategy(source)


@pytest.mark.parametrize(("split", "message"), [
    ("return model[:5]", r"must return \(trunk, head\), two torch.nn.Module, got Sequential"),
    ("return model[:5], 3", r"got \(Sequential, int\)"),
    ("return model[:5], model[6:]",
     r"RECIPE\['train'\] selects parameters \['5.bias', '5.weight'\] that are in neither"),
    ("return model[:4], model[5:]",
     r"split_model\(\) trunk/head forward pass raised RuntimeError"),
    ("return model[:5], nn.Sequential(model[5], model[7])",  # the ReLU left out
     r"head\(trunk\(x\)\) must equal model\(x\) in eval mode; they differ by up to"),
    ("return model[:6], model[5:]", r"in both trunk and head"),
    ("return model[:5], nn.Sequential(model[5], nn.ReLU(), nn.Linear(32, 10))",
     r"head parameter '2.weight' is not a parameter of the model"),
])
def test_split_model_contract_is_checked(split, message, weights, job):
    source = CACHED.replace("return model[:5], model[5:]", split)
    with pytest.raises(StrategyError, match=message):
        run(source, weights, job)


def test_trainable_parameters_must_lie_in_the_head(weights, job):
    source = CACHED.replace('"train": ["5.", "7."]', '"train": ["0.", "7."]')
    with pytest.raises(StrategyError, match=r"selects trunk parameters \['0.bias', '0.weight'\]"):
        run(source, weights, job)


# --------------------------------------------------------------------------- strategies


def _strategy(name: str):
    return load_strategy((ROOT / "clients" / "strategies" / name).read_text())


def test_lastblock_strategy_shares_the_demo_base_model():
    full, last = _strategy("fmnist_cnn.py"), _strategy("fmnist_cnn_lastblock.py")
    a, b = full.build_model().state_dict(), last.build_model().state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert last.recipe.cache_features and last.recipe.train == ("7.", "9.")
    assert not last.pretrain_recipe.cache_features and last.pretrain_recipe.train == "all"
    model = last.build_model().eval()
    trunk, head = last.split_model(model)
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(head(trunk(x)), model(x))
    assert trunk(x).shape == (3, 32 * 7 * 7)


def test_lastblock_strategy_runs_on_the_cached_engine(digits_splits):
    last = (ROOT / "clients" / "strategies" / "fmnist_cnn_lastblock.py").read_text()
    torch.manual_seed(0)
    w = save_weights(load_strategy(last).build_model())
    x = np.random.default_rng(0).random((20, 1, 28, 28), dtype=np.float32)
    y = np.arange(20, dtype=np.int64) % 10
    models = [(0, 1, np.arange(20) % 2 == 0), (1, 2, np.arange(20) % 2 == 1)]
    phi, info = run(last, w, dict(train_x=x, train_y=y, eval_x=x, eval_y=y, models=models))
    assert info.engine == "cached" and phi.shape == (2, 20) and np.isfinite(phi).all()


def test_cifar_resnet18_strategy():
    s = _strategy("cifar_resnet18.py")
    assert s.input_shape == (3, 32, 32) and s.num_classes == 10
    model = s.build_model()
    assert sum(p.numel() for p in model.parameters()) == 11_173_962
    model.eval()
    x = torch.rand(2, 3, 32, 32)
    assert model(x).shape == (2, 10)
    trunk, head = s.split_model(model)
    torch.testing.assert_close(head(trunk(x)), model(x))
    assert s.recipe.augment == ("hflip", "random-crop:4") and s.recipe.tta == ("hflip",)


def test_cifar_resnet18_fine_tunes_from_uploaded_weights():
    source = (ROOT / "clients" / "strategies" / "cifar_resnet18.py").read_text()
    torch.manual_seed(0)
    w = save_weights(load_strategy(source).build_model())
    x = np.random.default_rng(0).random((8, 3, 32, 32), dtype=np.float32)
    y = np.arange(8, dtype=np.int64)
    phi, info = run(source, w, dict(train_x=x, train_y=y, eval_x=x, eval_y=y,
                                     models=[(0, 1, np.arange(8) < 4)]))
    assert info.engine == "sequential" and np.isfinite(phi).all()


def test_engine_version_is_exported():
    assert engine_mod.ENGINE_VERSION


def test_cifar10_python_batches_load_without_unpickling_code(tmp_path):
    import pickle

    from ftps.ml.datasets import load_cifar10
    from ftps.records import RecordsError

    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
    batch = {b"batch_label": b"testing batch 1 of 1", b"labels": [3, 1, 4, 1], b"data": data,
             b"filenames": [b"a.png", b"b.png", b"c.png", b"d.png"]}
    (tmp_path / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    x, y = load_cifar10(tmp_path, "test")
    assert x.shape == (4, 3, 32, 32) and x.dtype == np.float32 and x.max() <= 1.0
    np.testing.assert_array_equal(y, [3, 1, 4, 1])
    np.testing.assert_allclose(x[2, 1, 0, 5], data[2, 1024 + 5] / 255.0)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    import os

    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(RecordsError, match="refers to posix.system"):
        load_cifar10(tmp_path, "test")
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        load_cifar10(tmp_path, "train")


def test_a_batch_of_several_models_is_augmented_as_each_alone():
    """The stacked engine augments k models' batches as one: each model's slice must equal what
    ``augment_batch`` gives its batch alone, bit for bit (same draws, same order)."""
    from ftps.ml.training import apply_augment, augment_batch, augment_draws

    augment = ["hflip", "random-crop:2"]
    xb = torch.rand(3, 5, 3, 8, 8)
    alone = [augment_batch(xb[j], augment, np.random.default_rng([j, 1])) for j in range(3)]
    draws = np.concatenate([augment_draws(augment, 5, (3, 8, 8), np.random.default_rng([j, 1]))
                            for j in range(3)], axis=1)
    together = apply_augment(xb.reshape(15, 3, 8, 8), augment, torch.from_numpy(draws)).reshape(xb.shape)
    for j in range(3):
        assert torch.equal(together[j], alone[j])
    assert not torch.equal(together[0], xb[0])  # it did augment
    with pytest.raises(StrategyError, match="random-crop needs image records"):
        augment_draws(["random-crop"], 4, (64,), np.random.default_rng(0))


def test_activation_bytes_count_leaf_outputs_and_leave_each_module_in_its_mode():
    """The stacked chunk's memory estimate on CUDA: every leaf module's output for one record; the
    probe must not turn a frozen BatchNorm (eval under set_train_mode) back to training."""
    from ftps.ml.engines import _activation_bytes
    from ftps.ml.training import select_trainable, set_train_mode

    model = load_strategy(FULL).build_model()
    select_trainable(model, [n for n, _ in model.named_parameters() if not n.startswith("1.")])
    set_train_mode(model)
    assert model.training and not model[1].training  # the frozen BatchNorm
    got = _activation_bytes(model, torch.rand(1, 1, 8, 8))
    # conv 8x8x8, BN, ReLU (8x8x8 each), pool 8x4x4, flatten 128, linear 32, ReLU 32, linear 10
    assert got == 4 * (3 * 512 + 128 + 128 + 32 + 32 + 10)
    assert model.training and not model[1].training and model[0].training
