"""A conversation with an actor in the data's prompt format (" Human: {text} Assistant:"), on
hybrid_engine.Generator: loading an actor from any step, one multi-turn Chat (the conversation is the
next turn's context, the oldest turns dropped when it outgrows the positions; answers streamed token
by token and cut where the model starts the next human turn), and complete() for batches of prompts.
"""
import os
from collections.abc import Callable

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from hybrid_engine import Generator, choose_dtype
from hybrid_engine.models import from_hf

HUMAN, ASSISTANT = "Human:", "Assistant:"


class StopGeneration(Exception):
    """Raised from the streaming hook once the model starts the next human turn: Generator releases
    the sequence's KV blocks and the answer so far is kept."""


def resolve_checkpoint(path: str) -> str:
    """The directory holding the actor: path itself, or path/actor for a step-3 output folder."""
    for candidate in (os.path.join(path, "actor"), path):
        if os.path.isfile(os.path.join(candidate, "config.json")):
            return candidate
    raise ValueError(f"--path {path!r}: no checkpoint there (no config.json in it or in {path}/actor; "
                     f"an unfinished step leaves none)")


def load_actor(path: str, dtype: str = "auto"):
    """(hybrid_engine inference model, tokenizer) of the causal LM at path, in dtype (a --dtype value);
    reward models are refused."""
    path = resolve_checkpoint(path)
    architectures = AutoConfig.from_pretrained(path).architectures or []
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        raise ValueError(f"--path {path!r} is a reward model ({architectures[0]}, step 2); chat needs a causal LM: "
                         f"the step-1 actor (actor-models/NAME) or the step-3 actor (step3-models/NAME)")
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=choose_dtype(dtype, "cpu").dtype)
    return from_hf(hf_model.eval()), AutoTokenizer.from_pretrained(path)


def human_turn(text: str) -> str:
    return f" {HUMAN} {text.strip()} {ASSISTANT}"


def visible_answer(text: str, final: bool) -> tuple[str, bool]:
    """(the part of an answer that can be shown for good, whether the model began a human turn): cut at
    "Human:"; while generating, hold back a tail that may still become it (or an unfinished character)."""
    cut = text.find(HUMAN)
    if cut >= 0:
        return text[:cut].rstrip(), True
    if not final:
        hold = next((n for n in range(len(HUMAN) - 1, 0, -1) if text.endswith(HUMAN[:n])), 0)
        text = text[:len(text) - hold].rstrip("\ufffd")
    return text.rstrip(), False


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text)["input_ids"]


class Chat:
    """One conversation over one Generator (its KV cache is reused from turn to turn)."""

    def __init__(self, model, tokenizer, max_new_tokens: int, sampling: dict, seed: int):
        if not 1 <= max_new_tokens < model.max_positions - 1:
            raise ValueError(f"--max_new_tokens must be in [1, {model.max_positions - 2}] for a model with "
                             f"{model.max_positions} positions, got {max_new_tokens}")
        self.generator, self.tokenizer = Generator(model), tokenizer
        self.max_new_tokens, self.sampling = max_new_tokens, sampling
        self.rng = torch.Generator().manual_seed(seed)
        self.on_text: Callable[[str], None] = lambda text: None
        self.new_ids: list[int] = []
        self.context_len = 0  # tokens the last answer was generated from
        model.register_forward_pre_hook(self._stream)
        self.clear()

    def clear(self) -> None:
        self.turns: list[str] = []  # " Human: ... Assistant: answer" each
        self.trimmed = False

    def context_ids(self, message: str) -> list[int]:
        """Token ids of the conversation plus the new message; the oldest turns (then the oldest tokens)
        are dropped while they leave fewer than max_new_tokens free positions."""
        positions = self.generator.model.max_positions
        limit = positions - self.max_new_tokens
        turns = [*self.turns, human_turn(message)]
        ids = encode(self.tokenizer, "".join(turns))
        while len(ids) > limit and len(turns) > 1:
            turns.pop(0)
            ids = encode(self.tokenizer, "".join(turns))
        if len(ids) > limit or len(turns) <= len(self.turns):
            self.turns = turns[:-1]
            if not self.trimmed:
                print(f"[the conversation no longer fits in the model's {positions} positions with "
                      f"{self.max_new_tokens} new tokens: its oldest part is dropped]", flush=True)
            self.trimmed = True
        return ids[-limit:]

    def _stream(self, module, args) -> None:
        """Forward pre-hook on the inference model: each decode step feeds back the token sampled last."""
        if args[2].is_prefill:
            return
        self.new_ids.append(int(args[0][0]))
        shown, human = visible_answer(self.tokenizer.decode(self.new_ids, skip_special_tokens=True), final=False)
        self.on_text(shown)
        if human:
            raise StopGeneration

    def reply(self, message: str, on_text: Callable[[str], None] = lambda text: None) -> str:
        """The answer to message given the conversation so far, which the turn then joins;
        on_text(answer so far) is called as the answer grows."""
        ids = self.context_ids(message)
        self.new_ids, self.on_text, self.context_len = [], on_text, len(ids)
        try:
            out = self.generator.generate(torch.tensor([ids]), max_new_tokens=self.max_new_tokens,
                                          generator=self.rng, eos_token_id=self.tokenizer.eos_token_id,
                                          **self.sampling)
            self.new_ids = out.sequences[0, len(ids):len(ids) + int(out.generated_lengths[0])].tolist()
        except StopGeneration:
            pass
        answer, _ = visible_answer(self.tokenizer.decode(self.new_ids, skip_special_tokens=True), final=True)
        on_text(answer)
        self.turns.append(human_turn(message) + ("" if answer[:1].isspace() else " ") + answer)
        return answer


def complete(model, tokenizer, prompts: list[str], max_new_tokens: int, **sampling) -> list[str]:
    """One answer per prompt (prompt texts as the data gives them), cut where a human turn begins."""
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    out = Generator(model).generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=max_new_tokens,
                                    eos_token_id=tokenizer.eos_token_id, **sampling)
    width = batch["input_ids"].shape[1]
    texts = [tokenizer.decode(row[width:width + int(n)], skip_special_tokens=True)
             for row, n in zip(out.sequences, out.generated_lengths)]
    return [visible_answer(text, final=True)[0] for text in texts]
