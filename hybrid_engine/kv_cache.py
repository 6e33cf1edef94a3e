"""PagedKVCache: per-layer key/value block pools plus the block allocator that hands them out."""
import torch

from hybrid_engine import kernels
from hybrid_engine._C import BlockAllocator


def available_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on device (MemAvailable on the host)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024


class PagedKVCache:
    """k and v: [num_layers, num_blocks, block_size, num_kv_heads, head_dim], allocated once.
    Layer i's caches are the contiguous views k[i], v[i]."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks} and {block_size}")
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        # Zeroed, not empty: every page is touched once here rather than in the first decode steps,
        # and a kernel that reads past a context never meets NaN bit patterns.
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.layers = list(zip(self.k.unbind(0), self.v.unbind(0)))
        self.allocator = BlockAllocator(num_blocks, block_size)

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def block_size(self) -> int:
        return self.allocator.block_size

    @staticmethod
    def block_bytes(model, block_size: int) -> int:
        """Bytes one block takes across all layers, keys and values."""
        return 2 * model.num_layers * block_size * model.num_kv_heads * model.head_dim * model.dtype.itemsize

    @classmethod
    def for_model(cls, model, *, num_blocks: int | None = None, memory_bytes: int | None = None,
                  memory_fraction: float | None = None, block_size: int = 16) -> "PagedKVCache":
        """Size the cache by a block count, a byte budget, or a fraction of the memory free now."""
        if sum(x is not None for x in (num_blocks, memory_bytes, memory_fraction)) != 1:
            raise ValueError("give exactly one of num_blocks, memory_bytes, memory_fraction")
        if memory_fraction is not None:
            if not 0 < memory_fraction <= 1:
                raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction}")
            memory_bytes = int(available_memory(model.device) * memory_fraction)
        if num_blocks is None:
            num_blocks = memory_bytes // cls.block_bytes(model, block_size)
            if num_blocks < 1:
                raise ValueError(f"memory budget of {memory_bytes} bytes holds no KV block "
                                 f"({cls.block_bytes(model, block_size)} bytes each)")
        return cls(model.num_layers, num_blocks, block_size, model.num_kv_heads, model.head_dim, model.dtype,
                   model.device)

    def copy_blocks(self, copies: torch.Tensor) -> None:
        """Copy-on-write of forked blocks in every layer, as one call over the flattened layers."""
        num_layers, num_blocks = self.k.shape[:2]
        offsets = torch.arange(num_layers, device=copies.device).repeat_interleave(copies.shape[0]) * num_blocks
        all_copies = copies.repeat(num_layers, 1) + offsets[:, None]
        kernels.copy_blocks(self.k.flatten(0, 1), self.v.flatten(0, 1), all_copies)
