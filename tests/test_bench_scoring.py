"""bench/scoring.py runs and writes a figure for every method (its numbers are the README's, not
asserted here: timings belong to benchmarks, not tests)."""

from __future__ import annotations

import json

from bench import scoring as bench_scoring
from ftps.privacy.scoring import METHODS


def test_quick_run_times_every_method(tmp_path, capsys):
    out = tmp_path / "scoring.json"
    assert bench_scoring.main(["--quick", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["method"] for r in rows} == set(METHODS)
    assert all(r["n"] == 256 and r["m"] == 500 and r["median_s"] > 0 for r in rows)
    printed = capsys.readouterr().out
    assert all(method in printed for method in METHODS)
