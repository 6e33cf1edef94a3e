"""What every benchmark needs: timing, machine limits measured in the same run, tables, JSON."""
import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def environment() -> dict:
    return {
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
    }


def print_environment() -> dict:
    env = environment()
    print("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    return env


def median_seconds(fn: Callable[[], object], repeat: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_rss_bytes() -> int:
    """High-water resident set size of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def copy_bandwidth(num_bytes: int = 512 * 2**20, repeat: int = 5) -> float:
    """Bytes/s of a large copy into a preallocated buffer, counting read + write."""
    src = torch.rand(num_bytes // 4)
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), repeat)
    return 2 * num_bytes / seconds


def gemm_rate(m: int, k: int, n: int, dtype: torch.dtype, repeat: int = 5) -> float:
    """FLOP/s of an [m, k] @ [k, n] product in dtype."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    return 2 * m * k * n / median_seconds(lambda: a @ b, repeat)


def print_table(rows: list[dict], columns: list[str]) -> None:
    cells = [[f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in cells:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths)))


def write_json(path: str, payload: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2))
    print(f"wrote {path}")
