"""Contributor-level masks (issue 15): each contributor's records in or out of a model together, and
each whole contribution scored (user-level membership inference), from the maths to the clients."""

from __future__ import annotations

import json
import time

import grpc
import numpy as np
import pytest

from clients.api import BuilderClient, ContributorClient
from clients.builder.cli import main as builder_main
from clients.contributor.cli import main as contributor_main
from ftps.common import archives
from ftps.common.task_rules import MIN_CONTRIBUTORS
from ftps.privacy import masks, scoring
from ftps.v1 import common_pb2
from tests.conftest import digits_records


def test_group_masks_draw_whole_groups():
    names, groups = masks.group_index(["bob", "alice", "bob", "carol", "alice"] * 4)
    assert names == ["alice", "bob", "carol"] and groups[:5].tolist() == [1, 0, 1, 2, 0]
    names, groups = masks.group_index([f"c{i % 17:02d}" for i in range(100)])
    m = masks.make_group_masks(16, groups, seed=7)
    assert m.shape == (16, 100)
    for g in range(17):  # a group's records share one column: in or out together
        cols = m[:, groups == g]
        assert (cols == cols[:, :1]).all()
    assert (m.sum(axis=0) == 8).all()  # every record (and group) IN for exactly n/2 models
    assert (m[0::2] == ~m[1::2]).all()  # complementary pairs, over the groups
    np.testing.assert_array_equal(m, masks.make_group_masks(16, groups, seed=7))  # deterministic
    with pytest.raises(ValueError, match="group indices"):
        masks.make_group_masks(16, np.array([], dtype=np.int64), seed=7)


def test_group_scores_find_the_contributions_that_leak():
    rng = np.random.default_rng(0)
    _, groups = masks.group_index([f"c{i % 20:02d}" for i in range(400)])
    member = masks.make_group_masks(32, groups, seed=3)
    leaks = np.arange(20) < 5  # the first 5 contributions raise their statistic when trained on
    phi = rng.normal(size=member.shape) + member * np.where(leaks, 0.8, 0.0)[groups]
    phi[0, 3] = np.nan  # a lost statistic is left out of its group's mean, not fatal
    r = scoring.score_groups(phi, member, groups).records
    assert len(r.score) == 20
    assert (r.score_ci_low[leaks] > 0.5).all()
    assert (r.score_ci_low[~leaks] < 0).mean() >= 0.8 and (np.abs(r.score[~leaks]) < 0.5).all()
    assert (r.empirical_epsilon[leaks] > r.empirical_epsilon[~leaks].max()).all()
    with pytest.raises(ValueError, match="in or out of each model together"):
        scoring.score_groups(phi, masks.make_masks(32, 400, seed=3), groups)


def test_a_round_scores_each_whole_contribution(module_stack, tmp_path, capsys, digits_splits, digits_strategy,
                                               digits_base_weights):
    signer = module_stack["signer"]
    b = ["--registry", module_stack["registry"], "--gateway", module_stack["gateway"], "--scorer", module_stack["scorer"],
         "--token", signer.issue("acme", "builder")]
    capsys.readouterr()
    assert builder_main(b + ["create-task", "--name", "users", "--record-shape", "1,8,8", "--models", "8",
                             "--batch-threshold", "32", "--mask-unit", "contributor", "--json"]) == 0
    task_id = json.loads(capsys.readouterr().out)["task_id"]
    builder = BuilderClient(registry=module_stack["registry"], gateway=module_stack["gateway"], scorer=module_stack["scorer"],
                            token=signer.issue("acme", "builder"))
    builder.upload(task_id, common_pb2.BLOB_KIND_BASE_MODEL, digits_base_weights)
    builder.upload(task_id, common_pb2.BLOB_KIND_STRATEGY, digits_strategy.encode())
    builder.upload(task_id, common_pb2.BLOB_KIND_BUILDER_DATA, archives.records_to_npz(*digits_splits["builder"]))
    assert builder.get_task(task_id).settings.mask_unit == common_pb2.MASK_UNIT_CONTRIBUTOR

    x, y = digits_records(digits_splits, 2 * MIN_CONTRIBUTORS, seed=5)
    names = [f"user{k:02d}" for k in range(MIN_CONTRIBUTORS)]
    clients = {who: ContributorClient(gateway=module_stack["gateway"], contributor=who,
                                      token=signer.issue(who, "contributor")) for who in names}
    # 15 contributors, 30 records: enough records for a forced round, too few contributors
    for k, who in enumerate(names[:-1]):
        clients[who].submit(task_id, x[2 * k:2 * k + 2], y[2 * k:2 * k + 2])
    with pytest.raises(grpc.RpcError) as e:
        builder.start_round(task_id, force=True)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"records of {MIN_CONTRIBUTORS - 1} contributor(s) pending" in e.value.details()
    assert f"need at least {MIN_CONTRIBUTORS}" in e.value.details()
    # the 16th contributor brings the batch to its threshold: the round starts by itself
    sub = clients[names[-1]].submit(task_id, x[-2:], y[-2:])
    for _ in range(300):
        sub = clients[names[-1]].get_submission(sub.submission_id)
        if sub.round_id:
            break
        time.sleep(0.1)
    assert sub.round_id
    for status in builder.watch_round(sub.round_id, timeout=300):
        pass
    assert status.state == common_pb2.ROUND_STATE_DONE, status.message
    result = builder.get_round(sub.round_id)
    whole = {c.contributor: c for c in result.contributor_scores}
    assert sorted(whole) == names
    for c in whole.values():
        assert c.n_records == 2 and c.n_in == c.n_out == 4 and c.delta == 1e-5
        assert c.score_ci_low <= c.score <= c.score_ci_high
        assert 0 <= c.empirical_epsilon_ci_low <= c.empirical_epsilon <= c.empirical_epsilon_ci_high
    # a record's masks are its contributor's: both records of a contribution share IN/OUT counts
    assert all(s.n_in == 4 for s in result.scores)

    # each contributor sees their own contribution's score, the builder everyone's
    capsys.readouterr()
    c = ["--gateway", module_stack["gateway"], "--token", signer.issue("user03", "contributor")]
    assert contributor_main(c + ["scores", "--task", task_id, "--json"]) == 0
    mine = json.loads(capsys.readouterr().out)
    assert [d["contributor"] for d in mine["contribution"]] == ["user03"]
    assert mine["contribution"][0]["score"] == pytest.approx(whole["user03"].score)
    assert contributor_main(c + ["scores", "--task", task_id]) == 0
    assert "user03's whole contribution (2 records, round " in capsys.readouterr().out
    assert contributor_main(c + ["report", "--task", task_id, "--out", str(tmp_path / "report")]) == 0
    assert "whole contribution" in (tmp_path / "report" / "report.html").read_text().lower()
    capsys.readouterr()
    assert builder_main(b + ["scores", "--task", task_id, "--json"]) == 0
    everyone = json.loads(capsys.readouterr().out)
    assert sorted(d["contributor"] for d in everyone["contributions"]) == names
    with pytest.raises(grpc.RpcError) as e:
        builder.create_task("bad", common_pb2.TaskSettings(record_shape=[1, 8, 8], mask_unit=7))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "mask_unit 7 is not a mask unit" in e.value.details()
    for cl in [builder, *clients.values()]:
        cl.close()
