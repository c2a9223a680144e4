"""Records as npz files: exactly arrays ``x`` (float32 ``[N, ...]``) and ``y`` (int64 ``[N]``),
never unpickled, every member bounded before it is read (``ftps.common.archives``).

Two readers, for two kinds of file:

- :func:`load` / :class:`Records`: an npz the services wrote (a stored batch, builder data, the
  files of a sandboxed job), held to ``validate``'s rules, errors :class:`RecordsError`;
- :func:`parse_upload`: an npz a person hands a client (any numeric x, integer y, an optional
  ``record_id`` array), bounded by the edge limits, errors ``InvalidArgument`` naming the file.

One writer, :func:`save`: ``archives.records_to_npz``, byte for byte the same for the same arrays.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from ftps.common import archives
from ftps.common.archives import npz_arrays, records_to_npz
from ftps.common.errors import InvalidArgument
from ftps.records import RecordsError
from ftps.records.checks import validate

__all__ = ["Records", "load", "parse_upload", "save"]


@dataclass(frozen=True, eq=False)
class Records:
    """Labelled records: x float32 [N, *S], y int64 [N].

    Built with ``of`` (arrays) or ``load`` (npz bytes), which validate (``checks.validate``).
    ``npz``: the blob they were read from, passed on as it came (``to_npz``); ``record_ids``: the
    ids a file named them by (a client's upload), else None; ``source``: where they came from,
    for messages.
    """

    x: np.ndarray
    y: np.ndarray
    npz: bytes | None = dataclasses.field(default=None, repr=False)
    record_ids: list[str] | None = None
    source: str = "records"

    @classmethod
    def of(cls, x: np.ndarray, y: np.ndarray, *, what: str = "records",
           record_ids: list[str] | None = None) -> Records:
        """Raises RecordsError unless x and y are records (``checks.validate``)."""
        validate(x, y, what=what)
        return cls(x, y, record_ids=record_ids, source=what)

    @classmethod
    def load(cls, data: bytes, *, keep_npz: bool = True) -> Records:
        """npz bytes (arrays x and y) -> Records; raises RecordsError (a ValueError), never
        unpickles. ``keep_npz=False`` drops the blob once read (nothing will pass it on)."""
        x, y = load(data)
        return cls(x, y, bytes(data) if keep_npz else None)

    def __len__(self) -> int:
        return len(self.x)

    @property
    def record_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def to_npz(self) -> bytes:
        """The blob they came as; else an npz of x and y (not ``save``: these are validated)."""
        return self.npz if self.npz is not None else records_to_npz(self.x, self.y)


def save(path_or_buffer: str | os.PathLike | BinaryIO, x: np.ndarray, y: np.ndarray) -> None:
    """Write validated records as an npz with arrays ``x`` (float32) and ``y`` (int64)."""
    validate(x, y)
    data = records_to_npz(x, y)
    if hasattr(path_or_buffer, "write"):
        path_or_buffer.write(data)
    else:
        with open(path_or_buffer, "wb") as f:
            f.write(data)


def load(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Parse npz bytes written by ``save`` -> (x, y); never unpickles.

    Raises RecordsError (a ValueError) on anything but exactly arrays x and y that pass
    ``checks.validate``.
    """
    try:
        # Bounded before it is read (archives.INTERNAL_LIMITS: records the services wrote).
        arrays = archives.read_npz(data, what="records")
    except archives.ArchiveError as e:
        raise RecordsError(f"records are not a valid npz file: {e}") from e
    names = sorted(arrays)
    if names != ["x", "y"]:
        raise RecordsError(f"records npz must hold exactly arrays x and y, got {names}")
    x, y = arrays["x"], arrays["y"]
    validate(x, y)
    return x, y


def parse_upload(data: bytes, what: str) -> Records:
    """An .npz a person hands a client: arrays x [N, ...] (numeric) and y [N] (labels >= 0), and
    optionally record_id [N] (strings), read without unpickling and bounded before it is read
    (``archives.EDGE_LIMITS``: the file may come from anyone). InvalidArgument names ``what``."""
    if not data:
        raise InvalidArgument(f"{what} is empty: an .npz with arrays x (records) and y (labels) is needed",
                              reason="RECORDS_EMPTY", field="records")
    # Shapes and dtypes on the headers, so a wrong file is refused before its data is read.
    arrays = npz_arrays(data, what=what, limits=archives.EDGE_LIMITS, expect={
        "x": archives.ArraySpec(("m", None, ...), "fiu"), "y": archives.ArraySpec(("m",), "iu"),
        "record_id": archives.ArraySpec(("m",), "U", required=False)})

    def bad(msg: str) -> InvalidArgument:
        return InvalidArgument(f"{what}: {msg}", reason="RECORDS_BAD_SHAPE", field="records")

    if "x" not in arrays or "y" not in arrays:
        raise bad("an .npz with arrays x (records) and y (labels) is needed; found "
                  f"{', '.join(sorted(arrays)) or 'no arrays'}")
    x, y = arrays["x"], arrays["y"]
    if x.dtype.kind not in "fiu" or y.dtype.kind not in "iu":
        raise bad(f"x must be numeric and y integer labels (got {x.dtype}, {y.dtype})")
    if x.ndim < 2 or y.ndim != 1 or len(x) != len(y):
        raise bad(f"x must be [N, ...] and y [N]; got x {list(x.shape)}, y {list(y.shape)}")
    if len(y) and y.min() < 0:
        raise InvalidArgument(f"{what}: labels must be >= 0, got {int(y.min())}", reason="LABEL_OUT_OF_RANGE",
                              field="records.y")
    ids = None
    if "record_id" in arrays:
        rid = arrays["record_id"]
        if rid.dtype.kind != "U" or rid.shape != (len(x),):
            raise bad(f"record_id must be {len(x)} strings, got {rid.dtype} {list(rid.shape)}")
        ids = [str(r) for r in rid]
    return Records(np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.int64), record_ids=ids, source=what)
