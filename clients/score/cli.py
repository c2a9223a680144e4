"""``ftps-score``: score a saved statistic matrix without any service.

For users who bring their own shadow-model outputs::

    ftps-score FILE.npz [--method M] [--alpha A] [--fixed-variance] [--delta D]
               [--offline-mu X --offline-sigma Y] [--json] [--out DIR] [--diagnose J ...]

``FILE.npz`` holds ``phi`` (float ``[n, m]``, model x record), ``member`` (bool or 0/1 ``[n, m]``,
record ``j`` was in model ``i``'s fine-tuning set) and optionally the scalars ``offline_mu`` and
``offline_sigma`` (the offline Gaussian, used by ``--method offline-global``; the flags override
them). It is loaded with ``allow_pickle=False``.

Per record it prints the headline model-based score with its interval, the paper's counted P
with its interval, n_in, n_out and the per-record AUC (``--json``: per record ``score``,
``score_ci_low``, ``score_ci_high`` (the headline), ``counted_p``, ``counted_p_ci_low``,
``counted_p_ci_high``, ``n_in``, ``n_out``, ``auc``, and the same exposure in DP units as this attack
measured it, ``empirical_mu`` and ``empirical_epsilon`` at ``--delta`` with their ``_ci_low``/``_ci_high``;
and ``"headline": "score"``, ``"delta"``).

Exit codes: 0 success; 2 bad usage or bad input (one line ``ftps-score: error: <cause>`` on
stderr); 1 the results could not be written.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import zipfile
from pathlib import Path

import numpy as np

from ftps.privacy.dp import DEFAULT_DELTA
from ftps.privacy.scoring import DEFAULT_METHOD, HEADLINE, METHODS, ScoreResult, score

PROG = "ftps-score"
_CSV_FIELDS = (
    "score", "score_ci_low", "score_ci_high", "counted_p", "counted_p_ci_low", "counted_p_ci_high",
    "n_in", "n_out", "auc", "mu_in", "sigma_in", "mu_out", "sigma_out",
    "empirical_mu", "empirical_mu_ci_low", "empirical_mu_ci_high",
    "empirical_epsilon", "empirical_epsilon_ci_low", "empirical_epsilon_ci_high",
)  # fmt: skip
# The DP-unit fields, as in RecordScore (ftps.privacy.dp): JSON carries them per record.
_DP_FIELDS = _CSV_FIELDS[-6:]


class UsageError(Exception):
    """Bad command line or bad input file: exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump, no traceback
        raise UsageError(message)


def _build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description=(
            "Per-record privacy scores (LiRA membership inference, FT-PrivacyScore) from a saved "
            "statistic matrix phi [n_models, n_records] and its membership mask."
        ),
        epilog=(
            "Each record gets two estimates of TPR - FPR of the attack on it (0 = coin flip, "
            "1 = membership always identified), each with a 95%% interval: the model-based "
            "score 2 Phi(d'/2) - 1 from the fitted IN/OUT Gaussians (the headline: steadier), "
            "and the paper's counted P over the n models' decisions."
        ),
    )
    p.add_argument("file", metavar="FILE.npz", help="NPZ with phi [n, m] and member [n, m]")
    p.add_argument(
        "--method", choices=METHODS, default=DEFAULT_METHOD,
        help=f"attack (default: {DEFAULT_METHOD})",
    )  # fmt: skip
    p.add_argument(
        "--alpha", type=float, default=0.05,
        help="level of the one-sided tests of offline-* and rmia (default: 0.05)",
    )  # fmt: skip
    p.add_argument(
        "--fixed-variance", action="store_true",
        help="one pooled residual std for all records (more stable at small n)",
    )  # fmt: skip
    p.add_argument(
        "--delta", type=float, default=DEFAULT_DELTA,
        help=f"delta of each record's empirical epsilon (default: {DEFAULT_DELTA:g})",
    )  # fmt: skip
    p.add_argument("--offline-mu", type=float, metavar="X", help="offline Gaussian mean")
    p.add_argument("--offline-sigma", type=float, metavar="Y", help="offline Gaussian std")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--out", metavar="DIR", help="also write scores.csv, roc.png, hist.png here")
    p.add_argument(
        "--diagnose", type=int, action="append", default=[], metavar="J",
        help="with --out: also write record_J.png, the record's diagnosis plot (repeatable)",
    )  # fmt: skip
    return p


def _scalar(f, key: str) -> float | None:
    if key not in f:
        return None
    a = f[key]
    if a.size != 1 or a.dtype == bool or not np.issubdtype(a.dtype, np.number):
        raise UsageError(f"{key} in the NPZ must be a single number, got shape {a.shape} {a.dtype}")
    return float(a.reshape(()))


def _load(path: str) -> tuple[np.ndarray, np.ndarray, float | None, float | None]:
    try:
        f = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise UsageError(f"no such file: {path}") from None
    except IsADirectoryError:
        raise UsageError(f"{path} is a directory, not an .npz file") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise UsageError(f"cannot read {path} as .npz: {e}") from None
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise UsageError(f"{path} is a single .npy array, not an .npz archive with phi and member")
    try:
        with f:
            missing = [k for k in ("phi", "member") if k not in f]
            if missing:
                raise UsageError(
                    f"{path} lacks {' and '.join(missing)} (has: {', '.join(f.files) or 'nothing'})"
                )
            return f["phi"], f["member"], _scalar(f, "offline_mu"), _scalar(f, "offline_sigma")
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise UsageError(f"cannot read {path}: {e}") from None


def _finite(v) -> float | None:
    v = float(v)
    return v if np.isfinite(v) else None


def _to_json(result: ScoreResult) -> dict:
    r = result.records
    return {
        "method": result.method,
        "n_models": result.n_models,
        "n_records": result.n_records,
        "headline": HEADLINE,
        "delta": result.delta,
        "records": [
            {
                "index": j,
                "score": float(r.score[j]),
                "score_ci_low": float(r.score_ci_low[j]),
                "score_ci_high": float(r.score_ci_high[j]),
                "counted_p": float(r.counted_p[j]),
                "counted_p_ci_low": float(r.counted_p_ci_low[j]),
                "counted_p_ci_high": float(r.counted_p_ci_high[j]),
                "n_in": int(r.n_in[j]),
                "n_out": int(r.n_out[j]),
                "auc": float(r.auc[j]),
                # null where a record's IN and OUT statistics never overlapped (infinite): JSON
                # has no infinity
                **{k: _finite(getattr(r, k)[j]) for k in _DP_FIELDS},
            }
            for j in range(result.n_records)
        ],
        "batch": {
            "auc": result.batch.auc,
            "tpr_at_1pct_fpr": result.batch.tpr_at_1pct_fpr,
            "tpr_at_0_1pct_fpr": result.batch.tpr_at_0_1pct_fpr,
        },
        "warnings": list(result.warnings),
    }


def _print_table(result: ScoreResult) -> None:
    from rich.console import Console
    from rich.table import Table

    # Piped output is not cut to 80 columns: every column stays readable in a file or a pager.
    console = Console(file=sys.stdout, width=None if sys.stdout.isatty() else 120)
    r, b = result.records, result.batch
    table = Table(
        title=(
            f"Privacy scores — {result.method}, n={result.n_models} models, "
            f"m={result.n_records} records"
        ),
        caption=(
            "score = 2 Phi(d'/2) - 1 from the fitted IN/OUT Gaussians (headline); "
            "counted P = TPR - FPR counted over the n models; 0 = coin flip, 1 = always identified; "
            "empirical ε: the same exposure in DP units as this attack measured it (mu-GDP with "
            "mu = |d'|), not a guarantee"
        ),
    )
    interval = f"{result.confidence:.0%} interval"
    eps = f"empirical ε (δ={result.delta:g})"
    for name in ("record", "score", interval, "counted P", f"counted P {interval}", eps, "n_in/n_out", "AUC"):
        table.add_column(name, justify="right", no_wrap=True)
    for j in range(result.n_records):
        table.add_row(
            str(j),
            f"{r.score[j]:+.3f}",
            f"[{r.score_ci_low[j]:+.2f}, {r.score_ci_high[j]:+.2f}]",
            f"{r.counted_p[j]:+.3f}",
            f"[{r.counted_p_ci_low[j]:+.2f}, {r.counted_p_ci_high[j]:+.2f}]",
            f"{r.empirical_epsilon[j]:.2f} [{r.empirical_epsilon_ci_low[j]:.2f}, "
            f"{r.empirical_epsilon_ci_high[j]:.2f}]",
            f"{int(r.n_in[j])}/{int(r.n_out[j])}",
            f"{r.auc[j]:.3f}",
        )
    console.print(table)
    console.print(
        f"batch: AUC {b.auc:.4f}   TPR@1%FPR {b.tpr_at_1pct_fpr:.4f}   "
        f"TPR@0.1%FPR {b.tpr_at_0_1pct_fpr:.4f}",
        highlight=False,
    )
    for w in result.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}", highlight=False)


def _write_outputs(result: ScoreResult, phi, member, out: Path, diagnose: list[int]) -> list[Path]:
    from ftps.privacy import plots

    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "scores.csv"
    with csv_path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(("index", *_CSV_FIELDS))
        cols = [getattr(result.records, name) for name in _CSV_FIELDS]
        for j in range(result.n_records):
            w.writerow((j, *(repr(c[j].item()) for c in cols)))
    written = [csv_path, out / "roc.png", out / "hist.png"]
    plots.roc_png(result, written[1])
    plots.score_hist_png(result, written[2])
    for j in diagnose:
        path = out / f"record_{j}.png"
        plots.record_diagnosis_png(result, phi, member, j, path)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``ftps-score``; returns the exit code."""
    parser = _build_parser()
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help
            return int(e.code or 0)
        if (args.offline_mu is None) != (args.offline_sigma is None):
            raise UsageError("--offline-mu and --offline-sigma must be given together")
        if args.diagnose and args.out is None:
            raise UsageError("--diagnose needs --out DIR")
        negative = [j for j in args.diagnose if j < 0]
        if negative:
            raise UsageError(f"--diagnose index must be >= 0, got {negative[0]}")
        phi, member, file_mu, file_sigma = _load(args.file)
        mu, sigma = args.offline_mu, args.offline_sigma
        if mu is None and args.method == "offline-global":
            mu, sigma = file_mu, file_sigma  # the file's offline Gaussian is for this method only
        if args.method == "offline-global" and (mu is None or sigma is None):
            raise UsageError(
                "--method offline-global needs the offline Gaussian: --offline-mu X "
                "--offline-sigma Y, or offline_mu and offline_sigma in the NPZ"
            )
        try:
            result = score(
                phi, member, method=args.method, alpha=args.alpha,
                fixed_variance=args.fixed_variance, offline_mu=mu, offline_sigma=sigma,
                delta=args.delta,
            )  # fmt: skip
        except ValueError as e:
            raise UsageError(str(e)) from None
        out_of_range = [j for j in args.diagnose if j >= result.n_records]
        if out_of_range:
            raise UsageError(
                f"--diagnose {out_of_range[0]}: the batch has only {result.n_records} records"
            )
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2

    if args.json:
        print(json.dumps(_to_json(result), allow_nan=False))
    else:
        _print_table(result)
    if args.out is not None:
        try:
            _write_outputs(result, phi, member, Path(args.out), args.diagnose)
        except OSError as e:
            print(f"{PROG}: error: cannot write results to {args.out}: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
