"""Benchmarks that print the figures of the README's Results section (issue 7)."""


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one), for the benches' machine line."""
    import platform
    from pathlib import Path

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
