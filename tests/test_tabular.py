"""Tabular tasks (issue 19): the schema, rows checked and encoded, CSV and Parquet files, and the
services and command-line clients taking raw rows of real health records (scikit-learn's bundled
Wisconsin diagnostic breast cancer data: 569 patients, 30 measurements)."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer

from clients.builder.cli import main as builder_main
from clients.contributor.cli import main as contributor_main
from ftps.common import grpcutil, serde
from ftps.common.errors import InvalidArgument, ResourceExhausted
from ftps.common.settings import StorageSettings
from ftps.common.storage import ObjectStore
from ftps.records import checks, files, tables
from ftps.records.files import Expect
from ftps.records.npz import load as load_npz
from ftps.records.tabular import CATEGORICAL, Feature, Schema
from ftps.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, registry_pb2, registry_pb2_grpc

MIXED = Schema((
    Feature("age", mean=50.0, std=10.0, range=(0.0, 120.0)),
    Feature("smoker", kind=CATEGORICAL, levels=("no", "yes", "former"), level_frequencies=(0.6, 0.1, 0.3)),
    Feature("bmi", mean=25.0, std=4.0),
), label_column="outcome", class_names=("healthy", "ill"))


def _columns(rows: list[tuple]) -> dict[str, list]:
    names = ["age", "smoker", "bmi", "outcome"]
    return {n: [r[k] for r in rows] for k, n in enumerate(names)}


# -- the schema -----------------------------------------------------------------------------------

def test_schema_round_trips_through_proto_and_json():
    assert MIXED.width == 1 + 3 + 1
    assert Schema.from_proto(MIXED.to_proto()) == MIXED
    assert Schema.from_json(MIXED.to_json()) == MIXED
    settings = common_pb2.TaskSettings(schema=MIXED.to_proto())
    assert Schema.from_proto(settings.schema).names == ["age", "smoker", "bmi"]


@pytest.mark.parametrize("schema, message", [
    (Schema(()), "features must list 1 to 4096 columns, got 0"),
    (Schema((Feature("a"), Feature("a"))), "features[1].name 'a' appears twice"),
    (Schema((Feature("a", std=0.0),)), "features[0].std must be > 0 and finite, got 0"),
    (Schema((Feature("a", mean=float("nan")),)), "features[0].mean must be finite"),
    (Schema((Feature("a", range=(2.0, 1.0)),)), "features[0].range must be finite with min <= max"),
    (Schema((Feature("c", kind=CATEGORICAL, levels=("x",)),)), "features[0].levels must list 2 to 1000"),
    (Schema((Feature("c", kind=CATEGORICAL, levels=("x", "x")),)), "levels must be distinct"),
    (Schema((Feature("label"),)), "features[0].name 'label' is the label column"),
    (Schema((Feature("a"),), class_names=("x", "y", "z")), "class_names must name all 2 classes, got 3"),
    (Schema((Feature("a", kind="text"),)), "features[0].kind must be numeric or categorical"),
])
def test_a_bad_schema_is_refused_naming_the_part(schema, message):
    with pytest.raises(InvalidArgument) as e:
        schema.check(2)
    assert message in str(e.value) and e.value.reason == "INVALID_SETTINGS"


def test_encode_standardises_numbers_one_hots_levels_and_decodes_back():
    raw = np.array([[60.0, 1, 29.0], [50.0, 2, 25.0]])
    enc = MIXED.encode(MIXED.check_rows(raw))
    assert enc.dtype == np.float32
    np.testing.assert_allclose(enc, [[1.0, 0, 1, 0, 1.0], [0.0, 0, 0, 1, 0.0]])
    np.testing.assert_allclose(MIXED.decode(enc), raw)
    assert [MIXED.cell_text(1, v) for v in (0, 1, 2)] == ["no", "yes", "former"]


@pytest.mark.parametrize("row, message, reason", [
    ([130.0, 0, 25.0], "records.x[1, 0] (column 'age') = 130 is outside the column's range [0, 120]",
     "RECORDS_OUT_OF_RANGE"),
    ([50.0, 3, 25.0], "records.x[1, 1] (column 'smoker') = 3 is not a level index in [0, 2]", "RECORDS_OUT_OF_RANGE"),
    ([50.0, 0.5, 25.0], "records.x[1, 1] (column 'smoker') = 0.5 is not a level index", "RECORDS_OUT_OF_RANGE"),
    ([50.0, 0, np.inf], "records.x[1, 2] (column 'bmi') = inf is not finite", "RECORDS_NOT_FINITE"),
    ([np.nan, 0, 25.0], "records.x[1, 0] (column 'age') = nan is not finite", "RECORDS_NOT_FINITE"),
])
def test_raw_rows_are_checked_naming_row_and_column(row, message, reason):
    x = np.array([[40.0, 0, 20.0], row])
    with pytest.raises(InvalidArgument) as e:
        MIXED.check_rows(x)
    assert str(e.value).startswith(message) and e.value.reason == reason
    with pytest.raises(InvalidArgument, match="expected raw rows \\[m, 3\\]"):
        MIXED.check_rows(np.zeros((2, 5)))


def test_unusual_puts_the_rarest_columns_first():
    why = MIXED.unusual(np.array([52.0, 1, 37.0]), top=3)
    # bmi is 3 standard deviations out; "yes" is held by 10% of the builder's rows; age is ordinary
    assert [w["feature"] for w in why] == ["bmi", "smoker", "age"]
    assert why[0]["z"] == pytest.approx(3.0) and why[0]["percentile"] == pytest.approx(99.865, abs=1e-3)
    assert why[1]["z"] is None and why[1]["value"] == "yes" and why[1]["percentile"] == pytest.approx(10.0)


# -- tables ---------------------------------------------------------------------------------------

def test_csv_and_parquet_give_the_same_rows_labels_by_name_or_index():
    cols = _columns([(61, "yes", 31.5, "ill"), (45, "no", 22.0, "0"), (70, "former", 27.25, "1")])
    for fmt in ("csv", "parquet"):
        recs = files.parse(tables.write_table(cols, fmt), f"mine.{fmt}", Expect(schema=MIXED, num_classes=2))
        np.testing.assert_array_equal(recs.x, [[61, 1, 31.5], [45, 0, 22.0], [70, 2, 27.25]])
        np.testing.assert_array_equal(recs.y, [1, 0, 1])
        assert recs.record_ids is None and recs.source == f"mine.{fmt}"
    typed = dict(cols, age=[61.0, 45.0, 70.0], outcome=[1, 0, 1])  # Parquet keeps types
    recs = files.parse(tables.write_table(typed, "parquet"), "t.parquet", Expect(schema=MIXED, num_classes=2))
    np.testing.assert_array_equal(recs.y, [1, 0, 1])


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
@pytest.mark.parametrize("change, message", [
    (lambda c: c.pop("bmi"), "missing column(s) 'bmi'"),
    (lambda c: c["age"].__setitem__(1, "old"), "row 2, column 'age': 'old' is not a number"),
    (lambda c: c["age"].__setitem__(0, ""), "row 1, column 'age': an empty cell is not a number"),
    (lambda c: c["smoker"].__setitem__(2, "sometimes"), "row 3, column 'smoker': 'sometimes' is not one of its levels"),
    (lambda c: c["outcome"].__setitem__(0, "dead"), "row 1, column 'outcome': 'dead' is not a class"),
    (lambda c: c["outcome"].__setitem__(0, "7"), "row 1, column 'outcome': '7' is not a class (an index in [0, 1]"),
])
def test_a_bad_table_is_refused_naming_file_row_and_column(fmt, change, message):
    cols = _columns([(61, "yes", 31.5, "ill"), (45, "no", 22.0, "healthy"), (70, "former", 27.25, "ill")])
    change(cols)
    with pytest.raises(InvalidArgument) as e:
        files.parse(tables.write_table(cols, fmt), f"bad.{fmt}", Expect(schema=MIXED, num_classes=2))
    assert str(e.value).startswith(f"bad.{fmt}") and message in str(e.value), str(e.value)


def test_malformed_empty_and_huge_files_are_refused_cheaply():
    expect = Expect(schema=MIXED, num_classes=2)
    for data, name, message in [
        (b"", "e.csv", "e.csv is empty"),
        (b"\n\n", "h.csv", "h.csv has no header row"),
        (b"age,smoker,bmi,outcome\n", "n.csv", "n.csv holds no rows"),
        (b"age,smoker,bmi,outcome\n1,no,2\n", "r.csv", "r.csv line 2: 3 cells, the header names 4 columns"),
        (b"age,age,bmi,outcome\n", "d.csv", "column 'age' appears twice"),
        (b"\xff\xfe,a\n", "u.csv", "u.csv is not UTF-8 text"),
        (b"PAR1 not really", "p.parquet", "p.parquet is not a readable Parquet file"),
        (b"hello", "x.txt", "x.txt: not a records file"),
    ]:
        with pytest.raises(InvalidArgument) as e:
            files.parse(data, name, expect)
        assert message in str(e.value), str(e.value)
    many = b"age,smoker,bmi,outcome\n" + b"1,no,2,0\n" * (tables.MAX_ROWS + 1)
    with pytest.raises(ResourceExhausted, match=f"at most {tables.MAX_ROWS} per file"):
        files.parse(many, "many.csv", expect)
    with pytest.raises(ResourceExhausted, match="at most 64 MiB per file"):
        files.parse(b"a" * (tables.MAX_TABLE_BYTES + 1), "big.csv", expect)
    cols = {"age": [1.0] * (tables.MAX_ROWS + 1), "smoker": ["no"] * (tables.MAX_ROWS + 1),
            "bmi": [2.0] * (tables.MAX_ROWS + 1), "outcome": [0] * (tables.MAX_ROWS + 1)}
    with pytest.raises(ResourceExhausted, match="rows or more"):  # from the metadata, before reading
        files.parse(tables.write_table(cols, "parquet"), "many.parquet", expect)
    with pytest.raises(InvalidArgument, match="this task's records are not tabular"):
        files.parse(b"a\n1\n", "img.csv", Expect(shape=(1, 8, 8)))


def test_for_task_encodes_raw_rows_and_refuses_a_mismatch():
    settings = common_pb2.TaskSettings(schema=MIXED.to_proto(), record_shape=[5], num_classes=2)
    x, y = checks.for_task(np.array([[60.0, 1, 29.0]]), np.array([1]), settings)
    np.testing.assert_allclose(x, [[1.0, 0, 1, 0, 1.0]])
    with pytest.raises(InvalidArgument, match="expected raw rows"):
        checks.for_task(np.zeros((1, 5)), np.array([1]), settings)  # already encoded: not raw rows
    with pytest.raises(InvalidArgument, match="labels outside"):
        checks.for_task(np.array([[60.0, 1, 29.0]]), np.array([2]), settings)


def test_inferred_schema_from_a_builder_table():
    cols = _columns([(61, "yes", 31.0, "ill"), (45, "no", 22.0, "healthy"), (71, "no", 27.0, "ill"),
                     (55, "former", 24.0, "healthy")])
    s = Schema.infer(cols, label_column="outcome", class_names=("healthy", "ill"))
    assert s.names == ["age", "smoker", "bmi"] and s.width == 5
    age, smoker, _ = s.features
    assert age.mean == pytest.approx(58.0) and age.std == pytest.approx(np.std([61, 45, 71, 55]))
    assert smoker.levels == ("former", "no", "yes") and smoker.level_frequencies == (0.25, 0.5, 0.25)
    with pytest.raises(InvalidArgument, match="no label column 'y'"):
        Schema.infer(cols, label_column="y")


# -- through the services and the command-line clients ---------------------------------------------

@pytest.fixture(scope="module")
def stack(module_stack):
    return dict(module_stack, builder_token=module_stack["signer"].issue("clinic", "builder"),
                alice_token=module_stack["signer"].issue("alice", "contributor"))


def _cancer_columns(idx: np.ndarray) -> dict[str, list]:
    bunch = load_breast_cancer()
    cols = {str(name): [float(v) for v in bunch.data[idx, j]] for j, name in enumerate(bunch.feature_names)}
    cols["diagnosis"] = [str(bunch.target_names[t]) for t in bunch.target[idx]]
    return cols


def _run(capsys, fn, argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = fn(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_breast_cancer_rows_from_csv_and_parquet_through_the_clients(stack, tmp_path, capsys):
    b = ["--registry", stack["registry"], "--gateway", stack["gateway"], "--scorer", stack["scorer"],
         "--token", stack["builder_token"]]
    c = ["--gateway", stack["gateway"], "--registry", stack["registry"], "--token", stack["alice_token"]]
    perm = np.random.default_rng(0).permutation(569)
    builder_csv = tmp_path / "builder.csv"
    builder_csv.write_bytes(tables.write_table(_cancer_columns(perm[:300]), "csv"))

    # the builder writes the schema from their own rows, then creates the task with it
    rc, out, err = _run(capsys, builder_main, b + ["schema", str(builder_csv), "--label", "diagnosis",
                                                   "--class-names", "malignant,benign", "--out",
                                                   str(tmp_path / "schema.json")])
    assert rc == 0, err
    assert "30 numeric and 0 categorical columns, 30 model inputs" in out
    doc = json.loads((tmp_path / "schema.json").read_text())
    assert doc["label_column"] == "diagnosis" and len(doc["features"]) == 30
    rc, out, err = _run(capsys, builder_main, b + ["create-task", "--name", "cancer", "--schema",
                                                   str(tmp_path / "schema.json"), "--models", "4",
                                                   "--batch-threshold", "500", "--json"])
    assert rc == 0, err
    task_id = json.loads(out)["task_id"]
    rc, out, err = _run(capsys, builder_main, b + ["task", "--task", task_id, "--json"])
    t = json.loads(out)
    assert t["record_shape"] == [30] and t["num_classes"] == 2
    assert t["columns"][0] == "mean radius (numeric)" and t["columns"][-1] == "diagnosis (label)"
    # builder data from the same table, as raw rows the registry encodes
    rc, out, err = _run(capsys, builder_main, b + ["upload", "--task", task_id, "--kind", "data",
                                                   str(builder_csv), "--json"])
    assert rc == 0, err and json.loads(out)["records"] == 300
    store = ObjectStore(StorageSettings(s3_endpoint=stack["s3"], s3_bucket=stack["bucket"]))
    ref = registry_pb2_grpc.BuilderRegistryServiceStub(grpcutil.make_channel(
        stack["registry"], token=stack["builder_token"])).GetTask(
        registry_pb2.GetTaskRequest(task_id=task_id), timeout=10).builder_data
    bx, by = load_npz(store.get_bytes(ref.key))
    assert bx.shape == (300, 30) and abs(float(bx.mean())) < 1e-3 and abs(float(bx.std()) - 1) < 1e-3  # z-scores

    gw = gateway_pb2_grpc.ContributorGatewayServiceStub(grpcutil.make_channel(stack["gateway"],
                                                                              token=stack["alice_token"]))

    def stored() -> list:
        return list(gw.ListSubmissions(gateway_pb2.ListSubmissionsRequest(), timeout=10).submissions)

    # the contributor submits their rows as CSV, then as Parquet
    cols = _cancer_columns(perm[300:340])
    for fmt in ("csv", "parquet"):
        path = tmp_path / f"mine.{fmt}"
        path.write_bytes(tables.write_table(cols, fmt))
        rc, out, err = _run(capsys, contributor_main, c + ["submit", "--task", task_id, str(path), "--json"])
        assert rc == 0, err
        sub = json.loads(out)
        assert sub["records"] == 40
        x, y = load_npz(store.get_bytes(f"gateway/tasks/{task_id}/submissions/{sub['submission_id']}/records.npz"))
        raw = np.array([cols[f["name"]] for f in doc["features"]]).T
        np.testing.assert_allclose(Schema.from_json(json.dumps(doc)).decode(x), raw, rtol=1e-5)
        np.testing.assert_array_equal(y, load_breast_cancer().target[perm[300:340]])
    assert len(stored()) == 2

    # bad files: one line, exit 2, nothing stored
    bad = dict(cols, **{"mean radius": ["n/a"] + cols["mean radius"][1:]})
    cases = {
        "wrong_columns.csv": tables.write_table({k: v for k, v in cols.items() if k != "worst area"}, "csv"),
        "bad_value.parquet": tables.write_table(bad, "parquet"),
        "bad_label.csv": tables.write_table(dict(cols, diagnosis=["unknown"] * 40), "csv"),
        "empty.csv": b"",
        "huge.csv": b"x" * (tables.MAX_TABLE_BYTES + 1),
    }
    expected = {
        "wrong_columns.csv": "missing column(s) 'worst area'",
        "bad_value.parquet": "row 1, column 'mean radius': 'n/a' is not a number",
        "bad_label.csv": "row 1, column 'diagnosis': 'unknown' is not a class",
        "empty.csv": "empty.csv is empty",
        "huge.csv": "at most 64 MiB per file",
    }
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        rc, out, err = _run(capsys, contributor_main, c + ["submit", "--task", task_id, str(path)])
        assert rc == 2 and out == "", (name, err)
        assert err.count("\n") == 1 and err.startswith("ftps-contributor: error: ") and expected[name] in err, err
    assert len(stored()) == 2

    # raw rows sent straight to the gateway are checked by the service too, naming row and column
    x = np.array([cols[f["name"]] for f in doc["features"]]).T
    x[3, 2] = np.inf
    with pytest.raises(grpc.RpcError) as e:
        gw.SubmitRecords(gateway_pb2.SubmitRecordsRequest(task_id=task_id, records=common_pb2.Records(
            x=serde.tensor_from_array(x), y=serde.tensor_from_array(np.zeros(40, np.int64)))), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith("records.x[3, 2] (column 'mean perimeter') = inf is not finite")
    assert len(stored()) == 2


def test_registry_fills_and_checks_a_tabular_tasks_shape(stack):
    stub = registry_pb2_grpc.BuilderRegistryServiceStub(grpcutil.make_channel(stack["registry"],
                                                                              token=stack["builder_token"]))

    def create(**kw):
        return stub.CreateTask(registry_pb2.CreateTaskRequest(name="t", settings=common_pb2.TaskSettings(
            schema=MIXED.to_proto(), n_models=4, batch_threshold=10, **kw)), timeout=10)

    t = create()
    assert list(t.settings.record_shape) == [5] and t.settings.num_classes == 2
    for kw, message in [
        (dict(record_shape=[4]), "does not match the schema, whose rows encode to [5] model inputs"),
        (dict(value_range=common_pb2.ValueRange(min=0, max=1)), "value_range applies to image tasks"),
        (dict(num_classes=3), "class_names must name all 3 classes, got 2"),
    ]:
        with pytest.raises(grpc.RpcError) as e:
            create(**kw)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in e.value.details()
