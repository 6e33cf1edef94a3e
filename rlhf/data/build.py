"""Split, blend, tokenize and cache the records of one RLHF stage.

The cache is keyed by everything that decides its contents, the bytes of local source files
included (DeepSpeed-Chat keys by names only and serves stale data after an edit), and holds only
tensors and plain data loaded with weights_only=True, so a planted file cannot run code.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
from fractions import Fraction

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from rlhf.data.sources import DataError, Source, load_source

CACHE_FORMAT = 1  # bump when the tokenization below changes
HASH_CONTENTS_UP_TO = 64 << 20  # bigger files are keyed by size and modification time


class RaggedDataset(Dataset):
    """Records of 1-D LongTensors stored as one flat tensor plus offsets per column, and scalar columns."""

    def __init__(self, ragged: dict[str, tuple[torch.Tensor, torch.Tensor]], scalar: dict[str, torch.Tensor]):
        self.ragged, self.scalar = ragged, scalar

    @classmethod
    def from_lists(cls, ragged: dict[str, list[list[int]]], scalar: dict[str, list[int]]) -> RaggedDataset:
        def flat(rows):
            offsets = torch.tensor([0] + [len(r) for r in rows], dtype=torch.long).cumsum(0)
            return torch.tensor([t for r in rows for t in r], dtype=torch.long), offsets
        scalar = {k: torch.tensor(v, dtype=torch.long) for k, v in scalar.items()}
        return cls({k: flat(v) for k, v in ragged.items()}, scalar)

    def __len__(self) -> int:
        values, offsets = next(iter(self.ragged.values()))
        return offsets.numel() - 1

    def __getitem__(self, i: int) -> dict:
        record = {k: values[offsets[i]:offsets[i + 1]] for k, (values, offsets) in self.ragged.items()}
        return record | {k: values[i] for k, values in self.scalar.items()}

    def state(self) -> dict:
        return {"ragged": {k: list(v) for k, v in self.ragged.items()}, "scalar": self.scalar}

    @classmethod
    def from_state(cls, state: dict) -> RaggedDataset:
        return cls({k: tuple(v) for k, v in state["ragged"].items()}, state["scalar"])


# --- --data_split arithmetic ------------------------------------------------------------------

def parse_data_split(data_split: str) -> list[Fraction]:
    """"2,4,4" -> [1/5, 2/5, 2/5]: three non-negative weights with a positive sum, normalised exactly."""
    try:
        weights = [Fraction(w.strip()) for w in data_split.split(",")]
    except (ValueError, ZeroDivisionError):
        raise DataError(f"--data_split {data_split!r}: expected three numbers such as '2,4,4'") from None
    if len(weights) != 3:
        raise DataError(f"--data_split {data_split!r}: expected 3 weights (one per stage), got {len(weights)}")
    if any(w < 0 for w in weights):
        raise DataError(f"--data_split {data_split!r}: weights must not be negative")
    if sum(weights) == 0:
        raise DataError(f"--data_split {data_split!r}: weights sum to zero")
    return [w / sum(weights) for w in weights]


def split_parts(n: int, fractions: list[Fraction], seed: int) -> list[list[int]]:
    """Indices of range(n), permuted with seed and cut at round(n * cumulative fraction).

    Exact fractions make the last cut n, so the parts are disjoint and cover every index.
    """
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    cuts, total = [0], Fraction(0)
    for fraction in fractions:
        total += fraction
        cuts.append(round(n * total))
    return [perm[a:b] for a, b in zip(cuts, cuts[1:])]


def stage_records(sources: list[Source], sft_only: list[Source], fractions: list[Fraction], stage: int,
                  seed: int) -> tuple[list[dict], list[dict]]:
    """Each source's part `stage` of train and eval, plus the sft-only sources whole in stage 1, shuffled."""
    train, eval_ = [], []
    for source in sources:
        for out, records in ((train, source.train), (eval_, source.eval)):
            out.extend(records[i] for i in split_parts(len(records), fractions, seed)[stage - 1])
    for source in sft_only if stage == 1 else ():
        train.extend(source.train)
        eval_.extend(source.eval)
    return _shuffled(train, seed), _shuffled(eval_, seed)


def _shuffled(records: list[dict], seed: int) -> list[dict]:
    perm = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    return [records[i] for i in perm]


# --- tokenization -------------------------------------------------------------------------------

def _encode(tokenizer, texts: list[str], special: bool) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=special)["input_ids"] if texts else []


def tokenize_records(records: list[dict], stage: int, tokenizer, max_seq_len: int,
                     max_prompt_len: int) -> tuple[RaggedDataset, dict]:
    """The stage's columns (see the contract) and the counts of records dropped on purpose.

    The prompt is encoded with the tokenizer's special tokens (OPT's and LLaMA's BOS), the answers
    without, then EOS: prompt_len is exact and stage 3 sees the same prompt ids as stage 1.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos_token_id")
    prompts = _encode(tokenizer, [r["prompt"] for r in records], special=True)
    if stage == 3:
        keep = [p for p in prompts if len(p) <= max_prompt_len]
        return RaggedDataset.from_lists({"prompt_ids": keep}, {}), _dropped(len(prompts) - len(keep), 0)
    if stage == 1:
        return _sft_rows(records, prompts, tokenizer, max_seq_len)
    return _pair_rows(records, prompts, tokenizer, max_seq_len)


def _dropped(too_long: int, chosen_eq_rejected: int) -> dict:
    return {"too_long": too_long, "chosen_eq_rejected": chosen_eq_rejected}


def _sft_rows(records, prompts, tokenizer, max_seq_len) -> tuple[RaggedDataset, dict]:
    answers = _encode(tokenizer, [r["chosen"] for r in records], special=False)
    rows = [(p + a + [tokenizer.eos_token_id], len(p)) for p, a in zip(prompts, answers)
            if len(p) + len(a) + 1 <= max_seq_len]
    dataset = RaggedDataset.from_lists({"input_ids": [ids for ids, _ in rows]}, {"prompt_len": [n for _, n in rows]})
    return dataset, _dropped(len(records) - len(rows), 0)


def _pair_rows(records, prompts, tokenizer, max_seq_len) -> tuple[RaggedDataset, dict]:
    distinct = [i for i, r in enumerate(records) if r["chosen"] != r["rejected"]]
    eos = [tokenizer.eos_token_id]
    chosen = _encode(tokenizer, [records[i]["chosen"] for i in distinct], special=False)
    rejected = _encode(tokenizer, [records[i]["rejected"] for i in distinct], special=False)
    pairs = [(prompts[i] + c + eos, prompts[i] + r + eos) for i, c, r in zip(distinct, chosen, rejected)]
    keep = [(c, r) for c, r in pairs if max(len(c), len(r)) <= max_seq_len]
    dataset = RaggedDataset.from_lists({"chosen_ids": [c for c, _ in keep], "rejected_ids": [r for _, r in keep]}, {})
    return dataset, _dropped(len(pairs) - len(keep), len(records) - len(distinct))


# --- cache ------------------------------------------------------------------------------------

def _file_fingerprint(path: str) -> str:
    stat = os.stat(path)
    if stat.st_size > HASH_CONTENTS_UP_TO:
        return f"size={stat.st_size},mtime_ns={stat.st_mtime_ns}"
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def source_fingerprint(spec: str) -> object:
    """Contents hash of a local file, of every file under a directory; hub names by name alone."""
    if os.path.isfile(spec):
        return _file_fingerprint(spec)
    if os.path.isdir(spec):
        files = sorted(os.path.join(d, f) for d, _, names in os.walk(spec) for f in names)
        return {os.path.relpath(f, spec): _file_fingerprint(f) for f in files}
    return f"hub:{spec}"


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    identity = [type(tokenizer).__name__, tokenizer.name_or_path, tokenizer.eos_token_id, tokenizer.bos_token_id, text]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()


def cache_key(data_path: list[str], sft_only_data_path: list[str], data_split: str, stage: int, seed: int, tokenizer,
              max_seq_len: int, max_prompt_len: int) -> str:
    """sha256 over everything that decides the cached tensors, local sources by their contents."""
    parts = {"format": CACHE_FORMAT, "data_path": [[p, source_fingerprint(p)] for p in data_path],
             "sft_only": [[p, source_fingerprint(p)] for p in sft_only_data_path] if stage == 1 else [],
             "split": [str(f) for f in parse_data_split(data_split)], "stage": stage, "seed": seed,
             "tokenizer": tokenizer_fingerprint(tokenizer), "max_seq_len": max_seq_len,
             "max_prompt_len": max_prompt_len}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def load_cache(path: str) -> dict:
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        raise RuntimeError(f"refusing to load data cache {path}: it holds objects that need unpickling, "
                           f"which could run code; delete the file to rebuild ({e})") from None


def save_cache(state: dict, path: str) -> None:
    """Write to a temporary file in the same directory, then rename: readers never see a partial file."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# --- the stage datasets -------------------------------------------------------------------------

def _build_state(data_path, sft_only_data_path, fractions, stage, tokenizer, seed, max_seq_len, max_prompt_len) -> dict:
    sources = [load_source(p, seed, need_rejected=stage == 2) for p in data_path]
    sft_only = [load_source(p, seed, need_rejected=False) for p in sft_only_data_path] if stage == 1 else []
    state = {}
    for name, records in zip(("train", "eval"), stage_records(sources, sft_only, fractions, stage, seed)):
        dataset, dropped = tokenize_records(records, stage, tokenizer, max_seq_len, max_prompt_len)
        state[name] = dataset.state()
        state[f"{name}_counts"] = dropped | {"records": len(records)}
    return state


def _report(state: dict, stage: int, origin: str) -> None:
    for name in ("train", "eval"):
        c = state[f"{name}_counts"]
        n = c["too_long"] + c["chosen_eq_rejected"]
        print(f"rlhf.data stage {stage} {name} ({origin}): dropped {n} of {c['records']} records: "
              f"{c['too_long']} too long, {c['chosen_eq_rejected']} chosen==rejected", flush=True)


def build_datasets(data_path: list[str], data_split: str, stage: int, tokenizer, *, seed: int,
                   max_seq_len: int, output_path: str, sft_only_data_path: list[str] = (),
                   max_prompt_len: int | None = None) -> tuple[Dataset, Dataset]:
    """(train, eval) datasets of ragged LongTensor records for stage 1, 2 or 3 (see the contract).

    Records longer than max_seq_len (stage 3: prompts longer than max_prompt_len, default max_seq_len)
    are dropped, not truncated: a cut answer would teach the model to stop without its end.
    """
    if stage not in (1, 2, 3):
        raise ValueError(f"stage must be 1, 2 or 3, got {stage}")
    if not data_path:
        raise DataError("--data_path: no data sources given")
    fractions = parse_data_split(data_split)
    max_prompt_len = max_seq_len if max_prompt_len is None else max_prompt_len
    key = cache_key(list(data_path), list(sft_only_data_path), data_split, stage, seed, tokenizer, max_seq_len,
                    max_prompt_len)
    path = os.path.join(output_path, f"stage{stage}_{key[:24]}.pt")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    distributed = dist.is_available() and dist.is_initialized()
    if distributed and local_rank != 0:
        dist.barrier()  # local rank 0 builds first; the others then read its file
    if os.path.exists(path):
        state, origin = load_cache(path), f"cached {path}"
    else:
        state, origin = _build_state(data_path, sft_only_data_path, fractions, stage, tokenizer, seed,
                                     max_seq_len, max_prompt_len), f"built {path}"
        os.makedirs(output_path, exist_ok=True)
        save_cache(state, path)
    if distributed and local_rank == 0:
        dist.barrier()
    if local_rank == 0:
        _report(state, stage, origin)
    return RaggedDataset.from_state(state["train"]), RaggedDataset.from_state(state["eval"])
