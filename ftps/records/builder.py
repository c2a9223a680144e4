"""Builder data, the records a task's builder keeps: one reader for every format it is stored in.

A builder-data blob is an npz (arrays ``x`` and ``y``, the default) or an FFCV ``.beton``
(:mod:`ftps.records.beton`, recognised by its header). :func:`builder_data` turns a stored blob into
arrays, whatever its format: the scorer (preparation, recipe comparison) and the worker (builder
records mixed into fine-tuning) read it through this one function.

:func:`decode_untrusted` decodes a ``.beton`` nobody has checked yet (the registry, at upload) in a
child process with a timeout and an address-space limit: FFCV's decoders trust the file's page
pointers and libjpeg-turbo parses its JPEG pages, so a hostile file may crash or exhaust the
process that reads it. Stored blobs passed that check, so readers decode them in-process.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from ftps.common import archives
from ftps.common.errors import FailedPrecondition
from ftps.records import RecordsError, beton
from ftps.records.npz import Records

__all__ = ["BetonDecodeError", "builder_data", "decode_untrusted"]

# The child's exit statuses besides 0 (its stderr's last line says why).
_BAD_FILE, _UNAVAILABLE = 3, 4
# What the child maps before it reads anything (the interpreter, numpy, ffcv and the torch it
# imports: about 4.2 GiB of address space measured with ffcv 1.0.2 and torch 2.14), and how many
# times the decoded records the loader may hold at once (its batch buffers, the copies out of
# them, the concatenation and the float32 conversion of image pages).
CHILD_BASE_BYTES = 6 << 30
CHILD_RECORD_FACTOR = 4
_NPZ = {"x": archives.ArraySpec(("m", ...), "f"), "y": archives.ArraySpec(("m",), "iu")}


class BetonDecodeError(RecordsError):
    """A ``.beton`` could not be decoded in the child: a bad file, or one past the child's limits."""


def builder_data(data: bytes | memoryview, *, what: str = "builder_data") -> Records:
    """A stored builder-data blob -> its Records (x float32 [N, ...], y int64 [N], validated once),
    npz or ``.beton``.

    Raises RecordsError (a ValueError) for a blob that is neither or whose records are malformed,
    FailedPrecondition for a ``.beton`` where ffcv cannot be imported.
    """
    if beton.is_beton(data):
        try:
            x, y = beton.read(data, what=what)
        except beton.BetonUnavailable as exc:
            raise FailedPrecondition(f"{what} is an FFCV .beton and this process cannot read it: {exc}",
                                     reason="FAILED_PRECONDITION") from exc
    else:
        try:
            # Bounded before it is read (archives.INTERNAL_LIMITS: the registry checked it at upload).
            arrays = archives.read_npz(bytes(data), what=what, expect=_NPZ)
        except archives.ArchiveError as exc:
            raise RecordsError(f"{what} is neither a valid npz nor an FFCV .beton: {exc}") from exc
        x, y = arrays["x"], arrays["y"]
        if x.dtype == np.float32 and y.dtype == np.int64 and set(arrays) == {"x", "y"}:
            # Kept with the records: the worker hands its sandbox child the blob as it came.
            return dataclasses.replace(Records.of(x, y, what=what), npz=bytes(data))
        # The registry accepted any float x and integer y (checks.for_task); the services train on these.
        x, y = x.astype(np.float32), y.astype(np.int64)
    return Records.of(x, y, what=what)


def decode_untrusted(data: bytes | memoryview, *, what: str = "builder_data", timeout_s: float = 300.0,
                     max_records_bytes: int = archives.DEFAULT_MAX_EXPANDED_BYTES,
                     expect_shape: tuple[int, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every record of a ``.beton`` nobody has checked yet, decoded once in a child process.

    ``max_records_bytes``: the most the decoded x and y may take (float32 and int64); the child's
    address space is bounded by :data:`CHILD_BASE_BYTES` plus :data:`CHILD_RECORD_FACTOR` times
    that. ``expect_shape``: the record shape the caller will accept, checked on the child's answer
    before it is read (None: any). Raises BetonDecodeError (one line naming ``what``) for a file
    that fails, crashes the decoder, takes longer than ``timeout_s`` or needs more memory;
    BetonUnavailable (saying why) where the child cannot import ffcv.
    """
    with tempfile.TemporaryDirectory(prefix="ftps-beton-check-") as tmp:
        src, out = Path(tmp) / "records.beton", Path(tmp) / "records.npz"
        src.write_bytes(data)
        limit = CHILD_BASE_BYTES + CHILD_RECORD_FACTOR * max_records_bytes
        cmd = [sys.executable, "-m", "ftps.records.builder", str(src), str(out), what, str(limit)]
        try:
            # Its own session, so that a timeout kills the loader's threads and any helper with it.
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, start_new_session=True)
        except OSError as exc:
            raise BetonDecodeError(f"{what}: could not start the .beton decoder ({exc})") from exc
        try:
            _, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise BetonDecodeError(f"{what}: decoding the .beton took longer than {timeout_s:g} s; "
                                   f"its pages are malformed or too many to check") from None
        why = _last_line(err)
        if proc.returncode == _UNAVAILABLE:
            raise beton.BetonUnavailable(why)
        if proc.returncode == _BAD_FILE:
            raise BetonDecodeError(why)
        if proc.returncode < 0:
            sig = signal.Signals(-proc.returncode).name
            raise BetonDecodeError(f"{what}: the .beton crashed its decoder ({sig}); its pages or "
                                   f"allocation table point outside the file or hold malformed images")
        if proc.returncode != 0:
            raise BetonDecodeError(f"{what}: the .beton decoder failed (exit status {proc.returncode}): {why}")
        expect = {"x": archives.ArraySpec(("m", *expect_shape), "f") if expect_shape is not None
                  else archives.ArraySpec(None, "f"), "y": archives.ArraySpec(("m",), "i")}
        try:
            arrays = archives.read_npz(out.read_bytes(), what=what, expect=expect,
                                       # the two .npy headers besides the records
                                       limits=archives.ArchiveLimits(max_bytes=max_records_bytes + (64 << 10)))
        except archives.ArchiveError as exc:
            raise BetonDecodeError(f"{what}: its records as decoded: {exc}") from exc
        return arrays["x"], arrays["y"]


def _last_line(err: bytes) -> str:
    lines = [s for s in err.decode("utf-8", "replace").splitlines() if s.strip()]
    return lines[-1].strip()[:500] if lines else "no message"


def _child(src: str, out: str, what: str, limit: int) -> int:
    # Bounded before ffcv is imported: a file declaring huge pages fails here with MemoryError,
    # not by exhausting the machine.
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        x, y = beton.read(src, what=what, verify_jpeg=True)
    except beton.BetonUnavailable as exc:
        print(beton.available() or str(exc), file=sys.stderr)
        return _UNAVAILABLE
    except RecordsError as exc:
        print(str(exc).replace("\n", " "), file=sys.stderr)
        return _BAD_FILE
    except MemoryError:
        print(f"{what}: decoding the .beton needs more than {limit >> 20} MiB of address space; "
              f"it declares records larger than its task's", file=sys.stderr)
        return _BAD_FILE
    Path(out).write_bytes(archives.records_to_npz(x, y))
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
