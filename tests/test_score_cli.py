"""Tests of the ``ftps-score`` command line (clients.score.cli.main), in process."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from clients.score.cli import main
from ftps.privacy.masks import make_masks
from ftps.privacy.scoring import HEADLINE, METHODS, score

PNG = b"\x89PNG\r\n\x1a\n"


def _arrays(n=16, m=8, seed=0):
    rng = np.random.default_rng(seed)
    member = make_masks(n, m, seed=seed)
    phi = rng.normal(size=(n, m)) + member * np.linspace(0, 3, m)
    return phi, member


@pytest.fixture
def npz(tmp_path):
    def write(name="batch.npz", **arrays):
        path = tmp_path / name
        np.savez(path, **arrays)
        return str(path)

    return write


def _error_line(capsys) -> str:
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("ftps-score: error: ")
    return lines[0]


@pytest.mark.parametrize("method", METHODS)
def test_json_output_matches_scorer(npz, capsys, method):
    phi, member = _arrays()
    path = npz(phi=phi, member=member, offline_mu=0.5, offline_sigma=1.2)
    assert main([path, "--json", "--method", method]) == 0
    out, err = capsys.readouterr()
    obj = json.loads(out)  # exactly one JSON object on stdout
    assert set(obj) == {
        "method", "n_models", "n_records", "headline", "delta", "records", "batch", "warnings",
    }  # fmt: skip
    assert obj["delta"] == 1e-5
    assert (obj["method"], obj["n_models"], obj["n_records"]) == (method, 16, 8)
    assert obj["headline"] == HEADLINE == "score"
    kw = {"offline_mu": 0.5, "offline_sigma": 1.2} if method == "offline-global" else {}
    ref = score(phi, member, method=method, **kw)
    assert [r["index"] for r in obj["records"]] == list(range(8))
    keys = (
        "score", "score_ci_low", "score_ci_high",
        "counted_p", "counted_p_ci_low", "counted_p_ci_high", "n_in", "n_out", "auc",
        "empirical_mu", "empirical_mu_ci_low", "empirical_mu_ci_high",
        "empirical_epsilon", "empirical_epsilon_ci_low", "empirical_epsilon_ci_high",
    )  # fmt: skip
    for key in keys:
        np.testing.assert_allclose([r[key] for r in obj["records"]], getattr(ref.records, key))
    # the headline model-based score and the counted P, each with its interval (RecordScore's names)
    assert set(obj["records"][0]) == {"index", *keys}
    assert isinstance(obj["records"][0]["n_in"], int)
    assert obj["batch"] == pytest.approx(
        {
            "auc": ref.batch.auc,
            "tpr_at_1pct_fpr": ref.batch.tpr_at_1pct_fpr,
            "tpr_at_0_1pct_fpr": ref.batch.tpr_at_0_1pct_fpr,
        }
    )
    assert obj["warnings"] == ref.warnings
    assert not any("only used by offline-global" in w for w in obj["warnings"])


def test_options_reach_the_scorer(npz, capsys):
    phi, member = _arrays(seed=1)
    path = npz(phi=phi, member=member)
    args = [path, "--json", "--method", "offline-per-record", "--alpha", "0.2", "--fixed-variance"]
    assert main(args) == 0
    obj = json.loads(capsys.readouterr().out)
    ref = score(phi, member, method="offline-per-record", alpha=0.2, fixed_variance=True)
    np.testing.assert_allclose([r["counted_p"] for r in obj["records"]], ref.records.counted_p)


def test_delta_reaches_the_scorer(npz, capsys):
    phi, member = _arrays(seed=2)
    path = npz(phi=phi, member=member)
    assert main([path, "--json", "--delta", "1e-3"]) == 0
    obj = json.loads(capsys.readouterr().out)
    ref = score(phi, member, delta=1e-3)
    assert obj["delta"] == 1e-3
    np.testing.assert_allclose([r["empirical_epsilon"] for r in obj["records"]], ref.records.empirical_epsilon)
    assert main([path, "--json"]) == 0
    default = json.loads(capsys.readouterr().out)
    # a larger delta buys a smaller epsilon for every record measured above 0
    for a, b in zip(obj["records"], default["records"]):
        assert a["empirical_epsilon"] <= b["empirical_epsilon"]
        assert (a["empirical_epsilon"] < b["empirical_epsilon"]) == (b["empirical_epsilon"] > 0)


def test_flags_override_file_offline_gaussian(npz, capsys):
    phi, member = _arrays()
    path = npz(phi=phi, member=member, offline_mu=100.0, offline_sigma=1.0)
    assert main([path, "--json", "--method", "offline-global"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert all(r["counted_p"] == 0 for r in obj["records"])  # mu = 100: nothing is ever called
    flags = ["--offline-mu", "0", "--offline-sigma", "1"]
    assert main([path, "--json", "--method", "offline-global", *flags]) == 0
    obj = json.loads(capsys.readouterr().out)
    ref = score(phi, member, method="offline-global", offline_mu=0.0, offline_sigma=1.0)
    np.testing.assert_allclose([r["counted_p"] for r in obj["records"]], ref.records.counted_p)


def test_table_output(npz, capsys):
    phi, member = _arrays(m=5)
    assert main([npz(phi=phi, member=member)]) == 0
    out = capsys.readouterr().out
    assert "online-per-record" in out and "interval" in out and "headline" in out
    assert "batch: AUC" in out and "TPR@1%FPR" in out and "TPR@0.1%FPR" in out
    assert "warning:" in out  # 16 models x 5 records: the low-FPR metrics are not resolved


def test_out_dir_writes_csv_and_pngs(npz, tmp_path, capsys):
    phi, member = _arrays()
    out_dir = tmp_path / "report" / "nested"
    path = npz(phi=phi, member=member)
    assert main([path, "--json", "--out", str(out_dir), "--diagnose", "0", "--diagnose", "7"]) == 0
    json.loads(capsys.readouterr().out)
    for name in ("roc.png", "hist.png", "record_0.png", "record_7.png"):
        assert (out_dir / name).read_bytes()[:8] == PNG, name
    with (out_dir / "scores.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 8
    ref = score(phi, member)
    np.testing.assert_allclose([float(r["counted_p"]) for r in rows], ref.records.counted_p)
    for key in ("score", "score_ci_low", "score_ci_high", "counted_p_ci_low", "counted_p_ci_high"):
        np.testing.assert_allclose([float(r[key]) for r in rows], getattr(ref.records, key))
    assert [int(r["index"]) for r in rows] == list(range(8))


def test_int_member_accepted(npz, capsys):
    phi, member = _arrays()
    assert main([npz(phi=phi, member=member.astype(np.int8)), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_models"] == 16


def test_help(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: ftps-score" in out and "--fixed-variance" in out and "--offline-sigma" in out


def _bad_cases(tmp_path):
    phi, member = _arrays()
    nan_phi = phi.copy()
    nan_phi[3, 2] = np.nan
    cases = {
        "nan": ({"phi": nan_phi, "member": member}, [], "non-finite"),
        "shape": ({"phi": phi[:, :5], "member": member}, [], "shape mismatch"),
        "float member": (
            {"phi": phi, "member": member.astype(float)},
            [],
            "member must be boolean",
        ),
        "few models": ({"phi": phi[:3], "member": member[:3]}, [], "at least 4 models"),
        "missing member": ({"phi": phi}, [], "lacks member"),
        "object array": (
            {"phi": np.array([object()] * 4, dtype=object), "member": member},
            [],
            "cannot read",
        ),
        "offline without gaussian": (
            {"phi": phi, "member": member},
            ["--method", "offline-global"],
            "needs the offline Gaussian",
        ),
        "mu without sigma": (
            {"phi": phi, "member": member},
            ["--offline-mu", "1"],
            "must be given together",
        ),
        "bad sigma": (
            {"phi": phi, "member": member},
            ["--method", "offline-global", "--offline-mu", "0", "--offline-sigma", "-1"],
            "offline_sigma",
        ),
        "bad scalar": (
            {"phi": phi, "member": member, "offline_mu": np.zeros(3), "offline_sigma": 1.0},
            ["--method", "offline-global"],
            "offline_mu in the NPZ must be a single number",
        ),
        "bad alpha": ({"phi": phi, "member": member}, ["--alpha", "0"], "alpha"),
        "bad delta": ({"phi": phi, "member": member}, ["--delta", "1.5"], "delta must be a number in (0, 1)"),
        "bad method": ({"phi": phi, "member": member}, ["--method", "lira"], "invalid choice"),
        "diagnose range": (
            {"phi": phi, "member": member},
            ["--out", str(tmp_path / "o"), "--diagnose", "8"],
            "only 8 records",
        ),
        "diagnose without out": (
            {"phi": phi, "member": member},
            ["--diagnose", "1"],
            "needs --out",
        ),
    }
    return cases


@pytest.mark.parametrize(
    "case",
    [
        "nan", "shape", "float member", "few models", "missing member", "object array",
        "offline without gaussian", "mu without sigma", "bad sigma", "bad scalar", "bad alpha", "bad delta",
        "bad method", "diagnose range", "diagnose without out",
    ],
)  # fmt: skip
def test_bad_input_exit_2_one_line(npz, tmp_path, capsys, case):
    arrays, extra, match = _bad_cases(tmp_path)[case]
    path = npz(**arrays)
    assert main([path, *extra]) == 2
    assert match in _error_line(capsys)


def test_bad_files_exit_2(tmp_path, capsys):
    assert main([str(tmp_path / "missing.npz")]) == 2
    assert "no such file" in _error_line(capsys)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file at all")
    assert main([str(garbage)]) == 2
    assert "cannot read" in _error_line(capsys)
    single = tmp_path / "single.npy"
    np.save(single, np.zeros((4, 4)))
    assert main([str(single)]) == 2
    assert "not an .npz archive" in _error_line(capsys)
    assert main([str(tmp_path)]) == 2
    _error_line(capsys)
    assert main([]) == 2
    assert "required" in _error_line(capsys)
    assert main([str(tmp_path / "x.npz"), "--alpha", "lots"]) == 2
    assert "invalid float value" in _error_line(capsys)


def test_unwritable_out_dir_exit_1(npz, tmp_path, capsys):
    phi, member = _arrays()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main([npz(phi=phi, member=member), "--json", "--out", str(blocker / "sub")]) == 1
    out, err = capsys.readouterr()
    json.loads(out)
    assert err.startswith("ftps-score: error: cannot write results") and "Traceback" not in err
