"""The typed Node.js client (clients/node): its committed generated code is what `buf generate`
makes from protos/, its example type-checks against the generated types, and it runs the whole flow
against the real embedded stack (health, task, uploads, preparation, two contributors, a forced
round, scores, a refused call).

Needs `node` and clients/node/node_modules (`npm ci --prefix clients/node`, done by
scripts/bootstrap.sh). What happens without them: tests/node_packages.py."""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np

from tests.conftest import digits_records
from tests.node_packages import NODE_DIR, require
from tests.stacks import embedded_stack

EXAMPLE_TIMEOUT_S = 180


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_generated_code_is_current(tmp_path):
    require("buf")
    out = subprocess.run(["bash", str(NODE_DIR / "generate.sh")], env=dict(os.environ, OUT=str(tmp_path)),
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    fresh, committed = tmp_path / "gen", NODE_DIR / "gen"
    assert _files(fresh) == _files(committed), "clients/node/gen is stale: run clients/node/generate.sh"
    _, mismatch, errors = filecmp.cmpfiles(fresh, committed, _files(fresh), shallow=False)
    assert not mismatch and not errors, f"clients/node/gen is stale ({mismatch + errors}): run clients/node/generate.sh"


def test_example_type_checks():
    """example.mjs is plain JavaScript, checked against the generated .d.ts (tsconfig.json: checkJs):
    a renamed message, field or RPC fails here without a running stack."""
    out = subprocess.run([str(require("tsc")), "-p", str(NODE_DIR)],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def _write_raw(path: Path, array: np.ndarray, dtype: str) -> dict:
    """Raw little-endian bytes of ``array`` as ``dtype`` ('<f4' or '<i8'), and its entry in the manifest."""
    a = np.ascontiguousarray(array, dtype=dtype)
    path.write_bytes(a.tobytes())
    return {"file": path.name, "dtype": {"<f4": "float32", "<i8": "int64"}[dtype], "shape": list(a.shape)}


def _write_data_dir(d: Path, splits, strategy: str, weights: bytes, contributors: dict[str, int]) -> None:
    """The example's input format: the base model and strategy as files, every array as a raw
    little-endian file, and manifest.json naming them with their shapes plus the task settings."""
    d.mkdir()
    (d / "base_model.safetensors").write_bytes(weights)
    (d / "strategy.py").write_text(strategy)
    bx, by = splits["builder"]
    manifest = {
        "name": "node-example",
        # TaskSettings in the protobuf JSON mapping: tiny and fast (4 models, 2 shadow models).
        "settings": {"nModels": 4, "batchThreshold": 1000, "shadowModels": 2, "modelsPerJob": 4,
                     "recordShape": ["1", "8", "8"], "numClasses": 10,
                     "valueRange": {"min": 0, "max": 1}},
        "base_model": "base_model.safetensors",
        "strategy": "strategy.py",
        "builder_data": {"x": _write_raw(d / "builder_x.f32", bx[:200], "<f4"),
                         "y": _write_raw(d / "builder_y.i64", by[:200], "<i8")},
        "contributors": [],
    }
    x, y = digits_records(splits, sum(contributors.values()), seed=5)
    start = 0
    for name, n in contributors.items():
        manifest["contributors"].append({
            "name": name,
            "x": _write_raw(d / f"{name}_x.f32", x[start:start + n], "<f4"),
            "y": _write_raw(d / f"{name}_y.i64", y[start:start + n], "<i8")})
        start += n
    (d / "manifest.json").write_text(json.dumps(manifest, indent=1))


def test_example_runs_the_whole_flow(tmp_path, digits_splits, digits_strategy, digits_base_weights):
    require("buf")
    node = shutil.which("node")
    stack = embedded_stack(tmp_path / "stack")
    try:
        signer = stack.signer()
        contributors = {"alice": 5, "bob": 4}
        data = tmp_path / "in"
        _write_data_dir(data, digits_splits, digits_strategy, digits_base_weights, contributors)
        env = dict(os.environ,
                   FTPS_GATEWAY_ADDR=stack.addresses["gateway"], FTPS_REGISTRY_ADDR=stack.addresses["registry"],
                   FTPS_SCORER_ADDR=stack.addresses["scorer"],
                   FTPS_BUILDER_TOKEN=signer.issue("acme", "builder"),
                   FTPS_CONTRIBUTOR_TOKENS=",".join(signer.issue(c, "contributor") for c in contributors))
        out = subprocess.run([node, str(NODE_DIR / "example.mjs"), str(data)], env=env, cwd=NODE_DIR,
                             capture_output=True, text=True, timeout=EXAMPLE_TIMEOUT_S, check=False)
    finally:
        stack.stop()
    assert out.returncode == 0, f"stdout:\n{out.stdout}\nstderr:\n{out.stderr}"
    lines = out.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["task_id"] and summary["round_id"]
    assert summary["round_state"] == "DONE"
    assert summary["preparation_state"] == "READY" and summary["shadow_models"] == 2
    assert summary["healthy"] == ["ftps.v1.ContributorGatewayService", "ftps.v1.BuilderRegistryService",
                                  "ftps.v1.LiraScorerService"]
    # Each contributor got exactly one score per submitted record, for exactly its records.
    assert summary["scores"] == contributors
    assert all(summary["scored_ids_match"][c] for c in contributors)
    assert summary["refused"] == {"code": "invalid_argument", "reason": "RECORDS_NOT_FINITE", "domain": "ftps.v1"}
    # The progress the example printed on the way.
    text = out.stdout
    assert "preparation: 2/2 shadow models" in text and "round " in text and "score " in text
