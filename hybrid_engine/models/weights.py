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
    padded: bool = False      # a vocabulary: dim 0 padded to a multiple of tp_size (vLLM's layout)

    def __post_init__(self):
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.padded and self.split != "column":
            raise ValueError(f"{self.name}: only a column split can be padded, got {self.split!r}")

    def shard_range(self, tp_rank: int, tp_size: int) -> tuple[int, int, int]:
        """(dim, start, length) of the rows or columns rank tp_rank holds; dim -1 when replicated.
        Every rank's slice has room for ceil(size / tp_size) of them (shard_shape); a padded source's
        last ranks hold fewer (maybe none), the rest of their slice is padding."""
        if self.split == "replicated":
            return -1, 0, 0
        dim = 0 if self.split == "column" else 1
        size = self.shape[dim]
        if size % tp_size and not self.padded:
            raise ValueError(f"{self.name}: dim {dim} of shape {self.shape} is not divisible by tp_size={tp_size}")
        room = -(-size // tp_size)
        start = min(tp_rank * room, size)
        return dim, start, min(room, size - start)

    def shard_shape(self, tp_size: int) -> tuple[int, ...]:
        dim, _, room = self.shard_range(0, tp_size)  # rank 0's slice is never cut short
        return self.shape if dim < 0 else self.shape[:dim] + (room,) + self.shape[dim + 1:]

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
            offset += source.shard_shape(tp_size)[0]


def linear_sources(names: list[str], shapes: list[tuple[int, ...]], split: str,
                   padded: bool = False) -> list[WeightSource]:
    return [WeightSource(n, s, split, padded) for n, s in zip(names, shapes)]


def norm_entries(name: str, hf_name: str, dim: int, bias: bool) -> WeightMap:
    entries = {f"{name}.weight": [WeightSource(f"{hf_name}.weight", (dim,), "replicated")]}
    if bias:
        entries[f"{name}.bias"] = [WeightSource(f"{hf_name}.bias", (dim,), "replicated")]
    return entries


def linear_entries(name: str, hf_names: list[str], out_sizes: list[int], in_size: int, split: str,
                   bias: bool, padded: bool = False) -> WeightMap:
    """A (possibly packed) linear: column-parallel splits weights and biases by output rows (padded:
    to a multiple of the TP degree); row-parallel splits weights by input columns and replicates the
    bias (added after the reduce)."""
    entries = {f"{name}.weight": linear_sources([f"{n}.weight" for n in hf_names],
                                                [(o, in_size) for o in out_sizes], split, padded)}
    if bias:
        bias_split = "column" if split == "column" else "replicated"
        entries[f"{name}.bias"] = linear_sources([f"{n}.bias" for n in hf_names], [(o,) for o in out_sizes],
                                                 bias_split, padded)
    return entries


def vocab_entries(name: str, hf_name: str, vocab_size: int, dim: int) -> WeightMap:
    """A token embedding or LM head [vocab, dim], split by vocabulary rows like a column-parallel
    linear's output rows, the vocabulary padded to a multiple of the TP degree."""
    return linear_entries(name, [hf_name], [vocab_size], dim, "column", bias=False, padded=True)


def replicated(hf_name: str, *shape: int) -> list[WeightSource]:
    return [WeightSource(hf_name, tuple(shape), "replicated")]
