"""Attack strength, stability, fidelity and interval coverage of every scoring method.

Issue 3's evidence and the score half of issue 7, on the demo task (``ftps-stack demo``:
Fashion-MNIST, the demo's base model and strategy, m records from the contributors' split)::

    python -m bench.attacks            # 512 models (~3 min of fine-tuning on one core)
    python -m bench.attacks --quick    # 128 models (~1 min), every figure at lower precision
    python -m bench.attacks --dataset breast-cancer   # the tabular demo task (tabular_mlp)

What it does:

1. Fine-tunes a pool of N models with the in-process engine (``finetune_and_score``), in chunks of
   32 with the production masks (``ftps.privacy.masks.make_masks``: complementary pairs, every record IN for
   exactly half the models). Chunks are cached as ``.npz`` under ``--cache-dir`` keyed by
   everything that changes phi (data, base model, strategy, seed, torch threads), and a pool is a
   prefix of every larger pool, so ``--quick`` reuses a full run's models and reruns are cheap.
   The pool is saved as ``phi_pool.npz`` (``phi``, ``member``, ``offline_mu``, ``offline_sigma``:
   the input format of ``ftps-score``).
2. Fits the offline Gaussian exactly as the scorer's preparation stage does
   (``services.lira_scorer.rounds.Scorer.prepare_offline``): k shadow models on random halves of
   a pool of builder records, phi on held-out builder records.
3. Splits the pool into disjoint blocks of n consecutive models (whole pairs, so each block is
   balanced) for n in ``--sizes`` and reports, per method variant:

   (a) attack: batch AUC, TPR at 1% and 0.1% FPR (mean over blocks);
   (b) stability: per-record Pearson and Spearman correlation between two disjoint blocks, for the
       counted P, the model-based score and the per-record AUC;
   (c) fidelity: each block's scores against the reference, per-record online LiRA (Carlini et
       al. S&P'22, per-record variances) fitted on *all the other* models of the pool (N - n >=
       448 models full, >= 64 quick): Spearman, Pearson, MAE, and a scatter plot like Figure 2 of
       the FT-PrivacyScore paper. The reference shares no model with the block, so shared noise
       cannot inflate the agreement;
   (d) coverage: how often a block's 95% interval covers the same score computed on all the
       other models, and the mean interval width.

Outputs in ``--out`` (default ``bench/out/attacks/``): ``attack.csv``, ``stability.csv``,
``fidelity.csv``, ``coverage.csv``, ``fidelity.png``, ``roc.png``, ``phi_pool.npz``,
``results.md`` (the printed tables).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats

from ftps.ml.datasets import DATASETS
from ftps.privacy.masks import derive_seed, make_masks, model_seeds, shadow_masks
from ftps.privacy.scoring import (
    DEFAULT_METHOD,
    HEADLINE,
    fit_offline_gaussian,
    newcombe_interval,
    score,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "out" / "attacks"
CHUNK = 32  # models per cached chunk; a pool of N models is the first N of any larger pool


@dataclass(frozen=True)
class Variant:
    """One attack configuration of :func:`ftps.privacy.scoring.score`."""

    label: str
    method: str
    fixed_variance: bool = False
    # per-record variances shrunk toward the batch's prior (the scorer's default); False: each
    # record's own (Carlini et al.'s per-record LiRA)
    moderated: bool = True


VARIANTS = (
    Variant("offline-global", "offline-global"),
    Variant("offline-per-record", "offline-per-record"),
    Variant("offline-per-record, own variances", "offline-per-record", moderated=False),
    Variant("offline-per-record +fixed", "offline-per-record", True),
    Variant("online-per-record", "online-per-record"),
    Variant("online-per-record, own variances", "online-per-record", moderated=False),
    Variant("online-per-record +fixed", "online-per-record", True),
    Variant("rmia", "rmia"),
)
# Carlini et al.'s online LiRA with per-record variances: on the other 448+ models moderation would
# change little, and the reference stays the one earlier figures were measured against.
REFERENCE = Variant("online-per-record, own variances", "online-per-record", moderated=False)
DEFAULT_VARIANT = next(v for v in VARIANTS if v.method == DEFAULT_METHOD and not v.fixed_variance and v.moderated)
DEFAULT_LABEL = DEFAULT_VARIANT.label
# Per-record score types: (name in the tables and JSON, RecordScores field, interval fields or None).
SCORES = (
    ("P", "counted_p", ("counted_p_ci_low", "counted_p_ci_high")),
    ("model", "score", ("score_ci_low", "score_ci_high")),
    ("auc", "auc", None),
)


# --------------------------------------------------------------------------------------------
# The demo task and the model pool (fine-tuning; cached)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    dataset: str
    strategy_source: str
    base_weights: bytes
    base_sha256: str
    x: np.ndarray  # the batch: m records [m, ...] float32
    y: np.ndarray  # [m] int64
    builder_x: np.ndarray
    builder_y: np.ndarray
    seed: int

    @property
    def key(self) -> str:
        """Everything that changes phi besides the model specs: data, base model, strategy,
        seed, torch threads and version, the engine's version and requested engine."""
        import torch

        h = hashlib.sha256()
        for part in (self.dataset, self.base_sha256, self.strategy_source, self.seed,
                     os.environ.get("FTPS_TORCH_THREADS", ""), torch.__version__,
                     engine_version(), os.environ.get("FTPS_ENGINE", "")):
            h.update(f"{part}\x00".encode())
        h.update(self.x.tobytes())
        h.update(self.y.tobytes())
        return h.hexdigest()[:16]


def engine_version() -> str:
    """``ftps.ml.engine.ENGINE_VERSION``: bumped whenever the same job may give other phi."""
    from ftps.ml import engine

    return str(getattr(engine, "ENGINE_VERSION", "1"))


def load_task(dataset: str, records: int, *, seed: int) -> Task:
    """The demo's task (``stack.demo.run_demo``): same base model (pretrained once and cached
    by the demo's own function), strategy, batch of ``records`` contributor records, builder data."""
    from rich.progress import Progress

    from ftps.ml.datasets import demo_splits
    from stack.demo import BUILDER_DATA_MAX, DATASET_STRATEGY, STRATEGIES, base_model

    strategy_source = (STRATEGIES / DATASET_STRATEGY[dataset]).read_text()
    splits = demo_splits(dataset, seed=seed)
    cx, cy = splits["contributors"]
    if not 4 <= records <= len(cx):
        raise SystemExit(f"--records must be in [4, {len(cx)}] for {dataset}, got {records}")
    pick = np.random.default_rng(seed + 1).choice(len(cx), size=records, replace=False)
    bx, by = splits["builder"]
    weights, _ = base_model(dataset, strategy_source, *splits["pretrain"], seed=seed,
                            progress=Progress(disable=True))
    return Task(dataset=dataset, strategy_source=strategy_source, base_weights=weights,
                base_sha256=hashlib.sha256(weights).hexdigest(), x=cx[pick], y=cy[pick],
                builder_x=bx[:BUILDER_DATA_MAX], builder_y=by[:BUILDER_DATA_MAX], seed=seed)


def _cached(path: Path, compute) -> dict[str, np.ndarray]:
    if path.exists():
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    arrays = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return arrays


@dataclass(frozen=True)
class Pool:
    phi: np.ndarray  # [N, m]
    member: np.ndarray  # [N, m] bool
    fine_tuned: int  # models fine-tuned by this call (the rest came from the cache)
    engines: tuple[str, ...]  # the engines that fine-tuned them (ftps.ml.engines)


def model_pool(task: Task, n_models: int, *, cache_dir: Path, log=print) -> Pool:
    """A pool of ``n_models`` fine-tuned models on the task's batch.

    Chunk ``c`` holds models ``32c .. 32c+31`` with masks ``make_masks(32, m)`` and the scorer's
    per-model seeds; any even ``n_models`` is a prefix of the pool (the last chunk may be cut)."""
    from ftps.ml.engine import finetune_and_score

    m = len(task.x)
    seeds = model_seeds(derive_seed(task.seed, "bench-attacks"), -(-n_models // CHUNK) * CHUNK)
    phis, members, engines = [], [], set()
    t0, trained = time.perf_counter(), 0
    for c in range(-(-n_models // CHUNK)):
        masks = make_masks(CHUNK, m, seed=derive_seed(task.seed, "bench-attacks", "masks", c))
        specs = [(CHUNK * c + i, seeds[CHUNK * c + i], masks[i]) for i in range(CHUNK)]

        def compute(specs=specs, masks=masks):
            result = finetune_and_score(
                strategy_source=task.strategy_source, base_weights=task.base_weights,
                train_x=task.x, train_y=task.y, eval_x=task.x, eval_y=task.y, models=specs)
            return {"phi": result.phi, "member": masks, "engine": np.array(result.engine)}

        path = cache_dir / f"pool-{task.dataset}-{task.key}-m{m}-c{c}.npz"
        fresh = not path.exists()
        arrays = _cached(path, compute)
        if fresh:
            trained += CHUNK
            log(f"  fine-tuned models {CHUNK * c}..{CHUNK * c + CHUNK - 1} "
                f"({(time.perf_counter() - t0) / trained:.2f} s/model)")
        phis.append(arrays["phi"])
        members.append(arrays["member"])
        engines.add(str(arrays.get("engine", "")))
    return Pool(np.concatenate(phis)[:n_models], np.concatenate(members)[:n_models], trained,
                tuple(sorted(engines - {""})))


def offline_gaussian(task: Task, k: int, *, records: int, heldout_max: int = 500,
                     cache_dir: Path) -> tuple[float, float]:
    """The preparation stage of ``Scorer.prepare_offline`` with the demo's settings
    (``batch_threshold`` = ``records``, ``settings.seed`` = the demo seed): k shadow models on
    random halves of ``records`` builder records, phi on up to ``heldout_max`` held-out ones."""
    from ftps.ml.engine import finetune_and_score

    x, y = task.builder_x, task.builder_y
    seed = derive_seed(task.seed, task.base_sha256, "offline")
    perm = np.random.default_rng(seed).permutation(len(x))
    n_heldout = min(len(x) // 2, heldout_max)
    n_pool = min(len(x) - n_heldout, records)
    heldout, pool = perm[:n_heldout], perm[n_heldout:n_heldout + n_pool]
    masks = shadow_masks(k, n_pool, seed=seed)  # the scorer's own masks, on purpose
    specs = list(zip(range(k), model_seeds(seed, k), masks))

    def compute():
        result = finetune_and_score(
            strategy_source=task.strategy_source, base_weights=task.base_weights,
            train_x=x[pool], train_y=y[pool], eval_x=x[heldout], eval_y=y[heldout], models=specs)
        return {"phi": result.phi}

    phi = _cached(cache_dir / f"offline-{task.dataset}-{task.key}-k{k}-p{n_pool}-h{n_heldout}.npz",
                  compute)["phi"]
    return fit_offline_gaussian(phi)


# --------------------------------------------------------------------------------------------
# Measurements (pure: PHI in, rows out)
# --------------------------------------------------------------------------------------------


def blocks(n_total: int, n: int) -> list[np.ndarray]:
    """Disjoint blocks of ``n`` consecutive model indices (whole complementary pairs)."""
    return [np.arange(s, s + n) for s in range(0, n_total - n + 1, n)]


def _score(phi, member, v: Variant, *, alpha: float, offline: tuple[float, float]):
    kw = {}
    if v.method == "offline-global":
        kw = dict(offline_mu=offline[0], offline_sigma=offline[1])
    return score(phi, member, method=v.method, fixed_variance=v.fixed_variance, moderated=v.moderated,
                 alpha=alpha, **kw)


def _corr(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(Pearson, Spearman); NaN when either side is constant (e.g. every record scores 0)."""
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan"), float("nan")
    return float(stats.pearsonr(a, b)[0]), float(stats.spearmanr(a, b)[0])


def _mean(values) -> float:
    values = [v for v in values if np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def measure(phi: np.ndarray, member: np.ndarray, *, sizes: list[int], offline: tuple[float, float],
            alpha: float = 0.05, variants=VARIANTS, log=print) -> dict[str, list[dict]]:
    """Every figure of the benchmark from one pool ``phi``/``member`` ``[N, m]``.

    Returns ``{"attack", "stability", "fidelity", "coverage", "scatter", "roc"}`` -> rows. Rows
    are means over blocks (attack, fidelity, coverage) or over pairs of disjoint blocks
    (stability); ``blocks`` / ``pairs`` says over how many."""
    n_total = phi.shape[0]
    out: dict[str, list] = {k: [] for k in ("attack", "stability", "fidelity", "coverage",
                                            "scatter", "roc")}
    roc_n = _roc_n(sizes)
    for n in sizes:
        bl = blocks(n_total, n)
        rest = [np.setdiff1d(np.arange(n_total), b) for b in bl]
        ref = [_score(phi[r], member[r], REFERENCE, alpha=alpha, offline=offline) for r in rest]
        for v in variants:
            t0 = time.perf_counter()
            fast = [_score(phi[b], member[b], v, alpha=alpha, offline=offline) for b in bl]
            same = [_score(phi[r], member[r], v, alpha=alpha, offline=offline) for r in rest]
            out["attack"].append({
                "method": v.label, "n": n, "blocks": len(bl),
                "auc": _mean(f.batch.auc for f in fast),
                "auc_sd": float(np.std([f.batch.auc for f in fast])),
                "tpr_at_1pct_fpr": _mean(f.batch.tpr_at_1pct_fpr for f in fast),
                "tpr_at_0_1pct_fpr": _mean(f.batch.tpr_at_0_1pct_fpr for f in fast),
                "mean_P": _mean(float(f.records.counted_p.mean()) for f in fast),
                "mean_model": _mean(float(f.records.score.mean()) for f in fast),
                "reference_auc": _mean(s.batch.auc for s in same),
            })
            pairs = [(fast[i], fast[i + 1]) for i in range(0, len(fast) - 1, 2)]
            row = {"method": v.label, "n": n, "pairs": len(pairs)}
            for name, field, _ in SCORES:
                cs = [_corr(getattr(a.records, field), getattr(b.records, field)) for a, b in pairs]
                row[f"{name}_pearson"] = _mean(c[0] for c in cs)
                row[f"{name}_spearman"] = _mean(c[1] for c in cs)
            out["stability"].append(row)
            for name, field, _ in SCORES:
                ref_field = "auc" if name == "auc" else "counted_p"  # the reference: online LiRA's P
                cs = [_corr(getattr(f.records, field), getattr(r.records, ref_field))
                      for f, r in zip(fast, ref)]
                out["fidelity"].append({
                    "method": v.label, "n": n, "score": name, "blocks": len(bl),
                    "reference": f"{REFERENCE.label} {ref_field}, other {n_total - n} models",
                    "spearman": _mean(c[1] for c in cs), "pearson": _mean(c[0] for c in cs),
                    "mae": _mean(float(np.mean(np.abs(getattr(f.records, field)
                                                      - getattr(r.records, ref_field))))
                                 for f, r in zip(fast, ref)),
                })
            for name, field, ci in SCORES:
                if ci is None:
                    continue
                cov, width, cov0, cov_binom = [], [], [], []
                for f, s, b in zip(fast, same, bl):
                    lo, hi = getattr(f.records, ci[0]), getattr(f.records, ci[1])
                    target = getattr(s.records, field)
                    cov.append(float(np.mean((lo <= target) & (target <= hi))))
                    width.append(float(np.mean(hi - lo)))
                    cov0.append(float(np.mean((lo > 0) | (hi < 0))))
                    if name == "P":  # the binomial interval alone, for comparison
                        tp = (f.decisions & member[b]).sum(axis=0)
                        fp = (f.decisions & ~member[b]).sum(axis=0)
                        lo, hi = newcombe_interval(tp, f.records.n_in, fp, f.records.n_out)
                        cov_binom.append(float(np.mean((lo <= target) & (target <= hi))))
                out["coverage"].append({
                    "method": v.label, "n": n, "score": name, "blocks": len(bl),
                    "reference_models": n_total - n, "covers_reference": _mean(cov),
                    "newcombe_only_covers": _mean(cov_binom), "mean_width": _mean(width),
                    "excludes_0": _mean(cov0),
                })
            log(f"  n={n:<3} {v.label:<26} {len(bl):>2} blocks  {time.perf_counter() - t0:5.1f}s")
            if v == DEFAULT_VARIANT:
                out["scatter"].append({
                    "n": n, "reference": ref[0].records.counted_p, "P": fast[0].records.counted_p,
                    "model": fast[0].records.score,
                })
            if n == roc_n:
                f = fast[0]
                out["roc"].append({"label": f"{v.label}  AUC={f.batch.auc:.3f}  "
                                            f"TPR@1%={f.batch.tpr_at_1pct_fpr:.3f}",
                                   "fpr": f.batch.fpr, "tpr": f.batch.tpr})
    return out


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def _fmt(x, spec=".3f") -> str:
    return "—" if x is None or (isinstance(x, float) and not np.isfinite(x)) else format(x, spec)


def _md(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def tables(res: dict[str, list[dict]]) -> dict[str, str]:
    """The four result tables as Markdown (what is printed and pasted into the README)."""
    attack = _md(
        ["method", "n", "blocks", "AUC", "TPR @ 1% FPR", "TPR @ 0.1% FPR", "mean P",
         "mean model"],
        [[r["method"], r["n"], r["blocks"], f"{_fmt(r['auc'])} ± {_fmt(r['auc_sd'])}",
          _fmt(r["tpr_at_1pct_fpr"]), _fmt(r["tpr_at_0_1pct_fpr"]), _fmt(r["mean_P"], "+.3f"),
          _fmt(r["mean_model"], "+.3f")]
         for r in res["attack"]])
    stability = _md(
        ["method", "n", "pairs", "P Pearson", "P Spearman", "model Pearson", "model Spearman",
         "AUC Pearson", "AUC Spearman"],
        [[r["method"], r["n"], r["pairs"], *(_fmt(r[f"{s}_{c}"]) for s in ("P", "model", "auc")
                                              for c in ("pearson", "spearman"))]
         for r in res["stability"]])
    fid = {(r["method"], r["n"], r["score"]): r for r in res["fidelity"]}
    keys = sorted({(r["method"], r["n"]) for r in res["fidelity"]},
                  key=lambda k: ([v.label for v in VARIANTS].index(k[0]), k[1]))
    fidelity = _md(
        ["method", "n", "P Spearman", "P Pearson", "P MAE", "model Spearman", "model Pearson",
         "model MAE", "AUC Spearman"],
        [[m, n, *(_fmt(fid[(m, n, s)][c]) for s in ("P", "model")
                  for c in ("spearman", "pearson", "mae")),
          _fmt(fid[(m, n, "auc")]["spearman"])] for m, n in keys])
    cov = {(r["method"], r["n"], r["score"]): r for r in res["coverage"]}
    coverage = _md(
        ["method", "n", "reference models", "P covers", "P covers (Newcombe only)", "P width",
         "P excludes 0", "model covers", "model width", "model excludes 0"],
        [[m, n, cov[(m, n, "P")]["reference_models"],
          *(_fmt(cov[(m, n, "P")][c]) for c in ("covers_reference", "newcombe_only_covers",
                                                 "mean_width", "excludes_0")),
          *(_fmt(cov[(m, n, "model")][c]) for c in ("covers_reference", "mean_width",
                                                     "excludes_0"))]
         for m, n in keys])
    return {"attack": attack, "stability": stability, "fidelity": fidelity, "coverage": coverage}


def _write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def fidelity_png(scatter: list[dict], *, n_total: int, path: Path) -> None:
    """Figure 2 of the paper, ours: each record's fast score (default method, a block of n
    models) against the reference online LiRA score from the other ``n_total - n`` models."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.6 * len(scatter), 7))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(scatter), squeeze=False)
    for col, s in enumerate(scatter):
        ref = np.asarray(s["reference"])
        for row, (key, what) in enumerate((("model", "model-based 2Φ(d'/2)-1"), ("P", "counted P"))):
            ax, y = axes[row][col], np.asarray(s[key])
            ax.plot([-1, 1], [-1, 1], color="grey", lw=1, ls="--")
            ax.scatter(ref, y, s=6, alpha=0.6)
            rho = stats.spearmanr(ref, y)[0] if np.ptp(y) > 0 else float("nan")
            ax.set_title(f"n={s['n']}: {what}\nSpearman {rho:.3f}, MAE {np.mean(np.abs(y - ref)):.3f}",
                         fontsize=8)
            ax.set_xlim(-0.45, 1.02)
            ax.set_ylim(-1.02, 1.02)
            ax.set_xlabel(f"reference: online LiRA P, {n_total - s['n']} other models", fontsize=7)
            if col == 0:
                ax.set_ylabel(f"{DEFAULT_LABEL}, n models", fontsize=7)
    fig.suptitle("Per-record scores: fast (n models) vs reference (all other models)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_outputs(res: dict, out: Path, *, meta: dict, text: str) -> list[Path]:
    from ftps.privacy import plots

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in ("attack", "stability", "fidelity", "coverage"):
        _write_csv(out / f"{name}.csv", res[name])
        written.append(out / f"{name}.csv")
    fidelity_png(res["scatter"], n_total=meta["pool_models"], path=out / "fidelity.png")
    plots.roc_curves_png([(r["label"], r["fpr"], r["tpr"]) for r in res["roc"]],
                         title=f"ROC, one block of n={meta['roc_n']} models, m={meta['records']}",
                         path=out / "roc.png")
    (out / "results.md").write_text(text)
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return written + [out / "fidelity.png", out / "roc.png", out / "results.md", out / "meta.json"]


def _machine() -> str:
    from bench import cpu_name

    cpu = cpu_name()
    cpus = len(os.sched_getaffinity(0))
    return f"{cpu}, {cpus} CPUs available, {platform.system()} {platform.release()}"


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated even integers, got {text!r}") from None
    if not sizes or any(s < 4 or s % 2 for s in sizes):
        raise argparse.ArgumentTypeError(f"sizes must be even and >= 4, got {text!r}")
    return sizes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.attacks",
        description="Attack strength, stability, fidelity and interval coverage of every "
                    "scoring method on the demo task (issues 3 and 7).")
    p.add_argument("--quick", action="store_true",
                   help="128 models instead of 512: every figure, lower precision (~1-2 min)")
    p.add_argument("--dataset", choices=DATASETS, default="fashion-mnist",
                   help="the demo task's data (default fashion-mnist; breast-cancer: the tabular task, "
                        "its records the encoded rows the services train on)")
    p.add_argument("--records", "-m", type=int, default=200,
                   help="records in the batch (default 200, as the demo)")
    p.add_argument("--models", "-N", type=int, default=None,
                   help="models in the pool (default 512; --quick 128); even, >= 2 x the largest size")
    p.add_argument("--sizes", type=_sizes, default=[16, 32, 64], help="n per block (default 16,32,64)")
    p.add_argument("--shadow-models", "-k", type=int, default=16,
                   help="shadow models of the offline Gaussian (default 16, as the demo)")
    p.add_argument("--alpha", type=float, default=0.05, help="level of the offline and rmia tests")
    add_run_args(p, DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.models is None:
        args.models = 128 if args.quick else 512
    if args.models % 2 or args.models < 2 * max(args.sizes):
        p.error(f"--models must be even and >= 2 x the largest size ({2 * max(args.sizes)}), "
                f"got {args.models}")
    if args.shadow_models < 2:
        p.error("--shadow-models must be >= 2")
    if args.threads < 1:
        p.error("--threads must be >= 1")
    return args


def add_run_args(p: argparse.ArgumentParser, default_out: Path) -> None:
    """The options every benchmark on the demo task takes: seed, threads, cache and output."""
    p.add_argument("--seed", type=int, default=0, help="demo seed: data splits, base model, records")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for fine-tuning (default 1; phi depends on it, so it is "
                        "part of the cache key)")
    p.add_argument("--cache-dir", type=Path,
                   default=Path(os.environ.get("FTPS_BENCH_CACHE", "/tmp/ftps-bench-cache")),
                   help="where fine-tuned PHI is cached (default $FTPS_BENCH_CACHE or "
                        "/tmp/ftps-bench-cache)")
    p.add_argument("--out", type=Path, default=default_out,
                   help=f"output directory (default {default_out.relative_to(ROOT)})")


def log(msg: str) -> None:
    """Progress of a benchmark, on stderr (stdout is left to results)."""
    print(msg, file=sys.stderr, flush=True)


def start(args: argparse.Namespace) -> Task:
    """What every benchmark on the demo task does first: the torch threads the workers would use,
    then the task (base model pretrained once and cached)."""
    os.environ["FTPS_TORCH_THREADS"] = str(args.threads)
    log(f"demo task: {args.dataset}, m={args.records} records, seed {args.seed}")
    return load_task(args.dataset, args.records, seed=args.seed)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    task = start(args)
    t_task = time.perf_counter()
    offline = offline_gaussian(task, args.shadow_models, records=args.records, cache_dir=args.cache_dir)
    log(f"offline Gaussian: mu={offline[0]:.3f} sigma={offline[1]:.3f} (k={args.shadow_models})")
    t_off = time.perf_counter()
    log(f"pool: {args.models} models (cache {args.cache_dir})")
    pool = model_pool(task, args.models, cache_dir=args.cache_dir, log=log)
    phi, member, trained = pool.phi, pool.member, pool.fine_tuned
    t_pool = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez(args.out / "phi_pool.npz", phi=phi, member=member, offline_mu=offline[0],
             offline_sigma=offline[1])
    log("measuring")
    res = measure(phi, member, sizes=args.sizes, offline=offline, alpha=args.alpha, log=log)
    t_measure = time.perf_counter()

    import torch

    meta = {
        "command": " ".join(["python -m bench.attacks", *(sys.argv[1:] if argv is None else argv)]),
        "date": time.strftime("%Y-%m-%d"), "machine": _machine(), "torch_threads": args.threads,
        "torch": torch.__version__, "engine_version": engine_version(),
        "engines": list(pool.engines), "dataset": args.dataset, "records": args.records,
        "pool_models": args.models, "fine_tuned_this_run": trained, "sizes": args.sizes,
        "shadow_models": args.shadow_models,
        "offline_mu": offline[0], "offline_sigma": offline[1], "alpha": args.alpha, "seed": args.seed,
        "default_method": DEFAULT_METHOD, "headline": HEADLINE, "roc_n": _roc_n(args.sizes),
        "seconds": {"base_model": t_task - t0, "offline_gaussian": t_off - t_task,
                    "pool": t_pool - t_off, "measure": t_measure - t_pool},
    }
    header = (
        f"{args.dataset}, m={args.records} records, pool of {args.models} fine-tuned models "
        f"(blocks of n = {', '.join(map(str, args.sizes))}), offline Gaussian from k="
        f"{args.shadow_models} shadow models (mu={offline[0]:.2f}, sigma={offline[1]:.2f}); "
        f"default method {DEFAULT_METHOD}, headline {HEADLINE}.\n"
        f"Machine: {meta['machine']}; torch {torch.__version__}, {args.threads} thread(s), "
        f"engine v{engine_version()} ({', '.join(pool.engines) or '?'}); {meta['date']}.\n"
        f"Seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in meta["seconds"].items())
        + f" ({trained} of {args.models} pool models fine-tuned by this run, the rest cached)"
    )
    t = tables(res)
    text = "\n\n".join([
        f"# bench.attacks\n\n`{meta['command']}`\n\n{header}",
        "## (a) Attack strength per method (mean over disjoint blocks of n models; ± = sd)\n\n"
        + t["attack"],
        "## (b) Stability: per-record correlation between two disjoint blocks of n models "
        "(different seeds and masks). The model-based score depends on the method only through "
        "fixed variance, the per-record AUC not at all\n\n" + t["stability"],
        f"## (c) Fidelity: block of n models vs reference online LiRA from the other "
        f"{args.models}-n models (P and model vs reference P; AUC vs reference AUC)\n\n" + t["fidelity"],
        "## (d) Coverage: the block's 95% interval covers the same score from the other models. "
        "That reference is itself estimated: when its models are not many more than n (quick "
        "mode) coverage reads low. Newcombe only: P's binomial interval without the jackknife "
        "widening\n\n" + t["coverage"],
    ]) + "\n"
    print(text)
    for path in write_outputs(res, args.out, meta=meta, text=text):
        log(f"wrote {path}")
    return 0


def _roc_n(sizes: list[int]) -> int:
    return 32 if 32 in sizes else max(sizes)


if __name__ == "__main__":
    sys.exit(main())
