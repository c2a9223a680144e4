"""Whether clients/node's npm packages (the Node.js client, buf, tsc) are installed, and what a test
does when they are not: skip on a developer's machine; under CI fail, unless scripts/bootstrap.sh
tried `npm ci` and it failed (a registry outage or npm's known stall), which it records in
$VENV/node-client-unavailable so that one bad registry minute does not fail the whole run."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

NODE_DIR = ROOT / "clients" / "node"
BIN = NODE_DIR / "node_modules" / ".bin"
UNAVAILABLE_MARKER = Path(sys.prefix) / "node-client-unavailable"


def require(what: str) -> Path:
    """The path of `node_modules/.bin/<what>` (buf, tsc, ...), with `node` on PATH; or skip/fail."""
    missing = []
    if shutil.which("node") is None:
        missing.append("`node` is not on PATH")
    tool = BIN / what
    if not tool.exists():
        missing.append(f"{tool.relative_to(ROOT)} is missing (run `npm ci --prefix clients/node`)")
    if not missing:
        return tool
    reason = "; ".join(missing)
    if UNAVAILABLE_MARKER.exists():
        pytest.skip(f"{reason}; bootstrap: {UNAVAILABLE_MARKER.read_text().strip()}")
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(reason + " (CI is set and the bootstrap did not record a failed npm ci)")
    pytest.skip(reason)
