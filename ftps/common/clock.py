"""Timestamps, one way everywhere: RFC 3339 UTC with milliseconds (sortable as text)."""

from __future__ import annotations

import datetime as dt


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")
