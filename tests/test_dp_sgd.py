"""DP-SGD recipes (``RECIPE['dp']``, opacus): validation, the engine rule, deterministic and
accounted fine-tuning on digits, and a tiny run of ``bench.dp_audit``."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch

from ftps.ml.engine import run_job, save_weights
from ftps.ml.engines import plan_engine
from ftps.ml.jobs import FinetuneJob, JobResult
from ftps.records.npz import Records
from ftps.ml.strategy import DPRecipe, StrategyError, load_strategy, parse_recipe
from ftps.ml.training import dp_budget
from tests.conftest import digits_records

BASE = {"optimizer": "adam", "lr": 5e-3, "epochs": 4, "batch_size": 8}
DIGITS_DP = "\nRECIPE = {{**RECIPE, 'epochs': 4, 'dp': {dp!r}}}\n"
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def with_dp(source: str, dp: dict) -> str:
    return source + DIGITS_DP.format(dp=dp)


# --------------------------------------------------------------------------- validation


def test_dp_recipes_parse():
    r = parse_recipe({**BASE, "dp": {"max_grad_norm": 1, "target_epsilon": 8}})
    assert r.dp == DPRecipe(max_grad_norm=1.0, target_epsilon=8.0, delta=1e-5)
    r = parse_recipe({**BASE, "dp": {"max_grad_norm": 0.5, "noise_multiplier": 0, "delta": 1e-6}})
    assert r.dp == DPRecipe(max_grad_norm=0.5, noise_multiplier=0.0, delta=1e-6)
    assert parse_recipe(BASE).dp is None


def test_pretrain_does_not_inherit_dp(digits_strategy):
    strategy = load_strategy(with_dp(digits_strategy, {"max_grad_norm": 1, "target_epsilon": 8}))
    assert strategy.recipe.dp is not None
    assert strategy.pretrain_recipe.dp is None and strategy.pretrain_recipe.epochs == 15
    asked = load_strategy(strategy.source + "\nPRETRAIN = {**PRETRAIN, 'dp': "
                                            "{'max_grad_norm': 2, 'noise_multiplier': 1}}\n")
    assert asked.pretrain_recipe.dp == DPRecipe(max_grad_norm=2.0, noise_multiplier=1.0)


@pytest.mark.parametrize("dp, message", [
    (1.0, r"RECIPE\['dp'\] must be a dict"),
    ({"noise_multiplier": 1}, r"RECIPE\['dp'\] is missing required key 'max_grad_norm'"),
    ({"max_grad_norm": 0, "noise_multiplier": 1},
     r"RECIPE\['dp'\]\['max_grad_norm'\] must be a number > 0, got 0"),
    ({"max_grad_norm": float("inf"), "noise_multiplier": 1}, r"\['max_grad_norm'\] must be"),
    ({"max_grad_norm": True, "noise_multiplier": 1}, r"\['max_grad_norm'\] must be"),
    ({"max_grad_norm": 1}, "exactly one of 'noise_multiplier' and 'target_epsilon', got neither"),
    ({"max_grad_norm": 1, "noise_multiplier": 1, "target_epsilon": 1},
     r"exactly one of .* got \['noise_multiplier', 'target_epsilon'\]"),
    ({"max_grad_norm": 1, "noise_multiplier": -0.1},
     r"RECIPE\['dp'\]\['noise_multiplier'\] must be a number >= 0, got -0.1"),
    ({"max_grad_norm": 1, "target_epsilon": 0},
     r"RECIPE\['dp'\]\['target_epsilon'\] must be a number > 0, got 0"),
    ({"max_grad_norm": 1, "target_epsilon": "8"}, r"\['target_epsilon'\] must be a number > 0"),
    ({"max_grad_norm": 1, "target_epsilon": 8, "delta": 1},
     r"RECIPE\['dp'\]\['delta'\] must be a number in \(0, 1\), got 1"),
    ({"max_grad_norm": 1, "target_epsilon": 8, "delta": float("nan")}, r"\['delta'\] must be"),
    ({"max_grad_norm": 1, "target_epsilon": 8, "sigma": 1}, r"unknown key\(s\) \['sigma'\]"),
])
def test_bad_dp_recipes_are_named_precisely(dp, message):
    with pytest.raises(StrategyError, match=message):
        parse_recipe({**BASE, "dp": dp})


def test_dp_recipes_never_train_stacked(digits_strategy, monkeypatch):
    monkeypatch.setenv("FTPS_ENGINE", "stacked")
    dp = load_strategy(with_dp(digits_strategy, {"max_grad_norm": 1, "noise_multiplier": 1}))
    for device, request in ((CPU, None), (CUDA, None), (CUDA, "stacked"), (CPU, "sequential")):
        plan = plan_engine(dp, device, request)
        assert plan.name == "sequential" and plan.reason.startswith("DP-SGD clips each record")
    cached = load_strategy(dp.source + "\ndef split_model(model):\n    return model[:4], model[4:]\n"
                           "RECIPE = {**RECIPE, 'train': ['4.', '6.'], 'cache_features': True}\n")
    assert plan_engine(cached, CUDA).name == "cached"


# --------------------------------------------------------------------------- accounting


def test_budget_meets_the_target_and_more_privacy_needs_more_noise():
    for n in (21, 100):
        b8 = dp_budget(DPRecipe(1.0, target_epsilon=8.0), n, batch_size=8, epochs=4)
        b1 = dp_budget(DPRecipe(1.0, target_epsilon=1.0), n, batch_size=8, epochs=4)
        for b, target in ((b8, 8.0), (b1, 1.0)):
            assert 0.9 * target <= b.epsilon <= target
            assert b.sample_rate == pytest.approx(8 / n)
            assert b.steps == 4 * math.ceil(n / 8)
        assert b1.noise_multiplier > b8.noise_multiplier > 0
    fixed = dp_budget(DPRecipe(1.0, noise_multiplier=2.0), 40, batch_size=8, epochs=4)
    louder = dp_budget(DPRecipe(1.0, noise_multiplier=4.0), 40, batch_size=8, epochs=4)
    assert fixed.noise_multiplier == 2.0 and louder.epsilon < fixed.epsilon < math.inf
    assert dp_budget(DPRecipe(1.0, noise_multiplier=0.0), 40, batch_size=8, epochs=4).epsilon \
        == math.inf
    small = dp_budget(DPRecipe(1.0, noise_multiplier=2.0), 5, batch_size=8, epochs=4)
    assert (small.sample_rate, small.steps) == (1.0, 4)


# --------------------------------------------------------------------------- fine-tuning


@pytest.fixture(scope="module")
def records(digits_splits):
    return digits_records(digits_splits, 40, seed=3)


def _job(source, weights, records, seeds=(11, 12)) -> FinetuneJob:
    x, y = records
    half = np.zeros(len(x), dtype=bool)
    half[::2] = True
    return FinetuneJob(strategy_source=source, base_weights=weights,
                       train_records=Records.of(x, y),
                       models=((0, seeds[0], half), (1, seeds[1], ~half)))


def test_dp_fine_tuning_is_deterministic_and_reports_its_budget(
        digits_strategy, digits_base_weights, records):
    results = {}
    for eps in (8.0, 1.0):
        source = with_dp(digits_strategy, {"max_grad_norm": 1.0, "target_epsilon": eps})
        first = run_job(_job(source, digits_base_weights, records))
        again = run_job(_job(source, digits_base_weights, records))
        np.testing.assert_array_equal(first.phi, again.phi)
        assert np.isfinite(first.phi).all() and first.engine == "sequential"
        assert 0.9 * eps <= first.dp_epsilon <= eps and first.dp_delta == 1e-5
        results[eps] = first
    assert results[1.0].dp_noise_multiplier > results[8.0].dp_noise_multiplier > 0
    # Another seed is another model: the seed drives the Poisson batches and the noise.
    source = with_dp(digits_strategy, {"max_grad_norm": 1.0, "target_epsilon": 8.0})
    other = run_job(_job(source, digits_base_weights, records, seeds=(13, 12)))
    assert not np.allclose(other.phi[0], results[8.0].phi[0])
    np.testing.assert_array_equal(other.phi[1], results[8.0].phi[1])
    # The demo's recipe without DP reports no budget.
    plain = run_job(_job(digits_strategy, digits_base_weights, records))
    assert (plain.dp_epsilon, plain.dp_noise_multiplier, plain.dp_delta) == (0.0, 0.0, 0.0)


def test_dp_runs_in_the_sandbox_the_same_as_in_process(digits_strategy, digits_base_weights, records):
    # The engine imports opacus on first use; a sandbox child preloads it before dropping its
    # privileges (the strategy names "dp"), else the import fails as the job uid.
    from services.finetune_worker.sandbox import run_sandboxed

    source = with_dp(digits_strategy, {"max_grad_norm": 1.0, "target_epsilon": 4.0})
    job = _job(source, digits_base_weights, records)
    boxed = run_sandboxed(job, timeout_s=300)
    here = run_job(job)
    np.testing.assert_allclose(boxed.phi, here.phi, rtol=1e-5, atol=1e-6)
    assert boxed.dp_epsilon == pytest.approx(here.dp_epsilon) and 3.6 <= boxed.dp_epsilon <= 4.0


def test_dp_trains_the_head_on_cached_features(digits_strategy, digits_base_weights, records):
    source = with_dp(digits_strategy, {"max_grad_norm": 1.0, "target_epsilon": 4.0}) + (
        "def split_model(model):\n    return model[:4], model[4:]\n"
        "RECIPE = {**RECIPE, 'train': ['4.', '6.'], 'cache_features': True}\n")
    first = run_job(_job(source, digits_base_weights, records))
    again = run_job(_job(source, digits_base_weights, records))
    assert first.engine == "cached" and 3.6 <= first.dp_epsilon <= 4.0
    np.testing.assert_array_equal(first.phi, again.phi)
    full = run_job(_job(source.replace("'cache_features': True", "'cache_features': False"),
                        digits_base_weights, records))
    # The same Poisson batches and noise on the same head parameters: caching changes rounding only.
    np.testing.assert_allclose(first.phi, full.phi, rtol=1e-4, atol=1e-4)


def test_dp_noise_and_clipping_change_the_model(digits_strategy, digits_base_weights, records):
    """No noise and no effective clipping is plain (Poisson-sampled) SGD: far from the noisy run."""
    loud = run_job(_job(with_dp(digits_strategy, {"max_grad_norm": 1.0, "noise_multiplier": 5.0}),
                        digits_base_weights, records))
    quiet = run_job(_job(with_dp(digits_strategy, {"max_grad_norm": 1e3, "noise_multiplier": 0}),
                         digits_base_weights, records))
    assert quiet.dp_epsilon == math.inf and loud.dp_noise_multiplier == 5.0
    half = np.zeros(len(records[0]), dtype=bool)
    half[::2] = True

    def gap(result: JobResult) -> float:  # model 0 trained on `half`
        return float(result.phi[0][half].mean() - result.phi[0][~half].mean())

    # Without noise the model fits its own half far better than the other half; with heavy noise
    # and clipping that gap shrinks.
    assert gap(quiet) > 1.0 and gap(loud) < gap(quiet) / 2


def test_trainable_batchnorm_is_refused(records):
    source = (
        "from torch import nn\n"
        "def build_model():\n"
        "    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),\n"
        "                         nn.Flatten(), nn.Linear(256, 10))\n"
        "RECIPE = {'optimizer': 'sgd', 'lr': 0.1, 'epochs': 1, 'batch_size': 8,\n"
        "          'dp': {'max_grad_norm': 1, 'noise_multiplier': 1}}\n")
    torch.manual_seed(0)
    weights = save_weights(load_strategy(source).build_model())
    with pytest.raises(StrategyError, match=r"RECIPE\['dp'\] needs per-record gradients.*BatchNorm"):
        run_job(_job(source, weights, records))
    # Frozen, the BatchNorm keeps its running statistics and DP-SGD trains the rest.
    frozen = source.replace("'epochs': 1,", "'epochs': 1, 'train': ['0.', '4.'],")
    assert np.isfinite(run_job(_job(frozen, weights, records)).phi).all()


def test_dp_fields_of_a_report_are_typed():
    phi = np.zeros((1, 2))
    full = JobResult(phi, dp_epsilon=7.9, dp_noise_multiplier=1.2, dp_delta=1e-5)
    back = JobResult.from_report(phi, full.report())
    assert (back.dp_epsilon, back.dp_noise_multiplier, back.dp_delta) == (7.9, 1.2, 1e-5)
    assert JobResult.from_report(phi, {"dp_epsilon": 3}).dp_epsilon == 3.0
    hostile = JobResult.from_report(phi, {"dp_epsilon": "0.5", "dp_noise_multiplier": True,
                                          "dp_delta": [1e-5]})
    assert (hostile.dp_epsilon, hostile.dp_noise_multiplier, hostile.dp_delta) == (0.0, 0.0, 0.0)


# --------------------------------------------------------------------------- the audit bench


def test_dp_audit_runs_on_a_tiny_setting(tmp_path):
    from bench import dp_audit

    out = tmp_path / "out"
    assert dp_audit.main(["--dataset", "digits", "--records", "40", "--models", "8",
                          "--heldout", "50", "--cache-dir", str(tmp_path / "cache"),
                          "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "dp_audit.csv").open()))
    assert [r["setting"] for r in rows] == [
        "no DP (the demo's recipe)", "DP-SGD, target ε=8", "DP-SGD, target ε=1"]
    for row, target in zip(rows[1:], (8.0, 1.0)):
        assert 0.9 * target <= float(row["accountant_epsilon"]) <= target
        assert 0 <= float(row["frac_ci_low_above_accountant"]) <= 1
    assert float(rows[2]["noise_multiplier"]) > float(rows[1]["noise_multiplier"])
    for row in rows:
        assert int(row["models"]) == 8 and int(row["records"]) == 40
        assert 0.5 < float(row["heldout_accuracy"]) <= 1
    assert "| DP-SGD, target ε=1 | 8 |" in (out / "results.md").read_text()
    assert (out / "meta.json").exists()


# --------------------------------------------------------------------------- through the services


def test_a_dp_round_through_the_services_reports_its_guarantee(tmp_path, digits_splits, digits_strategy,
                                                               digits_base_weights):
    # The worker carries each job's budget back, the scorer keeps the round's weakest guarantee,
    # and the builder's report puts it beside the records' empirical epsilon.
    from clients.api import ContributorClient
    from clients.reports import builder_report
    from ftps.common import archives
    from ftps.v1 import common_pb2
    from tests.stacks import builder, embedded_stack, force_round

    s = embedded_stack(tmp_path / "data")
    try:
        signer = s.signer()
        acme = signer.issue("acme", "builder")
        b = builder(s.addresses, acme)
        task = b.create_task("dp", common_pb2.TaskSettings(record_shape=[1, 8, 8], n_models=8, batch_threshold=1000,
                                                            models_per_job=4, seed=3)).task_id
        b.upload(task, common_pb2.BLOB_KIND_BASE_MODEL, digits_base_weights)
        b.upload(task, common_pb2.BLOB_KIND_STRATEGY,
                 with_dp(digits_strategy, {"max_grad_norm": 1.0, "target_epsilon": 8.0}).encode())
        b.upload(task, common_pb2.BLOB_KIND_BUILDER_DATA, archives.records_to_npz(*digits_splits["builder"]))
        x, y = digits_records(digits_splits, 24, seed=9)
        ContributorClient(gateway=s.addresses["gateway"], token=signer.issue("alice", "contributor")).submit(task, x, y)
        status, scores = force_round(s.addresses, acme, task)
        assert status.state == common_pb2.ROUND_STATE_DONE, status.message
        result = b.get_round(status.round_id)
        assert 7.2 <= result.dp_epsilon <= 8.0 and result.dp_delta == 1e-5 and result.dp_noise_multiplier > 0
        assert len(scores) == 24 and all(sc.delta == 1e-5 for sc in scores)
        files = builder_report(tmp_path / "report", task_id=task, scores=scores, rounds={status.round_id: result})
        assert "the accountant guarantees ε = " in files.html.read_text()
        b.close()
    finally:
        s.stop()
