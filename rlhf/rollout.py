"""The generation side of step 3: left-padded prompts in, answers out, behind one interface with the
ways a user can generate from a (ZeRO-3) DeepSpeed actor:

  ZeRO3Generate   transformers' generate on the DeepSpeed module: under ZeRO-3 every forward gathers
                  every layer (DeepSpeed-Chat without its hybrid engine).
  GatherOnce      every actor parameter gathered once per call (one all_gather each, LoRA merged) into
                  a plain transformers model, then its generate; the plain model's weights are dropped
                  afterwards (as vLLM's sleep mode does), so training never holds a second actor.
  HybridGenerate  hybrid_engine.HybridEngine: ZeRO-3 shards resharded into tensor-parallel inference
                  weights and a paged KV cache, given back before training.

Each is called as rollout(input_ids, attention_mask, sampling, samples, generator) -> Rollout, where
row b * samples + k of the output is answer k to prompt b. HybridGenerate(..., logprobs=True) also
returns each answer token's log-probability as it was sampled; the others leave it to the caller's
training forward.
"""
import time
from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn

from hybrid_engine import HybridEngine
from hybrid_engine.engine import unwrap, weights_device
from hybrid_engine.lora import base_name, find_adapters, is_adapter_param, merged
from hybrid_engine.memory import handing_back, return_freed_memory


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    min_new_tokens: int = 0
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def options(self, samples: int) -> dict:
        """Keyword arguments of transformers' generate and of HybridEngine.generate."""
        return {**asdict(self), "num_return_sequences": samples}


@dataclass
class Rollout:
    sequences: torch.Tensor  # int64 [B * G, P + A]: the prompt as given, then the answer, padded after EOS
    lengths: torch.Tensor    # int64 [B * G]: new tokens per row, EOS included
    times: dict[str, float] = field(default_factory=dict)  # seconds of parts inside generation (reshard, gather)
    stats: dict[str, float] = field(default_factory=dict)  # e.g. the KV cache's peak blocks
    logprobs: torch.Tensor | None = None  # float32 [B * G, A]: log p of each answer token as sampled, 0 after


class Generate(Protocol):
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, sampling: Sampling, samples: int,
                 generator: torch.Generator) -> Rollout: ...


def answer_lengths(answers: torch.Tensor, eos_token_id: int | None) -> torch.Tensor:
    """New tokens per row of transformers' generate output (up to and including the first EOS)."""
    is_eos = answers == eos_token_id
    return torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, answers.shape[1])


def hf_rollout(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, sampling: Sampling,
               samples: int, **kwargs) -> Rollout:
    """transformers' generate (it samples from torch's global generator)."""
    seq = model.generate(input_ids=input_ids, attention_mask=attention_mask, **sampling.options(samples), **kwargs)
    return Rollout(seq, answer_lengths(seq[:, input_ids.shape[1]:], sampling.eos_token_id))


class ZeRO3Generate:
    def __init__(self, actor: nn.Module):
        self.actor = actor

    def __call__(self, input_ids, attention_mask, sampling, samples, generator) -> Rollout:
        partitioned = self.actor.zero_optimization_stage() == 3 and dist.is_initialized() and dist.get_world_size() > 1
        return hf_rollout(self.actor.module, input_ids, attention_mask, sampling, samples, synced_gpus=partitioned)


class GatherOnce:
    """`plain` is a transformers model of the actor's architecture, built once; its storage exists
    only during a call."""

    def __init__(self, actor: nn.Module, plain: nn.Module):
        self.device = weights_device(unwrap(actor))
        self.actor, self.plain = actor, plain.eval().to(self.device)
        self.params = dict(self.plain.named_parameters())
        self.shapes = {name: p.shape for name, p in self.params.items()}
        self.release()

    def __call__(self, input_ids, attention_mask, sampling, samples, generator) -> Rollout:
        start = time.perf_counter()
        self.gather()
        gathered = time.perf_counter() - start
        try:
            out = hf_rollout(self.plain, input_ids, attention_mask, sampling, samples)
        finally:
            self.release()
        out.times["gather"] = gathered
        return out

    def release(self) -> None:
        with handing_back():
            for p in self.params.values():
                p.data = torch.empty(0, dtype=p.dtype, device=self.device)
        return_freed_memory()

    @torch.no_grad()
    def gather(self) -> None:
        import deepspeed

        for name, p in self.params.items():
            p.data = torch.empty(self.shapes[name], dtype=p.dtype, device=self.device)
        module = unwrap(self.actor)
        for name, p in module.named_parameters():  # one all_gather per parameter, as GatheredParameters does
            if not is_adapter_param(name):
                with deepspeed.zero.GatheredParameters([p]):
                    self.params[base_name(name)].copy_(p)
        for adapter in find_adapters(module):
            with deepspeed.zero.GatheredParameters([adapter.a, adapter.b]):
                w = self.params[adapter.weight]
                w.copy_(merged(w, adapter.delta()))


class HybridGenerate:
    """logprobs: record each answer token's log-probability under the inference weights as it is sampled."""

    def __init__(self, hybrid: HybridEngine, logprobs: bool = False):
        self.hybrid, self.logprobs = hybrid, logprobs

    def __call__(self, input_ids, attention_mask, sampling, samples, generator) -> Rollout:
        start = time.perf_counter()
        self.hybrid.eval()
        resharded = time.perf_counter() - start
        try:
            out = self.hybrid.generate(input_ids, attention_mask, generator=generator, return_logprobs=self.logprobs,
                                       **sampling.options(samples))
            stats = {f"kv_{k}": float(v) for k, v in self.hybrid.generator.stats.items() if "blocks" in k}
            cache = self.hybrid.generator.cache
            stats["kv_block_bytes"] = float(cache.k[:, 0].nbytes + cache.v[:, 0].nbytes)
        finally:
            self.hybrid.train()  # inference weights and KV cache go back before training
        return Rollout(out.sequences, out.generated_lengths, {"reshard": resharded}, stats, out.logprobs)
