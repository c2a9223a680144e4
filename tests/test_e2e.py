"""End to end: the embedded stack (real S3-protocol store, four gRPC services on 127.0.0.1:0),
driven through the real command-line clients, real fine-tuning on real digits."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from scipy import special

from clients.builder.cli import main as builder_main
from clients.contributor.cli import main as contributor_main
from ftps.common import archives
from ftps.privacy import dp
from stack.embedded import EmbeddedStack
from tests.conftest import digits_records


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = EmbeddedStack(ports={k: 0 for k in ("gateway", "registry", "scorer", "worker", "s3")},
                      data_dir=tmp_path_factory.mktemp("data"))
    s.start()
    signer = s.signer()
    yield dict(s.addresses, builder_token=signer.issue("acme", "builder"),
               alice_token=signer.issue("alice", "contributor"), bob_token=signer.issue("bob", "contributor"),
               zed_token=signer.issue("zed", "contributor"))
    s.stop()


def _b(stack):
    return ["--registry", stack["registry"], "--gateway", stack["gateway"], "--scorer", stack["scorer"],
            "--token", stack["builder_token"]]


def _c(stack, who):
    return ["--gateway", stack["gateway"], "--token", stack[f"{who}_token"]]


def _json(capsys, fn, argv):
    capsys.readouterr()
    assert fn(argv) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_round_through_the_real_clients(stack, tmp_path, capsys, digits_splits, digits_strategy,
                                        digits_base_weights):
    b = _b(stack)
    task = _json(capsys, builder_main, b + ["create-task", "--name", "e2e", "--record-shape", "1,8,8",
                                            "--models", "8", "--batch-threshold", "24", "--shadow-models", "4",
                                            "--models-per-job", "4", "--dp-delta", "1e-6", "--json"])["task_id"]
    (tmp_path / "w.safetensors").write_bytes(digits_base_weights)
    (tmp_path / "s.py").write_text(digits_strategy)
    (tmp_path / "d.npz").write_bytes(archives.records_to_npz(*digits_splits["builder"]))
    for kind, f in (("base-model", "w.safetensors"), ("strategy", "s.py"), ("data", "d.npz")):
        assert _json(capsys, builder_main, b + ["upload", "--task", task, "--kind", kind,
                                                str(tmp_path / f), "--json"])["version"] == 1
    prep = _json(capsys, builder_main, b + ["prepare", "--task", task, "--json"])
    g = prep["gaussian"]
    assert prep["state"] == "READY" and prep["models_done"] == prep["models_total"] == 4
    assert g["k"] == 4 and g["sigma"] > 0 and np.isfinite(g["mu"])
    # cost before you pay: timed by the preparation's shadow fine-tunes
    est = _json(capsys, builder_main, b + ["estimate", "--task", task, "--json"])
    assert (est["n_models"], est["n_records"], est["jobs"]) == (8, 24, 2) and est["parallel_jobs"] >= 1
    assert est["seconds_per_model"] > 0 and est["worker_s"] == pytest.approx(8 * est["seconds_per_model"])
    assert est["wall_s"] > 0 and "preparation" in est["basis"]

    x, y = digits_records(digits_splits, 24, seed=3)
    subs = {}
    for who, sl in (("alice", slice(0, 12)), ("bob", slice(12, 24))):
        path = tmp_path / f"{who}.npz"
        path.write_bytes(archives.records_to_npz(x[sl], y[sl]))
        c = _c(stack, who)
        subs[who] = _json(capsys, contributor_main, c + ["submit", "--task", task, str(path),
                                                         "--idempotency-key", "once", "--json"])
    # The 24th record reached the batch threshold: a round started on its own.
    c_bob = _c(stack, "bob")
    deadline = time.time() + 30
    while True:
        sub = _json(capsys, contributor_main, c_bob + ["submission", subs["bob"]["submission_id"], "--json"])
        if sub["round_id"] or time.time() > deadline:
            break
        time.sleep(0.2)
    assert sub["round_id"]
    capsys.readouterr()
    assert builder_main(b + ["watch", "--round", sub["round_id"]]) == 0, capsys.readouterr()

    alice = _json(capsys, contributor_main, _c(stack, "alice") + ["scores", "--task", task, "--json"])
    assert [r["record_id"] for r in alice["records"]] == subs["alice"]["record_ids"]
    for r in alice["records"]:
        assert r["contributor"] == "alice" and r["method"] == "online-per-record"
        assert -1 <= r["counted_p_ci_low"] <= r["counted_p"] <= r["counted_p_ci_high"] <= 1
        assert r["n_in"] == r["n_out"] == 4
        # the same exposure in DP units, at the task's delta, mapped from the headline's d'
        assert r["delta"] == 1e-6
        assert 0 <= r["empirical_mu_ci_low"] <= r["empirical_mu"] <= r["empirical_mu_ci_high"]
        assert 0 <= r["empirical_epsilon_ci_low"] <= r["empirical_epsilon"] <= r["empirical_epsilon_ci_high"]
        assert r["empirical_mu"] == pytest.approx(abs(2 * special.ndtri((r["score"] + 1) / 2)), rel=1e-6, abs=1e-9)
        assert r["empirical_epsilon"] == pytest.approx(float(dp.epsilon_at_delta(r["empirical_mu"], 1e-6)))
    summary = alice["summary"]
    assert summary["records"] == 12 and 0 <= summary["above_chance"] <= 12
    worst = max(alice["records"], key=lambda r: (r["score"], r["score_ci_low"]))
    assert summary["worst"]["record_id"] == worst["record_id"]
    assert summary["max_empirical_epsilon"] == max(r["empirical_epsilon"] for r in alice["records"])
    capsys.readouterr()
    assert contributor_main(_c(stack, "alice") + ["scores", "--task", task]) == 0
    table = capsys.readouterr().out
    assert "empirical ε" in table and "of 12 records identifiable above chance" in table
    # once a round finished, it is the basis, scaled to the size asked for
    est = _json(capsys, builder_main, b + ["estimate", "--task", task, "--models", "16", "--records", "48", "--json"])
    assert est["basis"].startswith(f"round {sub['round_id']} of this task (8 models, 24 records)")
    assert "scaled from 24 to 48 records" in est["basis"] and est["jobs"] == 4
    capsys.readouterr()
    assert builder_main(b + ["estimate", "--task", task, "--models", "5"]) == 1
    assert "INVALID_ARGUMENT [INVALID_SETTINGS]: n_models must be even" in capsys.readouterr().err
    everything = _json(capsys, builder_main, b + ["scores", "--task", task, "--json"])
    assert len(everything["records"]) == 24 and everything["batches"][0]["n_models"] == 8
    # Real fine-tuning leaves a real membership signal: the attack beats chance on the batch.
    assert everything["batches"][0]["auc"] > 0.55


def test_clients_fail_with_one_line_and_a_meaningful_exit_code(stack, tmp_path, capsys):
    c = _c(stack, "zed")
    assert contributor_main(c + ["submit", "--task", "t-x", str(tmp_path / "missing.npz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ftps-contributor: error: cannot read")
    path = tmp_path / "r.npz"
    path.write_bytes(archives.records_to_npz(np.zeros((2, 1, 8, 8), np.float32), np.zeros(2, np.int64)))
    assert contributor_main(c + ["submit", "--task", "t-unknown", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    # An unknown task reads exactly like someone else's: no answer tells what exists.
    assert err == ["ftps-contributor: error: PERMISSION_DENIED: contributor 'zed' may not submit to task t-unknown"]
    b = _b(stack)
    assert builder_main(b + ["create-task", "--name", "x", "--record-shape", "1,8,8", "--models", "5"]) == 1
    assert "n_models" in capsys.readouterr().err
    tid = _json(capsys, builder_main, b + ["create-task", "--name", "y", "--record-shape", "1,8,8", "--json"])["task_id"]
    assert builder_main(b + ["estimate", "--task", tid]) == 1  # nothing measured yet: says what to do
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "[PREPARATION_NOT_FOUND]" in err[0] and "run the preparation stage first" in err[0]
    with pytest.raises(SystemExit) as e:
        builder_main(["--help"])
    assert e.value.code == 0


def test_demo_digits_json(tmp_path, monkeypatch, capsys):
    from stack.cli import main as stack_main

    monkeypatch.setenv("FTPS_CACHE_DIR", str(tmp_path / "cache"))
    rc = stack_main(["demo", "--data-dir", str(tmp_path / "data"), "--dataset", "digits", "--records", "40", "--models", "8", "--shadow-models", "4",
                     "--json", "--report-dir", str(tmp_path / "report")])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    out = json.loads(captured.out)
    assert out["method"] == "online-per-record" and len(out["records"]) == 40
    assert {r["contributor"] for r in out["records"]} == {"alice", "bob"}
    assert all(-1 <= r["counted_p_ci_low"] <= r["counted_p"] <= r["counted_p_ci_high"] <= 1 for r in out["records"])
    assert {m["method"] for m in out["methods"]} >= {"offline-global", "online-per-record"}
    assert out["offline"]["k"] == 4 and out["timings"]["wall_s"] > 0
    assert all(r["delta"] == 1e-5 and r["empirical_epsilon"] >= 0 for r in out["records"])
    assert {who: m["records"] for who, m in out["contributors"].items()} == {"alice": 20, "bob": 20}
    for name in ("result.json", "scores.csv", "roc.png", "scores.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0
