"""This process's memory as the system sees it: hand freed heap back, read resident and peak bytes."""
import ctypes
import ctypes.util
import functools
from contextlib import contextmanager
from pathlib import Path

import torch

from hybrid_engine import _C


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None (find_library runs a subprocess: look it up once)."""
    name = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None


CACHE_HEADROOM = 0.25  # OPT-125M actor + critic steps, 2 ranks: no page faults after the first step


def cache_cpu_blocks(headroom: float = CACHE_HEADROOM) -> bool:
    """For the rest of the process, keep freed CPU tensors of 1 MiB and more and hand them out again:
    a training step then reuses the pages the last one touched instead of the kernel zeroing fresh
    ones (glibc unmaps every block above its mmap threshold at free). The process grows at most by
    `headroom` times its peak of live tensor bytes. False if another CPU allocator holds priority."""
    return _C.install_cpu_cache(headroom)


def limit_cpu_cache(max_cached_bytes: int) -> None:
    """Bound the bytes the installed cache keeps (what a memory plan for every rank of the machine left
    it); beyond them, freed blocks go back to the system."""
    _C.limit_cpu_cache(max_cached_bytes)


def reserve_free_memory(nbytes: int) -> None:
    """When the machine's available memory (MemAvailable) is below a request + nbytes, a request the cache
    cannot serve first hands every cached block back: the other processes on the machine (ranks) cannot
    take this one's cached blocks. Default: 1/16 of the machine's memory."""
    _C.reserve_free_memory(nbytes)


def cpu_cache_stats() -> dict[str, int]:
    """live_bytes, cached_bytes, peak_live_bytes, hits, misses, system_bytes, evicted_bytes,
    pressure_evictions (zeros without cache_cpu_blocks)."""
    return _C.cpu_cache_stats()


_handing_back_depth = 0


@contextmanager
def handing_back():
    """Tensors freed inside go back to the system, not to the CPU cache: for memory dropped for good.
    Nests: frees are cached again only when the outermost one ends."""
    global _handing_back_depth
    _handing_back_depth += 1
    _C.hand_back_frees(True)
    try:
        yield
    finally:
        _handing_back_depth -= 1
        _C.hand_back_frees(_handing_back_depth > 0)


def return_freed_memory() -> None:
    """Hand freed memory back to the system so training can use it: torch's CUDA cache, and on
    glibc the heap, which otherwise keeps large freed blocks (its mmap threshold grows with them).
    The CPU cache keeps its blocks: they are the next step's; `_C.empty_cpu_cache()` frees them."""
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
    """Start a new peak-memory window: freed heap and the CPU cache handed back (unless hand_back=False:
    a measurement that must not change what the next allocations cost), VmHWM reset to the resident
    bytes (Linux >= 4.0), which are returned."""
    if hand_back:
        _C.empty_cpu_cache()
        return_freed_memory()
    Path("/proc/self/clear_refs").write_text("5")
    return status_bytes("VmRSS")
