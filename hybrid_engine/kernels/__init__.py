"""Fused inference ops. Each public function validates its inputs and dispatches by device:
Triton for CUDA tensors, C++ (torch.ops.hybrid_engine) for CPU tensors where it wins, and the
plain-torch reference otherwise.

PROVISIONAL: every op currently runs the reference; validation and the Triton/C++ paths come
with the kernels issue.
"""
from hybrid_engine.kernels import reference
from hybrid_engine.kernels.reference import (
    add_layer_norm,
    add_rms_norm,
    copy_blocks,
    decode_attention,
    linear_act,
    prefill_attention,
    silu_and_mul,
    write_kv,
)

__all__ = [
    "reference", "write_kv", "copy_blocks", "prefill_attention", "decode_attention",
    "linear_act", "silu_and_mul", "add_layer_norm", "add_rms_norm",
]
