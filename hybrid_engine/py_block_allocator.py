"""A pure-Python model of BlockAllocator with the same API and the same block choices.

It is the oracle of the property tests and the baseline of bench.allocator; the engine itself
always uses the compiled hybrid_engine.BlockAllocator.
"""
from collections.abc import Sequence

import torch

from hybrid_engine._C import OutOfBlocksError


class PyBlockAllocator:
    def __init__(self, num_blocks: int, block_size: int):
        if not 1 <= num_blocks < 2**31:
            raise ValueError(f"num_blocks must be in [1, 2^31 - 1], got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free_blocks = list(range(num_blocks - 1, -1, -1))
        self.ref_counts = [0] * num_blocks
        self.block_tables: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def _blocks(self, seq_id: int) -> list[int]:
        if seq_id not in self.block_tables:
            raise KeyError(f"unknown sequence {seq_id}")
        return self.block_tables[seq_id]

    def _require_free(self, needed: int, what: str) -> None:
        if needed > len(self.free_blocks):
            raise OutOfBlocksError(f"{what} needs {needed} blocks but only {len(self.free_blocks)} "
                                   f"of {self.num_blocks} are free")

    def _take(self) -> int:
        block = self.free_blocks.pop()
        self.ref_counts[block] = 1
        return block

    def _release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self.free_blocks.append(block)

    def _needs_block(self, seq_id: int) -> bool:
        return self.lengths[seq_id] % self.block_size == 0 or self.ref_counts[self.block_tables[seq_id][-1]] > 1

    def allocate(self, seq_id: int, num_tokens: int) -> None:
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        if seq_id in self.block_tables:
            raise ValueError(f"sequence {seq_id} is already allocated")
        needed = -(-num_tokens // self.block_size)
        self._require_free(needed, f"allocate(sequence {seq_id}, {num_tokens} tokens)")
        self.block_tables[seq_id] = [self._take() for _ in range(needed)]
        self.lengths[seq_id] = num_tokens

    def append(self, seq_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError("append: a sequence is listed more than once")
        for seq_id in seq_ids:
            self._blocks(seq_id)
        self._require_free(sum(map(self._needs_block, seq_ids)), f"append({len(seq_ids)} sequences)")
        slots, copies = [], []
        for seq_id in seq_ids:
            table, offset = self.block_tables[seq_id], self.lengths[seq_id] % self.block_size
            if offset == 0:
                table.append(self._take())
            elif self.ref_counts[table[-1]] > 1:
                shared, table[-1] = table[-1], self._take()
                self._release(shared)
                copies.append((shared, table[-1]))
            slots.append(table[-1] * self.block_size + offset)
            self.lengths[seq_id] += 1
        return torch.tensor(slots, dtype=torch.int64), torch.tensor(copies, dtype=torch.int64).reshape(-1, 2)

    def fork(self, parent_id: int, child_id: int) -> None:
        table = self._blocks(parent_id)
        if child_id in self.block_tables:
            raise ValueError(f"fork: child sequence {child_id} already exists")
        for block in table:
            self.ref_counts[block] += 1
        self.block_tables[child_id] = list(table)
        self.lengths[child_id] = self.lengths[parent_id]

    def free(self, seq_id: int) -> None:
        for block in self._blocks(seq_id):
            self._release(block)
        del self.block_tables[seq_id], self.lengths[seq_id]

    def num_tokens(self, seq_id: int) -> int:
        self._blocks(seq_id)
        return self.lengths[seq_id]

    def block_table(self, seq_ids: Sequence[int]) -> torch.Tensor:
        tables = [self._blocks(seq_id) for seq_id in seq_ids]
        width = max(map(len, tables), default=0)
        return torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.int32).reshape(len(tables), width)

    def ref_count(self, block: int) -> int:
        return self.ref_counts[block]
