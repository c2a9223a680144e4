"""What both client tools share: settings (flags > env vars > config file > defaults), error
reporting, exit codes, and the flags that say which records a task takes (reading them is
``ftps.records.files``).

Exit codes: 0 ok, 1 the service refused or failed (the gRPC status is printed on one line), 2 bad
usage or input file, 130 interrupted.

The config file is TOML, ``~/.config/ftps/config.toml`` (``$XDG_CONFIG_HOME/ftps/config.toml``) or
``--config FILE``, with any of the keys of :data:`SETTINGS`::

    gateway = "ftps.example.org:443"
    tls_ca = "ca.pem"          # relative paths are relative to the config file
    token = "..."              # keep the file private: chmod 600
    contributor = "alice"
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tomllib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import grpc

from clients.api import describe_rpc_error, score_dict
from clients.score_html import dp_facts, headline
from ftps.common.errors import InvalidArgument, ResourceExhausted
from ftps.records.files import Expect

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class InputError(Exception):
    """A local input problem (file missing, wrong arrays, bad config): exit code 2."""


@dataclass(frozen=True)
class Setting:
    """One connection setting, resolved flag > env var > config key > default."""

    dest: str
    flag: str
    env: str
    default: str
    help: str


SETTINGS = {s.dest: s for s in (
    Setting("gateway", "--gateway", "FTPS_GATEWAY_ADDR", "127.0.0.1:50051", "contributor gateway address"),
    Setting("registry", "--registry", "FTPS_REGISTRY_ADDR", "127.0.0.1:50052", "builder registry address"),
    Setting("scorer", "--scorer", "FTPS_SCORER_ADDR", "127.0.0.1:50053", "LiRA scorer address"),
    Setting("token", "--token", "FTPS_TOKEN", "",
            "bearer token; `ftps-stack token` prints one for the embedded stack"),
    Setting("tls_ca", "--tls-ca", "FTPS_TLS_CA_FILE", "",
            "PEM CA bundle: connect with TLS and verify the server"),
    Setting("contributor", "--contributor", "FTPS_CONTRIBUTOR", "",
            "your contributor name (default: your token's subject)"),
)}
_PATH_SETTINGS = ("tls_ca",)  # relative to the config file when they come from it


def default_config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "ftps" / "config.toml"


def _add_setting(p: argparse.ArgumentParser, dest: str, *aliases: str) -> None:
    s = SETTINGS[dest]
    default = f"; default {s.default}" if s.default else ""
    # default=None marks "not given on the command line", so env and config can fill it later.
    p.add_argument(s.flag, *aliases, dest=dest, default=None,
                   help=f"{s.help} (env {s.env}, config key {dest}{default})")
    p.set_defaults(_ftps_settings=[*(p.get_default("_ftps_settings") or []), dest])


def add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None,
                   help=f"TOML config file (default {default_config_path()} if it exists); keys: "
                        + ", ".join(SETTINGS))


def add_address(p: argparse.ArgumentParser, name: str, default: str | None = None) -> None:
    """``--NAME`` address flag (gateway, registry, scorer); ``default`` is ignored (see SETTINGS)."""
    _add_setting(p, name)


def add_security(p: argparse.ArgumentParser) -> None:
    _add_setting(p, "token")
    _add_setting(p, "tls_ca")


def add_contributor(p: argparse.ArgumentParser) -> None:
    _add_setting(p, "contributor", "-c")


def load_config(path: Path, *, explicit: bool) -> dict[str, str]:
    """The config file's settings; {} when the default file does not exist."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        if explicit:
            raise InputError(f"config file {path} not found") from exc
        return {}
    except OSError as exc:
        raise InputError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"config file {path} is not valid TOML: {exc}") from exc
    unknown = sorted(set(data) - set(SETTINGS))
    if unknown:
        raise InputError(f"config file {path}: unknown key {unknown[0]!r} (known: {', '.join(SETTINGS)})")
    out = {}
    for key, value in data.items():
        if not isinstance(value, str):
            raise InputError(f"config file {path}: {key} must be a string, got {type(value).__name__}")
        if key in _PATH_SETTINGS and value:
            value = str((path.parent / Path(value).expanduser()).resolve())
        out[key] = value
    if out.get("token") and os.name == "posix" and path.stat().st_mode & 0o077:
        print(f"warning: {path} holds a token and is readable by others (chmod 600 {path})", file=sys.stderr)
    return out


def resolve_settings(args: argparse.Namespace) -> None:
    """Fill every setting not given as a flag from its env var, then the config file, then its default."""
    dests = getattr(args, "_ftps_settings", None) or []
    if not dests:
        return
    explicit = getattr(args, "config", None)
    config = load_config(explicit or default_config_path(), explicit=explicit is not None)
    for dest in dests:
        if getattr(args, dest) is not None:
            continue
        s = SETTINGS[dest]
        env = os.environ.get(s.env)
        setattr(args, dest, env if env else config.get(dest, s.default))


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
        resolve_settings(args)
        return handlers[args.command](args)
    except (InputError, InvalidArgument, ResourceExhausted) as exc:
        # a local input problem: a records file (ftps.records names the file and what is wrong), a flag
        print(f"{prog}: error: {_one_line(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except grpc.RpcError as exc:
        print(f"{prog}: error: {_one_line(describe_rpc_error(exc))}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _one_line(text: str) -> str:
    return " ".join(text.split())


# -- records -------------------------------------------------------------------------------------

def parse_shape(text: str, *, flag: str = "--shape") -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in text.split(","))
    except ValueError as exc:
        raise InputError(f"{flag} {text!r} must be comma-separated integers, e.g. 1,28,28") from exc
    if not shape or min(shape) < 1:
        raise InputError(f"{flag} {text!r}: every dimension must be >= 1")
    return shape


def parse_value_range(text: str, *, flag: str = "--value-range") -> tuple[float, float]:
    """``MIN,MAX`` as two finite floats with MIN < MAX."""
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError as exc:
        raise InputError(f"{flag} {text!r} must be MIN,MAX, e.g. 0,1") from exc
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise InputError(f"{flag} {text!r}: MIN and MAX must be finite with MIN < MAX")
    return lo, hi


def records_arg(text: str) -> tuple[str | None, Path]:
    """``PATH`` or ``SUBMISSION_ID=PATH`` (a path that exists as given wins)."""
    if Path(text).exists() or "=" not in text:
        return None, Path(text)
    sub, _, path = text.partition("=")
    return sub or None, Path(path)


def fetch_task(args: argparse.Namespace):
    """GetTask from the registry with the caller's token (contributors may read tasks they submit to)."""
    from ftps.common import grpcutil
    from ftps.v1 import registry_pb2, registry_pb2_grpc

    channel = grpcutil.make_channel(args.registry, **security_kwargs(args))
    try:
        return registry_pb2_grpc.BuilderRegistryServiceStub(channel).GetTask(
            registry_pb2.GetTaskRequest(task_id=args.task), timeout=30.0)
    finally:
        channel.close()


def expect(args: argparse.Namespace, task) -> Expect:
    """What the task's records look like: its settings (``task`` may be None when it is unknown),
    --shape overriding the record shape."""
    out = Expect.of(task.settings if task is not None else None)
    if getattr(args, "shape", None):
        out.shape = parse_shape(args.shape)
    return out


@contextmanager
def progress_bar(label: str) -> Iterator[Callable[[int, int], None]]:
    """A transient progress bar on stderr; yields ``update(done, total)``."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as progress:
        bar = progress.add_task(label, total=None)
        yield lambda done, total: progress.update(bar, completed=done, total=total)


def print_score_stream(scores: Iterable[Any], *, as_json: bool, with_contributor: bool = False) -> int:
    """Print a WatchScores stream as it comes, one JSON object or one line per record, until the
    stream ends (a round's scores all delivered) or its deadline passes (following a task) -> 0."""
    try:
        for s in scores:
            if as_json:
                print(json.dumps(score_dict(s)), flush=True)
                continue
            h = headline(s)
            who = f"{s.contributor}, " if with_contributor else ""
            print(f"{s.record_id} ({who}round {s.round_id}): score {h[0]:+.3f} [{h[1]:+.2f}, {h[2]:+.2f}] "
                  f"(counted P {s.counted_p:+.2f}; {dp_facts(s)})", flush=True)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            raise
    return 0
