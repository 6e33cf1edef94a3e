"""hybrid_engine: switch one RLHF actor between ZeRO-3 training and fast paged generation."""
import torch  # noqa: F401  (loads libtorch, which hybrid_engine._C links against)

from hybrid_engine._C import BlockAllocator, OutOfBlocksError

__all__ = ["BlockAllocator", "OutOfBlocksError"]
__version__ = "0.1.0"

from hybrid_engine.capability import DeviceCaps, DtypeChoice, choose_dtype, device_caps  # noqa: E402
from hybrid_engine.generation import GenerationOutput, Generator, generate  # noqa: E402
from hybrid_engine.kv_cache import PagedKVCache  # noqa: E402
from hybrid_engine.models import from_hf  # noqa: E402

__all__ += ["DeviceCaps", "DtypeChoice", "choose_dtype", "device_caps", "generate", "Generator", "GenerationOutput",
            "PagedKVCache", "from_hf"]

from hybrid_engine.engine import HybridEngine  # noqa: E402

__all__ += ["HybridEngine"]
