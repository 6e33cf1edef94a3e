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


def available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether oneDNN can pack weights of this dtype here (bf16 needs hardware many CPUs lack)."""
    return device.type == "cpu" and device_caps(device).can_prepack(dtype)


class PackedWeight:
    """A oneDNN-blocked copy of one weight tensor, valid while that same tensor keeps its version."""

    def __init__(self):
        self.source, self.version, self.tensor = None, None, None

    def get(self, weight: torch.Tensor) -> torch.Tensor:
        # Identity too: a module whose weight was replaced (not written in place) gets a fresh copy.
        if self.source is not weight or self.version != weight._version:
            self.tensor = torch.ops.mkldnn._reorder_linear_weight(weight, DECODE_ROWS_HINT)
            self.source, self.version = weight, weight._version
        return self.tensor


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str,
           packed: PackedWeight | None) -> torch.Tensor:
    """activation(x W^T + b) through the packed weight when there is one, else hybrid_engine.kernels."""
    if packed is None or x.device.type != "cpu" or (x.dtype == torch.float32 and x.shape[0] > FP32_MAX_ROWS):
        return kernels.linear_act(x, weight, bias, activation)
    post_op, algorithm = ONEDNN_ACTIVATIONS[activation]
    return torch.ops.mkldnn._linear_pointwise(x, packed.get(weight), bias, post_op, [], algorithm)
