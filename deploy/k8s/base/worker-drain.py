"""preStop drain of a fine-tune worker pod: return once it has no job in flight.

Kubernetes runs this before it sends SIGTERM (which stops the server after a 2 s grace, cutting a
running job). A terminating pod is already out of the headless Service, so no new connection brings
jobs; a connection the scorer still holds may, until FTPS_MAX_CONNECTION_AGE_S closes it. So: poll
the worker's own metrics (FTPS_METRICS_LISTEN) until ftps_worker_jobs_in_flight reads 0 on two polls
in a row. The pod's terminationGracePeriodSeconds bounds the wait. When the metrics cannot be read
(not served, malformed) there is nothing to wait on: return at once.

Standard library only (the worker image's python); stdout/stderr end up in the pod's events.
"""

from __future__ import annotations

import os
import sys
import time
import urllib.request

METRIC = "ftps_worker_jobs_in_flight"


def in_flight(url: str, timeout: float = 5.0) -> float | None:
    """The gauge's value (summed over its series), or None when it cannot be read."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            text = resp.read().decode("utf-8", "replace")
    except (OSError, ValueError):
        return None
    total, seen = 0.0, False
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name != METRIC:
            continue
        rest = line.rsplit("}", 1)[1] if "{" in line else line[len(name):]
        try:
            total += float(rest.split()[0])
        except (IndexError, ValueError):
            return None
        seen = True
    return total if seen else None


def metrics_url() -> str:
    listen = os.environ.get("FTPS_METRICS_LISTEN", "")
    port = listen.rpartition(":")[2] or "9464"
    return os.environ.get("DRAIN_METRICS_URL", f"http://127.0.0.1:{port}/metrics")


def drain(url: str, poll_s: float = 5.0, idle_polls: int = 2) -> int:
    idle = 0
    while idle < idle_polls:
        value = in_flight(url)
        if value is None:
            print(f"drain: {METRIC} unreadable at {url}; not waiting", flush=True)
            return 0
        idle = idle + 1 if value == 0 else 0
        if idle < idle_polls:
            time.sleep(poll_s)
    print("drain: no job in flight", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(drain(metrics_url(), poll_s=float(os.environ.get("DRAIN_POLL_S", "5"))))
