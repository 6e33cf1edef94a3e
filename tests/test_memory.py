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
