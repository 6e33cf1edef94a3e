"""What every benchmark needs: timing, machine limits measured in the same run, tables, JSON."""
import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from hybrid_engine.capability import device_caps
from rlhf.args import resolve_dtype


def parse_dtype(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--dtype auto becomes this CPU's dtype (printed with its reason); a dtype refused here is a usage error."""
    try:
        resolve_dtype(args, "cpu")
    except ValueError as e:
        p.error(str(e))


def environment(dtype: str | None = None) -> dict:
    """The settings and the machine a figure came from: the CPU's instruction set as torch reports it,
    its capability probe, and the dtype actually run (figures of an AVX2 and an AVX-512 machine, or of
    fp32 and bf16, are not comparable)."""
    caps = device_caps("cpu")
    return {
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_isa": caps.isa,
        **({"dtype": dtype} if dtype else {}),
        "cpu_caps": caps.as_dict(),
    }


def print_environment(dtype: str | None = None) -> dict:
    """Printed above every table and stored in every JSON."""
    env = environment(dtype)
    print("environment: " + ", ".join(f"{k}={v}" for k, v in env.items() if k != "cpu_caps"))
    print(f"capabilities: {device_caps('cpu')}")
    return env


def times_seconds(fn: Callable[[], object], repeat: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median_seconds(fn: Callable[[], object], repeat: int, warmup: int = 1) -> float:
    return statistics.median(times_seconds(fn, repeat, warmup))


def copy_bandwidth(num_bytes: int = 512 * 2**20, repeat: int = 5) -> float:
    """Bytes/s of a large copy into a preallocated buffer, counting read + write."""
    src = torch.rand(num_bytes // 4)
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), repeat)
    return 2 * num_bytes / seconds


def read_bandwidth(num_bytes: int, repeat: int = 5) -> float:
    """Bytes/s of reading num_bytes once (a float32 sum, which runs far above memory speed out of
    cache), best of repeat: other processes only ever slow a run down, so the fastest pass is the
    closest to the machine's limit. Size it like the data whose reading it bounds: a working set
    that fits in cache is read faster than one that streams from memory."""
    data = torch.rand(max(num_bytes // 4, 1024))
    return data.numel() * 4 / min(times_seconds(data.sum, repeat))


def peak_gemm_rate(dtype: torch.dtype, sizes: tuple[int, ...] = (1024, 2048), repeat: int = 5) -> float:
    """FLOP/s of large, compute-bound square products in dtype, the best of every size and repeat
    (a decode-shaped product is bound by reading its weights and runs far slower)."""
    def rate(size: int) -> float:
        a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
        return 2 * size**3 / min(times_seconds(lambda: a @ b, repeat))
    return max(rate(size) for size in sizes)


def print_table(rows: list[dict], columns: list[str]) -> None:
    """Rows as columns; a row without a column's key shows an empty cell (e.g. a side that has no such figure)."""
    cells = [[f"{row[c]:.4g}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns]
             for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in cells:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths)))


def write_json(path: str, payload: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2))
    print(f"wrote {path}")
