"""``python -m stack.s3server``: the embedded S3-protocol store (moto) as a process of its own,
for the multi-process local mode. Serves until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from ftps.common.embedded_s3 import EmbeddedS3
from ftps.common.grpcutil import die_with_parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stack.s3server",
                                     description="S3-protocol object store on loopback (moto, in memory)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000, help="0 picks a free port")
    args = parser.parse_args(argv)
    die_with_parent()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server = EmbeddedS3(args.host, args.port)
    endpoint = server.start()
    print(f"object store listening on {endpoint}", file=sys.stderr, flush=True)
    stop.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
