"""Timestamps, one way everywhere: ``google.protobuf.Timestamp`` in every message, RFC 3339 UTC
with milliseconds (sortable as text) in the databases and for people."""

from __future__ import annotations

import datetime as dt

from google.protobuf.timestamp_pb2 import Timestamp


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def now_ts() -> Timestamp:
    """Now, to the millisecond (as :func:`now_iso`), as a message field."""
    return to_ts(now_iso())


def to_ts(text: str) -> Timestamp:
    """An RFC 3339 string (as stored) as a Timestamp; empty: an unset (zero) Timestamp."""
    out = Timestamp()
    if text:
        out.FromDatetime(dt.datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(dt.timezone.utc))
    return out


def iso(ts: Timestamp) -> str:
    """A Timestamp as RFC 3339 UTC with milliseconds; an unset one as ""."""
    if not ts.seconds and not ts.nanos:
        return ""
    return ts.ToDatetime(tzinfo=dt.timezone.utc).isoformat(timespec="milliseconds")
