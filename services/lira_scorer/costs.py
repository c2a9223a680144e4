"""What a round will cost before it runs: worker seconds and wall seconds, from what was measured.

Pure arithmetic over measurements (no I/O, no protobuf): :meth:`Scorer.estimate_round` gathers the
basis (the task's last finished round, else its preparation stage) and turns the result into the
API's ``RoundEstimate``.

Model: a round fine-tunes ``n`` models in ``ceil(n / models_per_job)`` jobs, ``parallel`` jobs at a
time, each model trained on about half the batch plus the builder's mix and evaluated on the whole
batch; so a model's seconds grow with the batch. Per-model seconds come from the basis's own workers
(their summed job seconds over its models: sandbox start-up included, fan-out excluded) and are
scaled by the records a model handles relative to the basis's. The preparation's shadow models train
on the builder's data, whose size is not the batch's, so that basis is used as it is and said so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Basis", "Estimate", "estimate"]


@dataclass(frozen=True)
class Basis:
    """A measurement: ``worker_s`` seconds of worker time for ``models`` models, each trained on
    ``records`` records (0: unknown, not scaled), and ``scoring_s`` after the fine-tunes."""

    what: str  # for people: "round r-1 (32 models, 200 records)"
    models: int
    worker_s: float
    records: int = 0
    scoring_s: float = 0.0


@dataclass(frozen=True)
class Estimate:
    n_models: int
    n_records: int
    jobs: int
    parallel_jobs: int
    seconds_per_model: float
    worker_s: float
    wall_s: float
    basis: str


def estimate(basis: Basis, *, n_models: int, n_records: int, models_per_job: int, builder_mix: int,
             parallel_jobs: int) -> Estimate:
    """The cost of a round of ``n_models`` models on ``n_records`` records (ValueError on settings
    that cannot run: no models, no parallelism, an empty basis)."""
    if n_models < 1 or n_records < 1 or models_per_job < 1 or parallel_jobs < 1:
        raise ValueError("n_models, n_records, models_per_job and parallel_jobs must be >= 1")
    if basis.models < 1 or not basis.worker_s > 0:
        raise ValueError(f"the basis {basis.what!r} measured no model")
    per_model = basis.worker_s / basis.models
    note = basis.what
    if basis.records > 0:
        # Records a model handles: trains on half the batch plus the mix, scores the whole batch.
        handled = 1.5 * n_records + builder_mix
        before = 1.5 * basis.records + builder_mix
        per_model *= handled / before
        if n_records != basis.records:
            note += f", scaled from {basis.records} to {n_records} records"
    else:
        note += ", not scaled to the batch"
    jobs = math.ceil(n_models / models_per_job)
    waves = math.ceil(jobs / parallel_jobs)
    # Whole waves of full jobs: the last wave takes as long as its slowest (fullest) job.
    # Scoring is linear in the statistic matrix's size (n x m).
    cells = n_models * n_records / (basis.models * basis.records) if basis.records > 0 else n_models / basis.models
    wall = waves * min(models_per_job, n_models) * per_model + basis.scoring_s * cells
    return Estimate(n_models=n_models, n_records=n_records, jobs=jobs, parallel_jobs=parallel_jobs,
                    seconds_per_model=per_model, worker_s=per_model * n_models, wall_s=wall, basis=note)
