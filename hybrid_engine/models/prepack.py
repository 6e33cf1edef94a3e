"""Prepacked CPU weights for the linears of the inference graphs.

On the CPU, F.linear hands the weight to the BLAS, which repacks it into its blocked layout on
every call; at decode batch sizes that repacking costs about as much as the product itself.
oneDNN can keep the weight in its blocked layout once and reuse it: the 48 linears of OPT-125m at
batch 16 went from 213 to 106 ms (fp32) and 24 to 20 ms (bf16) on the 2-vCPU machines under load,
and bf16 prefill GEMMs run about 2x faster. The packed copy doubles the memory of the weights.

The canonical weights stay in `model.state_dict()` (what from_hf and the resharder fill in place);
a packed copy is rebuilt whenever its weight is replaced or its version counter moves (any in-place
torch write). Writes that bypass torch (C++ through data_ptr, e.g. a reshard plan's unpack) do not
move the counter: after those, call `model.prepack_weights()` again (or pack only after filling, as
HybridEngine.eval does by building a fresh Generator).
"""
import torch

from hybrid_engine import kernels
from hybrid_engine.capability import device_caps

# hybrid_engine.kernels activation -> (oneDNN post-op, its algorithm)
ONEDNN_ACTIVATIONS = {"none": ("none", ""), "relu": ("relu", ""), "gelu": ("gelu", "none"),
                      "gelu_tanh": ("gelu", "tanh"), "silu": ("swish", "")}
DECODE_ROWS_HINT = 16  # the batch size oneDNN chooses the blocked layout for (any batch works)
# Measured with one thread, [M, 768] x [768, 3072]: packed/F.linear time fp32 0.64 at M=16, 1.1 at
# M=256 and 4096; bf16 0.7 at M=16, 0.2 at M=256, 0.5 at M=4096. So fp32 prefills skip the packing.
FP32_MAX_ROWS = 128
# oneDNN keeps a primitive for every row count it has multiplied (0.7-3.5 MB each, bf16, 250-8000 rows,
# measured here), so prefills and scorers whose token counts vary grew by one per new count: 2.3 MB per
# step-3 iteration of the example. Row counts above EXACT_ROWS are rounded up to 8 steps per doubling.
EXACT_ROWS = 128


def available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether oneDNN can pack weights of this dtype here (bf16 needs hardware many CPUs lack)."""
    return device.type == "cpu" and device_caps(device).can_prepack(dtype)


def always_used(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether every product of this dtype goes through the packed weights (fp32 prefills skip them)."""
    return available(device, dtype) and dtype != torch.float32


class PackedWeight:
    """A oneDNN-blocked copy of one weight tensor, valid while that same tensor keeps its version."""

    def __init__(self):
        self.source, self.version, self.tensor, self.frozen = None, None, None, False

    def get(self, weight: torch.Tensor) -> torch.Tensor:
        # Identity too: a module whose weight was replaced (not written in place) gets a fresh copy.
        if not self.frozen and (self.source is not weight or self.version != weight._version):
            self.tensor = torch.ops.mkldnn._reorder_linear_weight(weight, DECODE_ROWS_HINT)
            self.source, self.version = weight, weight._version
        return self.tensor

    def freeze(self, weight: torch.Tensor) -> None:
        """Pack weight for good and let go of it: every later get returns this copy."""
        self.get(weight)
        self.frozen, self.source = True, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str,
           packed: PackedWeight | None) -> torch.Tensor:
    """activation(x W^T + b) through the packed weight when there is one, else hybrid_engine.kernels."""
    if packed is None or x.device.type != "cpu" or (x.dtype == torch.float32 and x.shape[0] > FP32_MAX_ROWS):
        return kernels.linear_act(x, weight, bias, activation)
    post_op, algorithm = ONEDNN_ACTIVATIONS[activation]
    rows = x.shape[0] if x.dim() == 2 else None
    padded = rows if rows is None else bucket_rows(rows)
    if padded != rows:
        x = torch.nn.functional.pad(x, (0, 0, 0, padded - rows))
    return torch.ops.mkldnn._linear_pointwise(x, packed.get(weight), bias, post_op, [], algorithm)[:rows]


def bucket_rows(rows: int) -> int:
    """rows, or above EXACT_ROWS the next multiple of 2^(k-3) for rows in [2^k, 2^(k+1)): at most 8 row
    counts per doubling, for at most 12.5% more rows."""
    if rows <= EXACT_ROWS:
        return rows
    step = 1 << (rows.bit_length() - 4)
    return -(-rows // step) * step
