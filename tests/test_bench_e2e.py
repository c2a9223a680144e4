"""Tests of ``bench/e2e.py``: its command line and pure helpers, and (slow) one run of the quick
mode on a tiny configuration through real multi-process stacks and the bare engine."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import e2e

ROOT = Path(e2e.__file__).resolve().parents[1]


def test_quick_and_full_grids():
    main, n_scale, m_scale, every = e2e.grid(e2e.parse_args(["--quick"]))
    assert main == [(100, 8), (100, 16)]
    assert n_scale == (100, [4, 8, 16]) and m_scale == (8, [50, 100, 200])
    assert every == [(50, 8), (100, 4), (100, 8), (100, 16), (200, 8)]
    args = e2e.parse_args([])
    main, n_scale, m_scale, every = e2e.grid(args)
    assert main == [(100, 16), (100, 64), (500, 16), (500, 64)]
    assert n_scale == (100, [8, 16, 32, 64, 128]) and m_scale == (16, [50, 100, 200, 500, 1000])
    assert set(main) <= set(every) and len(every) == len(set(every))
    assert args.throughput_stacks == [(1, 1), (2, 1), (1, 2)] and args.repeats == 2


@pytest.mark.parametrize("argv", [["--sizes", "5"], ["--sizes", "2"], ["--records", "x"],
                                  ["--throughput-stacks", "2"], ["--throughput-stacks", "0x1"],
                                  ["--repeats", "0"], ["--throughput-models", "7"]])
def test_bad_arguments_are_refused(argv):
    with pytest.raises(SystemExit):
        e2e.parse_args(argv)


def test_throughput_stacks_none_and_helpers():
    assert e2e.parse_args(["--throughput-stacks", "none"]).throughput_stacks == []
    a, b, r2 = e2e.linear_fit([4, 8, 16], [1.5, 2.5, 4.5])
    assert (a, b, r2) == pytest.approx((0.5, 0.25, 1.0))
    x, y = np.arange(10).reshape(5, 2), np.arange(5)
    bx, by = e2e.batch_order(x, y, "bob")  # bob submitted the second half
    assert by.tolist() == [2, 3, 4, 0, 1] and bx[0].tolist() == [4, 5]
    assert e2e.batch_order(x, y, "alice")[1].tolist() == y.tolist()
    assert [e2e.models_per_job(n) for n in (4, 16, 64, 128)] == [1, 4, 8, 8]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_quick_mode_tiny(tmp_path):
    """``python -m bench.e2e --quick`` with even smaller settings: m = 20, 40; n = 4, 8; k = 4;
    a 1-worker and a 2-worker stack (about a minute on 2 cores; the demo's cached base model)."""
    argv = ["--quick", "--records", "40", "--sizes", "4,8", "--scale-sizes", "4",
            "--scale-records", "20", "--shadow-models", "4", "--throughput-records", "40",
            "--throughput-models", "8", "--out", str(tmp_path)]
    proc = subprocess.run([sys.executable, "-m", "bench.e2e", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=1100)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for heading in ("Preparation stage", "Cost of a round", "overhead goes", "Scaling in n",
                    "Scaling in m", "Throughput"):
        assert heading in proc.stdout
    for name in ("cost.csv", "rounds.csv", "prep.csv", "throughput.csv", "results.md", "meta.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "e2e.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = json.loads((tmp_path / "meta.json").read_text())
    configs = {tuple(c) for c in meta["configs"]}
    assert configs == {(20, 4), (40, 4), (40, 8)}

    def rows(name):
        with (tmp_path / name).open() as fh:
            return list(csv.DictReader(fh))

    cost = rows("cost.csv")
    assert {(int(r["m"]), int(r["n"])) for r in cost} == configs
    for r in cost:
        for key in ("e2e_s", "finetune_s", "scoring_s", "s_per_record", "cpu_s", "bare_s",
                    "bare_finetune_s", "bare_cpu_s", "ratio", "cpu_ratio"):
            assert float(r[key]) > 0, (key, r)
        assert float(r["e2e_s"]) > float(r["finetune_s"])
        # The bare engine ran the very models the services ran: the same scores.
        assert float(r["max_abs_score_diff"]) < 1e-9
    for r in rows("rounds.csv"):
        assert float(r["e2e_s"]) > float(r["scorer_total_s"]) >= float(r["finetune_s"]) > 0
    prep = rows("prep.csv")
    assert {int(r["m"]) for r in prep} == {20, 40}
    assert all(float(r["services_s"]) > 0 and float(r["bare_s"]) > 0 for r in prep)
    assert all(r["same_gaussian"] == "True" for r in prep)
    tp = rows("throughput.csv")
    assert [r["stack"] for r in tp] == ["1 worker x 1 thread", "2 workers x 1 thread"]
    assert all(float(r["models_per_s"]) > 0 and float(r["speedup"]) > 0 for r in tp)
