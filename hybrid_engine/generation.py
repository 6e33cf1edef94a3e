"""The generation loop: packed prefill and batched decode over the paged KV cache, continuous
batching with preemption under a KV budget, and output in Hugging Face's layout.

One row of the output is one sequence: row b * n + k is sample k of prompt b (n =
num_return_sequences), as transformers orders them.
"""
from collections import deque
from dataclasses import dataclass

import torch

from hybrid_engine import kernels
from hybrid_engine._C import OutOfBlocksError
from hybrid_engine.kv_cache import PagedKVCache
from hybrid_engine.models import CausalLM, from_hf
from hybrid_engine.models.layers import AttentionBatch
from hybrid_engine.sampling import SamplingOptions, choose_tokens


@dataclass
class GenerationOutput:
    sequences: torch.Tensor          # int64 [B * n, L + max_new_tokens]: prompt as given, new tokens, pad after EOS
    attention_mask: torch.Tensor     # [B * n, L + max_new_tokens]: prompt mask, 1 for each generated token
    generated_lengths: torch.Tensor  # int64 [B * n]: new tokens per row, EOS included
    # float32 [B * n, max_new_tokens] with return_logprobs: log p of each new token under the model's
    # logits (before temperature and filtering), 0 after the row's last token
    logprobs: torch.Tensor | None = None


@dataclass
class Group:
    """Rows prefilled together from one token list: the n samples of a prompt (forked after the
    prefill, sharing its blocks), or one preempted row being recomputed."""
    rows: list[int]
    tokens: torch.Tensor


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class Generator:
    """Generates with one model and one KV cache that lives as long as this object (or until
    free_cache(), e.g. while the model trains).

    The cache is sized by kv_cache_bytes or kv_cache_fraction (of the memory available when it is
    allocated); with neither, it is sized to hold every sequence of the first call and grown only
    when a later call needs more. max_prefill_tokens bounds the tokens packed into one prefill
    forward. prepack_weights keeps oneDNN-blocked copies of the model's linear weights on the CPU
    (faster decode GEMMs for twice the weight memory; see hybrid_engine.models.prepack). The library
    never changes torch's thread settings; set them (and OMP_WAIT_POLICY) yourself.
    """

    def __init__(self, model, *, kv_cache_bytes: int | None = None, kv_cache_fraction: float | None = None,
                 block_size: int = 16, max_prefill_tokens: int = 8192, prepack_weights: bool = True):
        if block_size < 1 or max_prefill_tokens < 1:
            raise ValueError(f"block_size and max_prefill_tokens must be >= 1, got {block_size}, {max_prefill_tokens}")
        self.model = model if isinstance(model, CausalLM) else from_hf(model)
        self.model.prepack_weights(prepack_weights)
        self.block_size, self.max_prefill_tokens = block_size, max_prefill_tokens
        self.budget = None
        if kv_cache_bytes is not None or kv_cache_fraction is not None:
            self.budget = {"memory_bytes": kv_cache_bytes, "memory_fraction": kv_cache_fraction}
        self.cache = self._allocate_budget() if self.budget else None  # a bad budget fails here, not later
        # of the last call: prefills, decode_steps, preemptions, peak_blocks, prompt_blocks_shared
        self.stats: dict[str, int] = {}

    def free_cache(self) -> None:
        """Give the KV cache memory back; the next call allocates it again."""
        self.cache = None

    def _allocate_budget(self) -> PagedKVCache:
        return PagedKVCache.for_model(self.model, **self.budget, block_size=self.block_size)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int = 20, min_new_tokens: int = 0, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, num_return_sequences: int = 1,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                 seed: int | None = None, generator: torch.Generator | None = None,
                 return_logprobs: bool = False) -> GenerationOutput:
        """Like transformers' generate on left-padded input_ids [B, L] (attention_mask 1 = token).
        eos_token_id / pad_token_id default to the model config's; pass eos_token_id=[] for none.
        top_k=0 and top_p=1 disable those filters. return_logprobs: also the log-probability of every
        generated token as it was chosen (an RL trainer's old logprobs without a second forward)."""
        options = sampling_options(self.model.config, max_new_tokens, min_new_tokens, do_sample, temperature,
                                   top_k, top_p, eos_token_id, pad_token_id, self.model.device)
        input_ids, attention_mask = check_prompts(self.model, input_ids, attention_mask, max_new_tokens)
        if num_return_sequences < 1:
            raise ValueError(f"num_return_sequences must be >= 1, got {num_return_sequences}")
        generator = device_generator(seed, generator, self.model.device)
        run = Run(self.model, self._cache_for(attention_mask, num_return_sequences, max_new_tokens), options,
                  input_ids, attention_mask, num_return_sequences, generator, self.max_prefill_tokens, return_logprobs)
        with torch.inference_mode():
            output = run.execute()
        self.stats = run.stats
        # Outside inference mode, so that a trainer can feed the results to autograd-tracked forwards.
        return GenerationOutput(output.sequences.clone(), output.attention_mask.clone(),
                                output.generated_lengths.clone(),
                                None if output.logprobs is None else output.logprobs.clone())

    def _cache_for(self, attention_mask: torch.Tensor, n: int, max_new_tokens: int) -> PagedKVCache:
        """Check that every sequence fits alone, and size the cache when no budget was given."""
        # The last sampled token is never fed back, so a sequence holds at most L + max_new_tokens - 1.
        blocks = [blocks_for(int(length) + max_new_tokens - 1, self.block_size) for length in attention_mask.sum(1)]
        if self.budget:
            if self.cache is None:
                self.cache = self._allocate_budget()
            if max(blocks) > self.cache.num_blocks:
                raise ValueError(f"the KV cache budget holds {self.cache.num_blocks} blocks of {self.block_size} "
                                 f"tokens, but one sequence (prompt + max_new_tokens) needs {max(blocks)}: "
                                 f"raise kv_cache_bytes / kv_cache_fraction or lower max_new_tokens")
            return self.cache
        # Plus the spare block per row that admission keeps, so that all rows go in one prefill.
        needed = (sum(blocks) + len(blocks)) * n
        if self.cache is None or self.cache.num_blocks < needed:
            self.cache = None  # free the old pools before allocating the larger ones
            self.cache = PagedKVCache.for_model(self.model, num_blocks=needed, block_size=self.block_size)
        return self.cache


def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             **options) -> GenerationOutput:
    """One-shot generation (builds a Generator, so a KV cache, per call; keep a Generator to reuse it).
    model is a hybrid_engine CausalLM or a transformers causal LM (converted on every call)."""
    return Generator(model).generate(input_ids, attention_mask, **options)


def sampling_options(config, max_new_tokens, min_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id,
                     pad_token_id, device) -> SamplingOptions:
    eos = getattr(config, "eos_token_id", None) if eos_token_id is None else eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if any(not 0 <= e < config.vocab_size for e in eos):
        raise ValueError(f"eos_token_id must be in [0, vocab_size={config.vocab_size}), got {eos}")
    if pad_token_id is None:
        pad_token_id = getattr(config, "pad_token_id", None)
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    return SamplingOptions(max_new_tokens, min_new_tokens, do_sample, temperature, top_k, top_p,
                           torch.tensor(eos, dtype=torch.int64, device=device), pad_token_id)


def device_generator(seed: int | None, generator: torch.Generator | None,
                     device: torch.device) -> torch.Generator | None:
    """The sampling generator on the model's device: from a seed, or seeded from a generator held on
    another device (a trainer's host generator driving a GPU model), which advances it once."""
    if seed is not None and generator is not None:
        raise ValueError("give seed or generator, not both")
    if generator is not None and generator.device.type != device.type:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    if seed is not None:
        return torch.Generator(device).manual_seed(seed)
    return generator


def check_prompts(model: CausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated (input_ids, attention_mask) on the model's device."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
        raise ValueError("input_ids must be an integer tensor [batch, prompt_len]")
    if input_ids.numel() == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)})")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}")
    input_ids, attention_mask = input_ids.to(model.device, torch.int64), attention_mask.to(model.device, torch.int64)
    if bool(((attention_mask != 0) & (attention_mask != 1)).any()):
        raise ValueError("attention_mask must hold only 0 and 1")
    if bool((attention_mask.sum(1) == 0).any()):
        raise ValueError("attention_mask has an all-padding row (an empty prompt)")
    if bool((attention_mask.diff(dim=1) < 0).any()):
        raise ValueError("attention_mask must be left-padded (zeros, then ones, in every row)")
    tokens = input_ids[attention_mask.bool()]
    if bool(((tokens < 0) | (tokens >= model.vocab_size)).any()):
        raise ValueError(f"input_ids holds token ids outside [0, vocab_size={model.vocab_size})")
    longest = int(attention_mask.sum(1).max())
    if longest > model.max_positions:
        raise ValueError(f"input_ids has a prompt of {longest} tokens, more than the model's "
                         f"{model.max_positions} positions")
    if longest + max_new_tokens > model.max_positions:
        raise ValueError(f"max_new_tokens={max_new_tokens} after a prompt of {longest} tokens exceeds the "
                         f"model's {model.max_positions} positions")
    return input_ids, attention_mask


class Run:
    """One generate call: waiting groups, running rows, and the output being written."""

    def __init__(self, model: CausalLM, cache: PagedKVCache, options: SamplingOptions, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor, n: int, generator: torch.Generator | None, max_prefill_tokens: int,
                 return_logprobs: bool = False):
        self.model, self.cache, self.alloc, self.options = model, cache, cache.allocator, options
        self.generator, self.max_prefill_tokens, self.n = generator, max_prefill_tokens, n
        device, width = model.device, input_ids.shape[1]
        self.prompts = [ids[mask.bool()] for ids, mask in zip(input_ids, attention_mask)]
        self.prompt_mask = attention_mask.repeat_interleave(n, dim=0)
        self.out = torch.full((len(self.prompt_mask), width + options.max_new_tokens), options.pad_token_id,
                              dtype=torch.int64, device=device)
        self.out[:, :width] = input_ids.repeat_interleave(n, dim=0)
        self.first_new = width  # column of each row's first generated token
        self.num_generated = torch.zeros(len(self.out), dtype=torch.int64, device=device)
        self.logprobs = (torch.zeros(len(self.out), options.max_new_tokens, dtype=torch.float32, device=device)
                         if return_logprobs else None)
        self.waiting = deque(Group(list(range(b * n, (b + 1) * n)), p) for b, p in enumerate(self.prompts))
        # The running rows, in admission order (the newest last: preempted first).
        self.running: list[int] = []
        self.running_rows = torch.empty(0, dtype=torch.int64, device=device)
        self.context_lens = torch.empty(0, dtype=torch.int32, device=device)
        self.last_tokens = torch.empty(0, dtype=torch.int64, device=device)
        # Full prompt blocks are held once per prompt, whatever n: G separate copies would hold n of each.
        shared = (n - 1) * sum(len(p) // cache.block_size for p in self.prompts)
        self.stats = {"prefills": 0, "decode_steps": 0, "preemptions": 0, "peak_blocks": 0,
                      "prompt_blocks_shared": shared}

    def execute(self) -> GenerationOutput:
        try:
            while self.waiting or self.running:
                groups = self.admit()
                if groups:
                    self.prefill(groups)
                else:
                    self.decode()
        except BaseException:
            self.release_all()  # the cache outlives this call
            raise
        new_mask = torch.arange(self.options.max_new_tokens, device=self.out.device) < self.num_generated[:, None]
        mask = torch.cat([self.prompt_mask, new_mask.to(self.prompt_mask.dtype)], dim=1)
        return GenerationOutput(self.out, mask, self.num_generated, self.logprobs)

    def admit(self) -> list[Group]:
        """Waiting groups whose prompt blocks fit, keeping one spare block per running row for its next
        token; the first group always goes in when nothing runs (every sequence fits alone)."""
        free = self.alloc.num_free_blocks - len(self.running)
        groups, num_tokens = [], 0
        while self.waiting:
            group = self.waiting[0]
            need = blocks_for(len(group.tokens), self.cache.block_size) + len(group.rows)
            too_much = need > free or num_tokens + len(group.tokens) > self.max_prefill_tokens
            if too_much and (groups or self.running):
                break
            groups.append(self.waiting.popleft())
            free, num_tokens = free - need, num_tokens + len(group.tokens)
        return groups

    def prefill(self, groups: list[Group]) -> None:
        """All groups' tokens packed into one forward; each row samples from its group's last logits."""
        self.stats["prefills"] += 1
        lens = torch.tensor([len(g.tokens) for g in groups], device=self.out.device)
        for group in groups:
            self.alloc.allocate(group.rows[0], len(group.tokens))
        cu_seqlens = torch.nn.functional.pad(lens.cumsum(0), (1, 0)).to(torch.int32)
        seq_of_token = torch.repeat_interleave(torch.arange(len(groups), device=lens.device), lens)
        positions = torch.arange(int(cu_seqlens[-1]), device=lens.device) - cu_seqlens[:-1].long()[seq_of_token]
        block_tables = self.alloc.block_table([g.rows[0] for g in groups]).to(lens.device, torch.int64)
        bs = self.cache.block_size
        slots = block_tables[seq_of_token, positions // bs] * bs + positions % bs
        hidden = self.model(torch.cat([g.tokens for g in groups]), positions,
                            AttentionBatch(slots, cu_seqlens=cu_seqlens), self.cache.layers,
                            select=cu_seqlens[1:].long() - 1)
        logits = self.model.compute_logits(hidden)
        for group in groups:
            for child in group.rows[1:]:
                self.alloc.fork(group.rows[0], child)
        sizes = torch.tensor([len(g.rows) for g in groups], device=lens.device)
        rows = torch.tensor([r for g in groups for r in g.rows], device=lens.device)
        tokens, done = self.sample(rows, logits.repeat_interleave(sizes, dim=0))
        self.note_blocks_in_use()
        self.release(rows[done].tolist())
        keep = ~done
        self.running += rows[keep].tolist()
        self.running_rows = torch.cat([self.running_rows, rows[keep]])
        self.context_lens = torch.cat([self.context_lens, lens.repeat_interleave(sizes)[keep].to(torch.int32)])
        self.last_tokens = torch.cat([self.last_tokens, tokens[keep]])

    def decode(self) -> None:
        """One token for every running row."""
        self.stats["decode_steps"] += 1
        slots, copies = self.append()
        if copies.numel():
            self.cache.copy_blocks(copies.to(self.out.device))
        block_tables = self.alloc.block_table(self.running).to(self.out.device)
        positions = self.context_lens.long()
        self.context_lens += 1
        batch = AttentionBatch(slots.to(self.out.device), block_tables=block_tables, context_lens=self.context_lens)
        with kernels.spinning_workers():
            logits = self.model.compute_logits(self.model(self.last_tokens, positions, batch, self.cache.layers))
        self.last_tokens, done = self.sample(self.running_rows, logits)
        self.note_blocks_in_use()
        if bool(done.any()):
            self.release([r for r, d in zip(self.running, done.tolist()) if d])
            self.keep(~done)

    def append(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots for the running rows' next tokens, preempting the newest rows while blocks run out."""
        while True:
            try:
                return self.alloc.append(self.running)
            except OutOfBlocksError:
                if len(self.running) == 1:
                    raise
                self.preempt_newest()

    def preempt_newest(self) -> None:
        """Free the newest row; it waits at the front to be recomputed from its tokens so far."""
        self.stats["preemptions"] += 1
        row = self.running[-1]
        self.alloc.free(row)
        generated = self.out[row, self.first_new:self.first_new + int(self.num_generated[row])]
        self.waiting.appendleft(Group([row], torch.cat([self.prompts[row // self.n], generated])))
        keep = torch.ones(len(self.running), dtype=torch.bool, device=self.out.device)
        keep[-1] = False
        self.keep(keep)

    def sample(self, rows: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Choose and record the next token of rows; returns (tokens, rows now finished)."""
        num_generated = self.num_generated[rows]
        if self.logprobs is not None:  # of the raw logits: choose_tokens may mask some in place
            log_z = logits.float().logsumexp(-1)
        tokens = choose_tokens(logits, self.options, num_generated, self.generator)
        if self.logprobs is not None:  # a chosen token was never masked
            self.logprobs[rows, num_generated] = logits.gather(1, tokens[:, None])[:, 0].float() - log_z
        self.out[rows, self.first_new + num_generated] = tokens
        self.num_generated[rows] = num_generated + 1
        done = num_generated + 1 >= self.options.max_new_tokens
        if self.options.eos_token_ids.numel():
            done |= torch.isin(tokens, self.options.eos_token_ids)
        return tokens, done

    def note_blocks_in_use(self) -> None:
        in_use = self.cache.num_blocks - self.alloc.num_free_blocks
        self.stats["peak_blocks"] = max(self.stats["peak_blocks"], in_use)

    def release(self, rows: list[int]) -> None:
        for row in rows:
            self.alloc.free(row)

    def release_all(self) -> None:
        for row in range(len(self.out)):
            try:
                self.alloc.free(row)
            except KeyError:
                pass

    def keep(self, mask: torch.Tensor) -> None:
        self.running = [r for r, k in zip(self.running, mask.tolist()) if k]
        self.running_rows = self.running_rows[mask]
        self.context_lens = self.context_lens[mask]
        self.last_tokens = self.last_tokens[mask]
