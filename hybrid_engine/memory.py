"""This process's memory as the system sees it: hand freed heap back, read resident and peak bytes."""
import ctypes
import ctypes.util
import functools
from pathlib import Path

import torch


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None (find_library runs a subprocess: look it up once)."""
    name = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None


def return_freed_memory() -> None:
    """Hand freed memory back to the system so training can use it: torch's CUDA cache, and on
    glibc the heap, which otherwise keeps large freed blocks (its mmap threshold grows with them)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def status_bytes(field: str = "VmRSS") -> int:
    """A memory field of /proc/self/status in bytes: VmRSS (resident now) or VmHWM (peak resident)."""
    status = Path("/proc/self/status")
    lines = status.read_text().splitlines() if status.exists() else ()
    for line in lines:
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status: memory is measured on Linux only")


def reset_peak(hand_back: bool = True) -> int:
    """Start a new peak-memory window: freed heap handed back (unless hand_back=False: a measurement
    that must not change what the next allocations cost), VmHWM reset to the resident bytes (Linux >=
    4.0), which are returned."""
    if hand_back:
        return_freed_memory()
    Path("/proc/self/clear_refs").write_text("5")
    return status_bytes("VmRSS")
