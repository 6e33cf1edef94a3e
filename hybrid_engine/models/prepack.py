"""Prepacked CPU weights for the linears of the inference graphs.

On the CPU, F.linear hands the weight to the BLAS, which repacks it into its blocked layout on
every call; at decode batch sizes that repacking costs about as much as the product itself. So each
weight is packed once and reused:
- into column panels for our kernel (torch.ops.hybrid_engine.packed_linear, csrc/cpu/linear.cpp):
  fp32 with AVX2+FMA, bf16 with AVX-512 BF16 but no AMX. Over all the linears of a model at batch 16
  (2-vCPU EPYC, weights from memory) it ran 1.15-1.27x faster than oneDNN's packed kernels, 1.4x at
  batch 1 and level with them at 64 rows; at prefill sizes (4096 rows) within 0.8-1.05x of oneDNN and
  faster than torch's fp32 F.linear.
- else into oneDNN's blocked layout (bf16 on AMX, where oneDNN's tile kernels win; CPUs without our
  kernel): the 48 linears of OPT-125m at batch 16 went from 213 to 106 ms (fp32) and 24 to 20 ms
  (bf16) on the 2-vCPU machines under load, and bf16 prefill GEMMs ran about 2x faster.
The packed copy doubles the memory of the weights.

The canonical weights stay in `model.state_dict()` (what from_hf and the resharder fill in place);
a packed copy is rebuilt whenever its weight is replaced or its version counter moves (any in-place
torch write). Writes that bypass torch (C++ through data_ptr, e.g. a reshard plan's unpack) do not
move the counter: after those, call `model.prepack_weights()` again (or pack only after filling, as
HybridEngine.eval does by building a fresh Generator).
"""
import torch

from hybrid_engine import _C, kernels
from hybrid_engine.capability import device_caps
from hybrid_engine.kernels.reference import ACTIVATIONS

# hybrid_engine.kernels activation -> (oneDNN post-op, its algorithm)
ONEDNN_ACTIVATIONS = {"none": ("none", ""), "relu": ("relu", ""), "gelu": ("gelu", "none"),
                      "gelu_tanh": ("gelu", "tanh"), "silu": ("swish", "")}
DECODE_ROWS_HINT = 16  # the batch size oneDNN chooses the blocked layout for (any batch works)
# Measured with one thread, [M, 768] x [768, 3072]: oneDNN packed/F.linear time fp32 0.64 at M=16, 1.1
# at M=256 and 4096; bf16 0.7 at M=16, 0.2 at M=256, 0.5 at M=4096. So fp32 prefills skip oneDNN's packing.
FP32_MAX_ROWS = 128
# oneDNN keeps a primitive for every row count it has multiplied (0.7-3.5 MB each, bf16, 250-8000 rows,
# measured here), so prefills and scorers whose token counts vary grew by one per new count: 2.3 MB per
# step-3 iteration of the example. Row counts above EXACT_ROWS are rounded up to 8 steps per doubling.
EXACT_ROWS = 128


def panels_used(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether weights of this dtype are packed for our panel kernel here (else oneDNN's layout)."""
    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return False
    bf16 = dtype == torch.bfloat16
    return _C.packed_linear_supported(bf16) and not (bf16 and "amx_tile" in device_caps(device).features)


def available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether weights of this dtype can be packed here (bf16 needs hardware many CPUs lack)."""
    return device.type == "cpu" and (panels_used(device, dtype) or device_caps(device).can_prepack(dtype))


def always_used(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether every product of this dtype goes through the packed weights (oneDNN's fp32 prefills
    skip them)."""
    return available(device, dtype) and (dtype != torch.float32 or panels_used(device, dtype))


class PackedWeight:
    """A packed copy of one weight tensor [out_features, in_features] (panels for our kernel, or
    oneDNN-blocked), valid while that same tensor keeps its version."""

    def __init__(self):
        self.source, self.version, self.tensor, self.frozen = None, None, None, False
        self.panels, self.out_features = False, 0

    def get(self, weight: torch.Tensor) -> torch.Tensor:
        # Identity too: a module whose weight was replaced (not written in place) gets a fresh copy.
        if not self.frozen and (self.source is not weight or self.version != weight._version):
            self.panels, self.out_features = panels_used(weight.device, weight.dtype), weight.shape[0]
            self.tensor = (torch.ops.hybrid_engine.pack_linear_weight(weight.contiguous()) if self.panels
                           else torch.ops.mkldnn._reorder_linear_weight(weight, DECODE_ROWS_HINT))
            self.source, self.version = weight, weight._version
        return self.tensor

    def freeze(self, weight: torch.Tensor) -> None:
        """Pack weight for good and let go of it: every later get returns this copy."""
        self.get(weight)
        self.frozen, self.source = True, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str,
           packed: PackedWeight | None) -> torch.Tensor:
    """activation(x W^T + b) through the packed weight when there is one, else hybrid_engine.kernels."""
    if packed is None or x.device.type != "cpu":
        return kernels.linear_act(x, weight, bias, activation)
    tensor = packed.get(weight)
    if packed.panels:
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        y = torch.ops.hybrid_engine.packed_linear(rows, tensor, packed.out_features, bias, activation == "relu")
        y = y if activation in ("none", "relu") else ACTIVATIONS[activation](y)
        return y.view(*x.shape[:-1], packed.out_features)
    if x.dtype == torch.float32 and x.shape[0] > FP32_MAX_ROWS:
        return kernels.linear_act(x, weight, bias, activation)
    post_op, algorithm = ONEDNN_ACTIVATIONS[activation]
    rows = x.shape[0] if x.dim() == 2 else None
    padded = rows if rows is None else bucket_rows(rows)
    if padded != rows:
        x = torch.nn.functional.pad(x, (0, 0, 0, padded - rows))
    return torch.ops.mkldnn._linear_pointwise(x, tensor, bias, post_op, [], algorithm)[:rows]


def bucket_rows(rows: int) -> int:
    """rows, or above EXACT_ROWS the next multiple of 2^(k-3) for rows in [2^k, 2^(k+1)): at most 8 row
    counts per doubling, for at most 12.5% more rows."""
    if rows <= EXACT_ROWS:
        return rows
    step = 1 << (rows.bit_length() - 4)
    return -(-rows // step) * step
