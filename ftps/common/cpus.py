"""How many CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota
(Kubernetes CPU limits). Standard library only: the sandbox parent and the local stacks use it
without importing torch."""

from __future__ import annotations

import math
import os


def cpu_quota() -> int | None:
    """CPUs granted by a cgroup v2 quota, if any."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, math.ceil(int(quota) / int(period)))


def usable_cpus() -> int:
    """The CPUs this process may run on (not the machine's cores), within its cgroup quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    quota = cpu_quota()
    return min(cpus, quota) if quota is not None else cpus
