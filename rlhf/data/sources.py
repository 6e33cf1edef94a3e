"""Read every kind of --data_path source into validated {"prompt", "chosen", "rejected"} records.

A source is a local JSON directory (train/eval .json or .jsonl), a single .json/.jsonl file, a
`datasets.save_to_disk` directory, or a hub name read through `datasets.load_dataset`. Hub datasets
that DeepSpeed-Chat users run get field adapters; a save_to_disk directory whose path ends with such
a name (".../Dahoas/rm-static") uses the same adapter, so a downloaded copy works offline.
"""
from __future__ import annotations

import json
import os
import re
import socket
from urllib.parse import urlparse
from dataclasses import dataclass
from typing import Callable

import torch

FIELDS = ("prompt", "chosen", "rejected")
EVAL_FRACTION = 0.1  # carved off sources that ship no eval part
EVAL_SPLIT_NAMES = ("eval", "test", "validation")
HUB_NAME = re.compile(r"[\w.-]+/[\w.-]+")  # "owner/name": what is not a local path is tried on the hub
HUB_CONNECT_TIMEOUT_S = 5
LOCAL_COPY = ("Give a local copy instead: a directory of train.json/eval.json (or .jsonl) records {\"prompt\", "
              "\"chosen\", \"rejected\"}, one such .json/.jsonl file, or a datasets save_to_disk directory (a path "
              "ending in the hub name, e.g. .../Dahoas/rm-static, keeps its field adapter); for a copy already in the "
              "Hugging Face cache, set HF_HUB_OFFLINE=1.")


class DataError(ValueError):
    """Bad input data; the message names the file (or flag) and the record index."""


@dataclass
class Source:
    name: str
    train: list[dict]
    eval: list[dict]


def check_record(record: object, where: str, index: int, need_rejected: bool) -> dict:
    """Validate one record and keep only the known fields."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: record {index}: expected an object with prompt/chosen/rejected, "
                        f"got {type(record).__name__}")
    for field in FIELDS:
        if field == "rejected" and record.get(field) is None and not need_rejected:
            continue
        if field not in record or record[field] is None:
            raise DataError(f"{where}: record {index}: missing field {field!r}")
        if not isinstance(record[field], str):
            raise DataError(f"{where}: record {index}: field {field!r} must be a string, "
                            f"got {type(record[field]).__name__}")
    if not record["prompt"].strip():
        raise DataError(f"{where}: record {index}: empty prompt")
    return {f: record[f] for f in FIELDS if record.get(f) is not None}


def read_json_records(path: str) -> list:
    """Raw records of a .json (a list) or .jsonl (one object per line) file."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".jsonl"):
        return [_parse_json(line, path, lineno) for lineno, line in enumerate(text.splitlines(), 1) if line.strip()]
    records = _parse_json(text, path, None)
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    return records


def _parse_json(text: str, path: str, lineno: int | None) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        line = lineno if lineno is not None else e.lineno
        raise DataError(f"{path}: malformed JSON at line {line}: {e.msg}") from None


def carve_eval(records: list[dict], seed: int, where: str) -> tuple[list[dict], list[dict]]:
    """Deterministic (train, eval) split of a source that ships no eval part: 10%, at least 1 record."""
    if len(records) < 2:
        raise DataError(f"{where}: needs at least 2 records to carve off an eval part, has {len(records)}")
    perm = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = max(1, round(len(records) * EVAL_FRACTION))
    eval_index, train_index = sorted(perm[:n_eval]), sorted(perm[n_eval:])
    return [records[i] for i in train_index], [records[i] for i in eval_index]


# --- hub adapters: DeepSpeed-Chat's field names and prompt format " Human: ... Assistant:" ---------

def _strip_citations(text: str) -> str:
    # WebGPT answers cite browser results as "[1]" or "(2)"; nothing here browses.
    return re.sub(r" ?[\(\[].*?[\)\]]", "", text)


def _webgpt(row: dict) -> dict:
    first_wins = float(row["score_0"]) >= float(row["score_1"])
    chosen, rejected = (row["answer_0"], row["answer_1"]) if first_wins else (row["answer_1"], row["answer_0"])
    return {"prompt": " Human: " + row["question"]["full_text"] + " Assistant:",
            "chosen": " " + _strip_citations(chosen), "rejected": " " + _strip_citations(rejected)}


def _shp(row: dict) -> dict:
    a_wins = int(row["labels"]) == 1
    chosen, rejected = (row["human_ref_A"], row["human_ref_B"]) if a_wins else (row["human_ref_B"], row["human_ref_A"])
    return {"prompt": " Human: " + row["history"] + " Assistant:", "chosen": " " + chosen, "rejected": " " + rejected}


def _human_assistant(row: dict) -> dict:
    return {"prompt": " Human: " + row["prompt"] + " Assistant:",
            "chosen": " " + row["chosen"], "rejected": " " + row["rejected"]}


def _yitingxie(row: dict) -> dict:
    return {"prompt": row["prompt"] + "Assistant:", "chosen": row["chosen"].split("Assistant:")[-1],
            "rejected": row["rejected"].split("Assistant:")[-1]}


def _as_is(row: dict) -> dict:
    return {f: row[f] for f in FIELDS if f in row}


# name -> (train split, eval split or None to carve one off, row adapter)
ADAPTERS: dict[str, tuple[str, str | None, Callable[[dict], dict]]] = {
    "Dahoas/rm-static": ("train", "test", _as_is),
    "Dahoas/full-hh-rlhf": ("train", "test", _as_is),
    "Dahoas/synthetic-instruct-gptj-pairwise": ("train", None, _human_assistant),
    "yitingxie/rlhf-reward-datasets": ("train", "test", _yitingxie),
    "openai/webgpt_comparisons": ("train", None, _webgpt),
    "stanfordnlp/SHP": ("train", "validation", _shp),
}


class HubUnreachable(ConnectionError):
    pass


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached from here, None when a connection opens (or goes through a
    proxy, or offline mode reads the local cache). datasets.load_dataset alone retries for ~25 s, printing a
    warning per retry, before it fails."""
    offline = any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
                  for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if offline or any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    from huggingface_hub.constants import ENDPOINT
    url = urlparse(ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=HUB_CONNECT_TIMEOUT_S).close()
    except OSError as e:
        return f"the Hugging Face hub ({ENDPOINT}) cannot be reached from this machine: {e}"
    return None


def hub_load(name: str):
    """datasets.load_dataset once the hub answers, a seam the tests point at local directories."""
    reason = hub_unreachable()
    if reason:
        raise HubUnreachable(reason)
    import datasets
    return datasets.load_dataset(name)


def _adapter_name(spec: str) -> str | None:
    return next((name for name in ADAPTERS if spec.rstrip("/").endswith(name)), None)


def _convert(rows, adapter: Callable[[dict], dict], where: str, need_rejected: bool) -> list[dict]:
    records = []
    for index, row in enumerate(rows):
        try:
            record = adapter(row)
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{where}: record {index}: cannot read fields ({type(e).__name__}: {e})") from None
        records.append(check_record(record, where, index, need_rejected))
    return records


def _from_datasets(data, spec: str, seed: int, need_rejected: bool) -> Source:
    """A datasets Dataset or DatasetDict, through the adapter its name selects (else fields as they are)."""
    import datasets
    name = _adapter_name(spec)
    train_split, eval_split, adapter = ADAPTERS.get(name, ("train", None, _as_is))
    if isinstance(data, datasets.Dataset):
        return Source(spec, *carve_eval(_convert(data, adapter, spec, need_rejected), seed, spec))
    if train_split not in data:
        raise DataError(f"{spec}: no {train_split!r} split (has {sorted(data)})")
    train = _convert(data[train_split], adapter, f"{spec}[{train_split}]", need_rejected)
    eval_split = eval_split if name else next((s for s in EVAL_SPLIT_NAMES if s in data), None)
    if eval_split is None or eval_split not in data:
        return Source(spec, *carve_eval(train, seed, spec))
    return Source(spec, train, _convert(data[eval_split], adapter, f"{spec}[{eval_split}]", need_rejected))


def _json_file(path: str, need_rejected: bool) -> list[dict]:
    return [check_record(r, path, i, need_rejected) for i, r in enumerate(read_json_records(path))]


def _find(directory: str, stem: str) -> str | None:
    return next((p for ext in (".json", ".jsonl") if os.path.isfile(p := os.path.join(directory, stem + ext))), None)


def load_source(spec: str, seed: int, need_rejected: bool) -> Source:
    """Read one --data_path entry. need_rejected: every record must carry a rejected answer (stage 2)."""
    if os.path.isfile(spec):
        if not spec.endswith((".json", ".jsonl")):
            raise DataError(f"{spec}: a data file must end in .json or .jsonl")
        return Source(spec, *carve_eval(_json_file(spec, need_rejected), seed, spec))
    if os.path.isdir(spec):
        if train_path := _find(spec, "train"):
            train = _json_file(train_path, need_rejected)
            eval_path = _find(spec, "eval")
            if eval_path is None:
                return Source(spec, *carve_eval(train, seed, train_path))
            return Source(spec, train, _json_file(eval_path, need_rejected))
        import datasets
        try:
            data = datasets.load_from_disk(spec)
        except FileNotFoundError:
            raise DataError(f"{spec}: neither train.json/train.jsonl nor a datasets save_to_disk directory") from None
        return _from_datasets(data, spec, seed, need_rejected)
    if not HUB_NAME.fullmatch(spec) or spec.endswith((".json", ".jsonl")):
        raise DataError(f"{spec}: no such file or directory")
    try:
        data = hub_load(spec)
    except Exception as e:  # anything the hub client raises (offline, unknown name) becomes one clear line
        raise hub_error(spec, e) from e
    return _from_datasets(data, spec, seed, need_rejected)


def hub_error(spec: str, error: Exception) -> DataError:
    first_line = (str(error).strip().splitlines() or [""])[0]
    return DataError(f"{spec}: not a local file or directory, and loading it from the hub failed: "
                     f"{type(error).__name__}: {first_line}. {LOCAL_COPY}")


def check_hub_sources(specs: list[str]) -> None:
    """Refuse hub names at once while the hub cannot be reached (before any process is started for them)."""
    hub = [spec for spec in specs if not os.path.exists(spec) and HUB_NAME.fullmatch(spec)]
    reason = hub_unreachable() if hub else None
    if reason:
        raise hub_error(hub[0], HubUnreachable(reason))
