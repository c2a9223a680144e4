"""``ftps-contributor``: submit records to a task and read their privacy scores."""

from __future__ import annotations

import argparse
import os
import sys

from rich.console import Console
from rich.table import Table

from clients.api import ContributorClient, score_dict
from clients.cli_common import add_address, add_security, load_npz_records, print_json, run, security_kwargs

PROG = "ftps-contributor"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="FT-PrivacyScore data-contributor tool")
    add_address(p, "gateway", "127.0.0.1:50051")
    add_security(p)
    p.add_argument("--contributor", "-c", default=os.environ.get("FTPS_CONTRIBUTOR", ""),
                   help="your contributor name (env FTPS_CONTRIBUTOR; default: your token's subject)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("submit", help="submit records from an .npz file (arrays x and y)")
    s.add_argument("--task", required=True)
    s.add_argument("file")
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
    w.add_argument("--timeout", type=float, default=3600.0, help="stop after this many seconds")
    w.add_argument("--json", action="store_true", help="one JSON object per line")
    return p


def _client(args) -> ContributorClient:
    return ContributorClient(gateway=args.gateway, contributor=args.contributor, **security_kwargs(args))


def _sub_dict(sub) -> dict:
    from ftps.v1 import gateway_pb2

    return {"submission_id": sub.submission_id, "task_id": sub.task_id, "contributor": sub.contributor,
            "records": len(sub.record_ids), "record_ids": list(sub.record_ids),
            "state": gateway_pb2.SubmissionState.Name(sub.state).removeprefix("SUBMISSION_STATE_").lower(),
            "round_id": sub.round_id, "pending_in_task": sub.pending_in_task}


def cmd_submit(args) -> int:
    x, y = load_npz_records(args.file)
    sub = _client(args).submit(
        args.task, x, y, idempotency_key=args.idempotency_key)
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


def _reading(score: float) -> str:
    pct = max(0.0, score) * 100
    return (f"identified {pct:.0f}% more often than chance" if pct >= 0.5 else "no better than a coin flip")


def cmd_scores(args) -> int:
    scores = _client(args).scores(args.task, args.round)
    if args.json:
        print_json({"task": args.task, "contributor": args.contributor,
                    "records": [score_dict(s) for s in scores]})
        return 0
    if not scores:
        print("no scores yet: your records are waiting for a round")
        return 0
    table = Table("record", "score", "95% interval", "reading")
    for s in scores:
        table.add_row(s.record_id, f"{s.score:+.3f}", f"[{s.ci_low:+.2f}, {s.ci_high:+.2f}]", _reading(s.score))
    Console().print(table)
    return 0


def cmd_watch(args) -> int:
    import grpc

    client = _client(args)
    try:
        for s in client.watch_scores(args.task, timeout=args.timeout):
            if args.json:
                import json

                print(json.dumps(score_dict(s)), flush=True)
            else:
                print(f"{s.record_id} (round {s.round_id}): score {s.score:+.3f} "
                      f"[{s.ci_low:+.2f}, {s.ci_high:+.2f}]", flush=True)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            raise
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(PROG, build_parser(), argv, {"submit": cmd_submit, "submission": cmd_submission,
                                            "scores": cmd_scores, "watch": cmd_watch})


if __name__ == "__main__":
    sys.exit(main())
