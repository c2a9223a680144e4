"""``ftps-stack``: run the embedded default (``up``) or the end-to-end demo (``demo``)."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path

import grpc
from rich.console import Console

from ftps.common.errors import FtpsError

from ftps.common.log import setup_logging
from stack.embedded import DEFAULT_PORTS, EmbeddedStack, blob_dir, default_data_dir

# The demo's data sets (ftps.ml.datasets.DATASETS), named here: importing that module (scipy) would
# cost every `ftps-stack` command seconds before it parses its arguments.
DEMO_DATASETS = ("fashion-mnist", "digits", "breast-cancer")
NAMES = {"gateway": "contributor gateway", "registry": "builder registry", "scorer": "LiRA scorer",
         "worker": "fine-tune worker", "s3": "object store (S3 protocol, moto)"}


def _add_stack_flags(p: argparse.ArgumentParser, *, ephemeral_default: bool, s3: bool) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address every listener binds (default 127.0.0.1)")
    for name, port in DEFAULT_PORTS.items():
        if name == "s3" and not s3:  # `up` keeps its blobs as files: no store server to place
            continue
        p.add_argument(f"--{name}-port", type=int, default=None,
                       help=f"port of the {NAMES[name]} (default {port}; 0 picks a free one)")
    p.add_argument("--ephemeral-ports", action="store_true", default=ephemeral_default,
                   help="let the OS pick every port not given explicitly")
    p.add_argument("--log-level", default=None, help="service log level (default WARNING for demo, INFO for up)")
    _add_data_dir(p)
    p.add_argument("--web-port", type=int, default=None,
                   help="port of the web client (default 8080; 0 picks a free one; with --ephemeral-ports 0)")
    p.add_argument("--no-web", dest="web", action="store_false", help="do not serve the web client")
    p.add_argument("--no-auth", dest="auth", action="store_false",
                   help="run without tokens (every caller is admin); for local experiments only")


def _add_data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, default=default_data_dir(),
                   help="where the embedded stack keeps its token signing key and, for `up`, everything "
                        "it stores: metadata.db (SQLite), blobs/ (files), logs/; delete metadata.db and "
                        "blobs/ to start empty (env FTPS_DATA_DIR; default ~/.local/share/ftps)")


def _ports(args: argparse.Namespace) -> dict[str, int]:
    out = {}
    for name, port in DEFAULT_PORTS.items():
        given = getattr(args, f"{name}_port", None)
        out[name] = given if given is not None else (0 if args.ephemeral_ports else port)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ftps-stack", description=(
        "FT-PrivacyScore embedded default: the four gRPC services (gateway, registry, scorer, worker) "
        "on loopback, plaintext; `up` keeps metadata and blobs in the data dir, `demo` keeps nothing."))
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="run the embedded stack until Ctrl-C / SIGTERM; it keeps its data "
                                   "in --data-dir across restarts")
    _add_stack_flags(up, ephemeral_default=False, s3=False)
    up.add_argument("--processes", action="store_true",
                    help="run each service as its own OS process (`python -m services.X`, as the pods "
                         "do) instead of all in this process; one that dies is restarted, with backoff")
    up.add_argument("--no-metrics", dest="metrics", action="store_false",
                    help="serve no Prometheus metrics; by default every service serves /metrics on a free "
                         "port of --host, each address printed at start (scrape those)")
    up.add_argument("--workers", type=int, default=1,
                    help="fine-tune worker processes, with --processes (default 1; worker i listens on "
                         "the worker port + i)")
    demo = sub.add_parser("demo", help="bring the stack up and run the end-to-end demo on real data")
    _add_stack_flags(demo, ephemeral_default=True, s3=True)
    demo.add_argument("--dataset", choices=DEMO_DATASETS, default="fashion-mnist",
                      help="fashion-mnist (images, the default), digits (small images, fast) or "
                           "breast-cancer (a tabular task: 569 real patient records, 30 measurements)")
    demo.add_argument("--records", "-m", type=int, default=200, help="records submitted, m (default 200)")
    demo.add_argument("--models", "-n", type=int, default=32, help="fine-tuned models, n (even, default 32)")
    demo.add_argument("--shadow-models", "-k", type=int, default=16,
                      help="shadow models of the preparation stage, k (default 16)")
    demo.add_argument("--method", default="online-per-record",
                      choices=("online-per-record", "offline-per-record", "offline-global", "rmia"),
                      help="headline method (default online-per-record)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")
    demo.add_argument("--report-dir", type=Path, default=None, help="also write result.json, scores.csv and plots here")
    demo.add_argument("--serve", action="store_true",
                      help="after the report, keep the stack and the web client running (Ctrl-C stops)")
    tok = sub.add_parser("token", help="print a signed token for the embedded stack")
    tok.add_argument("--role", required=True, choices=("contributor", "builder", "admin"))
    tok.add_argument("--subject", required=True, help="the contributor's or builder's name")
    tok.add_argument("--task", action="append", default=[],
                     help="limit a contributor to this task (repeatable; default: any task)")
    tok.add_argument("--ttl", type=float, default=24 * 3600, help="seconds until it expires (default 1 day)")
    _add_data_dir(tok)
    return parser


def cmd_token(args: argparse.Namespace) -> int:
    from ftps.common.auth import TokenSigner, load_or_create_key_file
    from ftps.common.storage import check_id

    check_id(args.subject, "subject")
    for t in args.task:
        check_id(t, "task")
    signer = TokenSigner(load_or_create_key_file(args.data_dir / "signing.key"))
    print(signer.issue(args.subject, args.role, tasks=args.task, ttl_s=args.ttl))
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    setup_logging(args.log_level or "INFO")
    if args.workers < 1 or (args.workers > 1 and not args.processes):
        print("ftps-stack: error: --workers N needs --processes (and N >= 1)", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if args.processes:
        from stack.processes import ProcessStack

        stack = ProcessStack(workers=args.workers, host=args.host, ports=_ports(args), data_dir=args.data_dir,
                             auth=args.auth, log_level=args.log_level or "INFO", persistent=True,
                             metrics=args.metrics)
    else:
        stack = EmbeddedStack(host=args.host, ports=_ports(args), data_dir=args.data_dir, auth=args.auth,
                              persistent=True, metrics=args.metrics)
    stack.start()
    kind = f"stack is up as {len(stack.children)} processes" if args.processes else "embedded stack is up"
    print(f"FT-PrivacyScore {kind} (plaintext on loopback; use TLS settings elsewhere):")
    if args.auth:
        print(f"  tokens: `ftps-stack token --role builder --subject NAME` (key {stack.key_file})")
    else:
        print("  AUTH IS OFF (--no-auth): tokens are not checked, every caller is admin 'auth-disabled'")
    for name in ("gateway", "registry", "scorer", "worker"):
        print(f"  {NAMES[name]:<34} {stack.addresses[name]}")
    for name, url in stack.metrics_addresses.items():  # "worker-1" with --processes --workers 2
        kind, _, index = name.partition("-")
        print(f"  {NAMES[kind] + (' ' + index if index else '') + ' metrics':<34} {url}")
    print(f"  {'metadata (SQLite)':<34} {args.data_dir.resolve() / 'metadata.db'}")
    print(f"  {'blobs (files)':<34} {blob_dir(args.data_dir)}")
    if args.processes:
        print(f"  logs in {stack.log_dir} (a process that dies is restarted)")
    web = _start_web(args, stack.addresses)
    if web is not None:
        print(f"  {'web client':<34} {web.url}")
    print("Ctrl-C to stop.", flush=True)
    while not stop.wait(1.0):  # with --processes, the stack's supervisor restarts a process that dies
        pass
    print("stopping...", flush=True)
    if web is not None:
        web.stop()
    stack.stop()
    return 0


def _start_web(args: argparse.Namespace, addresses: dict[str, str]):
    """The web client over the stack's gateway/registry/scorer (sign-in needs tokens: not with --no-auth)."""
    if not args.web or not args.auth:
        return None
    from clients.web import WebServer

    port = args.web_port if args.web_port is not None else (0 if args.ephemeral_ports else 8080)
    web = WebServer(addresses, host=args.host, port=port)
    web.start()  # sets web.url
    return web


def cmd_demo(args: argparse.Namespace) -> int:
    from stack.demo import print_report, run_demo, write_report

    if args.models < 4 or args.models % 2:
        print("ftps-stack: error: --models must be even and at least 4", file=sys.stderr)
        return 2
    if args.records < 4:
        print("ftps-stack: error: --records must be at least 4", file=sys.stderr)
        return 2
    if args.shadow_models < 2:
        print("ftps-stack: error: --shadow-models must be at least 2", file=sys.stderr)
        return 2
    setup_logging(args.log_level or "WARNING")
    console = Console(stderr=True)
    t0 = time.perf_counter()
    # With --serve the stack outlives the report: serve its metrics too, to look at after the round.
    with EmbeddedStack(host=args.host, ports=_ports(args), data_dir=args.data_dir, auth=args.auth,
                       metrics=args.serve) as stack:
        console.log("stack up: " + ", ".join(f"{k} {v}" for k, v in stack.addresses.items()))
        out = run_demo(stack.addresses, dataset=args.dataset, records=args.records, models=args.models,
                       shadow_models=args.shadow_models, method=args.method, seed=args.seed, console=console,
                       signer=stack.signer())
        out["timings"]["wall_s"] = time.perf_counter() - t0
        if args.report_dir:
            for path in write_report(out, args.report_dir):
                console.log(f"wrote {path}")
        if args.json:
            json.dump(out, sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            # Piped output is not cut to 80 columns: the record ids and intervals stay whole.
            print_report(out, Console(width=None if sys.stdout.isatty() else 132))
        if args.serve:
            _serve_demo(args, stack, console)
        elif not args.json:
            console.print("See it in the browser: `ftps-stack demo --serve` keeps the stack and the web "
                          "client running after the report.")
    return 0


def _serve_demo(args: argparse.Namespace, stack: EmbeddedStack, console: Console) -> None:
    web = _start_web(args, stack.addresses)
    if web is None:
        return
    signer = stack.signer()
    console.print(f"web client: {web.url}  — sign in with one of these tokens (valid 1 day):")
    for subject, role in (("builder", "builder"), ("alice", "contributor"), ("bob", "contributor")):
        console.print(f"  {subject:>8} ({role}): {signer.issue(subject, role, ttl_s=86400)}", soft_wrap=True)
    for name, url in stack.metrics_addresses.items():
        console.print(f"{NAMES[name]} metrics: {url}")
    console.print("Ctrl-C to stop.")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    web.stop()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "up":
            return cmd_up(args)
        if args.command == "token":
            return cmd_token(args)
        return cmd_demo(args)
    except KeyboardInterrupt:
        return 130
    except (OSError, ValueError, RuntimeError, FtpsError) as exc:
        print(f"ftps-stack: error: {exc}", file=sys.stderr)
        logging.getLogger(__name__).debug("details", exc_info=True)
        return 1
    except grpc.RpcError as exc:
        from clients.api import describe_rpc_error

        print(f"ftps-stack: error: {describe_rpc_error(exc)}", file=sys.stderr)
        logging.getLogger(__name__).debug("details", exc_info=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
