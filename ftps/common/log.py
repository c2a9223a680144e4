"""One logging setup for every process."""

from __future__ import annotations

import logging
import sys

_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"

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
        return escape_controls(super().formatMessage(record))

    def formatException(self, ei) -> str:
        return super().formatException(ei).translate(_TRACEBACK_ESCAPES)

    def formatStack(self, stack_info: str) -> str:
        return super().formatStack(stack_info).translate(_TRACEBACK_ESCAPES)


def setup_logging(level: str = "INFO") -> None:
    root = logging.getLogger()
    if not any(getattr(h, "_ftps", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(EscapingFormatter(_FORMAT, "%H:%M:%S"))
        handler._ftps = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level.upper())
    # Third-party chatter that drowns the services' own lines.
    for noisy in ("botocore", "urllib3", "werkzeug", "moto", "boto3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
