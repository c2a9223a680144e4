"""``ftps-contributor``: submit records to a task, read their privacy scores, write a report.

Settings come from flags, then env vars, then ``~/.config/ftps/config.toml`` (or ``--config``).
Exit codes: 0 ok, 1 the service refused (the gRPC status on one line), 2 bad usage or input,
130 interrupted."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from clients.api import ContributorClient, contribution_dict, contribution_text, score_dict
from clients.cli_common import (
    add_address,
    add_config,
    add_contributor,
    add_security,
    expect,
    fetch_task,
    print_json,
    print_score_stream,
    progress_bar,
    records_arg,
    run,
    security_kwargs,
)
from ftps.records import files, tables
from clients.score_html import (
    contributor_summary,
    epsilon_cell,
    headline,
    record_reading,
    summary_line,
)

PROG = "ftps-contributor"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="FT-PrivacyScore data-contributor tool",
                                epilog="exit codes: 0 ok, 1 the service refused, 2 bad usage or input, 130 interrupted")
    add_config(p)
    add_address(p, "gateway")
    add_address(p, "registry")
    add_security(p)
    add_contributor(p)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("submit", help="submit records: an .npz (arrays x and y), a folder of images with "
                                      "labels.csv, or a .csv / .parquet table for a tabular task")
    s.add_argument("--task", required=True)
    s.add_argument("file", help="records.npz; a folder of images with labels.csv (columns file,label); or for a "
                                "tabular task a .csv or .parquet file with the task's columns and its label column "
                                "(`ftps-builder task ID` lists them)")
    s.add_argument("--shape", default="", help="record shape C,H,W for a folder of images (default: the task's, "
                                               "fetched from the registry)")
    s.add_argument("--idempotency-key", default="", help="makes a retried submit safe (no duplicates)")
    s.add_argument("--json", action="store_true")

    g = sub.add_parser("submission", help="show a submission's state")
    g.add_argument("id")
    g.add_argument("--json", action="store_true")

    sc = sub.add_parser("scores", help="your records' privacy scores")
    sc.add_argument("--task", required=True)
    sc.add_argument("--round", default="")
    sc.add_argument("--json", action="store_true")

    w = sub.add_parser("watch", help="print scores as rounds finish (Ctrl-C to stop)")
    w.add_argument("--task", required=True)
    w.add_argument("--round", default="", help="only this round: stop once its scores are printed")
    w.add_argument("--timeout", type=float, default=3600.0, help="stop after this many seconds")
    w.add_argument("--json", action="store_true", help="one JSON object per line")

    r = sub.add_parser("report", help="write an HTML report of your records' scores (with plots) and scores.csv")
    r.add_argument("--task", required=True)
    r.add_argument("--out", required=True, type=Path, help="folder for report.html, its PNGs and scores.csv")
    r.add_argument("--round", default="", help="only this round (default: every round)")
    r.add_argument("--records", action="append", default=[], metavar="[SUBMISSION_ID=]FILE",
                   help="the records you submitted (.npz, image folder or table), in submission order, for "
                        "thumbnails (images) or what makes each row unusual (tables); "
                        "repeat with SUBMISSION_ID= for several submissions")
    r.add_argument("--shape", default="", help="record shape C,H,W for an image folder (default: the task's)")
    r.add_argument("--json", action="store_true", help="print the written files as JSON")
    return p


def _client(args) -> ContributorClient:
    return ContributorClient(gateway=args.gateway, contributor=args.contributor, **security_kwargs(args))


def _sub_dict(sub) -> dict:
    from ftps.v1 import gateway_pb2

    return {"submission_id": sub.submission_id, "task_id": sub.task_id, "contributor": sub.contributor,
            "records": len(sub.record_ids), "record_ids": list(sub.record_ids),
            "state": gateway_pb2.SubmissionState.Name(sub.state).removeprefix("SUBMISSION_STATE_").lower(),
            "round_id": sub.round_id, "pending_in_task": sub.pending_in_task,
            "failed_rounds": sub.failed_rounds, "failure_reason": sub.failure_reason}


def cmd_submit(args) -> int:
    path = Path(args.file)
    task = None
    # The task's settings say what a folder of images must fill, or a table's columns mean; an .npz
    # goes as it is (the gateway checks it).
    if (path.is_dir() and not args.shape) or tables.table_format(path.name):
        task = fetch_task(args)
    recs = files.load(path, expect(args, task))
    sub = _client(args).submit(args.task, recs.x, recs.y, idempotency_key=args.idempotency_key)
    if args.json:
        print_json(_sub_dict(sub))
    else:
        print(f"submission {sub.submission_id}: {len(sub.record_ids)} records stored; "
              f"{sub.pending_in_task} pending in task {sub.task_id}")
    return 0


def cmd_submission(args) -> int:
    d = _sub_dict(_client(args).get_submission(args.id))
    if args.json:
        print_json(d)
    else:
        d.pop("record_ids")
        for k, v in d.items():
            print(f"{k:>16}: {v}")
    return 0


def cmd_scores(args) -> int:
    resp = _client(args).scores_response(args.task, args.round)
    scores, whole = list(resp.scores), list(resp.contributor_scores)
    if args.json:
        print_json({"task": args.task, "contributor": args.contributor,
                    "records": [score_dict(s) for s in scores], "summary": contributor_summary(scores),
                    # tasks with contributor-level masks: the whole contribution, per round
                    "contribution": [contribution_dict(c) for c in whole]})
        return 0
    if not scores:
        print("no scores yet: your records are waiting for a round")
        return 0
    table = Table("record", "score", "95% interval", "counted P", "empirical ε [95%]", "reading")
    for s in scores:
        h = headline(s)
        table.add_row(s.record_id, f"{h[0]:+.3f}", f"[{h[1]:+.2f}, {h[2]:+.2f}]", f"{s.counted_p:+.2f}",
                      epsilon_cell(s), record_reading(s))
    console = Console()
    console.print(table)
    console.print(summary_line(contributor_summary(scores)))
    for c in whole:
        console.print(contribution_text(c), highlight=False)
    return 0


def cmd_watch(args) -> int:
    return print_score_stream(_client(args).watch_scores(args.task, round_id=args.round, timeout=args.timeout),
                              as_json=args.json)


def cmd_report(args) -> int:
    import grpc

    from clients import reports

    resp = _client(args).scores_response(args.task, args.round)
    scores = list(resp.scores)
    notes, task = [], None
    needs_shape = any((records_arg(r)[1].is_dir() and not args.shape) or tables.table_format(records_arg(r)[1].name)
                      for r in args.records)
    try:
        task = fetch_task(args)  # name, alpha and record shape; the report works without them
    except grpc.RpcError as exc:
        if needs_shape:
            raise
        notes.append(f"Task settings unavailable from the registry ({exc.code().name}); assuming alpha = 0.05.")
    images = None
    if args.records:
        images = reports.load_record_images(args.records, expect(args, task))
    with progress_bar("plotting your records") as update:
        files = reports.contributor_report(args.out, task_id=args.task, contributor=args.contributor or
                                           (scores[0].contributor if scores else ""), scores=scores, task=task,
                                           images=images, notes=notes, progress=update,
                                           contributions=list(resp.contributor_scores))
    if args.json:
        print_json(files.as_dict())
    else:
        above = sum(headline(s)[1] > 0 for s in scores)
        print(f"report written: {files.html} ({files.n_records} records, {above} with the interval above 0)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(PROG, build_parser(), argv, {"submit": cmd_submit, "submission": cmd_submission,
                                            "scores": cmd_scores, "watch": cmd_watch, "report": cmd_report})


if __name__ == "__main__":
    sys.exit(main())
