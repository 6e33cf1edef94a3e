"""The declarative weight map: which Hugging Face tensors make up each inference tensor, and how
each is split across tensor-parallel ranks.

One map serves both loaders: `from_hf` slices a full state dict locally, and the resharder plans
which bytes of each ZeRO-3 shard every TP rank needs. A packed inference tensor (QKV, gate/up) is
the concatenation along dim 0 of its sources' slices for that rank, in the listed order, so rank j
holds [q_j; k_j; v_j].
"""
from collections.abc import Mapping
from dataclasses import dataclass

import torch

SPLITS = ("replicated", "column", "row")


@dataclass(frozen=True)
class WeightSource:
    name: str                 # key in the Hugging Face model's state_dict
    shape: tuple[int, ...]    # its full (unsharded) shape
    split: str                # "replicated" | "column" (split along dim 0) | "row" (split along dim 1)

    def __post_init__(self):
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")

    def shard_range(self, tp_rank: int, tp_size: int) -> tuple[int, int, int]:
        """(dim, start, length) of the slice rank tp_rank holds; dim -1 when replicated."""
        if self.split == "replicated":
            return -1, 0, 0
        dim = 0 if self.split == "column" else 1
        if self.shape[dim] % tp_size:
            raise ValueError(f"{self.name}: dim {dim} of shape {self.shape} is not divisible by tp_size={tp_size}")
        length = self.shape[dim] // tp_size
        return dim, tp_rank * length, length

    def shard_shape(self, tp_size: int) -> tuple[int, ...]:
        dim, _, length = self.shard_range(0, tp_size)
        return self.shape if dim < 0 else self.shape[:dim] + (length,) + self.shape[dim + 1:]

    def shard(self, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
        dim, start, length = self.shard_range(tp_rank, tp_size)
        return full if dim < 0 else full.narrow(dim, start, length)


WeightMap = dict[str, list[WeightSource]]


def packed_shape(sources: list[WeightSource], tp_size: int) -> tuple[int, ...]:
    shapes = [s.shard_shape(tp_size) for s in sources]
    return (sum(s[0] for s in shapes),) + shapes[0][1:]


def load_weights(params: Mapping[str, torch.Tensor], weight_map: WeightMap, state_dict: Mapping[str, torch.Tensor],
                 tp_rank: int, tp_size: int) -> None:
    """Fill each inference tensor in place from its sources, converting dtype once on the way."""
    missing = [s.name for sources in weight_map.values() for s in sources if s.name not in state_dict]
    if missing:
        raise ValueError(f"state_dict lacks {len(missing)} tensors the model needs, e.g. {missing[:3]}")
    for name, sources in weight_map.items():
        target = params[name]
        if tuple(target.shape) != packed_shape(sources, tp_size):
            raise ValueError(f"{name}: inference tensor {tuple(target.shape)} but the map gives "
                             f"{packed_shape(sources, tp_size)}")
        offset = 0
        for source in sources:
            full = state_dict[source.name]
            if tuple(full.shape) != source.shape:
                raise ValueError(f"{source.name} has shape {tuple(full.shape)}, the config implies {source.shape}")
            piece = source.shard(full, tp_rank, tp_size)
            target.narrow(0, offset, piece.shape[0]).copy_(piece)
            offset += piece.shape[0]


def linear_sources(names: list[str], shapes: list[tuple[int, ...]], split: str) -> list[WeightSource]:
    return [WeightSource(n, s, split) for n, s in zip(names, shapes)]


def norm_entries(name: str, hf_name: str, dim: int, bias: bool) -> WeightMap:
    entries = {f"{name}.weight": [WeightSource(f"{hf_name}.weight", (dim,), "replicated")]}
    if bias:
        entries[f"{name}.bias"] = [WeightSource(f"{hf_name}.bias", (dim,), "replicated")]
    return entries


def linear_entries(name: str, hf_names: list[str], out_sizes: list[int], in_size: int, split: str,
                   bias: bool) -> WeightMap:
    """A (possibly packed) linear: column-parallel splits weights and biases by output rows;
    row-parallel splits weights by input columns and replicates the bias (added after the reduce)."""
    entries = {f"{name}.weight": linear_sources([f"{n}.weight" for n in hf_names],
                                                [(o, in_size) for o in out_sizes], split)}
    if bias:
        bias_split = "column" if split == "column" else "replicated"
        entries[f"{name}.bias"] = linear_sources([f"{n}.bias" for n in hf_names], [(o,) for o in out_sizes],
                                                 bias_split)
    return entries


def replicated(hf_name: str, *shape: int) -> list[WeightSource]:
    return [WeightSource(hf_name, tuple(shape), "replicated")]
