"""DP-SGD audit: per-record empirical epsilon against the accountant's epsilon (issue 15).

On the demo task (``ftps-stack demo``: Fashion-MNIST, the demo's base model and strategy, m
records from the contributors' split), the demo's strategy is fine-tuned as it is (the baseline)
and with ``RECIPE['dp']`` added (DP-SGD through opacus) at each target epsilon::

    python -m bench.dp_audit            # n = 64 models per setting, target epsilon 1 and 8
    python -m bench.dp_audit --quick    # n = 16

Per setting, n models with the production masks (``ftps.privacy.masks.make_masks``) are scored
by ``ftps.privacy.scoring.score`` (default method, delta = the recipe's delta) and reported
beside what the accountant spent (``JobResult.dp_epsilon``, opacus' RDP accountant):

- the accountant's epsilon and noise multiplier;
- the models' accuracy on held-out builder records (mean over the n models: the same models,
  see ``_heldout_queries``);
- the attack's batch AUC;
- per-record empirical epsilon: median and max of the point estimates, max of the lower 95%
  bounds, and the fraction of records whose lower bound exceeds the accountant's epsilon.

DP-SGD bounds every attack, so that fraction must be about 0: each record's interval misses its
true value below the lower bound at most 2.5% of the time. The point estimates can exceed the
accountant's epsilon without contradiction: with n models a record's d' carries noise of sd
about sqrt(4/n), and epsilon at delta = 1e-5 grows about 4.3x faster than mu. With few models
(--quick: 8 complementary pairs) a record's membership can match that of a few other records in
every pair; its IN - OUT contrast then carries their effect on its statistic too, and the interval
(t on n/2 - 1 degrees of freedom) does not cover that when one or two similar records dominate.
Audit with n >= 64.

The accountant's epsilon is for adding or removing one record; a record IN a model and OUT of its
complementary partner is a replacement (the OUT model has another record in its place), which
DP-SGD bounds by at most twice that epsilon (group privacy). Comparing with the add/remove
epsilon is the stricter check.

Fine-tuned PHI is cached under ``--cache-dir`` keyed by everything that changes it (as in
``bench.attacks``). Outputs in ``--out`` (default ``bench/out/dp_audit/``): ``dp_audit.csv``,
``results.md``, ``meta.json``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from bench.attacks import (
    ROOT,
    Task,
    _cached,
    _fmt,
    _machine,
    _md,
    add_run_args,
    engine_version,
    log,
    start,
)
from ftps.privacy.masks import derive_seed, make_masks, model_seeds
from ftps.privacy.scoring import DEFAULT_METHOD, score

DEFAULT_OUT = ROOT / "bench" / "out" / "dp_audit"
DEFAULT_DELTA = 1e-5
# Chosen for the demo CNN fine-tuned from its base model: per-record gradient norms there are
# mostly above 1, so C = 1 clips most records (the usual choice, Abadi et al. 2016).
DEFAULT_MAX_GRAD_NORM = 1.0


@dataclasses.dataclass(frozen=True)
class Setting:
    """One recipe of the audit: the demo's (``dp`` None) or DP-SGD at ``target_epsilon``."""

    label: str
    dp: dict | None = None

    def source(self, strategy_source: str) -> str:
        """The demo's strategy with this setting's ``RECIPE['dp']`` added (the same
        ``build_model``, so the demo's base weights load)."""
        if self.dp is None:
            return strategy_source
        return strategy_source + f"\n\nRECIPE = {{**RECIPE, 'dp': {self.dp!r}}}\n"


def settings(epsilons: list[float], *, max_grad_norm: float, delta: float) -> list[Setting]:
    out = [Setting("no DP (the demo's recipe)")]
    for eps in sorted(epsilons, reverse=True):
        out.append(Setting(f"DP-SGD, target ε={eps:g}", {
            "max_grad_norm": max_grad_norm, "target_epsilon": eps, "delta": delta}))
    return out


# --------------------------------------------------------------------------------------------
# Fine-tuning (cached)
# --------------------------------------------------------------------------------------------


def _heldout_queries(x: np.ndarray, y: np.ndarray, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Each held-out record once per class label: phi(x, c) = log(p_c / (1 - p_c)) is increasing
    in p_c, so the class with the largest phi is the model's prediction. Accuracy then comes from
    the pool's own models through the engine's PHI, with no second fine-tuning."""
    return np.repeat(x, classes, axis=0), np.tile(np.arange(classes, dtype=np.int64), len(x))


def fine_tune(task: Task, setting: Setting, n: int, *, heldout: tuple[np.ndarray, np.ndarray],
              cache_dir: Path, log=print) -> dict[str, np.ndarray]:
    """n models of ``setting`` on the task's batch, production masks, the scorer's per-model seeds
    -> ``phi`` [n, m] on the batch, ``member`` [n, m], ``accuracy`` [n] on ``heldout``, and the
    job's ``dp_epsilon``, ``dp_noise_multiplier``, ``dp_delta``, ``train_s`` (0-d)."""
    from ftps.ml.engine import run_job
    from ftps.ml.jobs import FinetuneJob
    from ftps.records.npz import Records

    hx, hy = heldout
    classes = int(max(task.y.max(), hy.max())) + 1
    m = len(task.x)
    masks = make_masks(n, m, seed=derive_seed(task.seed, "bench-dp-audit", "masks", n))
    seeds = model_seeds(derive_seed(task.seed, "bench-dp-audit", n), n)
    source = setting.source(task.strategy_source)
    key = dataclasses.replace(task, strategy_source=source).key
    path = cache_dir / f"dp-audit-{task.dataset}-{key}-m{m}-n{n}-h{len(hx)}.npz"

    def compute() -> dict[str, np.ndarray]:
        qx, qy = _heldout_queries(hx, hy, classes)
        job = FinetuneJob(
            strategy_source=source, base_weights=task.base_weights,
            train_records=Records.of(task.x, task.y, what="batch"),
            models=tuple(zip(range(n), seeds, masks, strict=True)),
            eval_records=Records.of(np.concatenate([task.x, qx]), np.concatenate([task.y, qy]),
                                    what="batch and held-out queries"),
            engine="auto")
        t0 = time.perf_counter()

        def progress(done: int, total: int) -> None:
            if done % 8 == 0 or done == total:
                log(f"    {setting.label}: {done}/{total} models "
                    f"({(time.perf_counter() - t0) / done:.2f} s/model)")

        result = run_job(job, progress=progress)
        pred = result.phi[:, m:].reshape(n, len(hx), classes).argmax(axis=2)
        return {"phi": result.phi[:, :m], "member": masks,
                "accuracy": (pred == hy[None, :]).mean(axis=1),
                "dp_epsilon": np.array(result.dp_epsilon),
                "dp_noise_multiplier": np.array(result.dp_noise_multiplier),
                "dp_delta": np.array(result.dp_delta), "train_s": np.array(result.train_s),
                "engine": np.array(result.engine)}

    fresh = not path.exists()
    arrays = _cached(path, compute)
    if not fresh:
        log(f"    {setting.label}: {n} models from the cache")
    return arrays


def base_accuracy(task: Task, heldout: tuple[np.ndarray, np.ndarray]) -> float:
    """The base model's accuracy on ``heldout``: what fine-tuning starts from."""
    import torch

    from ftps.ml.engine import load_weights
    from ftps.ml.strategy import load_strategy

    model = load_strategy(task.strategy_source).build_model()
    load_weights(model, task.base_weights)
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(heldout[0])).argmax(dim=1).numpy()
    return float(np.mean(pred == heldout[1]))


# --------------------------------------------------------------------------------------------
# Measurement (pure: PHI in, a row out)
# --------------------------------------------------------------------------------------------


def audit_row(setting: Setting, pool: dict[str, np.ndarray], *, delta: float) -> dict:
    """The audit's figures for one setting's pool (see the module docstring)."""
    res = score(pool["phi"], pool["member"], method=DEFAULT_METHOD, delta=delta)
    rec = res.records
    dp = setting.dp is not None
    acc_eps = float(pool["dp_epsilon"]) if dp else math.inf
    lo = rec.empirical_epsilon_ci_low
    return {
        "setting": setting.label,
        "models": int(pool["phi"].shape[0]),
        "records": int(pool["phi"].shape[1]),
        "accountant_epsilon": acc_eps if dp else float("nan"),
        "noise_multiplier": float(pool["dp_noise_multiplier"]) if dp else float("nan"),
        "delta": delta,
        "heldout_accuracy": float(np.mean(pool["accuracy"])),
        "batch_auc": float(res.batch.auc),
        "emp_eps_median": float(np.median(rec.empirical_epsilon)),
        "emp_eps_max": float(np.max(rec.empirical_epsilon)),
        "emp_eps_ci_low_max": float(np.max(lo)),
        "emp_mu_median": float(np.median(rec.empirical_mu)),
        # Records whose lower bound exceeds the accountant's epsilon: DP-SGD says ~0 (<= 2.5%).
        "frac_ci_low_above_accountant": float(np.mean(lo > acc_eps)) if dp else float("nan"),
        "frac_point_above_accountant": (float(np.mean(rec.empirical_epsilon > acc_eps))
                                        if dp else float("nan")),
        "train_s_per_model": float(pool["train_s"]) / max(int(pool["phi"].shape[0]), 1),
    }


def table(rows: list[dict]) -> str:
    return _md(
        ["setting", "n", "accountant ε", "noise σ", "held-out accuracy", "batch AUC",
         "empirical ε median", "empirical ε max", "max lower 95% bound",
         "lower bound > accountant ε", "point > accountant ε"],
        [[r["setting"], r["models"], _fmt(r["accountant_epsilon"]), _fmt(r["noise_multiplier"]),
          _fmt(r["heldout_accuracy"]), _fmt(r["batch_auc"]), _fmt(r["emp_eps_median"]),
          _fmt(r["emp_eps_max"]), _fmt(r["emp_eps_ci_low_max"]),
          _fmt(r["frac_ci_low_above_accountant"]), _fmt(r["frac_point_above_accountant"])]
         for r in rows])


def write_outputs(rows: list[dict], out: Path, *, meta: dict, text: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "dp_audit.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (out / "results.md").write_text(text)
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return [out / "dp_audit.csv", out / "results.md", out / "meta.json"]


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _epsilons(text: str) -> list[float]:
    try:
        eps = sorted({float(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not eps or any(not (e > 0 and math.isfinite(e)) for e in eps):
        raise argparse.ArgumentTypeError(f"epsilons must be finite and > 0, got {text!r}")
    return eps


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.dp_audit",
        description="Per-record empirical epsilon of DP-SGD fine-tunes against the accountant's "
                    "epsilon on the demo task (issue 15).")
    p.add_argument("--quick", action="store_true", help="16 models per setting instead of 64")
    p.add_argument("--dataset", choices=("fashion-mnist", "digits"), default="fashion-mnist")
    p.add_argument("--records", "-m", type=int, default=200,
                   help="records in the batch (default 200, as the demo)")
    p.add_argument("--models", "-n", type=int, default=None,
                   help="models per setting (default 64; --quick 16); even, >= 4")
    p.add_argument("--epsilons", type=_epsilons, default=[1.0, 8.0],
                   help="target epsilons of the DP-SGD settings (default 1,8)")
    p.add_argument("--max-grad-norm", type=float, default=DEFAULT_MAX_GRAD_NORM,
                   help=f"DP-SGD clipping norm C (default {DEFAULT_MAX_GRAD_NORM})")
    p.add_argument("--delta", type=float, default=DEFAULT_DELTA,
                   help=f"delta of the accountant and of the empirical epsilon (default {DEFAULT_DELTA})")
    p.add_argument("--heldout", type=int, default=300,
                   help="held-out builder records for the accuracy (default 300)")
    add_run_args(p, DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.models is None:
        args.models = 16 if args.quick else 64
    if args.models % 2 or args.models < 4:
        p.error(f"--models must be even and >= 4, got {args.models}")
    if not args.max_grad_norm > 0:
        p.error(f"--max-grad-norm must be > 0, got {args.max_grad_norm}")
    if not 0 < args.delta < 1:
        p.error(f"--delta must be in (0, 1), got {args.delta}")
    if args.heldout < 1 or args.threads < 1:
        p.error("--heldout and --threads must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    task = start(args)
    if args.heldout > len(task.builder_x):
        raise SystemExit(f"--heldout must be <= {len(task.builder_x)} for {args.dataset}")
    # Builder records: the base model's builder never saw them in fine-tuning, nor did the batch.
    heldout = (task.builder_x[-args.heldout:], task.builder_y[-args.heldout:])
    base_acc = base_accuracy(task, heldout)
    log(f"  base model: held-out accuracy {base_acc:.3f}")
    rows, seconds, engines = [], {"base_model": time.perf_counter() - t0}, set()
    for setting in settings(args.epsilons, max_grad_norm=args.max_grad_norm, delta=args.delta):
        t = time.perf_counter()
        log(f"  {setting.label}: {args.models} models (cache {args.cache_dir})")
        pool = fine_tune(task, setting, args.models, heldout=heldout, cache_dir=args.cache_dir,
                         log=log)
        engines.add(str(pool["engine"]))
        row = audit_row(setting, pool, delta=args.delta)
        rows.append(row)
        seconds[setting.label] = time.perf_counter() - t
        log(f"  {setting.label}: accountant ε {_fmt(row['accountant_epsilon'])}, accuracy "
            f"{row['heldout_accuracy']:.3f}, AUC {row['batch_auc']:.3f}, empirical ε median "
            f"{row['emp_eps_median']:.3f} max {row['emp_eps_max']:.3f} (lower bounds max "
            f"{row['emp_eps_ci_low_max']:.3f})")

    import torch

    meta = {
        "command": " ".join(["python -m bench.dp_audit", *(sys.argv[1:] if argv is None else argv)]),
        "date": time.strftime("%Y-%m-%d"), "machine": _machine(), "torch_threads": args.threads,
        "torch": torch.__version__, "engine_version": engine_version(),
        "engines": sorted(engines), "dataset": args.dataset, "records": args.records,
        "models": args.models, "epsilons": args.epsilons, "max_grad_norm": args.max_grad_norm,
        "delta": args.delta, "heldout": args.heldout, "base_accuracy": base_acc, "seed": args.seed,
        "default_method": DEFAULT_METHOD, "seconds": seconds,
    }
    header = (
        f"{args.dataset}, m={args.records} records, n={args.models} models per setting "
        f"(production masks), the demo's strategy and base model; DP-SGD with C="
        f"{args.max_grad_norm:g}, delta={args.delta:g} (opacus, RDP accountant); scored with "
        f"{DEFAULT_METHOD}, empirical ε at delta={args.delta:g}; accuracy on {args.heldout} "
        f"held-out builder records (the base model's before fine-tuning: {base_acc:.3f}).\n"
        f"Machine: {meta['machine']}; torch {torch.__version__}, {args.threads} thread(s), engine "
        f"v{engine_version()} ({', '.join(sorted(engines))}); {meta['date']}.\n"
        "Seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items())
    )
    text = (f"# bench.dp_audit\n\n`{meta['command']}`\n\n{header}\n\n"
            "## Per-record empirical ε (point estimates and lower 95% bounds) vs the "
            "accountant's ε\n\n" + table(rows) + "\n")
    print(text)
    for path in write_outputs(rows, args.out, meta=meta, text=text):
        log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
