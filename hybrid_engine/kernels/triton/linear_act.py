"""GEMM with the bias and the activation fused into the epilogue.

    out[m, n] = act(sum_k x[m, k] weight[n, k] + bias[n])

act is one of none, relu, gelu (erf), gelu_tanh, silu. The tanh of gelu_tanh is rewritten with
a sigmoid (the interpreter has no tanh):
    0.5 x (1 + tanh(y)) = x sigmoid(2y),   y = sqrt(2/pi) (x + 0.044715 x^3).

Program (pid_m, pid_n) owns a BLOCK_M x BLOCK_N tile of out and walks K BLOCK_K at a time with a
float32 accumulator; weight is read in its [N, K] layout (nn.Linear), no transpose copy.
Autotuned on GPUs; one fixed config when interpreting.
"""
import torch
import triton
import triton.language as tl

from hybrid_engine.kernels.triton import dot_precision, interpreting, require_dot_dtype, unit_stride

TWO_SQRT_2_OVER_PI = tl.constexpr(1.5957691216057308)
INV_SQRT_2 = tl.constexpr(0.7071067811865476)


@triton.jit
def _activation(x, ACTIVATION: tl.constexpr):
    if ACTIVATION == "relu":
        x = tl.maximum(x, 0.0)
    elif ACTIVATION == "gelu":
        x = 0.5 * x * (1.0 + tl.math.erf(x * INV_SQRT_2))
    elif ACTIVATION == "gelu_tanh":
        x = x * tl.sigmoid((x + 0.044715 * x * x * x) * TWO_SQRT_2_OVER_PI)
    elif ACTIVATION == "silu":
        x = x * tl.sigmoid(x)
    return x


@triton.jit
def _linear_act_kernel(x_ptr, weight_ptr, bias_ptr, out_ptr, M, N, K, x_stride_m, weight_stride_n, out_stride_m,
                       HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * x_stride_m + ks[None, :]
    w_ptrs = weight_ptr + cols.to(tl.int64)[None, :] * weight_stride_n + ks[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k_start in range(0, K, BLOCK_K):
        k_mask = ks + k_start < K
        x = tl.load(x_ptrs, mask=(rows < M)[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & (cols < N)[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    out = _activation(acc, ACTIVATION)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * out_stride_m + cols[None, :], out.to(out_ptr.dtype.element_ty),
             mask=(rows < M)[:, None] & (cols < N)[None, :])


def _configs() -> list[triton.Config]:
    tiles = [(128, 128, 32, 4), (128, 64, 32, 4), (64, 128, 32, 4), (64, 64, 64, 4), (16, 128, 64, 4), (16, 64, 128, 4)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=3)
            for m, n, k, w in tiles]


if interpreting():
    _kernel, _fixed = _linear_act_kernel, {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64}
else:
    _kernel, _fixed = triton.autotune(_configs(), key=["M", "N", "K"])(_linear_act_kernel), {}


def linear_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    """x [..., K], weight [N, K], bias [N] or None."""
    require_dot_dtype("x", x.dtype)
    x2, weight, bias = unit_stride(x.reshape(-1, x.shape[-1])), unit_stride(weight), unit_stride(bias)
    M, K = x2.shape
    N = weight.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))  # noqa: E731
    _kernel[grid](x2, weight, bias, out, M, N, K, x2.stride(0), weight.stride(0), out.stride(0),
                  HAS_BIAS=bias is not None, ACTIVATION=activation, PRECISION=dot_precision(x.dtype), **_fixed)
    return out.view(*x.shape[:-1], N)
