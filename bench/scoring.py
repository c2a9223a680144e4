"""Scoring time: every method of :func:`ftps.privacy.scoring.score` on one statistic matrix, side by
side in one run (the scoring step of a round; fine-tuning dominates a round, this is what is left).

    python -m bench.scoring                 # n = 32 / 256 models x m = 500 / 5,000 records, 7 repeats
    python -m bench.scoring --quick         # n = 256 x m = 500 only, 3 repeats

A synthetic matrix (balanced masks as rounds draw them, per-record offsets, an IN shift): the
maths' cost depends on its shape, not on where phi came from. Median wall time per call after one
warm-up call, in one process (numpy's threads as the machine gives them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from bench import cpu_name
from ftps.privacy.masks import make_masks
from ftps.privacy.scoring import METHODS, score

OFFLINE = {"offline_mu": 0.0, "offline_sigma": 1.0}


def matrix(n: int, m: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    member = make_masks(n, m, seed=seed)
    return rng.normal(size=(n, m)) + 0.5 * member + rng.normal(0, 2.0, m), member


def time_method(phi: np.ndarray, member: np.ndarray, method: str, repeats: int) -> float:
    kwargs = {"method": method, **(OFFLINE if method == "offline-global" else {})}
    score(phi, member, **kwargs)  # warm-up: first-call imports and caches
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        score(phi, member, **kwargs)
        seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one shape (n = 256, m = 500), 3 repeats")
    p.add_argument("--out", type=Path, default=Path("bench/out/scoring.json"), help="where the figures go (JSON)")
    args = p.parse_args(argv)
    shapes = [(256, 500)] if args.quick else [(32, 500), (256, 500), (32, 5000), (256, 5000)]
    repeats = 3 if args.quick else 7
    rows = []
    print(f"machine: {cpu_name()}; median of {repeats} calls after a warm-up")
    print(f"{'method':<20}" + "".join(f"{f'n={n} m={m}':>16}" for n, m in shapes))
    cells: dict[str, list[str]] = {method: [] for method in METHODS}
    for n, m in shapes:
        phi, member = matrix(n, m)
        for method in METHODS:
            s = time_method(phi, member, method, repeats)
            rows.append({"method": method, "n": n, "m": m, "median_s": s})
            cells[method].append(f"{s * 1000:.1f} ms")
    for method in METHODS:
        print(f"{method:<20}" + "".join(f"{c:>16}" for c in cells[method]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": cpu_name(), "repeats": repeats, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
