"""``ftps-stack demo``: the whole FT-PrivacyScore flow on the embedded stack, on real data.

builder: register a task (base model pretrained on the builder's split, cached; default strategy;
builder data) -> preparation stage (k shadow models, offline Gaussian) -> two contributors submit
records from a disjoint split -> the batch threshold starts a round -> n models fine-tuned -> every
record scored -> per-record table and batch metrics.

A tabular dataset (breast-cancer) runs the same flow as a tabular task: the task carries the
builder's schema, the builder uploads its data and contributors submit their rows as raw
measurements, which the services check and encode; the base model is pretrained on encoded rows.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from clients.api import BuilderClient, ContributorClient, batch_dict, score_dict
from clients.score_html import contributor_summary, summary_line
from ftps.common import archives, serde
from ftps.common.clock import iso
from ftps.ml.pretrain import cached_base_model
from ftps.v1 import common_pb2, scorer_pb2

STRATEGIES = Path(__file__).resolve().parents[1] / "clients" / "strategies"
DATASET_STRATEGY = {"fashion-mnist": "fmnist_cnn.py", "digits": "digits_cnn.py",
                    "breast-cancer": "tabular_mlp.py"}
# What one record of each dataset is, for the progress and log lines.
RECORD_NOUN = {"fashion-mnist": "images", "digits": "images", "breast-cancer": "patient records"}
IMAGE_CLASSES = 10
BUILDER_DATA_MAX = 4000


def base_model(dataset: str, strategy_source: str, x: np.ndarray, y: np.ndarray, *, seed: int,
               progress: Progress) -> tuple[bytes, bool]:
    """The base model M0 (:func:`ftps.ml.pretrain.cached_base_model`), its pretraining on a progress bar."""
    job = None

    def on_epoch(done: int, total: int) -> None:
        nonlocal job
        if job is None:
            job = progress.add_task(f"pretraining the base model on {len(x)} {dataset} "
                                    f"{RECORD_NOUN.get(dataset, 'records')}", total=total)
        progress.update(job, completed=done, total=total)

    out = cached_base_model(dataset, strategy_source, x, y, seed=seed, progress=on_epoch)
    if job is not None:
        progress.remove_task(job)
    return out


def run_demo(addresses: dict[str, str], *, dataset: str, records: int, models: int, shadow_models: int,
             method: str, seed: int, console: Console, signer=None) -> dict[str, Any]:
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    strategy_source = (STRATEGIES / DATASET_STRATEGY[dataset]).read_text()
    from ftps.ml.datasets import TABULAR_DATASETS, demo_splits, demo_tabular

    schema = None
    if dataset in TABULAR_DATASETS:
        # Builder data and contributors' rows travel raw, as their files would hold them; only the
        # base model, trained here, sees encoded rows (the same as demo_splits gives the benches).
        schema, splits = demo_tabular(dataset, seed=seed)
        px, py = splits["pretrain"]
        splits["pretrain"] = (schema.encode(px), py)
    else:
        splits = demo_splits(dataset, seed=seed)
    cx, cy = splits["contributors"]
    if records > len(cx):
        raise ValueError(f"--records {records}: the {dataset} contributor split has only {len(cx)} records")
    pick = np.random.default_rng(seed + 1).choice(len(cx), size=records, replace=False)
    cx, cy = cx[pick], cy[pick]
    bx, by = splits["builder"]
    bx, by = bx[:BUILDER_DATA_MAX], by[:BUILDER_DATA_MAX]

    # Each role with its own token, as separate people would be.
    token = (lambda sub, role: signer.issue(sub, role, ttl_s=6 * 3600)) if signer else (lambda sub, role: None)
    builder = BuilderClient(registry=addresses["registry"], gateway=addresses["gateway"],
                            scorer=addresses["scorer"], token=token("builder", "builder"))
    alice = ContributorClient(gateway=addresses["gateway"], contributor="alice", token=token("alice", "contributor"))
    bob = ContributorClient(gateway=addresses["gateway"], contributor="bob", token=token("bob", "contributor"))
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                        MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=True)
    try:
        with progress:
            t = time.perf_counter()
            weights, cached = base_model(dataset, strategy_source, *splits["pretrain"], seed=seed,
                                         progress=progress)
            timings["base_model_s"] = time.perf_counter() - t
            console.log(f"base model: {'cached' if cached else 'pretrained'} "
                        f"({len(weights) / 1e6:.1f} MB, {timings['base_model_s']:.1f}s)")

            settings = common_pb2.TaskSettings(
                n_models=models, batch_threshold=records, method=serde.method_enum(method),
                shadow_models=shadow_models, seed=seed, models_per_job=max(1, min(8, models // 4)))
            if schema is not None:
                # The registry fills record_shape with the schema's width; ranges are per column.
                settings.schema.CopyFrom(schema.to_proto())
                settings.num_classes = len(schema.class_names)
            else:
                settings.record_shape.extend(cx.shape[1:])
                settings.num_classes = IMAGE_CLASSES
                settings.value_range.CopyFrom(common_pb2.ValueRange(min=0.0, max=1.0))  # images scaled to [0, 1]
            task = builder.create_task(f"{dataset} demo", settings)
            builder.upload(task.task_id, common_pb2.BLOB_KIND_BASE_MODEL, weights)
            builder.upload(task.task_id, common_pb2.BLOB_KIND_STRATEGY, strategy_source.encode())
            if schema is not None:
                builder.upload_builder_records(task.task_id, bx, by)
            else:
                builder.upload(task.task_id, common_pb2.BLOB_KIND_BUILDER_DATA, archives.records_to_npz(bx, by))
            console.log(f"task {task.task_id} registered: n={models} models, m={records} records, "
                        f"k={shadow_models} shadow models, method {method}")

            t = time.perf_counter()
            prep = progress.add_task(f"preparation stage: {shadow_models} shadow fine-tunes", total=shadow_models)

            def prep_progress(p) -> None:
                left = f", ~{p.remaining_s:.0f}s left" if p.remaining_s > 0 else ""
                progress.update(prep, completed=p.models_done, total=p.models_total or None,
                                description=f"preparation stage: {p.models_done}/{p.models_total} shadow "
                                            f"fine-tunes{left}")

            prepared = builder.prepare(task.task_id, progress=prep_progress)
            progress.remove_task(prep)
            if prepared.state != scorer_pb2.PREPARATION_STATE_READY:
                raise RuntimeError(f"the preparation stage failed: {prepared.message}")
            offline = prepared.gaussian
            timings["preparation_s"] = time.perf_counter() - t
            console.log(f"offline Gaussian: mu={offline.mu:.3f} sigma={offline.sigma:.3f} "
                        f"(k={offline.k}, {offline.n_values} statistics, {timings['preparation_s']:.1f}s)")

            t = time.perf_counter()
            half = records // 2
            alice.submit(task.task_id, cx[:half], cy[:half], idempotency_key="demo-alice")
            sub = bob.submit(task.task_id, cx[half:], cy[half:], idempotency_key="demo-bob")
            console.log(f"alice submitted {half} records, bob {records - half}; "
                        f"{sub.pending_in_task} pending (threshold m={records})")
            round_id = _await_round(bob, sub.submission_id)
            ft = progress.add_task(f"round {round_id}: fine-tuning", total=models)
            for status in builder.watch_round(round_id):
                progress.update(ft, completed=status.models_done,
                                description=f"round {round_id}: {common_pb2.RoundState.Name(status.state).removeprefix('ROUND_STATE_').lower()}")
                if status.state == common_pb2.ROUND_STATE_FAILED:
                    raise RuntimeError(f"round {round_id} failed: {status.message}")
            progress.remove_task(ft)
            timings["round_s"] = time.perf_counter() - t
        result = builder.get_round(round_id)
        mine = {c.contributor: c.scores(task.task_id, round_id) for c in (alice, bob)}
    finally:
        for c in (builder, alice, bob):
            c.close()
    timings.update({k: float(v) for k, v in result.timings.items()})
    timings["demo_total_s"] = time.perf_counter() - t_start
    scores = sorted(mine["alice"] + mine["bob"], key=lambda s: s.index)
    return {
        "task": task.task_id, "round": round_id, "dataset": dataset, "method": method,
        "records": [score_dict(s) for s in scores],
        # what each contributor sees about their own records (the contributor CLI's summary line)
        "contributors": {who: contributor_summary(own) for who, own in mine.items()},
        "batch": batch_dict(result.batch),
        "methods": [batch_dict(b) for b in result.method_metrics],
        "offline": {"mu": offline.mu, "sigma": offline.sigma, "k": offline.k, "fitted_at": iso(offline.fitted_at)},
        "timings": timings,
        "roc": {serde.METHOD_NAMES[b.method]: {"fpr": list(b.roc_fpr), "tpr": list(b.roc_tpr)}
                for b in result.method_metrics},
    }


def _await_round(client: ContributorClient, submission_id: str, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sub = client.get_submission(submission_id)
        if sub.round_id:
            return sub.round_id
        time.sleep(0.2)
    raise RuntimeError("the batch threshold was reached but no round started")


def print_report(out: dict[str, Any], console: Console) -> None:
    table = Table(title=f"Privacy scores — task {out['task']}, round {out['round']}, method {out['method']}")
    table.add_column("record", no_wrap=True)
    for col, just in (("contributor", "left"), ("score", "right"), ("95% interval", "right"),
                      ("counted P", "right"), ("95% interval ", "right"), ("empirical ε [95%]", "right"),
                      ("n_in/n_out", "right"), ("AUC", "right")):
        table.add_column(col, justify=just, no_wrap=True)
    for r in out["records"]:
        low = r["score_ci_low"]
        style = "bold red" if low > 0.5 else ("yellow" if low > 0 else None)
        table.add_row(r["record_id"], r["contributor"], f"{r['score']:+.3f}",
                      f"[{low:+.2f}, {r['score_ci_high']:+.2f}]", f"{r['counted_p']:+.3f}",
                      f"[{r['counted_p_ci_low']:+.2f}, {r['counted_p_ci_high']:+.2f}]",
                      f"{r['empirical_epsilon']:.2f} [{r['empirical_epsilon_ci_low']:.2f}, "
                      f"{r['empirical_epsilon_ci_high']:.2f}]", f"{r['n_in']}/{r['n_out']}",
                      f"{r['auc']:.2f}", style=style)
    console.print(table)
    console.print("score = the headline privacy score, 2*Phi(d'/2)-1 from the record's fitted IN/OUT "
                  "Gaussians (TPR-FPR of the attack at its best threshold); counted P = the paper's "
                  "TPR-FPR counted over the n models. 0 = a coin flip, 1 = always identified. "
                  f"empirical ε = the same exposure in DP units at δ = {out['records'][0]['delta']:g} "
                  "(mu-GDP with mu = |d'|): what this attack measured, not a guarantee.")
    scores = np.array([r["score"] for r in out["records"]])
    lows = np.array([r["score_ci_low"] for r in out["records"]])
    console.print(f"{len(scores)} records: mean score {scores.mean():+.3f}, median {np.median(scores):+.3f}, "
                  f"max {scores.max():+.3f}; {int((lows > 0).sum())} records with the whole interval above 0 "
                  f"(identifiable more often than chance), {int((lows > 0.5).sum())} above 0.5")
    for who, summary in out["contributors"].items():
        console.print(f"  {who}: {summary_line(summary)}", highlight=False)
    m = Table(title="Batch metrics (the same fine-tuned models, every attack)")
    for col in ("method", "AUC", "TPR @ 1% FPR", "TPR @ 0.1% FPR", "mean counted P"):
        m.add_column(col, justify="left" if col == "method" else "right")
    for b in out["methods"]:
        name = b["method"] + (" *" if b["method"] == out["method"] else "")
        m.add_row(name, f"{b['auc']:.3f}", f"{b['tpr_at_1pct_fpr']:.3f}", f"{b['tpr_at_0_1pct_fpr']:.3f}",
                  f"{b['mean_counted_p']:+.3f}")
    console.print(m)
    console.print(f"* the headline method; offline Gaussian mu={out['offline']['mu']:.3f} "
                  f"sigma={out['offline']['sigma']:.3f} from k={out['offline']['k']} shadow models")
    t = out["timings"]
    console.print("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in t.items()))


def write_report(out: dict[str, Any], report_dir: Path) -> list[Path]:
    report_dir.mkdir(parents=True, exist_ok=True)
    written = [report_dir / "result.json", report_dir / "scores.csv"]
    written[0].write_text(json.dumps(out, indent=2))
    with written[1].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(out["records"][0]))
        w.writeheader()
        w.writerows(out["records"])
    from ftps.privacy import plots

    recs = out["records"]
    plots.roc_curves_png([(f"{b['method']}  AUC={b['auc']:.3f}  TPR@1%FPR={b['tpr_at_1pct_fpr']:.3f}",
                           out["roc"][b["method"]]["fpr"], out["roc"][b["method"]]["tpr"])
                          for b in out["methods"]],
                         title=f"ROC, round {out['round']} (n={out['batch']['n_models']}, m={len(recs)})",
                         path=report_dir / "roc.png")
    plots.scores_with_intervals_png([r["score"] for r in recs], [r["score_ci_low"] for r in recs],
                                    [r["score_ci_high"] for r in recs], what="model-based score",
                                    title=f"Privacy scores, {out['dataset']} round {out['round']} ({out['method']})",
                                    path=report_dir / "scores.png")
    return written + [report_dir / "roc.png", report_dir / "scores.png"]
