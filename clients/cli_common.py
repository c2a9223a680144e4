"""What both client tools share: settings (flags > env vars > config file > defaults), error
reporting, exit codes, and reading records from an ``.npz`` or a folder of images.

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
import csv
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
import numpy as np

from clients.api import describe_rpc_error, score_dict
from clients.score_html import dp_facts, headline

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
    except InputError as exc:
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


@dataclass
class Records:
    """Labelled records read from disk: ``x`` float32 ``[N, *shape]``, ``y`` int64 ``[N]``, and the
    service's record ids when the file names them (npz array ``record_id``, CSV column ``record_id``)."""

    x: np.ndarray
    y: np.ndarray
    path: str
    record_ids: list[str] | None = None


def is_image_folder(path: str | Path) -> bool:
    return Path(path).is_dir()


def load_records(path: str | Path, *, shape: tuple[int, ...] | None = None,
                 num_classes: int | None = None) -> Records:
    """Records from an ``.npz`` (arrays ``x``, ``y``) or a folder of images with a ``labels.csv``
    (columns ``file,label``; images need ``shape`` = (C, H, W) with C 1 or 3). Raises InputError."""
    p = Path(path)
    if p.is_dir():
        if shape is None:
            raise InputError(f"{p} is a folder of images: the record shape is needed (--shape C,H,W)")
        recs = load_image_folder(p, shape)
    else:
        recs = load_npz(p)
        if shape is not None and tuple(recs.x.shape[1:]) != tuple(shape):
            raise InputError(f"{p}: records have shape {','.join(map(str, recs.x.shape[1:]))}, "
                             f"the task's records are {','.join(map(str, shape))}")
    if num_classes and len(recs.y) and recs.y.max() >= num_classes:
        j = int(np.argmax(recs.y >= num_classes))
        raise InputError(f"{p}: label {int(recs.y[j])} of record {j} is out of range: "
                         f"the task has {num_classes} classes (0-{num_classes - 1})")
    return recs


def load_npz(path: str | Path) -> Records:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from exc
    return parse_npz_records(data, str(path))


def parse_npz_records(data: bytes, what: str) -> Records:
    """An .npz with arrays x [N, ...] (numeric) and y [N] (labels >= 0), and optionally record_id [N]
    (strings), read without unpickling and bounded before it is read (``archives.EDGE_LIMITS``: the
    file may come from anyone, and the web client reads uploads with this); InputError names
    ``what`` and the problem."""
    from ftps.common import archives
    from ftps.common.errors import InvalidArgument
    from ftps.common.serde import npz_arrays

    if not data:
        raise InputError(f"{what} is empty: an .npz with arrays x (records) and y (labels) is needed")
    try:
        # Shapes and dtypes on the headers, so a wrong file is refused before its data is read.
        arrays = npz_arrays(data, what=what, limits=archives.EDGE_LIMITS, expect={
            "x": archives.ArraySpec(("m", None, ...), "fiu"), "y": archives.ArraySpec(("m",), "iu"),
            "record_id": archives.ArraySpec(("m",), "U", required=False)})
    except InvalidArgument as exc:
        raise InputError(str(exc)) from exc  # it names ``what`` already
    if "x" not in arrays or "y" not in arrays:
        raise InputError(f"{what}: an .npz with arrays x (records) and y (labels) is needed; found "
                         f"{', '.join(sorted(arrays)) or 'no arrays'}")
    x, y = arrays["x"], arrays["y"]
    if x.dtype.kind not in "fiu" or y.dtype.kind not in "iu":
        raise InputError(f"{what}: x must be numeric and y integer labels (got {x.dtype}, {y.dtype})")
    if x.ndim < 2 or y.ndim != 1 or len(x) != len(y):
        raise InputError(f"{what}: x must be [N, ...] and y [N]; got x {list(x.shape)}, y {list(y.shape)}")
    if len(y) and y.min() < 0:
        raise InputError(f"{what}: labels must be >= 0, got {int(y.min())}")
    ids = None
    if "record_id" in arrays:
        rid = arrays["record_id"]
        if rid.dtype.kind != "U" or rid.shape != (len(x),):
            raise InputError(f"{what}: record_id must be {len(x)} strings, got {rid.dtype} {list(rid.shape)}")
        ids = [str(r) for r in rid]
    return Records(np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.int64), what, ids)


def load_npz_records(path: str) -> tuple[np.ndarray, np.ndarray]:
    recs = load_npz(path)
    return recs.x, recs.y


def load_image_folder(folder: Path, shape: tuple[int, ...]) -> Records:
    """Images listed in ``folder/labels.csv`` (``file,label``[,``record_id``]) in CSV order, each
    converted to grayscale (C=1) or RGB (C=3) and scaled to [0, 1]; sizes must match (H, W)."""
    from PIL import Image, UnidentifiedImageError

    if len(shape) != 3 or shape[0] not in (1, 3):
        raise InputError(f"record shape {','.join(map(str, shape))}: a folder of images fills records of "
                         "shape C,H,W with C = 1 (grayscale) or 3 (RGB)")
    c, h, w = shape
    labels = folder / "labels.csv"
    try:
        text = labels.read_text(encoding="utf-8-sig")
    except FileNotFoundError as exc:
        raise InputError(f"{folder}: no labels.csv (a CSV with columns file,label)") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {labels}: {exc}") from exc
    rows = csv.DictReader(text.splitlines())
    fields = [f.strip() for f in rows.fieldnames or []]
    if "file" not in fields or "label" not in fields:
        raise InputError(f"{labels}: needs a header with columns file,label; found {','.join(fields) or 'nothing'}")
    root = folder.resolve()
    xs, ys, ids = [], [], []
    for line, row in enumerate(rows, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        name, raw = row.get("file", ""), row.get("label", "")
        try:
            label = int(raw)
        except ValueError:
            label = -1
        if label < 0:
            raise InputError(f"{labels} line {line}: label {raw!r} is not a class index (an integer >= 0)")
        img_path = (folder / name).resolve()
        if not name or root not in img_path.parents:
            raise InputError(f"{labels} line {line}: file {name!r} is not a file inside {folder}")
        try:
            img = Image.open(img_path)
        except FileNotFoundError as exc:
            raise InputError(f"{labels} line {line}: {name} not found in {folder}") from exc
        except (UnidentifiedImageError, OSError) as exc:
            raise InputError(f"{img_path}: not an image Pillow can read") from exc
        with img:
            if img.size != (w, h):
                raise InputError(f"{img_path}: {img.size[0]}x{img.size[1]} pixels, the task's records are "
                                 f"{w}x{h} (shape {c},{h},{w}); resize the image first")
            xs.append(_image_array(img, c))
        ys.append(label)
        ids.append(row.get("record_id", ""))
    if not xs:
        raise InputError(f"{labels}: lists no images")
    record_ids = ids if all(ids) else None
    return Records(np.stack(xs), np.asarray(ys, dtype=np.int64), str(folder), record_ids)


def _image_array(img, channels: int) -> np.ndarray:
    """A Pillow image -> float32 [C, H, W] in [0, 1]."""
    if img.mode.startswith("I;16"):  # 16-bit grayscale: keep the precision
        a = np.asarray(img, dtype=np.float32) / 65535.0
        a = np.repeat(a[None], channels, axis=0)
    elif channels == 1:
        a = np.asarray(img.convert("L"), dtype=np.float32)[None] / 255.0
    else:
        a = np.asarray(img.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255.0
    return np.ascontiguousarray(a, dtype=np.float32)


def save_image_folder(folder: Path, x: np.ndarray, y: np.ndarray, record_ids: list[str] | None = None) -> Path:
    """The inverse of :func:`load_image_folder` (8-bit PNGs): for exporting a batch to look at."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "labels.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "label"] + (["record_id"] if record_ids else []))
        for j, (rec, label) in enumerate(zip(x, y)):
            name = f"{j:05d}.png"
            Image.fromarray(to_uint8_image(rec)).save(folder / name)
            w.writerow([name, int(label)] + ([record_ids[j]] if record_ids else []))
    return folder


def to_uint8_image(rec: np.ndarray) -> np.ndarray:
    """One record [C, H, W] in [0, 1] -> uint8 [H, W] (C=1) or [H, W, 3] (C=3)."""
    a = np.clip(np.nan_to_num(np.asarray(rec, dtype=np.float64)), 0.0, 1.0)
    a = np.round(a * 255.0).astype(np.uint8)
    return a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)


def is_image_record_shape(shape: tuple[int, ...]) -> bool:
    return len(shape) == 3 and shape[0] in (1, 3)


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


def record_shape(args: argparse.Namespace, task) -> tuple[int, ...] | None:
    """--shape if given, else the task's record_shape (``task`` may be None when it is unknown)."""
    if getattr(args, "shape", None):
        return parse_shape(args.shape)
    if task is not None and len(task.settings.record_shape):
        return tuple(int(d) for d in task.settings.record_shape)
    return None


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
