"""Triton kernels of hybrid_engine.kernels, one per module, each with its launcher.

Imported lazily by hybrid_engine.kernels on the first Triton call, so that importing the package
never imports triton and TRITON_INTERPRET can still be set before any @triton.jit runs.
"""
import os

import torch


def interpreting() -> bool:
    """TRITON_INTERPRET=1 runs kernels on the CPU through numpy: no autotuning there."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dot_precision(dtype) -> str:
    """float32 inputs get exact float32 products (tl.dot defaults to tf32 on GPUs, ~1e-3 error);
    16-bit inputs ignore the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"


def require_dot_dtype(name: str, dtype: torch.dtype) -> None:
    """The interpreter computes a bf16 tl.dot as garbage, silently."""
    if interpreting() and dtype == torch.bfloat16:
        raise ValueError(f"{name}: bfloat16 matrix products do not run under TRITON_INTERPRET=1; "
                         "use float32 or float16 there (bf16 is tested on the CPU path)")


def unit_stride(t: torch.Tensor | None) -> torch.Tensor | None:
    """Kernels index the last dimension with stride 1 and take the other strides as arguments, so
    views such as q/k/v split from one fused projection need no copy."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def packed_rows(t: torch.Tensor) -> torch.Tensor:
    """t with each t[i] contiguous, for kernels that read a row of t as one flat run."""
    return t if t.shape[0] == 0 or t[0].is_contiguous() else t.contiguous()
