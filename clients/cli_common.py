"""What both client tools share: address flags (with env defaults), error reporting, exit codes.

Exit codes: 0 ok, 1 the service refused or failed (the gRPC status is printed), 2 bad usage or
input file, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable

import grpc

from clients.api import describe_rpc_error


class InputError(Exception):
    """A local input problem (file missing, wrong arrays): exit code 2."""


def add_address(p: argparse.ArgumentParser, name: str, default: str) -> None:
    env = f"FTPS_{name.upper()}_ADDR"
    p.add_argument(f"--{name}", default=os.environ.get(env, default),
                   help=f"{name} address (env {env}; default {default})")


def add_security(p: argparse.ArgumentParser) -> None:
    p.add_argument("--token", default=os.environ.get("FTPS_TOKEN", ""),
                   help="bearer token (env FTPS_TOKEN); `ftps-stack token` prints one for the embedded stack")
    p.add_argument("--tls-ca", default=os.environ.get("FTPS_TLS_CA_FILE", ""),
                   help="PEM CA bundle: connect with TLS and verify the server (env FTPS_TLS_CA_FILE)")


def security_kwargs(args: argparse.Namespace) -> dict:
    from ftps.common.grpcutil import Tls

    try:
        tls = Tls.from_files(ca_file=args.tls_ca) if args.tls_ca else None
    except OSError as exc:
        raise InputError(f"cannot read --tls-ca {args.tls_ca}: {exc.strerror}") from exc
    return {"token": args.token or None, "tls": tls}


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2)
    sys.stdout.write("\n")


def run(prog: str, parser: argparse.ArgumentParser, argv: list[str] | None,
        handlers: dict[str, Callable[[argparse.Namespace], int]]) -> int:
    args = parser.parse_args(argv)
    try:
        return handlers[args.command](args)
    except InputError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        print(f"{prog}: error: {describe_rpc_error(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def load_npz_records(path: str):
    import numpy as np

    from ftps.common.errors import InvalidArgument
    from ftps.common.serde import npz_arrays

    try:
        data = open(path, "rb").read()
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        arrays = npz_arrays(data)
    except InvalidArgument as exc:
        raise InputError(f"{path}: {exc}") from exc
    if "x" not in arrays or "y" not in arrays:
        raise InputError(f"{path}: an npz with arrays x (records) and y (labels) is needed; found {sorted(arrays)}")
    x, y = arrays["x"], arrays["y"]
    if x.dtype.kind not in "fiu" or y.dtype.kind not in "iu":
        raise InputError(f"{path}: x must be numeric and y integer labels (got {x.dtype}, {y.dtype})")
    return np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.int64)
