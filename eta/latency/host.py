"""The machine this process runs on, as latency tables name it."""
from __future__ import annotations

import platform
from pathlib import Path


def cpu_name() -> str:
    """The host CPU's model name (the device name of CPU tables)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
