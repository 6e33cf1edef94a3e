"""Repartition the training weights into this rank's tensor-parallel inference weights.

Under ZeRO-3 each parameter is flattened, padded to a multiple of the world size N, and rank r
holds [r*c, (r+1)*c) in `param.ds_tensor` (checked against DeepSpeed's own partition numbers).
The C++ ReshardPlan intersects what every rank holds with what every rank needs; each bucket of
inference tensors then costs one pack, one all_to_all_single and one unpack, straight into the
preallocated inference weights: nothing is gathered whole, and each rank receives only the bytes
it needs and does not hold. Whole weights (a plain module, ZeRO stages 0-2) are sliced locally.
"""
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from hybrid_engine import kernels
from hybrid_engine._C import ReshardPlan
from hybrid_engine.lora import base_name, find_adapters, is_adapter_param, merge_adapters
from hybrid_engine.models.weights import WeightMap, WeightSource, load_weights, packed_shape


def is_zero3(module: nn.Module) -> bool:
    return any(hasattr(p, "ds_tensor") for p in module.parameters())


class TritonPlan:
    """ReshardPlan's pack / copy_local / unpack for GPU tensors: the plan's runs, cut into chunk
    tables once, copied by one Triton kernel launch per (source or destination) tensor."""

    def __init__(self, plan: ReshardPlan, world: int, device: torch.device):
        from hybrid_engine.kernels.triton.copy_runs import chunk_runs

        pack, unpack, local, sent, received = {}, {}, {}, 0, 0
        for peer in range(world):
            for source, src_offset, _, _, length in plan.sends(peer):
                pack.setdefault(source, []).append((src_offset, sent, length))
                sent += length
            for _, _, dst, dst_offset, length in plan.recvs(peer):
                unpack.setdefault(dst, []).append((received, dst_offset, length))
                received += length
        for source, src_offset, dst, dst_offset, length in plan.local():
            local.setdefault((source, dst), []).append((src_offset, dst_offset, length))
        self.pack_chunks, self.unpack_chunks, self.local_chunks = (
            {key: chunk_runs(runs, device) for key, runs in groups.items()} for groups in (pack, unpack, local))

    def pack(self, shards: list[torch.Tensor], send: torch.Tensor) -> None:
        from hybrid_engine.kernels.triton.copy_runs import copy_runs

        for source, chunks in self.pack_chunks.items():
            copy_runs(shards[source], send, chunks)

    def copy_local(self, shards: list[torch.Tensor], dsts: list[torch.Tensor]) -> None:
        from hybrid_engine.kernels.triton.copy_runs import copy_runs

        for (source, dst), chunks in self.local_chunks.items():
            copy_runs(shards[source], dsts[dst].view(-1), chunks)

    def unpack(self, recv: torch.Tensor, dsts: list[torch.Tensor]) -> None:
        from hybrid_engine.kernels.triton.copy_runs import copy_runs

        for dst, chunks in self.unpack_chunks.items():
            copy_runs(recv, dsts[dst].view(-1), chunks)


@dataclass(frozen=True)
class Piece:
    """Rows [row_begin, row_end) of one source's TP slice, landing in inference tensor `name`
    whose rows from dst_row on hold that slice."""
    name: str
    source: WeightSource
    dst_row: int
    row_begin: int
    row_end: int
    bytes: int


@dataclass
class Bucket:
    names: list[str]               # inference tensors filled by this bucket
    sources: list[WeightSource]    # the source of each piece, in plan order
    plan: ReshardPlan
    triton_plan: TritonPlan | None = None

    @classmethod
    def build(cls, pieces: list[Piece], world: int, tp_size: int, rank: int) -> "Bucket":
        names = list(dict.fromkeys(p.name for p in pieces))
        layouts = [(p.source.shape[0], math.prod(p.source.shape[1:]), p.source.split, names.index(p.name), p.dst_row,
                    p.row_begin, p.row_end) for p in pieces]
        return cls(names, [p.source for p in pieces], ReshardPlan(layouts, world, tp_size, rank))

    def executor(self, device: torch.device, world: int) -> ReshardPlan | TritonPlan:
        """The C++ plan for CPU tensors; Triton for GPU tensors (or when forced, as tests do)."""
        if device.type == "cpu" and kernels.current_backend() != "triton":
            return self.plan
        if self.triton_plan is None:
            self.triton_plan = TritonPlan(self.plan, world, device)
        return self.triton_plan


@dataclass
class ReshardStats:
    seconds: float = 0.0
    bytes_received: int = 0
    bytes_sent: int = 0
    peak_buffer_bytes: int = 0
    buckets: int = 0


class Resharder:
    """Fills inference tensors (name -> this rank's tensor) from `module`'s parameters.

    tp_rank/tp_size: this rank's place in its TP group (groups are contiguous ranks). bucket_bytes
    bounds the bytes of source tensors exchanged per all_to_all, so extra memory is at most a
    send and a receive buffer of one bucket, reused across calls.
    """

    def __init__(self, module: nn.Module, weight_map: WeightMap, *, tp_rank: int, tp_size: int,
                 bucket_bytes: int = 64 << 20, group=None):
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
        self.module, self.weight_map = module, weight_map
        self.tp_rank, self.tp_size, self.bucket_bytes, self.group = tp_rank, tp_size, bucket_bytes, group
        self.params = {base_name(n): p for n, p in module.named_parameters(remove_duplicate=False)
                       if not is_adapter_param(n)}
        self.adapters = find_adapters(module)
        self.zero3 = is_zero3(module)
        self.stats = ReshardStats()
        self.buckets = self._plan_buckets() if self.zero3 else []
        self.send_buffer = self.recv_buffer = None

    def _world(self) -> tuple[int, int]:
        if not dist.is_initialized():
            return 1, 0
        return dist.get_world_size(self.group), dist.get_rank(self.group)

    def _param(self, source: WeightSource) -> nn.Parameter:
        param = self.params.get(source.name)
        if param is None:
            raise ValueError(f"the actor has no parameter {source.name!r} (needed by the inference model)")
        return param

    def _check_zero3_layout(self, source: WeightSource, param: nn.Parameter, world: int) -> None:
        numel = math.prod(source.shape)
        c = -(-numel // world)
        layout = (param.ds_numel, param.partition_numel(), param.padding_size(), dist.get_world_size(param.ds_process_group))
        if layout != (numel, c, c * world - numel, world) or param.ds_tensor.numel() < c:
            raise RuntimeError(
                f"{source.name}: unexpected ZeRO-3 partition (numel, partition numel, padding, group size) = {layout}, "
                f"expected {(numel, c, c * world - numel, world)}: this DeepSpeed version or configuration (e.g. "
                f"hpZ/MiCS groups) lays shards out differently from what the resharder supports")

    def _plan_buckets(self) -> list[Bucket]:
        world, rank = self._world()
        if world % self.tp_size:
            raise ValueError(f"tp_size={self.tp_size} must divide the world size {world}")
        buckets, pieces, size = [], [], 0
        for name, entry in self.weight_map.items():
            for source in entry:
                self._check_zero3_layout(source, self._param(source), world)
            for piece in self._pieces(name, entry, world):
                if pieces and size + piece.bytes > self.bucket_bytes:
                    buckets.append(Bucket.build(pieces, world, self.tp_size, rank))
                    pieces, size = [], 0
                pieces.append(piece)
                size += piece.bytes
        if pieces:
            buckets.append(Bucket.build(pieces, world, self.tp_size, rank))
        return buckets

    def _pieces(self, name: str, entry: list[WeightSource], world: int) -> Iterator[Piece]:
        """Each source's slice in runs of rows small enough for one bucket. A rank receives at most
        the piece's slice rows and sends at most that much to each of the other world - 1 ranks;
        every rank must cut the same pieces, so the bound cannot depend on the rank."""
        dst_row = 0
        for source in entry:
            rows, cols = source.shard_shape(self.tp_size)[0], math.prod(source.shard_shape(self.tp_size)[1:])
            row_bytes = cols * self._param(source).ds_tensor.element_size() * max(1, world - 1)
            step = max(1, self.bucket_bytes // row_bytes)
            for begin in range(0, rows, step):
                end = min(begin + step, rows)
                yield Piece(name, source, dst_row, begin, end, (end - begin) * row_bytes)
            dst_row += rows

    @torch.no_grad()
    def reshard(self, targets: dict[str, torch.Tensor]) -> ReshardStats:
        """Fill targets (e.g. `dict(empty_model(...).named_buffers())`) with this rank's slices."""
        start = time.perf_counter()
        received = sent = 0
        if not self.zero3:
            load_weights(targets, self.weight_map, self.params, self.tp_rank, self.tp_size)
        for bucket in self.buckets:
            r, s = self._run(bucket, targets)
            received, sent = received + r, sent + s
        if self.adapters:
            received += self._merge_adapters(targets)
        self.stats.seconds, self.stats.bytes_received, self.stats.bytes_sent = time.perf_counter() - start, received, sent
        self.stats.buckets = len(self.buckets)
        return self.stats

    def _run(self, bucket: Bucket, targets: dict[str, torch.Tensor]) -> tuple[int, int]:
        dsts = [targets[name] for name in bucket.names]
        shards = [self._param(s).ds_tensor.view(-1) for s in bucket.sources]
        self._check_targets(bucket.names, dsts, shards[0].device)
        # The wire carries the narrower of the two dtypes: pack converts (the same rounding as after).
        wire = min(shards[0], dsts[0], key=lambda t: t.element_size())
        send_counts, recv_counts = bucket.plan.send_counts(), bucket.plan.recv_counts()
        send = self._buffer("send_buffer", int(send_counts.sum()), wire)
        recv = self._buffer("recv_buffer", int(recv_counts.sum()), wire)
        world = self._world()[0]
        executor = bucket.executor(shards[0].device, world)
        executor.pack(shards, send)
        if world > 1:
            dist.all_to_all_single(recv, send, recv_counts.tolist(), send_counts.tolist(), group=self.group)
        executor.copy_local(shards, dsts)
        executor.unpack(recv, dsts)
        return recv.numel() * recv.element_size(), send.numel() * send.element_size()

    def _check_targets(self, names: list[str], dsts: list[torch.Tensor], device: torch.device) -> None:
        """Inference tensors must match the plan before any kernel writes into them."""
        for name, dst in zip(names, dsts):
            expected = packed_shape(self.weight_map[name], self.tp_size)
            if tuple(dst.shape) != expected or not dst.is_contiguous() or dst.device != device:
                raise ValueError(f"inference tensor {name} must be a contiguous {expected} tensor on {device}, "
                                 f"got {tuple(dst.shape)} on {dst.device}")

    def _merge_adapters(self, targets: dict[str, torch.Tensor]) -> int:
        """Adapters are small: gather them whole (under ZeRO-3) and merge; returns bytes received."""
        merge = lambda: merge_adapters(self.adapters, self.weight_map, targets, self.tp_rank, self.tp_size)  # noqa: E731
        if not self.zero3:
            merge()
            return 0
        import deepspeed

        params = [p for adapter in self.adapters for p in (adapter.a, adapter.b)]
        with deepspeed.zero.GatheredParameters(params):
            merge()
        world, _ = self._world()
        return sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in params) * (world - 1)

    def _buffer(self, attr: str, numel: int, like: torch.Tensor) -> torch.Tensor:
        buffer = getattr(self, attr)
        if buffer is None or buffer.dtype != like.dtype or buffer.device != like.device or buffer.numel() < numel:
            setattr(self, attr, None)
            buffer = torch.empty(numel, dtype=like.dtype, device=like.device)
            setattr(self, attr, buffer)
            peak = sum(b.numel() * b.element_size() for b in (self.send_buffer, self.recv_buffer) if b is not None)
            self.stats.peak_buffer_bytes = max(self.stats.peak_buffer_bytes, peak)
        return buffer[:numel]

    def release(self) -> None:
        """Free the exchange buffers (the plans stay: they are small and reused)."""
        self.send_buffer = self.recv_buffer = None


def new_tp_group(tp_size: int):
    """This rank's TP group (contiguous ranks). Every rank creates every group, in the same order,
    as torch.distributed requires."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % tp_size:
        raise ValueError(f"tp_size={tp_size} must divide the world size {world}")
    mine = None
    for start in range(0, world, tp_size):
        group = dist.new_group(list(range(start, start + tp_size)))
        if start <= rank < start + tp_size:
            mine = group
    return mine
