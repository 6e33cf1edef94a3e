import os
import subprocess
import sys

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


ALIGNMENT_PROBE = """
import torch
{imports}
print(max(torch.empty(n).data_ptr() % 4096 for n in (50 << 20, 257 << 20)))
"""


def page_offset(imports: str, **env) -> int:
    """The largest offset from a 4 KiB page of two large CPU tensors (beyond glibc's mmap threshold)
    allocated in a fresh process. PyTorch's allocator starts them on a page, and madvises them
    MADV_HUGEPAGE, exactly when THP_MEM_ALLOC_ENABLE is on; else they follow glibc's chunk header."""
    environ = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"} | env
    code = ALIGNMENT_PROBE.format(imports=imports)
    out = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, check=True)
    return int(out.stdout)


def test_importing_rlhf_backs_large_tensors_with_huge_pages():
    assert page_offset("") != 0
    assert page_offset("import rlhf") == 0
    assert page_offset("import rlhf", THP_MEM_ALLOC_ENABLE="0") != 0  # the user's choice is kept
