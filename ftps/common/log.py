"""One logging setup for every process: text lines (default) or one JSON object per line
(``FTPS_LOG_FORMAT=json``), each with the trace and span id of the span current when it was logged
(:mod:`ftps.common.tracing`)."""

from __future__ import annotations

import json
import logging
import os
import sys
import time

_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s%(trace_suffix)s"
LOG_FORMATS = ("text", "json")

# C0 controls, DEL, C1 controls and the Unicode line/paragraph separators: each as a visible escape.
_ESCAPES = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)]}
_ESCAPES |= {ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t", 0x2028: "\\u2028", 0x2029: "\\u2029"}
_TRACEBACK_ESCAPES = {c: e for c, e in _ESCAPES.items() if c not in (ord("\n"), ord("\t"))}


def escape_controls(text: str) -> str:
    """``text`` on one line, with no terminal escapes: control characters as ``\\n``, ``\\x1b``..."""
    return text.translate(_ESCAPES)


class EscapingFormatter(logging.Formatter):
    """Task names, contributor ids, token claims, method paths... reach log lines as the caller sent
    them; a newline would forge a line and ``\\x1b[`` would drive the operator's terminal. Every
    line is escaped here, once, so that no call site has to remember. Tracebacks keep their own
    line breaks (and only those) to stay readable."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        if not hasattr(record, "trace_suffix"):  # a record that met no TraceContextFilter
            record.trace_suffix = ""
        return escape_controls(super().formatMessage(record))

    def formatException(self, ei) -> str:
        return super().formatException(ei).translate(_TRACEBACK_ESCAPES)

    def formatStack(self, stack_info: str) -> str:
        return super().formatStack(stack_info).translate(_TRACEBACK_ESCAPES)


class TraceContextFilter(logging.Filter):
    """Adds ``trace_id``, ``span_id`` (hex; "" outside any span), ``service`` and ``trace_suffix``
    (`` trace=<id> span=<id>`` or "", for text lines) to every record; installed on the handlers
    :func:`setup_logging` makes, so records of every logger get them. Never filters a record out."""

    def filter(self, record: logging.LogRecord) -> bool:
        from ftps.common import tracing

        trace_id, span_id = tracing.current_ids()
        record.trace_id = trace_id
        record.span_id = span_id
        record.service = tracing.service_name()
        record.trace_suffix = f" trace={trace_id} span={span_id}" if trace_id else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601 with milliseconds), level, logger, message,
    trace_id, span_id, service, and exception (the traceback) when there is one. JSON escapes every
    control character: no caller-sent text can forge a line."""

    def format(self, record: logging.LogRecord) -> str:
        t = time.gmtime(record.created)
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "trace_id": getattr(record, "trace_id", ""),
            "span_id": getattr(record, "span_id", ""),
            "service": getattr(record, "service", ""),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def log_format(fmt: str | None = None) -> str:
    """``fmt``, else ``$FTPS_LOG_FORMAT``, else "text"; ValueError when not text or json."""
    fmt = (fmt or os.environ.get("FTPS_LOG_FORMAT") or "text").strip().lower()
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {fmt!r}")
    return fmt


def configure_handler(handler: logging.Handler, fmt: str | None = None) -> logging.Handler:
    """``handler`` with the trace-context filter and the formatter of ``fmt`` (:func:`log_format`)."""
    if not any(isinstance(f, TraceContextFilter) for f in handler.filters):
        handler.addFilter(TraceContextFilter())
    if log_format(fmt) == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(EscapingFormatter(_FORMAT, "%H:%M:%S"))
    return handler


def setup_logging(level: str = "INFO", fmt: str | None = None) -> None:
    """The process's log lines on stderr, at ``level``, as ``fmt`` (text | json; default
    ``$FTPS_LOG_FORMAT``, else text). Called again, it changes level and format in place."""
    root = logging.getLogger()
    ours = [h for h in root.handlers if getattr(h, "_ftps", False)]
    if not ours:
        handler = logging.StreamHandler(sys.stderr)
        handler._ftps = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        ours = [handler]
    for handler in ours:
        configure_handler(handler, fmt)
    root.setLevel(level.upper())
    # Third-party chatter that drowns the services' own lines.
    for noisy in ("botocore", "urllib3", "werkzeug", "moto", "boto3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
