"""Fused inference ops: one public function per op, shapes and names as in `reference`.

Each function validates its inputs (a ValueError naming the argument; no bad index ever reaches
a kernel), then dispatches by the device of the inputs:

- CUDA tensors: Triton kernels (`hybrid_engine.kernels.triton`, imported on first use).
- CPU tensors: the C++ attention and write_kv kernels in `torch.ops.hybrid_engine` when the
  extension has them, the float32 reference for attention otherwise; the other ops run plain
  torch in the inputs' own dtype (`native`; C++ norm and silu kernels exist but lose inside a
  model, see `_CPP_OPS`). CPU dtypes: float32 and bfloat16
  (float16 matrix work on the CPU is about 1000x slower, so it is rejected).

`use_backend(name)` forces a path inside a `with` block (per thread/task, via a ContextVar):
"triton" (also on CPU tensors: that is how tests run the Triton interpreter), "cpp" (CPU ops
with a C++ kernel; RuntimeError for the others), "torch" (`native`; `reference` for attention),
"reference", or "auto" (the default described above):

    with kernels.use_backend("triton"):   # TRITON_INTERPRET=1 must be set before triton loads
        out = kernels.decode_attention(q, k_cache, v_cache, block_tables, context_lens)

Inputs may be strided views (e.g. q/k/v split from one fused projection): each backend copies
only what it cannot index (the C++ kernels take contiguous tensors, the Triton kernels need a
unit stride on the last dimension). The caches are written in place and must be contiguous.
"""
import contextlib
import contextvars
import functools
import importlib
import math
import types
from collections.abc import Iterator

import torch

from hybrid_engine import _C
from hybrid_engine.kernels import native, reference
from hybrid_engine.kernels import validate as check

BACKENDS = ("auto", "triton", "cpp", "torch", "reference")
# Public op -> its C++ kernel in torch.ops.hybrid_engine. "auto" takes only the attention kernels:
# the fused norm and silu_and_mul kernels win alone (csrc/cpu/ops.h) but not in a model. OPT-125m,
# batch 16, prompt 256 (2026-11-26): C++ norms made prefill 4.8 s vs 2.9 s (fp32) and 2.8 s vs
# 0.8 s (bf16), decode 76-81 vs 70 ms/step; C++ silu_and_mul left a LLaMA decode step unchanged.
# They stay reachable through use_backend("cpp").
_CPP_OPS = {"decode_attention": "decode_attention", "prefill_attention": "prefill_attention",
            "add_layer_norm": "add_norm", "add_rms_norm": "add_norm", "silu_and_mul": "silu_and_mul",
            "write_kv": "write_kv"}
_CPP_BY_DEFAULT = ("decode_attention", "prefill_attention", "write_kv")
# Norms of decode-sized inputs do go to C++: it keeps a few rows on one thread, where torch's
# layer_norm wakes the second one (on 2 vCPUs, [16, 768] bf16: 48 us in torch, 9 us in C++; a
# step of OPT-1.3b has 49 norms). Prefill-sized inputs stay in torch, as measured above.
_CPP_NORM_MAX_ELEMENTS = 1 << 16
_backend_override = contextvars.ContextVar("hybrid_engine_kernels_backend", default="auto")
# How long the C++ kernels' worker threads wait for the next kernel, spinning, inside spinning_workers().
WORKER_SPIN_MICROSECONDS = 200

__all__ = [
    "BACKENDS", "use_backend", "current_backend", "reference", "write_kv", "copy_blocks", "prefill_attention", "decode_attention",
    "linear_act", "silu_and_mul", "add_layer_norm", "add_rms_norm", "spinning_workers",
]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside the block on one backend (see the module docstring)."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    token = _backend_override.set(name)
    try:
        yield
    finally:
        _backend_override.reset(token)


@contextlib.contextmanager
def spinning_workers(microseconds: int | None = None) -> Iterator[None]:
    """Inside the block, the C++ kernels' worker threads spin up to `microseconds` (default
    WORKER_SPIN_MICROSECONDS) for their next kernel before they sleep, instead of sleeping at once:
    for a decode step, whose kernels follow each other within tens of microseconds while waking a
    sleeping thread takes 35-45 (csrc/cpu/thread_pool.h)."""
    previous = _C.cpu_spin_microseconds()
    _C.set_cpu_spin_microseconds(WORKER_SPIN_MICROSECONDS if microseconds is None else microseconds)
    try:
        yield
    finally:
        _C.set_cpu_spin_microseconds(previous)


def current_backend() -> str:
    """The backend forced by the innermost use_backend block ("auto" outside any)."""
    return _backend_override.get()


@functools.cache
def _has_cpp(op: str) -> bool:
    return hasattr(torch.ops.hybrid_engine, op)


def _backend(op: str, device: torch.device) -> str:
    forced = _backend_override.get()
    has_cpp = op in _CPP_OPS and _has_cpp(_CPP_OPS[op])
    if forced == "auto":
        return "triton" if device.type == "cuda" else "cpp" if has_cpp and op in _CPP_BY_DEFAULT else "torch"
    if forced == "cpp" and not (has_cpp and device.type == "cpu"):
        raise RuntimeError(f"{op} has no C++ kernel for {device.type} tensors in this build of hybrid_engine._C")
    return forced


def _float_dtypes(device: torch.device, backend: str) -> tuple[torch.dtype, ...]:
    native_cpu = device.type == "cpu" and backend in ("cpp", "torch")
    return check.CPU_DTYPES if native_cpu else check.GPU_DTYPES


def _triton(module: str) -> types.ModuleType:
    return importlib.import_module(f"hybrid_engine.kernels.triton.{module}")


def _route(op: str, *named: tuple[str, torch.Tensor | None]) -> tuple[str, tuple[torch.dtype, ...]]:
    """Backend and allowed float dtypes for the op's (name, tensor) arguments."""
    device = check.check_devices(*named)
    backend = _backend(op, device)
    return backend, _float_dtypes(device, backend)


def write_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slots: torch.Tensor, *, check_indices: bool = True) -> None:
    """Write key/value [T, KVH, D] into the paged caches at slots int64 [T]; slot -1 is skipped.
    check_indices=False skips the slot range check for a caller that made it already (a model,
    once per forward for all its layers)."""
    backend, dtypes = _route("write_kv", ("key", key), ("value", value), ("k_cache", k_cache),
                             ("v_cache", v_cache), ("slots", slots))
    check.check_cache_pair(k_cache, v_cache, dtypes)
    check.check_float("key", key, 3, dtypes)
    check.check_same("value", value, "key", key)
    if key.shape[1:] != k_cache.shape[2:]:
        raise ValueError(f"key {tuple(key.shape)} does not match the [KVH, D] of k_cache {tuple(k_cache.shape)}")
    check.check_slots(slots, key.shape[0], k_cache.shape[0] * k_cache.shape[1], values=check_indices)
    if key.shape[0] == 0:
        return
    if backend == "triton":
        _triton("write_kv").write_kv(key, value, k_cache, v_cache, slots)
    elif backend == "cpp":
        torch.ops.hybrid_engine.write_kv(key.to(k_cache.dtype), value.to(v_cache.dtype), k_cache, v_cache,
                                         slots.contiguous())
    else:
        (reference if backend == "reference" else native).write_kv(key, value, k_cache, v_cache, slots)


def copy_blocks(k_cache: torch.Tensor, v_cache: torch.Tensor, copies: torch.Tensor) -> None:
    """Copy whole cache blocks, copies int64 [k, 2] of (src_block, dst_block).

    No Triton kernel: torch's gather/scatter already copies at memory bandwidth and this runs only
    at copy-on-write, so every backend but "reference" uses `native.copy_blocks`.
    """
    backend, dtypes = _route("copy_blocks", ("k_cache", k_cache), ("v_cache", v_cache), ("copies", copies))
    check.check_cache_pair(k_cache, v_cache, dtypes)
    check.check_copies(copies, k_cache.shape[0])
    if copies.shape[0]:
        (reference if backend == "reference" else native).copy_blocks(k_cache, v_cache, copies.long())


def _check_qkv(q: torch.Tensor, k_name: str, k: torch.Tensor, v_name: str, v: torch.Tensor,
               dtypes: tuple[torch.dtype, ...], k_ndim: int) -> None:
    check.check_float("q", q, 3, dtypes)
    check.check_float(k_name, k, k_ndim, dtypes)
    check.check_same(k_name, k, "q", q, slice(-1, None))
    check.check_same(v_name, v, k_name, k)
    check.check_heads(q.shape[1], k.shape[-2])


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, *,
                      causal: bool = True, scale: float | None = None, window: int | None = None) -> torch.Tensor:
    """Attention within each sequence of a packed batch: q [T, H, D], k/v [T, KVH, D], cu_seqlens int32 [B+1].
    window (causal only): sliding-window attention, each query sees itself and the window - 1 keys before it."""
    backend, dtypes = _route("prefill_attention", ("q", q), ("k", k), ("v", v), ("cu_seqlens", cu_seqlens))
    _check_qkv(q, "k", k, "v", v, dtypes, 3)
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"k has {k.shape[0]} tokens but q has {q.shape[0]}")
    check.check_cu_seqlens(cu_seqlens, q.shape[0])
    check.check_window(window, bool(causal))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if backend == "triton":
        return _triton("prefill_attention").prefill_attention(q, k, v, cu_seqlens, bool(causal), scale, window)
    if backend == "cpp":
        return torch.ops.hybrid_engine.prefill_attention(q, k, v, cu_seqlens.contiguous(), bool(causal), scale,
                                                         window or 0)
    return reference.prefill_attention(q, k, v, cu_seqlens, causal=bool(causal), scale=scale, window=window)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, *, scale: float | None = None, window: int | None = None,
                     check_indices: bool = True) -> torch.Tensor:
    """One query per sequence over its paged cache: q [B, H, D], block_tables int32 [B, W] (-1 padded),
    context_lens int32 [B] (>= 1). window: only the last `window` cached tokens are seen. Returns [B, H, D].
    check_indices=False skips the range checks of block_tables and context_lens (see write_kv)."""
    backend, dtypes = _route("decode_attention", ("q", q), ("k_cache", k_cache), ("v_cache", v_cache),
                             ("block_tables", block_tables), ("context_lens", context_lens))
    check.check_cache_pair(k_cache, v_cache, dtypes)
    _check_qkv(q, "k_cache", k_cache, "v_cache", v_cache, dtypes, 4)
    num_blocks, block_size = k_cache.shape[:2]
    check.check_block_tables(block_tables, context_lens, q.shape[0], num_blocks, block_size, values=check_indices)
    check.check_window(window, causal=True)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if backend == "triton":
        return _triton("decode_attention").decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale,
                                                            window)
    if backend == "cpp":
        return torch.ops.hybrid_engine.decode_attention(*_contiguous(q, k_cache, v_cache, block_tables, context_lens),
                                                        scale, window or 0)
    return reference.decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale=scale, window=window)


def linear_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    """activation(x @ weight.T + bias): x [..., K], weight [N, K], bias [N] or None."""
    backend, dtypes = _route("linear_act", ("x", x), ("weight", weight), ("bias", bias))
    if activation not in reference.ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(reference.ACTIVATIONS)}, got {activation!r}")
    check.check_float("x", x, None, dtypes)
    check.check_float("weight", weight, 2, dtypes)
    check.check_same("weight", weight, "x", x, slice(-1, None))
    _check_vector("bias", bias, weight.shape[0], x)
    if backend == "triton":
        return _triton("linear_act").linear_act(x, weight, bias, activation)
    return (reference if backend == "reference" else native).linear_act(x, weight, bias, activation)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[..., :I]) * x[..., I:] for x [..., 2I]."""
    backend, dtypes = _route("silu_and_mul", ("x", x))
    check.check_float("x", x, None, dtypes)
    if x.shape[-1] % 2:
        raise ValueError(f"x must have an even last dimension [..., 2I], got shape {tuple(x.shape)}")
    if backend == "triton":
        return _triton("silu_and_mul").silu_and_mul(x)
    if backend == "cpp":
        return torch.ops.hybrid_engine.silu_and_mul(x.contiguous())
    return (reference if backend == "reference" else native).silu_and_mul(x)


def _contiguous(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.contiguous() for t in tensors]


def _check_vector(name: str, t: torch.Tensor | None, size: int, like: torch.Tensor) -> None:
    """An optional per-feature parameter: [size] in the dtype of like."""
    if t is not None:
        check.check_float(name, t, 1, (like.dtype,))
        if t.shape[0] != size:
            raise ValueError(f"{name} has {t.shape[0]} entries, expected {size}")


def _check_norm(op: str, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                bias: torch.Tensor | None) -> str:
    backend, dtypes = _route(op, ("x", x), ("residual", residual), ("weight", weight), ("bias", bias))
    if backend == "torch" and current_backend() == "auto" and x.numel() <= _CPP_NORM_MAX_ELEMENTS and _has_cpp("add_norm"):
        backend = "cpp"
    check.check_float("x", x, None, dtypes)
    if residual is not None:
        check.check_same("residual", residual, "x", x)
    _check_vector("weight", weight, x.shape[-1], x)
    _check_vector("bias", bias, x.shape[-1], x)
    return backend


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(layer_norm(x + residual), x + residual); residual may be None (then new_residual is x)."""
    backend = _check_norm("add_layer_norm", x, residual, weight, bias)
    return _add_norm(backend, x, residual, weight, bias, eps, rms=False)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual); residual may be None (then new_residual is x)."""
    backend = _check_norm("add_rms_norm", x, residual, weight, None)
    return _add_norm(backend, x, residual, weight, None, eps, rms=True)


def _add_norm(backend: str, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
              bias: torch.Tensor | None, eps: float, rms: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        return _triton("add_norm").add_norm(x, residual, weight, bias, float(eps), rms)
    if backend == "cpp":
        x, weight = _contiguous(x, weight)
        residual, bias = (None if t is None else t.contiguous() for t in (residual, bias))
        out, new_residual = torch.ops.hybrid_engine.add_norm(x, residual, weight, bias, float(eps), rms)
        return out, x if residual is None else new_residual
    impl = reference if backend == "reference" else native
    if rms:
        return impl.add_rms_norm(x, residual, weight, eps)
    return impl.add_layer_norm(x, residual, weight, bias, eps)
