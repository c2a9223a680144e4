"""``ftps-builder``: register a task, upload its base model / strategy / data, prepare, run rounds,
write the batch report.

Settings come from flags, then env vars, then ``~/.config/ftps/config.toml`` (or ``--config``).
Exit codes: 0 ok, 1 the service refused (the gRPC status on one line), 2 bad usage or input,
130 interrupted."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import grpc
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from clients.api import (
    KIND_NAMES,
    BuilderClient,
    batch_dict,
    comparison_dict,
    contribution_dict,
    estimate_dict,
    estimate_text,
    preparation_dict,
    score_dict,
)
from clients.cli_common import (
    InputError,
    add_address,
    add_config,
    add_security,
    expect,
    parse_shape,
    parse_value_range,
    print_json,
    print_score_stream,
    progress_bar,
    run,
    security_kwargs,
)
from clients.score_html import epsilon_cell, headline
from ftps.common import serde
from ftps.common.clock import iso
from ftps.records import beton, files, tables
from ftps.records.files import Expect
from ftps.records.tabular import Schema
from ftps.v1 import common_pb2, scorer_pb2

PROG = "ftps-builder"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="FT-PrivacyScore model-builder tool",
                                epilog="exit codes: 0 ok, 1 the service refused, 2 bad usage or input, 130 interrupted")
    add_config(p)
    add_address(p, "registry")
    add_address(p, "gateway")
    add_address(p, "scorer")
    add_security(p)
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("create-task", help="register a modelling task")
    c.add_argument("--name", required=True)
    c.add_argument("--owner", default="")
    c.add_argument("--record-shape", default="", help="shape of one record, e.g. 1,28,28 (required for an "
                                                     "image task; a tabular task's comes from --schema)")
    c.add_argument("--schema", type=Path, default=None, metavar="SCHEMA.json",
                   help="a tabular task: its columns and normalisation (`ftps-builder schema` writes one from "
                        "your data); contributors then submit .csv or .parquet rows with these columns")
    c.add_argument("--num-classes", type=int, default=0, help="classes of the labels (default 10; a tabular "
                                                              "task's schema with class names: their number)")
    c.add_argument("--models", "-n", type=int, default=32, help="fine-tuned models per round (even)")
    c.add_argument("--batch-threshold", "-m", type=int, default=200, help="records that start a round")
    c.add_argument("--shadow-models", "-k", type=int, default=16)
    c.add_argument("--method", choices=list(serde.METHOD_ENUMS), default="online-per-record")
    c.add_argument("--alpha", type=float, default=0.05)
    c.add_argument("--fixed-variance", action="store_true")
    c.add_argument("--dp-delta", type=float, default=1e-5,
                   help="delta at which each record's empirical epsilon is reported, in (0, 0.01] "
                        "(default 1e-5; pick one well below 1 / people in the data set)")
    c.add_argument("--builder-mix", type=int, default=0, help="builder records mixed into each model")
    c.add_argument("--value-range", default=None, metavar="MIN,MAX",
                   help="image tasks: values a record may hold; contributors' records and builder data outside "
                        "it are refused (default 0,1: the shipped image strategies; 'any': any finite float32). "
                        "A tabular task's ranges are per column, in its schema")
    c.add_argument("--models-per-job", type=int, default=4)
    c.add_argument("--contributor-growth-limit", type=int, default=0, metavar="N",
                   help="let contributors with records in a finished round add models to it, up to N models in "
                        "all, at your cost (default 0: only you grow rounds)")
    c.add_argument("--mask-unit", choices=("record", "contributor"), default="record",
                   help="what a model's inclusion mask draws: single records (default), or each contributor's "
                        "records together, which also scores each whole contribution (user-level inference; "
                        "a round then needs records of at least 16 contributors)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--json", action="store_true")

    sm = sub.add_parser("schema", help="write a tabular task's schema from your own table (.csv or .parquet): "
                                       "each column's kind and your normalisation (mean and std, or levels)")
    sm.add_argument("file", type=Path, help="your training-distribution table, one row per record")
    sm.add_argument("--label", default="label", help="the label column (default: label)")
    sm.add_argument("--class-names", default="", metavar="NAME,NAME",
                    help="class names by label index, e.g. malignant,benign: files may then give labels by name")
    sm.add_argument("--max-levels", type=int, default=50,
                    help="a text column with more distinct values than this is refused (default 50)")
    sm.add_argument("--out", type=Path, default=None, help="write the JSON here (default: standard output)")

    u = sub.add_parser("upload", help="upload a base model (.safetensors), strategy (.py) or data "
                                      "(.npz, an FFCV .beton with fields x and y, or .csv / .parquet "
                                      "for a tabular task)")
    u.add_argument("--task", required=True)
    u.add_argument("--kind", required=True, choices=list(KIND_NAMES))
    u.add_argument("file", type=Path)
    u.add_argument("--defer-check", action="store_true",
                   help="base model or strategy: do not check it against the task's current other half now; "
                        "the other half's upload checks the pair (changing the architecture needs both)")
    u.add_argument("--npz-blob", action="store_true",
                   help="data: send the .npz file as it is (UploadBlob) instead of streaming its records "
                        "in chunks (UploadBuilderData); both store the same builder data. An FFCV .beton "
                        "is always sent as it is: the registry decodes and checks it, and stores the file")
    u.add_argument("--json", action="store_true")

    t = sub.add_parser("tasks", help="list tasks")
    t.add_argument("--json", action="store_true")
    s = sub.add_parser("task", help="show one task")
    s.add_argument("--task", required=True)
    s.add_argument("--json", action="store_true")

    pr = sub.add_parser("prepare", help="run the preparation stage (offline Gaussian on k shadow models)")
    pr.add_argument("--task", required=True)
    pr.add_argument("--refit", action="store_true", help="fit again even if a Gaussian exists")
    pr.add_argument("--no-wait", action="store_true",
                    help="start it (or join the running one) and return at once with its state")
    pr.add_argument("--json", action="store_true", help="print the final Preparation as JSON")

    es = sub.add_parser("estimate", help="what a round would cost (worker and wall time), before it runs")
    es.add_argument("--task", required=True)
    es.add_argument("--models", "-n", type=int, default=0, help="models per round (default: the task's)")
    es.add_argument("--records", "-m", type=int, default=0, help="records in the batch (default: the task's "
                                                                 "batch threshold)")
    es.add_argument("--json", action="store_true")

    r = sub.add_parser("start-round", help="score the task's pending records now")
    r.add_argument("--task", required=True)
    r.add_argument("--force", action="store_true", help="start even below the batch threshold")
    r.add_argument("--watch", action="store_true", help="then follow the round to the end")

    w = sub.add_parser("watch", help="follow a round's progress until it ends")
    w.add_argument("--round", required=True)

    cp = sub.add_parser("compare", help="what you can do about the exposure: run a finished round's batch under "
                                        "other recipes (same masks and seeds) and compare each record's exposure "
                                        "and the models' held-out accuracy side by side")
    cp.add_argument("--round", required=True)
    cp.add_argument("--recipe", action="append", default=[], metavar="NAME=STRATEGY.py",
                    help="an alternative strategy (e.g. fewer-epochs=s2.py); repeat for up to 4. Without any: "
                         "show the round's last comparison")
    cp.add_argument("--no-wait", action="store_true", help="start it and return at once")
    cp.add_argument("--json", action="store_true")

    gr = sub.add_parser("grow", help="add models to a finished round: sharper scores for the cost of the added "
                                     "models only (the statistics so far are reused)")
    gr.add_argument("--round", required=True)
    gr.add_argument("--models", "-n", type=int, required=True, help="models to add (even)")
    gr.add_argument("--watch", action="store_true", help="then follow the round to the end")

    ws = sub.add_parser("watch-scores", help="print every record's score as rounds finish (Ctrl-C to stop)")
    ws.add_argument("--task", required=True)
    ws.add_argument("--round", default="", help="only this round: stop once its scores are printed")
    ws.add_argument("--contributor", default="", help="only this contributor's records")
    ws.add_argument("--timeout", type=float, default=3600.0, help="stop after this many seconds")
    ws.add_argument("--json", action="store_true", help="one JSON object per line")

    sc = sub.add_parser("scores", help="every record's score and the batch metrics of a task")
    sc.add_argument("--task", required=True)
    sc.add_argument("--round", default="")
    sc.add_argument("--json", action="store_true")

    rp = sub.add_parser("report", help="write the batch report (HTML with PNG plots) and scores.csv")
    rp.add_argument("--task", required=True)
    rp.add_argument("--out", required=True, type=Path, help="folder for report.html, its PNGs and scores.csv")
    rp.add_argument("--round", default="", help="only this round (default: every round of the task)")
    rp.add_argument("--records", action="append", default=[], metavar="[SUBMISSION_ID=]FILE",
                    help="your own local copy of records (.npz or image folder) for thumbnails: by position "
                         "within SUBMISSION_ID, or by a record_id array/column; never fetched from the service")
    rp.add_argument("--shape", default="", help="record shape C,H,W for an image folder (default: the task's)")
    rp.add_argument("--top", type=int, default=10, help="highest-risk records shown with plots")
    rp.add_argument("--json", action="store_true", help="print the written files as JSON")
    return p


def _client(args) -> BuilderClient:
    return BuilderClient(registry=args.registry, gateway=args.gateway, scorer=args.scorer,
                         **security_kwargs(args))


def cmd_create(args) -> int:
    schema = None
    if args.schema is not None:
        try:
            text = args.schema.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read --schema {args.schema}: {getattr(exc, 'strerror', None) or exc}") from exc
        schema = Schema.from_json(text, what=str(args.schema))
        if args.value_range is not None:
            raise InputError("--value-range applies to image tasks; a tabular task's ranges are per column, "
                             "in its schema")
    elif not args.record_shape:
        raise InputError("--record-shape is required (e.g. 1,28,28), or --schema for a tabular task")
    shape = list(parse_shape(args.record_shape, flag="--record-shape")) if args.record_shape else []
    settings = common_pb2.TaskSettings(
        n_models=args.models, batch_threshold=args.batch_threshold, method=serde.method_enum(args.method),
        alpha=args.alpha, shadow_models=args.shadow_models, fixed_variance=args.fixed_variance,
        record_shape=shape, num_classes=args.num_classes, builder_mix=args.builder_mix,
        seed=args.seed, models_per_job=args.models_per_job, dp_delta=args.dp_delta,
        contributor_growth_limit=args.contributor_growth_limit,
        mask_unit=common_pb2.MASK_UNIT_CONTRIBUTOR if args.mask_unit == "contributor" else common_pb2.MASK_UNIT_RECORD)
    if schema is not None:
        settings.schema.CopyFrom(schema.to_proto())
    elif (args.value_range or "0,1") != "any":
        lo, hi = parse_value_range(args.value_range or "0,1")
        settings.value_range.CopyFrom(common_pb2.ValueRange(min=lo, max=hi))
    task = _client(args).create_task(args.name, settings, owner=args.owner)
    if args.json:
        print_json({"task_id": task.task_id, "name": task.name})
    else:
        print(task.task_id)
    return 0


def cmd_schema(args) -> int:
    fmt = tables.table_format(args.file.name)
    if fmt is None:
        raise InputError(f"{args.file}: a schema is read from a .csv or .parquet table")
    try:
        data = args.file.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {args.file}: {exc.strerror}") from exc
    columns = tables.read_table(data, fmt, what=str(args.file))
    names = [c.strip() for c in args.class_names.split(",") if c.strip()]
    schema = Schema.infer(columns, label_column=args.label, class_names=names, what=str(args.file),
                          max_levels=args.max_levels)
    text = schema.to_json() + "\n"
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.write_text(text)
        kinds = [f.kind for f in schema.features]
        print(f"schema written: {args.out} ({kinds.count('numeric')} numeric and {kinds.count('categorical')} "
              f"categorical columns, {schema.width} model inputs); check it, then create-task --schema {args.out}")
    return 0


def cmd_upload(args) -> int:
    beton_file = KIND_NAMES[args.kind] == common_pb2.BLOB_KIND_BUILDER_DATA and _is_beton(args.file)
    if KIND_NAMES[args.kind] == common_pb2.BLOB_KIND_BUILDER_DATA and not args.npz_blob and not beton_file:
        # A table's columns mean what the task's schema says: fetched first.
        task = _client(args).get_task(args.task) if tables.table_format(args.file.name) else None
        recs = files.load(args.file, Expect.of(task.settings if task is not None else None))
        with progress_bar(f"uploading {args.file.name}") as update:
            ref = _client(args).upload_builder_records(args.task, recs.x, recs.y, progress=update)
        if args.json:
            print_json({"key": ref.key, "sha256": ref.sha256, "size": ref.size, "version": ref.version,
                        "records": len(recs.x), "model_check": None})
        else:
            print(f"{args.kind} v{ref.version} stored: {len(recs.x)} records, {ref.size} bytes, "
                  f"sha256 {ref.sha256[:16]}...")
        return 0
    try:
        data = args.file.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {args.file}: {exc.strerror}") from exc
    with Progress(TextColumn(f"uploading {args.file.name}"), BarColumn(), DownloadColumn(),
                  TimeElapsedColumn(), console=Console(stderr=True), transient=True) as progress:
        bar = progress.add_task("upload", total=len(data))
        client = _client(args)
        ref = client.upload(args.task, KIND_NAMES[args.kind], data, defer_check=args.defer_check,
                            progress=lambda done, total: progress.update(bar, completed=done))
    check = None
    if KIND_NAMES[args.kind] in (common_pb2.BLOB_KIND_BASE_MODEL, common_pb2.BLOB_KIND_STRATEGY):
        c = client.get_task(args.task).model_check
        if ref.sha256 in (c.base_model_sha256, c.strategy_sha256):
            check = _check_dict(c)
    if args.json:
        print_json({"key": ref.key, "sha256": ref.sha256, "size": ref.size, "version": ref.version,
                    "model_check": check})
    else:
        print(f"{args.kind} v{ref.version} stored: {ref.size} bytes, sha256 {ref.sha256[:16]}..."
              + (" (an FFCV .beton, decoded and checked by the registry)" if beton_file else ""))
        if check is not None:
            print(f"checked in a worker's sandbox: the base model fits the strategy ({check['num_classes']} classes, "
                  f"{check['parameters']:,} parameters, {check['seconds']:.1f} s on {check['device']})")
        elif KIND_NAMES[args.kind] in (common_pb2.BLOB_KIND_BASE_MODEL, common_pb2.BLOB_KIND_STRATEGY):
            print("not checked yet: the task's other half (base model / strategy) is checked with it on its upload")
    return 0


def _is_beton(path: Path) -> bool:
    """Whether the file starts like an FFCV .beton (by its header, whatever its name)."""
    try:
        with path.open("rb") as f:
            return beton.is_beton(f.read(64))
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from exc


def _check_dict(c) -> dict | None:
    if not c.HasField("checked_at"):
        return None
    return {"base_model_sha256": c.base_model_sha256, "strategy_sha256": c.strategy_sha256,
            "num_classes": c.num_classes, "parameters": c.parameters, "device": c.device,
            "seconds": round(c.seconds, 3), "checked_at": iso(c.checked_at)}


def _task_dict(t) -> dict:
    s = t.settings
    return {"task_id": t.task_id, "name": t.name, "owner": t.owner, "ready": t.ready,
            "created_at": iso(t.created_at), "n_models": s.n_models, "batch_threshold": s.batch_threshold,
            "method": serde.METHOD_NAMES.get(s.method, ""), "shadow_models": s.shadow_models,
            "record_shape": list(s.record_shape), "num_classes": s.num_classes,
            "columns": ([f"{f.name} ({f.kind})" for f in Schema.from_proto(s.schema).features] + [
                f"{s.schema.label_column or 'label'} (label)"] if s.HasField("schema") else None),
            "uploads": {k: (getattr(t, k).version or None) for k in ("base_model", "strategy", "builder_data")},
            "model_check": _check_dict(t.model_check)}


def cmd_tasks(args) -> int:
    tasks = [_task_dict(t) for t in _client(args).list_tasks()]
    if args.json:
        print_json(tasks)
        return 0
    table = Table("task", "name", "ready", "n", "m", "method", "created")
    for t in tasks:
        table.add_row(t["task_id"], t["name"], "yes" if t["ready"] else "no", str(t["n_models"]),
                      str(t["batch_threshold"]), t["method"], t["created_at"])
    Console().print(table)
    return 0


def cmd_task(args) -> int:
    t = _task_dict(_client(args).get_task(args.task))
    if args.json:
        print_json(t)
    else:
        for k, v in t.items():
            print(f"{k:>16}: {v}")
    return 0


def _prep_line(p) -> str:
    """``3/8 shadow models, 42s elapsed, ~70s left``: the preparation's progress in one line."""
    line = f"{p.models_done}/{p.models_total} shadow models, {p.elapsed_s:.0f}s elapsed"
    if p.remaining_s > 0:
        line += f", ~{p.remaining_s:.0f}s left"
    return line


def cmd_prepare(args) -> int:
    client = _client(args)
    if args.no_wait:
        p = client.start_preparation(args.task, refit=args.refit)
    else:
        console = Console(stderr=True)
        with console.status(f"preparation stage of {args.task}: starting...") as status:
            def show(prep) -> None:
                status.update(f"preparation {prep.preparation_id} of {args.task}: {_prep_line(prep)}")
                if not console.is_terminal:  # no live status line: one line per change
                    console.print(f"preparation {prep.preparation_id}: {_prep_line(prep)}", highlight=False)
            p = client.prepare(args.task, refit=args.refit, progress=show)
    out = preparation_dict(p)
    if args.json:
        print_json(out)
    else:
        state = out["state"]
        if p.state == scorer_pb2.PREPARATION_STATE_READY:
            g = p.gaussian
            print(f"preparation {p.preparation_id}: READY; offline Gaussian mu={g.mu:.4f} sigma={g.sigma:.4f} "
                  f"from k={g.k} shadow models ({g.n_values} statistics), fitted {iso(g.fitted_at)} "
                  f"in {p.elapsed_s:.1f} s")
            try:  # cost before you pay: what the first round will take, from these shadow fine-tunes
                print("next, " + estimate_text(client.estimate_round(args.task)))
            except grpc.RpcError:
                pass  # the estimate is a courtesy; the preparation's result stands
        else:
            print(f"preparation {p.preparation_id}: {state}; {_prep_line(p)}" + (f"; {p.message}" if p.message else ""))
    return 1 if p.state == scorer_pb2.PREPARATION_STATE_FAILED else 0


def cmd_estimate(args) -> int:
    est = _client(args).estimate_round(args.task, n_models=args.models, n_records=args.records)
    if args.json:
        print_json(estimate_dict(est))
    else:
        print(estimate_text(est))
    return 0


def _watch(client: BuilderClient, round_id: str) -> int:
    last = None
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as progress:
        bar = progress.add_task(f"round {round_id}", total=None)
        for status in client.watch_round(round_id):
            last = status
            state = common_pb2.RoundState.Name(status.state).removeprefix("ROUND_STATE_").lower()
            progress.update(bar, completed=status.models_done, total=status.models_total or None,
                            description=f"round {round_id}: {state}")
    if last is None:
        return 1
    state = common_pb2.RoundState.Name(last.state).removeprefix("ROUND_STATE_").lower()
    print(f"round {round_id}: {state} — {last.message}")
    return 0 if last.state == common_pb2.ROUND_STATE_DONE else 1


def cmd_start(args) -> int:
    client = _client(args)
    status = client.start_round(args.task, force=args.force)
    print(f"round {status.round_id} started with {status.n_records} records")
    return _watch(client, status.round_id) if args.watch else 0


def cmd_watch(args) -> int:
    return _watch(_client(args), args.round)


def cmd_compare(args) -> int:
    client = _client(args)
    recipes = {}
    for spec in args.recipe:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise InputError(f"--recipe {spec!r} must be NAME=STRATEGY.py")
        if name in recipes or name == "current":
            raise InputError(f"--recipe {name!r}: each recipe needs its own name (and 'current' is the task's own)")
        try:
            recipes[name] = Path(path).read_bytes()
        except OSError as exc:
            raise InputError(f"cannot read --recipe {spec}: {exc.strerror}") from exc
    comparison = client.compare_recipes(args.round, recipes) if recipes else client.get_comparison(args.round)
    if recipes and not args.no_wait:
        with progress_bar(f"comparing {len(recipes) + 1} recipes on round {args.round}") as update:
            while True:
                done = sum(v.status.models_done for v in comparison.variants)
                update(done, sum(v.status.models_total for v in comparison.variants))
                if all(v.status.state in serde.TERMINAL_ROUND_STATES for v in comparison.variants):
                    break
                time.sleep(1.0)
                comparison = client.get_comparison(args.round)
    out = comparison_dict(comparison)
    if args.json:
        print_json(out)
    else:
        table = Table("recipe", "state", "held-out accuracy", "AUC", "mean score", "above chance",
                      "max empirical ε", "DP-SGD ε", title=f"Recipes on round {args.round}: risk and utility")
        for r in out["recipes"]:
            b = r["batch"] or {}
            table.add_row(r["recipe"], r["state"] if r["state"] != "failed" else f"failed: {r['message']}",
                          f"{r['heldout_accuracy']:.3f} (n={r['heldout_records']})" if r["batch"] else "",
                          f"{b.get('auc', 0):.3f}" if b else "", f"{b.get('mean_score', 0):+.3f}" if b else "",
                          str(r["above_chance"]) if b else "", f"{r['max_empirical_epsilon']:.2f}" if b else "",
                          f"{r['dp_epsilon']:.2f}" if r["dp_epsilon"] else "")
        console = Console()
        console.print(table)
        if all(r["state"] == "done" for r in out["recipes"]):
            everywhere = out["exposed_everywhere"]
            console.print(f"{len(everywhere)} record(s) identifiable above chance under every recipe"
                          + (": " + ", ".join(everywhere[:20]) + (" ..." if len(everywhere) > 20 else "")
                             if everywhere else ""), highlight=False)
    return 0 if all(r["state"] == "done" for r in out["recipes"]) or args.no_wait else 1


def cmd_grow(args) -> int:
    client = _client(args)
    status = client.grow_round(args.round, args.models)
    print(f"round {status.round_id}: growing to {status.models_total} models "
          f"({args.models} more; its scores so far stay readable meanwhile)")
    if not args.watch:
        return 0
    if _watch(client, status.round_id) != 0:
        return 1
    # a growth that failed leaves the round DONE with its models so far (the message says why)
    return 0 if client.get_round(status.round_id).status.models_total == status.models_total else 1


def cmd_watch_scores(args) -> int:
    return print_score_stream(_client(args).watch_scores(args.task, contributor=args.contributor,
                                                         round_id=args.round, timeout=args.timeout),
                              as_json=args.json, with_contributor=True)


def cmd_scores(args) -> int:
    resp = _client(args).scores(args.task, args.round)
    if args.json:
        print_json({"task": args.task, "records": [score_dict(s) for s in resp.scores],
                    "batches": [batch_dict(b) for b in resp.batches],
                    "contributions": [contribution_dict(c) for c in resp.contributor_scores]})
        return 0
    table = Table("record", "contributor", "round", "score", "95% interval", "counted P", "empirical ε [95%]", "AUC")
    for s in resp.scores:
        h = headline(s)
        table.add_row(s.record_id, s.contributor, s.round_id, f"{h[0]:+.3f}", f"[{h[1]:+.2f}, {h[2]:+.2f}]",
                      f"{s.counted_p:+.2f}", epsilon_cell(s), f"{s.auc:.2f}")
    console = Console()
    console.print(table)
    for b in resp.batches:
        console.print(f"batch ({serde.METHOD_NAMES.get(b.method)}): AUC {b.auc:.3f}, "
                      f"TPR@1%FPR {b.tpr_at_1pct_fpr:.3f}, TPR@0.1%FPR {b.tpr_at_0_1pct_fpr:.3f}")
    if resp.contributor_scores:  # contributor-level masks: each whole contribution
        whole = Table("contributor", "round", "records", "score", "95% interval", "empirical ε [95%]")
        for c in resp.contributor_scores:
            whole.add_row(c.contributor, c.round_id, str(c.n_records), f"{c.score:+.3f}",
                          f"[{c.score_ci_low:+.2f}, {c.score_ci_high:+.2f}]",
                          f"{c.empirical_epsilon:.2f} [{c.empirical_epsilon_ci_low:.2f}, "
                          f"{c.empirical_epsilon_ci_high:.2f}]")
        console.print(whole)
    return 0


def cmd_report(args) -> int:
    from clients import reports

    if args.top < 0:
        raise InputError("--top must be >= 0")
    client = _client(args)
    task = client.get_task(args.task)
    resp = client.scores(args.task, args.round)
    round_ids = [args.round] if args.round else sorted({s.round_id for s in resp.scores})
    rounds = {rid: client.get_round(rid) for rid in round_ids}  # every method's metrics and ROC
    comparisons = {}
    for rid in round_ids:
        try:
            comparisons[rid] = client.get_comparison(rid)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:  # NOT_FOUND: no recipes were compared on it
                raise
    images = None
    if args.records:
        images = reports.load_record_images(args.records, expect(args, task))
    with progress_bar("plotting the highest-risk records") as update:
        files = reports.builder_report(args.out, task_id=args.task, scores=list(resp.scores), rounds=rounds,
                                       task=task, images=images, progress=update, top=args.top,
                                       comparisons=comparisons)
    if args.json:
        print_json(files.as_dict())
    else:
        above = sum(headline(s)[1] > 0 for s in resp.scores)  # as the report counts them
        print(f"report written: {files.html} ({files.n_records} records in {len(rounds)} round(s), "
              f"{above} with the interval above 0)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(PROG, build_parser(), argv, {
        "create-task": cmd_create, "schema": cmd_schema, "upload": cmd_upload, "tasks": cmd_tasks, "task": cmd_task,
        "prepare": cmd_prepare, "estimate": cmd_estimate, "start-round": cmd_start, "watch": cmd_watch, "grow": cmd_grow, "compare": cmd_compare,
        "watch-scores": cmd_watch_scores, "scores": cmd_scores,
        "report": cmd_report})


if __name__ == "__main__":
    sys.exit(main())
