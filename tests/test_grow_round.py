"""Growing n without redoing a round (issue 15): models added to a DONE round reuse its statistics,
every score is computed again from all of them, and the scores stay readable while it grows."""

from __future__ import annotations


import grpc
import numpy as np
import pytest

from clients.builder.cli import main as builder_main
from ftps.common import archives
from ftps.common.settings import StorageSettings
from ftps.common.storage import ObjectStore
from ftps.v1 import common_pb2, gateway_pb2
from tests.stacks import digits_round


def test_a_done_round_grows_reusing_its_statistics(module_stack, capsys, digits_splits, digits_strategy,
                                                   digits_base_weights):
    signer = module_stack["signer"]
    builder, alice, task_id, round_id = digits_round(module_stack, digits_splits, digits_strategy, digits_base_weights,
                                                     name="grow", seed=11, models_per_job=2,
                                                     contributor_growth_limit=8)
    assert builder.get_round(round_id).status.models_total == 4
    before = builder.get_round(round_id)
    assert {s.n_in for s in before.scores} == {2}

    # contributors only up to the builder's limit; not an odd number; not past 4096
    with pytest.raises(grpc.RpcError) as e:
        alice.stub.GrowRound(gateway_pb2.GrowRoundRequest(round_id=round_id, add_models=6), timeout=10)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "may not grow round" in e.value.details() and "allows contributors at most 8" in e.value.details()
    for add, message in ((3, "add_models must be even and >= 2"), (0, "add_models must be even"),
                         (4094, "over 4096")):
        with pytest.raises(grpc.RpcError) as e:
            builder.grow_round(round_id, add)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in e.value.details()

    capsys.readouterr()
    b = ["--registry", module_stack["registry"], "--gateway", module_stack["gateway"], "--scorer", module_stack["scorer"],
         "--token", signer.issue("acme", "builder")]
    status = alice.stub.GrowRound(gateway_pb2.GrowRoundRequest(round_id=round_id, add_models=4), timeout=10)
    assert status.models_total == 8 and status.state != common_pb2.ROUND_STATE_DONE
    # while it grows, the scores so far stay readable (or the grown ones, if it was quick)
    assert {s.n_in for s in alice.scores(task_id)} <= {2, 4} and len(alice.scores(task_id)) == 24
    if builder.get_round(round_id).status.state != common_pb2.ROUND_STATE_DONE:
        with pytest.raises(grpc.RpcError) as e:
            builder.grow_round(round_id, 2)  # one growth at a time
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "only a DONE round can grow" in e.value.details()
    assert builder_main(b + ["watch", "--round", round_id]) == 0
    assert "with 8 models (grown from 4)" in capsys.readouterr().out

    after = builder.get_round(round_id)
    assert after.status.models_total == 8 and after.batch.n_models == 8
    assert {s.n_in for s in after.scores} == {4} and {s.n_out for s in after.scores} == {4}
    assert [s.record_id for s in after.scores] == [s.record_id for s in before.scores]
    # the first four models' statistics are the round's own, reused, not fine-tuned again
    store = ObjectStore(StorageSettings(s3_endpoint=module_stack["s3"], s3_bucket=module_stack["bucket"]))
    first = archives.npz_arrays(store.get_bytes(f"scorer/rounds/{round_id}/phi.npz"))
    grown = archives.npz_arrays(store.get_bytes(f"scorer/rounds/{round_id}/phi-n8.npz"))
    np.testing.assert_array_equal(grown["x"][:4], first["x"])
    np.testing.assert_array_equal(grown["y"][:4], first["y"])
    assert (grown["y"][4::2] == ~grown["y"][5::2]).all()  # the added ones in complementary pairs
    assert (grown["y"].sum(axis=0) == 4).all()
    # more models, sharper scores: the intervals narrow on the whole
    width = lambda r: np.mean([s.score_ci_high - s.score_ci_low for s in r.scores])  # noqa: E731
    assert width(after) < width(before)
    # contributors read the grown scores
    assert {s.n_in for s in alice.scores(task_id)} == {4}
    with pytest.raises(grpc.RpcError) as e:  # alice reached the builder's limit; the builder may go on
        alice.stub.GrowRound(gateway_pb2.GrowRoundRequest(round_id=round_id, add_models=2), timeout=10)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    capsys.readouterr()
    assert builder_main(b + ["grow", "--round", round_id, "--models", "2", "--watch"]) == 0
    assert "with 10 models (grown from 8)" in capsys.readouterr().out
    assert builder.get_round(round_id).status.models_total == 10
    assert {s.n_in for s in builder.get_round(round_id).scores} == {5}
    # a growth that fails leaves the round as it was, DONE with its scores, and says why
    store.delete(f"scorer/rounds/{round_id}/phi-n10.npz")
    capsys.readouterr()
    assert builder_main(b + ["grow", "--round", round_id, "--models", "2", "--watch"]) == 1
    out = capsys.readouterr().out
    assert "growing to 12 models failed" in out and "the scores are those of its 10 models" in out
    kept = builder.get_round(round_id)
    assert kept.status.state == common_pb2.ROUND_STATE_DONE and kept.status.models_total == 10
    assert len(kept.scores) == 24 and {s.n_in for s in kept.scores} == {5}
    for c in (builder, alice):
        c.close()
