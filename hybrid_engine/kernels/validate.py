"""Input checks of the public kernels: every bad input raises a ValueError naming the argument
before anything reaches a kernel (Triton reads out-of-bounds memory silently, C++ crashes).

Index checks cost a few small ops and one host sync per call. A model checks its step's index
tensors once per forward and passes check_indices=False to the per-layer calls (the C++ kernels
check indices again, cheaply, before they touch memory).
"""
import torch

CPU_DTYPES = (torch.float32, torch.bfloat16)  # fp16 matrix work on this CPU runs at 0.2 GFLOP/s
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_float(name: str, t: torch.Tensor, ndim: int | None, dtypes: tuple[torch.dtype, ...]) -> None:
    """ndim None: any rank with a feature dimension, [..., features]."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if ndim is None and t.dim() == 0:
        raise ValueError(f"{name} must have a feature dimension [..., features], got a scalar")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} has dtype {t.dtype}; supported here: {', '.join(map(str, dtypes))}")


def check_index(name: str, t: torch.Tensor, ndim: int, dtypes: tuple[torch.dtype, ...]) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype {' or '.join(map(str, dtypes))}, got {t.dtype}")


def check_devices(*named: tuple[str, torch.Tensor | None]) -> torch.device:
    """All given (name, tensor) pairs, None skipped, are tensors on one device; returns it."""
    named = [(name, t) for name, t in named if t is not None]
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    first_name, device = named[0][0], named[0][1].device
    for name, t in named[1:]:
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {device}")
    return device


def check_same(name: str, t: torch.Tensor, like_name: str, like: torch.Tensor, dims: slice = slice(None)) -> None:
    """t has the dtype of like and the same shape over dims."""
    if t.dtype != like.dtype:
        raise ValueError(f"{name} has dtype {t.dtype} but {like_name} has {like.dtype}")
    if t.shape[dims] != like.shape[dims]:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, incompatible with {like_name} {tuple(like.shape)}")


def bounds(t: torch.Tensor) -> tuple[int, int]:
    """(min, max) of a non-empty index tensor, with one host sync."""
    return tuple(torch.stack(t.aminmax()).tolist())


def check_contiguous(name: str, t: torch.Tensor) -> None:
    """For outputs written in place (caches): a copy would silently drop the writes."""
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (it is written in place)")


def check_heads(num_heads: int, num_kv_heads: int) -> None:
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"q has {num_heads} heads, not a multiple of the {num_kv_heads} heads of the KV tensors")


def check_cache_pair(k_cache: torch.Tensor, v_cache: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> None:
    check_float("k_cache", k_cache, 4, dtypes)
    check_same("v_cache", v_cache, "k_cache", k_cache)
    check_contiguous("k_cache", k_cache)
    check_contiguous("v_cache", v_cache)


def check_slots(slots: torch.Tensor, num_tokens: int, num_slots: int, values: bool = True) -> None:
    """values=False: shape and dtype only (the caller checked these slots' values already)."""
    check_index("slots", slots, 1, INDEX_DTYPES)
    if slots.shape[0] != num_tokens:
        raise ValueError(f"slots has {slots.shape[0]} entries for {num_tokens} tokens of key")
    if values and slots.numel():
        lo, hi = bounds(slots)
        if lo < -1 or hi >= num_slots:
            raise ValueError(f"slots must be -1 (skip) or in [0, {num_slots}), got min {lo} max {hi}")


def check_copies(copies: torch.Tensor, num_blocks: int) -> None:
    check_index("copies", copies, 2, INDEX_DTYPES)
    if copies.shape[1] != 2:
        raise ValueError(f"copies must be [k, 2] (src_block, dst_block), got shape {tuple(copies.shape)}")
    if copies.numel():
        lo, hi = bounds(copies)
        if lo < 0 or hi >= num_blocks:
            raise ValueError(f"copies holds block ids outside [0, {num_blocks}), got min {lo} max {hi}")
    # Copies run in one batch, not in order: a destination written twice or read as a source
    # would depend on scheduling.
    dst = copies[:, 1]
    if dst.unique().numel() != dst.numel() or bool(torch.isin(dst, copies[:, 0]).any()):
        raise ValueError("copies must have distinct destination blocks that are not also sources")


def check_block_tables(block_tables: torch.Tensor, context_lens: torch.Tensor, batch: int, num_blocks: int,
                       block_size: int, values: bool = True) -> None:
    """values=False: shapes and dtypes only (the caller checked these tensors' values already)."""
    check_index("block_tables", block_tables, 2, (torch.int32,))
    check_index("context_lens", context_lens, 1, (torch.int32,))
    if block_tables.shape[0] != batch or context_lens.shape[0] != batch:
        raise ValueError(f"block_tables {tuple(block_tables.shape)} and context_lens {tuple(context_lens.shape)} "
                         f"must have one row per query, batch {batch}")
    width = block_tables.shape[1]
    if batch == 0 or not values:
        return
    if width == 0:
        raise ValueError("block_tables has no columns")
    # Entry j of a table is used when it holds one of the first context_len tokens.
    used = torch.arange(0, width * block_size, block_size, dtype=torch.int32,
                        device=block_tables.device) < context_lens[:, None]
    lo, hi, shortest, longest = torch.stack([*torch.where(used, block_tables, 0).aminmax(),
                                             *context_lens.aminmax()]).tolist()
    if shortest < 1 or longest > width * block_size:
        raise ValueError(f"context_lens must be in [1, {width * block_size}] (block_tables width {width} x "
                         f"block_size {block_size}), got min {shortest} max {longest}")
    if lo < 0 or hi >= num_blocks:
        raise ValueError(f"block_tables holds block ids outside [0, {num_blocks}) within the context "
                         f"(min {lo}, max {hi})")


def check_cu_seqlens(cu_seqlens: torch.Tensor, num_tokens: int) -> None:
    check_index("cu_seqlens", cu_seqlens, 1, (torch.int32,))
    if cu_seqlens.shape[0] < 2:
        raise ValueError("cu_seqlens needs at least 2 entries [0, ..., T]")
    steps = cu_seqlens.diff()
    if bool((cu_seqlens[0] != 0) | (cu_seqlens[-1] != num_tokens) | (steps < 0).any()):
        raise ValueError(f"cu_seqlens must rise monotonically from 0 to T={num_tokens}, got {cu_seqlens.tolist()}")


def check_window(window: int | None, causal: bool) -> None:
    """A sliding attention window: None (attend to everything) or a positive int, causal only."""
    if window is None:
        return
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be None or an int >= 1, got {window!r}")
    if not causal:
        raise ValueError("window (sliding-window attention) needs causal=True")
