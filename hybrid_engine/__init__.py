"""hybrid_engine: switch one RLHF actor between ZeRO-3 training and fast paged generation."""
import torch  # noqa: F401  (loads libtorch, which hybrid_engine._C links against)

from hybrid_engine._C import BlockAllocator, OutOfBlocksError

__all__ = ["BlockAllocator", "OutOfBlocksError"]
__version__ = "0.1.0"
