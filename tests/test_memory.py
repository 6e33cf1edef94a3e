import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hybrid_engine.memory import reset_peak, status_bytes


def test_reset_peak_starts_a_new_high_water_mark():
    before = reset_peak()
    big = torch.rand(64 * 2**20)  # 256 MiB, touched
    touched_peak = status_bytes("VmHWM")
    assert touched_peak - before >= 200 * 2**20
    del big
    now = reset_peak()
    assert status_bytes("VmHWM") < touched_peak - 200 * 2**20
    assert abs(now - status_bytes()) < 64 * 2**20


def test_status_bytes_names_a_missing_field():
    with pytest.raises(RuntimeError, match="no VmNothing in /proc/self/status"):
        status_bytes("VmNothing")


def fresh_process(body: str, **env):
    """Runs body (which sets `out`) in a fresh process and returns out: PyTorch reads its huge-page setting
    once, and hybrid_engine's CPU cache stays installed for the rest of a process once it is. The
    process's environment has neither allocator setting (THP_MEM_ALLOC_ENABLE, HE_CPU_CACHE) unless env
    gives it."""
    environ = {k: v for k, v in os.environ.items() if k not in ("THP_MEM_ALLOC_ENABLE", "HE_CPU_CACHE")} | env
    code = f"import json, torch\n{body}\nprint(json.dumps(out))"
    result = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def page_offset(imports: str, **env) -> int:
    """The largest offset from a 4 KiB page of two large CPU tensors (beyond glibc's mmap threshold)
    allocated in a fresh process. PyTorch's allocator starts them on a page, and madvises them
    MADV_HUGEPAGE, exactly when THP_MEM_ALLOC_ENABLE is on; else they follow glibc's chunk header."""
    return fresh_process(f"{imports}\nout = max(torch.empty(n).data_ptr() % 4096 for n in (50 << 20, 257 << 20))",
                         **env)


def test_importing_rlhf_backs_large_tensors_with_huge_pages():
    assert page_offset("") != 0
    assert page_offset("import rlhf") == 0
    assert page_offset("import rlhf", THP_MEM_ALLOC_ENABLE="0") != 0  # the user's choice is kept


CACHE_IMPORTS = """import resource
from hybrid_engine.memory import (cache_cpu_blocks, cpu_cache_stats, handing_back, limit_cpu_cache, reserve_free_memory,
                                  reset_peak, status_bytes)
"""


def cache_probe(body: str, **env):
    """body in a fresh process with the CPU cache's functions imported, huge pages off unless env says."""
    return fresh_process(CACHE_IMPORTS + body, **({"THP_MEM_ALLOC_ENABLE": "0"} | env))


def test_cpu_cache_hands_a_freed_block_out_again_for_the_same_size_within_an_eighth():
    out = cache_probe("""
assert cache_cpu_blocks(0.25)
x = torch.empty(3_000_001)
block = x.data_ptr()
values = torch.empty(3_000_001)
del x
y = torch.empty(2_800_003)  # 7% smaller: the same block
z = torch.empty(2_800_003)  # a second one while y is live: a new block
same = y.data_ptr() == block
del y
w = torch.empty(2_000_000)  # a third smaller than the cached block: not served by it
live = [values, z, w, torch.empty(10)]  # no two share bytes: each keeps what was written last
for i, t in enumerate(live):
    t.fill_(i)
out = dict(same=same, other=w.data_ptr() != block, stats=cpu_cache_stats(),
           intact=[bool((t == i).all()) for i, t in enumerate(live)])
""")
    assert out["same"] and out["other"] and all(out["intact"]), out
    assert out["stats"]["hits"] == 1 and out["stats"]["misses"] == 4, out  # x, values, z, w


def test_cpu_cache_never_holds_more_than_its_headroom_over_the_peak():
    """Random sizes from 1 to 24 MiB allocated and freed in random order; after every step, live +
    cached <= (1 + headroom) x peak live bytes, and the bound did evict (not vacuous)."""
    for headroom in (0.0, 0.25):
        out = cache_probe(f"""
assert cache_cpu_blocks({headroom})
g = torch.Generator().manual_seed(1)
live, worst = [], 0.0
for step in range(400):
    if live and (len(live) > 12 or torch.rand(1, generator=g).item() < 0.45):
        live.pop(int(torch.randint(len(live), (1,), generator=g)))
    else:
        n = int(torch.randint(1 << 18, 6 << 20, (1,), generator=g))
        live.append(torch.empty(n).fill_(step))
    s = cpu_cache_stats()
    worst = max(worst, (s["live_bytes"] + s["cached_bytes"]) / s["peak_live_bytes"])
out = dict(worst=worst, stats=cpu_cache_stats())
""")
        assert out["worst"] <= 1 + headroom + 1e-9, (headroom, out)
        assert out["stats"]["evicted_bytes"] > 0 and out["stats"]["hits"] > 0, out


def test_cpu_cache_keeps_no_more_than_its_limit_in_bytes():
    """A limit set while blocks are cached trims them at once (largest first); later frees keep the cache
    under it, whatever the headroom would allow; limit 0 caches nothing."""
    out = cache_probe("""
mib = 1 << 20
assert cache_cpu_blocks(10.0)
blocks = [torch.empty(n * mib // 4).fill_(n) for n in (3, 5, 7, 9)]
del blocks
before = cpu_cache_stats()["cached_bytes"]
limit_cpu_cache(13 * mib)
after_limit = cpu_cache_stats()["cached_bytes"]
worst = 0
for n in (2, 6, 3, 8, 4, 7, 5):
    t = torch.empty(n * mib // 4).fill_(n)
    del t
    worst = max(worst, cpu_cache_stats()["cached_bytes"])
limit_cpu_cache(0)
x = torch.empty(mib).fill_(1)
del x
out = dict(before=before, after_limit=after_limit, worst=worst, zero=cpu_cache_stats()["cached_bytes"], mib=mib)
""")
    mib = out["mib"]
    assert out["before"] == 24 * mib and out["after_limit"] == 8 * mib, out  # the 9 and 7 MiB blocks go
    assert 0 < out["worst"] <= 13 * mib and out["zero"] == 0, out
    uninstalled = cache_probe("try:\n    limit_cpu_cache(1)\nexcept RuntimeError as e:\n    out = str(e)")
    assert "the CPU cache is not installed" in uninstalled


def test_cpu_cache_hands_every_block_back_when_the_machine_runs_short():
    """A request from the system while the machine's available memory is below it + the reserve first hands
    every cached block back (and counts it); with the machine's memory to spare, the cache keeps them."""
    out = cache_probe("""
mib = 1 << 20
assert cache_cpu_blocks(10.0)
reserve_free_memory(0)
a = torch.empty(mib // 4).fill_(1)
del a
b = torch.empty(4 * mib // 4).fill_(2)  # from the system; 4 MiB are available
kept = cpu_cache_stats()
reserve_free_memory(1 << 62)  # more than any machine has
c = torch.empty(16 * mib // 4).fill_(3)
short = cpu_cache_stats()
out = dict(kept=kept, short=short, mib=mib)
""")
    mib = out["mib"]
    assert out["kept"]["cached_bytes"] == mib and out["kept"]["pressure_evictions"] == 0, out
    assert out["short"]["cached_bytes"] == 0 and out["short"]["pressure_evictions"] == 1, out


def test_cpu_cache_refuses_a_negative_limit_or_reserve():
    from hybrid_engine.memory import limit_cpu_cache, reserve_free_memory

    with pytest.raises(RuntimeError, match="limit is a number of bytes >= 0; got -1"):
        limit_cpu_cache(-1)
    with pytest.raises(RuntimeError, match="leaves free is a number of bytes >= 0; got -2"):
        reserve_free_memory(-2)


def test_cpu_cache_makes_repeated_large_allocations_fault_free():
    """64 MiB written 10 times: the kernel faults in (and zeroes) every page each time without the cache
    (4 KiB pages: >= 80k faults), at most 1k faults with it."""
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists() and "[always]" in thp.read_text():
        pytest.skip("this kernel backs every large mapping with huge pages: a fault per 2 MiB, not per 4 KiB")
    loop = """
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.empty(16 << 20).fill_(1.0)
start = faults()
for i in range(10):
    torch.empty(16 << 20).fill_(float(i))
out = faults() - start
"""
    uncached = cache_probe(loop)
    cached = cache_probe("assert cache_cpu_blocks()\n" + loop)
    assert uncached >= 80_000 and cached <= 1_000, (uncached, cached)


def test_handing_back_and_reset_peak_return_cached_memory_to_the_system():
    out = cache_probe("""
assert cache_cpu_blocks()
def touched():
    return torch.rand(64 << 20)  # 256 MiB
x = touched()
rss = status_bytes()
del x
kept = rss - status_bytes()  # freed into the cache: still resident
y = touched()
rss = status_bytes()
with handing_back():
    del y
handed = rss - status_bytes()
z = touched()
del z
rss = status_bytes()
reset_peak()
out = dict(kept=kept, handed=handed, reset=rss - status_bytes(), cached=cpu_cache_stats()["cached_bytes"])
""")
    mib = 2**20
    assert out["kept"] < 16 * mib and out["handed"] > 200 * mib and out["reset"] > 200 * mib, out
    assert out["cached"] == 0


def test_handing_back_nests():
    """A free after an inner handing_back() ended, still inside the outer one, goes to the system; after the
    outer one ends, frees are cached again."""
    out = cache_probe("""
assert cache_cpu_blocks()
with handing_back():
    with handing_back():
        pass
    x = torch.rand(4 << 20)
    del x
    inside = cpu_cache_stats()["cached_bytes"]
y = torch.rand(4 << 20)
del y
out = dict(inside=inside, after=cpu_cache_stats()["cached_bytes"])
""")
    assert out == {"inside": 0, "after": 16 << 20}, out


def test_importing_rlhf_installs_the_cpu_cache_unless_told_not_to():
    body = "import rlhf\nfrom hybrid_engine import _C\nout = _C.cpu_cache_installed()"
    assert cache_probe(body) is True
    assert cache_probe(body, HE_CPU_CACHE="0") is False


def test_cpu_cache_refuses_a_negative_headroom_before_installing_anything():
    from hybrid_engine.memory import cache_cpu_blocks

    with pytest.raises(RuntimeError, match="headroom is a fraction of the peak live bytes, >= 0; got -0.5"):
        cache_cpu_blocks(-0.5)
