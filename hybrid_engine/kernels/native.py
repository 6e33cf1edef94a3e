"""Plain-torch implementations in the inputs' own dtype: the CPU path of the ops that have no C++
kernel, and copy_blocks on every device.

Unlike `reference` (float32 compute, the test oracle) these never upcast: a bf16 GEMM runs about
4x faster than fp32 on our CPUs (design.md section 4), and the norms' torch kernels already
accumulate in float32 internally.

Why no C++ kernels for these (measured 2026-11-26, bf16, OPT-1.3b decode shapes at batch 16,
2 shared vCPUs, OMP_WAIT_POLICY=PASSIVE): add_layer_norm [16, 2048] 26 us, add_rms_norm 41 us,
silu_and_mul [16, 11264] 69 us, against 2.2 ms for one [16, 2048] x [8192, 2048] linear_act
(the fp32 reference takes 43 ms for it). A fused norm could save at most ~15 us per call: under 1%
of a decode step, which the GEMMs dominate.
"""
import torch
import torch.nn.functional as F

from hybrid_engine.kernels.reference import ACTIVATIONS


def write_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slots: torch.Tensor) -> None:
    keep = slots >= 0
    slots = slots[keep]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, key[keep].to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, value[keep].to(v_cache.dtype))


def copy_blocks(k_cache: torch.Tensor, v_cache: torch.Tensor, copies: torch.Tensor) -> None:
    """One gather and one scatter per cache: copies are rare (first divergent write of a forked
    sequence) and pure memory traffic, which torch's index kernels already move at bandwidth."""
    src, dst = copies[:, 0], copies[:, 1]
    k_cache.index_copy_(0, dst, k_cache.index_select(0, src))
    v_cache.index_copy_(0, dst, v_cache.index_select(0, src))


def linear_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    return ACTIVATIONS[activation](F.linear(x, weight, bias))


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    new_residual = x if residual is None else x + residual
    return F.layer_norm(new_residual, new_residual.shape[-1:], weight, bias, eps), new_residual


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    new_residual = x if residual is None else x + residual
    return F.rms_norm(new_residual, new_residual.shape[-1:], weight, eps), new_residual
