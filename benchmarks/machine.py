"""The machine description and command line that every benchmark record carries."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path


def machine_description() -> str:
    """Return CPU model, cores, memory, platform and the current load average."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = os.getloadavg()[0]
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB, {platform.platform()}, "
        f"load average {load:.1f} at start"
    )


def command_line() -> str:
    """Return the running script's command line, with the script path as given."""
    return " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
