"""This process's memory as the kernel counts it (``/proc/self/status``), without importing torch:
the llama.cpp child processes read their peak from it too."""

from __future__ import annotations


def status_bytes(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``: the peak since exec) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in /proc/self/status")
