"""What the builder can do about it (issue 15): a DONE round's batch run under other recipes with
the same masks and seeds, each record's exposure and the models' held-out accuracy side by side."""

from __future__ import annotations

import json

import grpc
import pytest

from clients.builder.cli import main as builder_main
from ftps.v1 import common_pb2, gateway_pb2
from tests.stacks import digits_round


def test_recipes_compared_on_the_same_batch(module_stack, tmp_path, capsys, digits_splits, digits_strategy,
                                           digits_base_weights):
    signer = module_stack["signer"]
    builder, alice, task_id, round_id = digits_round(module_stack, digits_splits, digits_strategy, digits_base_weights,
                                                     name="compare", seed=21)
    scored = {s.record_id: s.score for s in builder.get_round(round_id).scores}

    with pytest.raises(grpc.RpcError) as e:
        builder.get_comparison(round_id)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    # refused before anything runs: a syntax error, a bad name, not a contributor's to ask
    for recipes, code, words in [
        ({"broken": b"def build_model(:\n"}, grpc.StatusCode.INVALID_ARGUMENT, "has a syntax error at line 1"),
        ({"current": digits_strategy.encode()}, grpc.StatusCode.INVALID_ARGUMENT, "not 'current'"),
        ({f"r{k}": digits_strategy.encode() for k in range(5)}, grpc.StatusCode.INVALID_ARGUMENT, "1 to 4 recipes"),
    ]:
        with pytest.raises(grpc.RpcError) as e:
            builder.compare_recipes(round_id, recipes)
        assert e.value.code() == code and words in e.value.details(), e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        alice.stub.CompareRecipes(gateway_pb2.CompareRecipesRequest(round_id=round_id, alternatives=[
            common_pb2.RecipeAlternative(name="x", strategy=digits_strategy.encode())]), timeout=10)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED

    # fewer epochs: the usual first thing to try
    fewer = digits_strategy.replace('"epochs": 15', '"epochs": 3')
    assert fewer != digits_strategy
    (tmp_path / "fewer.py").write_text(fewer)
    b = ["--registry", module_stack["registry"], "--gateway", module_stack["gateway"], "--scorer", module_stack["scorer"],
         "--token", signer.issue("acme", "builder")]
    capsys.readouterr()
    assert builder_main(b + ["compare", "--round", round_id, "--recipe", f"fewer-epochs={tmp_path / 'fewer.py'}",
                             "--json"]) == 0, capsys.readouterr().err
    out = json.loads(capsys.readouterr().out)
    assert [r["recipe"] for r in out["recipes"]] == ["current", "fewer-epochs"]
    current, alt = out["recipes"]
    for r in (current, alt):
        assert r["state"] == "done" and r["heldout_records"] > 0 and 0.0 <= r["heldout_accuracy"] <= 1.0
        assert set(r["scores"]) == set(scored)
    # the same masks and seeds under the same recipe: the round's own scores again, exactly
    assert current["scores"] == pytest.approx(scored, abs=1e-9)
    assert current["heldout_accuracy"] > 0.8  # the task's recipe is a good digits model
    comparison = builder.get_comparison(round_id)
    above = [{s.record_id for s in v.scores if s.score_ci_low > 0} for v in comparison.variants]
    assert set(comparison.exposed_everywhere) == above[0] & above[1] == set(out["exposed_everywhere"])
    # the table a person reads
    assert builder_main(b + ["compare", "--round", round_id]) == 0
    table = capsys.readouterr().out
    assert "current" in table and "fewer" in table and "held-o" in table and "under every recipe" in table
    # one comparison at a time; the contributors' view of the round is unchanged
    assert {s.record_id: s.score for s in alice.scores(task_id)} == pytest.approx(scored)
    for c in (builder, alice):
        c.close()
