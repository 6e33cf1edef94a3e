"""The Triton kernels compile to GPU code (cubin for sm_80 and sm_90), with the exact arguments
their launchers pass, in every GPU dtype.

The interpreter runs kernels as Python and accepts code the GPU compiler rejects (and it cannot
multiply bf16 at all), so this is the only check of the real GPU path on machines without one.
Each launcher runs on CPU tensors with its kernels replaced by recorders; the recorded calls are
then compiled with triton.compile. It needs a process without TRITON_INTERPRET (under the
interpreter @triton.jit builds no compilable function), hence the subprocess.
"""
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

KERNELS = ["_write_kv_kernel", "_prefill_attention_kernel", "_decode_split_kernel", "_decode_reduce_kernel",
           "_linear_act_kernel", "_silu_and_mul_kernel", "_add_norm_kernel"]
# sm_90 lowers tl.dot to wgmma instead of mma: checked once, in the dtype most GPU users run.
ARCHS = {"float16": (80,), "bfloat16": (80, 90), "float32": (80,)}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_triton_kernels_compile_for_gpus(dtype):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, __file__, dtype], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    expected = [f"{name} sm_{arch}" for name in KERNELS for arch in ARCHS[dtype]]
    assert sorted(done.stdout.splitlines()) == sorted(expected)


class _Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kwargs)` is recorded, not run."""

    def __init__(self, fn, calls: list):
        self.fn, self.calls = fn, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.fn, args, kwargs))


def _calls(dtype: torch.dtype) -> list:
    """Run every launcher once on small CPU tensors with recorders in place of its kernels."""
    from hybrid_engine.kernels.triton import (add_norm, decode_attention, linear_act, prefill_attention,
                                              silu_and_mul, write_kv)
    calls = []
    for module, name in [(write_kv, "_write_kv_kernel"), (prefill_attention, "_prefill_attention_kernel"),
                         (decode_attention, "_decode_split_kernel"), (decode_attention, "_decode_reduce_kernel"),
                         (silu_and_mul, "_silu_and_mul_kernel"), (add_norm, "_add_norm_kernel")]:
        setattr(module, name, _Recorder(getattr(module, name), calls))
    linear_act._kernel = _Recorder(linear_act._linear_act_kernel, calls)
    linear_act._fixed = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}  # the autotuner picks on a GPU

    x = torch.randn(4, 2, 80, dtype=dtype)
    cache = torch.randn(4, 16, 2, 80, dtype=dtype)
    write_kv.write_kv(x, x, cache, cache, torch.tensor([0, -1, 5, 63]))
    q = torch.randn(4, 8, 80, dtype=dtype)
    prefill_attention.prefill_attention(q, x, x, torch.tensor([0, 1, 4], dtype=torch.int32), True, 0.1)
    tables = torch.tensor([[0, 1], [2, -1]], dtype=torch.int32)
    decode_attention.decode_attention(q[:2], cache, cache, tables, torch.tensor([20, 3], dtype=torch.int32), 0.1)
    linear_act.linear_act(q[0], torch.randn(24, 80, dtype=dtype), torch.randn(24, dtype=dtype), "gelu_tanh")
    silu_and_mul.silu_and_mul(q[0])
    add_norm.add_norm(q[0], q[1], q[0, 0], None, 1e-5, rms=True)
    return calls


def _signature(fn, args: tuple, kwargs: dict) -> tuple[dict, dict]:
    types = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32",
             torch.int64: "i64"}
    signature, constexprs = {}, {}
    for param, value in zip(fn.params, [*args, *(kwargs[name] for name in fn.arg_names[len(args):])]):
        if param.is_constexpr or value is None:
            signature[param.name], constexprs[param.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + types[value.dtype]
        else:
            signature[param.name] = "fp32" if isinstance(value, float) else "i32"
    return signature, constexprs


def _compile_all(dtype: str) -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for fn, args, kwargs in _calls(getattr(torch, dtype)):
        options = {key: kwargs.pop(key) for key in ("num_warps", "num_stages") if key in kwargs}
        signature, constexprs = _signature(fn, args, kwargs)
        for arch in ARCHS[dtype]:
            triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", arch, 32), options=options)
            print(f"{fn.__name__} sm_{arch}", flush=True)


if __name__ == "__main__":
    _compile_all(sys.argv[1])
