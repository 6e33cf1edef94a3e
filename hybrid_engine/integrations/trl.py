"""TRL's GRPOTrainer and RLOOTrainer with completions from hybrid_engine.HybridEngine, switched on by the class:

    from hybrid_engine.integrations.trl import HybridGRPOTrainer        # or HybridRLOOTrainer
    trainer = HybridGRPOTrainer(model=model, reward_funcs=reward_fn, args=trl.GRPOConfig(...),
                                train_dataset=ds, processing_class=tokenizer,
                                hybrid_engine={"tp_size": 2})           # optional: HybridEngine's keyword arguments
    trainer.train()

Every generation (each training step's, evaluation's, each turn of GRPO's tool-call loop) runs between
HybridEngine.eval(), which reshards the weights being trained (ZeRO-3 shards, a DDP or plain module, PEFT LoRA
merged into the inference slices) into inference weights, and HybridEngine.train() in a `finally`, which frees
them and the KV cache before training: no copy of the weights outlives a generation, so none can go stale. The
engine is built at the first generation, on every rank together: the DeepSpeed engine or DDP wrapper it wraps
exists only once train() starts, and its tensor-parallel groups are a collective.

TRL repeats each prompt num_generations times in a row. Each run of equal prompts is generated once with
num_return_sequences, so the samples share the prompt's KV blocks (fork, copy-on-write). The ranks of a
tensor-parallel group generate together with the same options, so the group size is the gcd of every run
length on those ranks: a prompt group that TRL splits across ranks still shares what the split leaves.

Generation options are read from what `model.generate(generation_config=trainer.generation_config)` would run
with (TRL's options, then the checkpoint's generation_config.json for what TRL leaves unset). These map to ours:
max_new_tokens (max_completion_length), min_new_tokens, do_sample (greedy: generation_kwargs={"do_sample": False}),
temperature, top_p, top_k, eos_token_id, pad_token_id. bos_token_id has no effect (prompts are never empty).
Anything else that differs from transformers' defaults (min_p, repetition_penalty, cache_implementation, num_beams,
any other generation_kwargs) is refused at construction with its name and value, and so are TRL's other
generation backends (use_vllm, use_transformers_continuous_batching, rollout_func) and GRPO's
cast_lm_head_to_fp32 unless hybrid_engine={"dtype": torch.float32}. ds3_gather_for_generation and
pad_to_multiple_of do not apply: nothing is gathered whole and prompts are not padded to a multiple.

On CPUs (the one place these settings are documented): GRPOConfig and RLOOConfig default to bf16=True, which
transformers refuses on a CPU unless use_cpu=True; with use_cpu=True the ranks of torchrun or `accelerate
launch` form one gloo world, with DeepSpeed too (pass `deepspeed=` a ZeRO config as usual). With bf16=False but
no use_cpu, accelerate would run every rank as a world of its own; these trainers refuse that. bf16 is the
training dtype; HybridEngine generates in the training weights' dtype unless hybrid_engine={"dtype": ...} says
otherwise (a torch dtype, or "auto", "fp32", "bf16": hybrid_engine.choose_dtype picks by what the CPU can do).

Metrics, through TRL's log under the trainer's mode (per logged step, the mean over its generations):
hybrid_engine/generation_seconds (slowest rank), hybrid_engine/tokens_per_second (all ranks' tokens over that),
hybrid_engine/reshard_seconds (slowest rank), hybrid_engine/reshard_bytes (received, all ranks),
hybrid_engine/memory_bytes (largest rank: inference weights, prepacked copies, KV cache, exchange buffers) and
hybrid_engine/kv_prompt_blocks_shared (prompt KV blocks the forks held once instead of once per sample).
"""
import inspect
import math
import warnings

import torch
import torch.distributed as dist
import trl
from torch.nn.utils.rnn import pad_sequence

from hybrid_engine.capability import choose_dtype
from hybrid_engine.engine import HybridEngine, check_tp_size, unwrap
from hybrid_engine.generation import GenerationOutput
from hybrid_engine.models.registry import model_class

# transformers' generation options that HybridEngine.generate takes under the same name
MAPPED = ("max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_p", "top_k", "eos_token_id",
          "pad_token_id")
# entries of a GenerationConfig that do not change the tokens generated from non-empty prompts
NO_EFFECT = ("bos_token_id", "disable_compile", "_from_model_config", "transformers_version")
# TRL's own ways to generate: with hybrid_engine they would be silently unused
OTHER_BACKENDS = ("use_vllm", "use_transformers_continuous_batching")
ENGINE_OPTIONS = tuple(inspect.signature(HybridEngine).parameters)[1:]  # the keyword arguments after `actor`
METRICS = ("generation_seconds", "tokens_per_second", "reshard_seconds", "reshard_bytes", "memory_bytes",
           "kv_prompt_blocks_shared")


def check_config(config, rollout_func, options: dict) -> None:
    """Refuse, before TRL builds anything, its other generation backends and what they would need."""
    chosen = [f"{name}=True" for name in OTHER_BACKENDS if getattr(config, name, False)]
    chosen += ["rollout_func"] if rollout_func is not None else []
    if chosen:
        raise ValueError(f"{', '.join(chosen)}: the Hybrid trainers generate with hybrid_engine, so this would be "
                         f"ignored; turn it off, or use TRL's own trainer")
    if getattr(config, "cast_lm_head_to_fp32", False) and options.get("dtype") != torch.float32:
        raise ValueError("cast_lm_head_to_fp32=True: hybrid_engine computes logits in its inference dtype; pass "
                         "hybrid_engine={'dtype': torch.float32} for fp32 logits, or set cast_lm_head_to_fp32=False")


def engine_options(options: dict | None, device: torch.device | str) -> dict:
    """HybridEngine's keyword arguments from the trainer's hybrid_engine dict."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(ENGINE_OPTIONS))
    if unknown:
        raise ValueError(f"hybrid_engine: unknown option(s) {unknown}; HybridEngine takes {list(ENGINE_OPTIONS)}")
    options.setdefault("report", False)  # the metrics go to TRL's log instead of stdout
    if isinstance(options.get("dtype"), str):
        choice = choose_dtype(options["dtype"], device)
        if choice.warning:
            warnings.warn(f"hybrid_engine: {choice.message}", stacklevel=3)
        options["dtype"] = choice.dtype
    return options


def generation_options(model: torch.nn.Module, generation_config) -> dict:
    """HybridEngine.generate's options for what model.generate(generation_config=...) would run with;
    refuses every entry that would change the tokens and has no counterpart here."""
    hf = unwrap(model)
    effective = hf._prepare_generation_config(generation_config)[0].to_dict()
    defaults = hf.generation_config._get_default_generation_params()
    # an entry transformers has no default for is off when unset, False, 0 or empty
    refused = {k: v for k, v in effective.items()
               if k not in MAPPED + NO_EFFECT and v != defaults.get(k) and (k in defaults or v)}
    if refused:
        listed = ", ".join(f"{k}={v!r}" for k, v in sorted(refused.items()))
        raise ValueError(f"hybrid_engine cannot generate with {listed} (set through the trainer's config, its "
                         f"generation_kwargs or the model's generation_config); it supports {', '.join(MAPPED)}")
    options = {k: effective[k] for k in MAPPED}
    options["min_new_tokens"] = options["min_new_tokens"] or 0
    return options


def check_setup(trainer, options: dict) -> None:
    """What would otherwise fail (or silently go wrong) at the first generation."""
    ranks = trainer.accelerator.num_processes
    if dist.is_initialized() and dist.get_world_size() != ranks:
        raise ValueError(f"torch.distributed has {dist.get_world_size()} ranks but accelerate runs this trainer "
                         f"on {ranks}: each rank would train alone. On CPUs set use_cpu=True in the trainer's config")
    if trainer.args.fsdp or trainer.is_fsdp_enabled:  # asked for (accelerate ignores it on CPUs) or running
        raise ValueError("fsdp: hybrid_engine reshards DeepSpeed ZeRO-0..3, DDP or single-process weights, not FSDP's; "
                         "use deepspeed= a ZeRO-3 config instead")
    config = unwrap(trainer.model).config
    model_class(config)  # an architecture hybrid_engine has no inference model for fails here
    check_tp_size(config, options.get("tp_size", 1), ranks)


def run_lengths(prompt_ids: list) -> list[int]:
    """Lengths of the runs of equal consecutive prompts."""
    lengths = []
    for i, ids in enumerate(prompt_ids):
        if i and list(ids) == list(prompt_ids[i - 1]):
            lengths[-1] += 1
        else:
            lengths.append(1)
    return lengths


def left_pad(prompt_ids: list, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [torch.as_tensor(ids, dtype=torch.int64) for ids in prompt_ids]
    ids = pad_sequence(rows, batch_first=True, padding_value=pad_token_id, padding_side="left")
    mask = pad_sequence([torch.ones_like(r) for r in rows], batch_first=True, padding_value=0, padding_side="left")
    return ids, mask


def completions(out: GenerationOutput, prompt_width: int, eos_token_ids: list[int]) -> list[list[int]]:
    """Each row's new tokens up to and including the first of TRL's EOS ids, as TRL cuts them."""
    rows = []
    for tokens, length in zip(out.sequences[:, prompt_width:].tolist(), out.generated_lengths.tolist()):
        tokens = tokens[:length]
        end = next((i + 1 for i, t in enumerate(tokens) if t in eos_token_ids), length)
        rows.append(tokens[:end])
    return rows


class HybridGeneration:
    """What HybridGRPOTrainer and HybridRLOOTrainer share (placed before the TRL trainer in their bases)."""

    def __init__(self, *args, hybrid_engine: dict | None = None, **kwargs):
        given = inspect.signature(super().__init__).bind(*args, **kwargs).arguments
        config = given.get("args")
        self.hybrid_options = engine_options(hybrid_engine, config.device if config is not None else "cpu")
        check_config(config, given.get("rollout_func"), self.hybrid_options)
        super().__init__(*args, **kwargs)
        check_setup(self, self.hybrid_options)
        self.sampling = generation_options(self.model, self.generation_config)
        self.hybrid: HybridEngine | None = None
        self.hybrid_totals = {"seconds": 0.0, "tokens": 0, "shared": 0}

    def hybrid_engine(self) -> HybridEngine:
        """The engine around the model being trained; built again when the wrapper changes (evaluate()
        before train(), then DeepSpeed's engine)."""
        if self.hybrid is None or self.hybrid.actor is not self.model_wrapped:
            self.hybrid = HybridEngine(self.model_wrapped, **self.hybrid_options)
        return self.hybrid

    def _generate(self, prompts: list):
        engine = self.hybrid_engine()
        self.hybrid_totals = {"seconds": 0.0, "tokens": 0, "shared": 0}
        engine.eval()
        try:
            out = super()._generate(prompts)
        finally:
            engine.train()
        self._log_hybrid_metrics(engine)
        return out

    def _complete(self, prompt_ids: list, images, multimodal_fields) -> list[list[int]]:
        """TRL's completion ids (each prompt as often as TRL repeated it), each group generated once."""
        if images is not None or multimodal_fields:
            raise ValueError("hybrid_engine generates from text prompts only; this batch has images or other "
                             "multimodal inputs")
        engine = self.hybrid_engine()
        n = self._group_size(engine, prompt_ids)
        ids, mask = left_pad(prompt_ids[::n], self._tokenizer.pad_token_id)
        out = engine.generate(ids, mask, num_return_sequences=n, **self.sampling)
        self._add_totals(engine)
        return completions(out, ids.shape[1], self.eos_token_ids)

    def _group_size(self, engine: HybridEngine, prompt_ids: list) -> int:
        """num_return_sequences, the same on every rank of the TP group (they generate together)."""
        n = math.gcd(*run_lengths(prompt_ids))
        if engine.tp_size > 1:
            sizes = [None] * engine.tp_size
            dist.all_gather_object(sizes, n, group=engine.tp_group)
            n = math.gcd(*sizes)
        return n

    def _add_totals(self, engine: HybridEngine) -> None:
        totals = self.hybrid_totals
        totals["seconds"] += engine.stats["generate_seconds"]
        totals["tokens"] += engine.stats["generated_tokens"]
        # every rank of a TP group runs the group's generation: count its sharing once
        totals["shared"] += engine.generator.stats["prompt_blocks_shared"] / engine.tp_size

    def _log_hybrid_metrics(self, engine: HybridEngine) -> None:
        totals, stats = self.hybrid_totals, engine.stats
        mine = [totals["seconds"], totals["tokens"], stats["reshard_seconds"], stats["reshard_bytes_received"],
                stats["peak_inference_bytes"], totals["shared"]]
        ranks = self.accelerator.gather(torch.tensor([mine], dtype=torch.float64, device=self.accelerator.device))
        seconds = ranks[:, 0].max()
        values = (seconds, ranks[:, 1].sum() / seconds, ranks[:, 2].max(), ranks[:, 3].sum(), ranks[:, 4].max(),
                  ranks[:, 5].sum())
        mode = "train" if self.model.training else "eval"
        for name, value in zip(METRICS, values):
            self._metrics[mode][f"hybrid_engine/{name}"].append(float(value))


class HybridGRPOTrainer(HybridGeneration, trl.GRPOTrainer):
    """trl.GRPOTrainer generating with HybridEngine: the same arguments plus hybrid_engine (see the module)."""

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        # no sampling logprobs, as from TRL's transformers path: its importance-sampling correction is vLLM's
        return self._complete(prompt_ids, images, multimodal_fields), None


class HybridRLOOTrainer(HybridGeneration, trl.RLOOTrainer):
    """trl.RLOOTrainer generating with HybridEngine: the same arguments plus hybrid_engine (see the module)."""

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields):
        return self._complete(prompt_ids, images, multimodal_fields)
