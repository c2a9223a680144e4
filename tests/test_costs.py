"""The cost arithmetic behind EstimateRound (services/lira_scorer/costs.py)."""

from __future__ import annotations

import pytest

from services.lira_scorer.costs import Basis, estimate


def test_a_round_like_its_basis_costs_what_the_basis_did():
    basis = Basis(what="round r-1 (32 models, 200 records)", models=32, worker_s=64.0, records=200, scoring_s=3.0)
    est = estimate(basis, n_models=32, n_records=200, models_per_job=4, builder_mix=0, parallel_jobs=2)
    assert est.seconds_per_model == pytest.approx(2.0) and est.worker_s == pytest.approx(64.0)
    assert (est.jobs, est.parallel_jobs) == (8, 2)
    # 8 jobs two at a time: 4 waves of 4 models at 2 s each, then the basis's scoring time
    assert est.wall_s == pytest.approx(4 * 4 * 2.0 + 3.0)
    assert est.basis == basis.what


def test_scaling_with_models_records_and_parallelism():
    basis = Basis(what="round r-1", models=32, worker_s=64.0, records=200, scoring_s=2.0)
    kw = dict(models_per_job=4, builder_mix=0, parallel_jobs=2)
    double_models = estimate(basis, n_models=64, n_records=200, **kw)
    assert double_models.worker_s == pytest.approx(128.0) and double_models.jobs == 16
    double_records = estimate(basis, n_models=32, n_records=400, **kw)
    assert double_records.seconds_per_model == pytest.approx(4.0)  # a model handles twice the records
    assert "scaled from 200 to 400 records" in double_records.basis
    wide = estimate(basis, n_models=32, n_records=200, models_per_job=4, builder_mix=0, parallel_jobs=8)
    assert wide.worker_s == pytest.approx(64.0) and wide.wall_s < estimate(basis, n_models=32, n_records=200,
                                                                           **kw).wall_s
    # the builder's mix is trained on in every model: it dilutes the batch's share of the time
    mixed = estimate(basis, n_models=32, n_records=400, models_per_job=4, builder_mix=300, parallel_jobs=2)
    assert 2.0 < mixed.seconds_per_model < 4.0


def test_a_preparation_basis_is_not_scaled_and_says_so():
    basis = Basis(what="the preparation stage's 16 shadow fine-tunes", models=16, worker_s=8.0)
    est = estimate(basis, n_models=32, n_records=5000, models_per_job=1, builder_mix=0, parallel_jobs=4)
    assert est.seconds_per_model == pytest.approx(0.5) and est.wall_s == pytest.approx(8 * 0.5)
    assert est.basis.endswith("not scaled to the batch")


@pytest.mark.parametrize("kw", [dict(n_models=0), dict(parallel_jobs=0), dict(models_per_job=0)])
def test_impossible_sizes_are_refused(kw):
    basis = Basis(what="b", models=4, worker_s=1.0)
    args = dict(n_models=4, n_records=10, models_per_job=1, builder_mix=0, parallel_jobs=1) | kw
    with pytest.raises(ValueError):
        estimate(basis, **args)


def test_an_empty_basis_is_refused():
    with pytest.raises(ValueError, match="measured no model"):
        estimate(Basis(what="b", models=4, worker_s=0.0), n_models=4, n_records=10, models_per_job=1,
                 builder_mix=0, parallel_jobs=1)
