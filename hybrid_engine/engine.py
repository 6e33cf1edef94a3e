"""HybridEngine: one actor, trained under ZeRO-3 (or FSDP-free plain torch), generating as a
tensor-parallel inference model.

    he = HybridEngine(actor, tp_size=2, dtype=torch.bfloat16)
    he.eval()        # reshard into TP slices, build the inference model
    out = he.generate(input_ids, attention_mask, max_new_tokens=256, do_sample=True, top_p=0.9)
    he.train()       # free inference weights and KV cache; training goes on as before

Inside a TP group the ranks generate together over the union of their prompts (every rank runs
the same loop on the same batch; the model all-reduces after each row-parallel linear), then each
rank keeps its own rows.
"""
import time

import torch
import torch.distributed as dist
from torch import nn

from hybrid_engine.generation import GenerationOutput, Generator
from hybrid_engine.memory import handing_back, return_freed_memory
from hybrid_engine.models.registry import empty_model, model_class, weight_map
from hybrid_engine.reshard import Resharder, new_tp_group


def unwrap(actor: nn.Module) -> nn.Module:
    """The transformers model inside a DeepSpeed engine (or the module itself)."""
    inner = getattr(actor, "module", None)
    return inner if isinstance(inner, nn.Module) else actor


def weights_device(module: nn.Module) -> torch.device:
    """Where the training weights live: under ZeRO-3 a parameter is an empty placeholder and its
    shard (ds_tensor) is the real storage."""
    param = next(module.parameters())
    return getattr(param, "ds_tensor", param).device


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def packed_weight_bytes(model: nn.Module) -> int:
    """Bytes of the prepacked (oneDNN-blocked) weight copies the model holds; they are built on the
    first forward and, on the CPU, double the weight memory."""
    packs = [getattr(m, "packed", None) for m in model.modules()] + [getattr(model, "packed_lm_head", None)]
    return tensor_bytes(p.tensor for p in packs if p is not None and p.tensor is not None)


def check_tp_size(config, tp_size: int, world: int) -> None:
    if tp_size < 1 or world % tp_size:
        raise ValueError(f"tp_size={tp_size} must be >= 1 and divide the world size {world}")
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if heads % tp_size or kv_heads % tp_size:
        raise ValueError(f"tp_size={tp_size} must divide the attention heads ({heads}) and key/value heads ({kv_heads})")


class HybridEngine:
    """Switches `actor` (a DeepSpeed engine or an nn.Module holding a transformers causal LM)
    between training and tensor-parallel generation. kv_cache_bytes sizes the paged KV cache
    (None: sized to each batch); bucket_bytes bounds the bytes of each resharding exchange."""

    def __init__(self, actor: nn.Module, *, tp_size: int = 1, dtype: torch.dtype | None = None,
                 kv_cache_bytes: int | None = None, bucket_bytes: int = 64 << 20, block_size: int = 16,
                 report: bool = True):
        self.actor, self.module = actor, unwrap(actor)
        self.config = self.module.config
        model_class(self.config)  # an architecture without an inference model fails here, not mid-RLHF
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        check_tp_size(self.config, tp_size, self.world)
        self.tp_size, self.tp_rank = tp_size, self.rank % tp_size
        self.tp_group = new_tp_group(tp_size) if self.world > 1 else None
        self.dtype = dtype or next(self.module.parameters()).dtype
        self.device = weights_device(self.module)
        self.kv_cache_bytes, self.block_size, self.report = kv_cache_bytes, block_size, report
        self.resharder = Resharder(self.module, weight_map(self.config), tp_rank=self.tp_rank, tp_size=tp_size,
                                   bucket_bytes=bucket_bytes)
        self.model = self.generator = None
        self.iteration = 0
        self.stats: dict[str, float] = {}

    @property
    def is_eval(self) -> bool:
        return self.model is not None

    def eval(self) -> "HybridEngine":
        """Reshard the training weights into this rank's inference weights and reserve the KV cache."""
        if self.is_eval:
            return self
        self.model = empty_model(self.config, self.tp_rank, self.tp_size, self.tp_group, self.dtype, self.device)
        stats = self.resharder.reshard(dict(self.model.named_buffers()))
        self.generator = Generator(self.model, kv_cache_bytes=self.kv_cache_bytes, block_size=self.block_size)
        self.stats.update(reshard_seconds=stats.seconds, reshard_bytes_received=stats.bytes_received,
                          reshard_buffer_bytes=stats.peak_buffer_bytes,
                          inference_weight_bytes=tensor_bytes(self.model.buffers()))
        return self

    def train(self) -> "HybridEngine":
        """Give back the inference weights and the KV cache. The resharder's two exchange buffers
        (at most one bucket each) stay for the next iteration; `resharder.release()` frees them."""
        with handing_back():
            self.model = self.generator = None
        return_freed_memory()
        return self

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 **options) -> GenerationOutput:
        """Options as for `hybrid_engine.Generator.generate`; every rank of a TP group must pass the
        same options. Without an explicit eval(), switches to eval and back to train."""
        switched = not self.is_eval
        self.eval()
        try:
            return self._generate(input_ids, attention_mask, options)
        finally:
            if switched:
                self.train()

    def _generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, options: dict) -> GenerationOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self.tp_size > 1:
            options = self._agree_on_options(options)
        rows, width = input_ids.shape
        group_ids, group_mask, first_row = self._union_of_prompts(input_ids, attention_mask)
        start = time.perf_counter()
        out = self.generator.generate(group_ids, group_mask, **options)
        seconds = time.perf_counter() - start
        n = options.get("num_return_sequences", 1)
        mine = slice(first_row * n, (first_row + rows) * n)
        skip = group_ids.shape[1] - width  # left padding added only to line prompts up with the group's
        out = GenerationOutput(out.sequences[mine, skip:], out.attention_mask[mine, skip:], out.generated_lengths[mine],
                               None if out.logprobs is None else out.logprobs[mine])
        self._record(seconds, int(out.generated_lengths.sum()))
        return out

    def _agree_on_options(self, options: dict) -> dict:
        """All TP ranks must sample alike: same options, and one seed drawn on the group's first rank."""
        gathered = [None] * self.tp_size
        comparable = {k: v for k, v in options.items() if k not in ("seed", "generator")}
        dist.all_gather_object(gathered, comparable, group=self.tp_group)
        if any(g != gathered[0] for g in gathered):
            raise ValueError(f"generate options differ across the ranks of a tensor-parallel group: {gathered}")
        options = dict(options)
        generator = options.pop("generator", None)
        seed = options.pop("seed", None)
        if seed is None:
            device = generator.device if generator is not None else None
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=device))
        seed_tensor = torch.tensor([seed], dtype=torch.int64, device=self.device)  # NCCL sends device tensors only
        dist.broadcast(seed_tensor, src=self.rank - self.tp_rank, group=self.tp_group)
        return {**options, "seed": int(seed_tensor)}

    def _union_of_prompts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """The TP group's prompts, left-padded to a common width, and where this rank's rows start."""
        if self.tp_size == 1:
            return input_ids, attention_mask, 0
        gathered = [None] * self.tp_size
        dist.all_gather_object(gathered, (input_ids, attention_mask), group=self.tp_group)
        width = max(ids.shape[1] for ids, _ in gathered)
        pad = lambda t: nn.functional.pad(t, (width - t.shape[1], 0))  # noqa: E731
        first_row = sum(ids.shape[0] for ids, _ in gathered[: self.tp_rank])
        return torch.cat([pad(ids) for ids, _ in gathered]), torch.cat([pad(m) for _, m in gathered]), first_row

    def _record(self, seconds: float, tokens: int) -> None:
        self.iteration += 1
        cache = self.generator.cache
        kv_bytes = 0 if cache is None else tensor_bytes([cache.k, cache.v])
        packed_bytes = packed_weight_bytes(self.model)
        self.stats.update(generate_seconds=seconds, generated_tokens=tokens, tokens_per_second=tokens / seconds,
                          kv_cache_bytes=kv_bytes, prepacked_weight_bytes=packed_bytes,
                          peak_inference_bytes=self.stats["inference_weight_bytes"] + packed_bytes + kv_bytes
                          + self.stats["reshard_buffer_bytes"])
        if self.report and self.rank == 0:
            s = self.stats
            print(f"[hybrid-engine] iter {self.iteration} | reshard {s['reshard_seconds'] * 1e3:.1f} ms, "
                  f"{s['reshard_bytes_received'] / 2**20:.2f} MiB received | generate {seconds:.2f} s, "
                  f"{tokens} tokens, {s['tokens_per_second']:.1f} tokens/s | inference memory "
                  f"{s['peak_inference_bytes'] / 2**20:.1f} MiB (tp={self.tp_size}, world={self.world})", flush=True)
