"""A synthetic preference task that a tiny model trained from scratch on a CPU learns in minutes.

The prompt asks for words on a topic (" Human: tell me about food Assistant:"); an answer is 5-12
words. score() is the rule: the fraction of the answer's words that belong to the topic, minus one
for every word that repeats the word before it, minus 0.1 per word outside 5-12. Both answers of a
pair are sampled from the same imperfect writer (each word on topic with a per-answer probability),
and the rule labels the better one chosen. So SFT on chosen answers gives a decent, not perfect,
actor, a reward model can read the rule from the tokens (topic word in the prompt, answer words),
and PPO has room to push the on-topic fraction towards 1.

    python -m rlhf.example data DIR    # DIR/train.json, DIR/eval.json
    python -m rlhf.example model DIR   # tokenizer + random OPT base model, save_pretrained
    python -m rlhf.example all DIR     # DIR/data and DIR/base-model
"""
from __future__ import annotations

import json
import os
import random

TOPIC_WORDS = {
    "animals": "cat dog horse bird fish cow sheep goat mouse lion".split(),
    "food": "bread rice apple cheese soup egg milk honey bean cake".split(),
    "weather": "rain snow wind sun cloud storm fog frost heat thunder".split(),
    "music": "song drum piano guitar violin note rhythm melody choir flute".split(),
    "space": "star moon planet comet orbit galaxy rocket meteor nebula asteroid".split(),
    "sports": "ball goal team race swim tennis soccer runner coach medal".split(),
    "tools": "hammer saw drill wrench nail screw pliers shovel axe ladder".split(),
    "colors": "red blue green yellow purple orange pink brown black white".split(),
}
FILLERS = "um maybe stuff thing well like so very really okay".split()
TEMPLATES = ("tell me about {}", "list some {} words", "say words about {}", "name {} things")
MIN_WORDS, MAX_WORDS = 5, 12
REPEAT_PROB = 0.1  # the writer's chance of repeating its previous word
MIN_MARGIN = 0.2  # pairs closer than this in score are skipped, as ties are: the label would be noise
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
SIZES = {  # OPT shapes: "tiny" ~0.12M parameters for tests, "small" ~1.2M for the example run
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=256),
    "small": dict(hidden_size=128, num_hidden_layers=6, num_attention_heads=4, ffn_dim=512),
}


def vocabulary() -> list[str]:
    """Every token: specials, the prompt frame, template words, topic names, topic words, fillers."""
    template_words = sorted({w for t in TEMPLATES for w in t.format("").split()})
    words = [w for ws in TOPIC_WORDS.values() for w in ws]
    return [*SPECIAL_TOKENS, "Human:", "Assistant:", *template_words, *TOPIC_WORDS, *words, *FILLERS]


def topic_of(prompt: str) -> str:
    """The topic a prompt asks about (the last topic name in it)."""
    topics = [w for w in prompt.split() if w in TOPIC_WORDS]
    if not topics:
        raise ValueError(f"prompt {prompt!r} names none of the topics {sorted(TOPIC_WORDS)}")
    return topics[-1]


def score(prompt: str, answer: str) -> float:
    """The task's metric, higher is better, at most 1: on-topic fraction minus repeat and length penalties."""
    topic, words = topic_of(prompt), answer.split()
    if not words:
        return -1.0
    on_topic = sum(w in TOPIC_WORDS[topic] for w in words)
    repeats = sum(a == b for a, b in zip(words, words[1:]))
    outside = max(0, MIN_WORDS - len(words), len(words) - MAX_WORDS)
    return (on_topic - repeats) / len(words) - 0.1 * outside


def sample_answer(topic: str, quality: float, rng: random.Random) -> str:
    """An answer from the imperfect writer: each word on topic with probability `quality`."""
    off_topic = FILLERS + [w for t, ws in TOPIC_WORDS.items() if t != topic for w in ws]
    words = []
    for _ in range(rng.randint(MIN_WORDS, MAX_WORDS)):
        if words and rng.random() < REPEAT_PROB:
            words.append(words[-1])
        else:
            words.append(rng.choice(TOPIC_WORDS[topic] if rng.random() < quality else off_topic))
    return " " + " ".join(words)


def make_prompt(rng: random.Random) -> str:
    return " Human: " + rng.choice(TEMPLATES).format(rng.choice(list(TOPIC_WORDS))) + " Assistant:"


def make_records(n: int, seed: int) -> list[dict]:
    """n preference records {"prompt", "chosen", "rejected"}; score(chosen) - score(rejected) >= MIN_MARGIN."""
    rng, records = random.Random(seed), []
    while len(records) < n:
        prompt = make_prompt(rng)
        topic = topic_of(prompt)
        a, b = (sample_answer(topic, rng.random(), rng) for _ in range(2))
        if abs(score(prompt, a) - score(prompt, b)) < MIN_MARGIN:
            continue
        chosen, rejected = (a, b) if score(prompt, a) > score(prompt, b) else (b, a)
        records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return records


def make_tokenizer():
    """A word-level tokenizer over the task vocabulary (tokenizers library) as a PreTrainedTokenizerFast.

    The prompt gets a BOS like OPT's and LLaMA's tokenizers give it; padding is on the left for generation.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side="left", clean_up_tokenization_spaces=False)


def make_base_model(tokenizer, size: str = "tiny", seed: int = 0, positions: int = 128):
    """A randomly initialised OPTForCausalLM over the tokenizer's vocabulary (`positions` tokens long at most:
    DeepSpeed-Chat's scripts train on 512)."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    shape = SIZES[size]
    config = OPTConfig(vocab_size=len(tokenizer), max_position_embeddings=positions,
                       word_embed_proj_dim=shape["hidden_size"], pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, dropout=0.0, attention_dropout=0.0, **shape)
    torch.manual_seed(seed)
    return OPTForCausalLM(config)


def write_data(directory: str, num_records: int, seed: int) -> None:
    """DIR/train.json and DIR/eval.json (the last 10%, at least 1 record) in the local JSON format."""
    records = make_records(num_records, seed)
    n_eval = max(1, num_records // 10)
    os.makedirs(directory, exist_ok=True)
    for name, part in (("train", records[:-n_eval]), ("eval", records[-n_eval:])):
        with open(os.path.join(directory, f"{name}.json"), "w") as f:
            json.dump(part, f, indent=0)
    print(f"wrote {num_records - n_eval} train and {n_eval} eval records to {directory}")


def write_model(directory: str, size: str, seed: int, positions: int = 128) -> None:
    tokenizer = make_tokenizer()
    model = make_base_model(tokenizer, size, seed, positions)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote a {size} OPT ({n_params:,} parameters) and its tokenizer to {directory}")
