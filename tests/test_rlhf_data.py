"""rlhf.data: split arithmetic, sources, cache, bad input, collate functions."""
import json
from pathlib import Path
from fractions import Fraction

import pytest
import torch

from rlhf.data import (DataError, build_datasets, collate_pairs, collate_prompts, collate_sft, parse_data_split,
                       split_parts)
from rlhf.example import make_records, make_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def write_json(path, records, jsonl=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(json.dumps(r) for r in records) if jsonl else json.dumps(records)
    path.write_text(text)
    return path


# --- split arithmetic ---------------------------------------------------------------------------

@pytest.mark.parametrize("n", [0, 1, 2, 7, 10, 13, 101])
@pytest.mark.parametrize("data_split", ["2,4,4", "1,1,1", "0,0,1", "0.3, 0.3, 0.4", "6,0,4"])
def test_split_parts_disjoint_covering_proportional(n, data_split):
    fractions = parse_data_split(data_split)
    parts = split_parts(n, fractions, seed=5)
    flat = [i for part in parts for i in part]
    assert sorted(flat) == list(range(n))
    for part, fraction in zip(parts, fractions):
        assert abs(len(part) - n * fraction) <= 1
        assert fraction > 0 or not part
    assert parts == split_parts(n, fractions, seed=5)


def test_split_parts_is_seeded():
    fractions = parse_data_split("2,4,4")
    assert split_parts(50, fractions, 1) != split_parts(50, fractions, 2)
    assert parse_data_split("2,4,4") == [Fraction(1, 5), Fraction(2, 5), Fraction(2, 5)]


# --- collate --------------------------------------------------------------------------------------

def ids(*values):
    return torch.tensor(values, dtype=torch.long)


@pytest.mark.parametrize("mask_prompt", [False, True])
def test_collate_sft_ragged(mask_prompt):
    batch = [{"input_ids": ids(5, 6, 7, 2), "prompt_len": torch.tensor(2)},
             {"input_ids": ids(8, 9), "prompt_len": torch.tensor(1)},
             {"input_ids": ids(3, 4, 5, 6, 2, 2), "prompt_len": torch.tensor(3)}]
    out = collate_sft(batch, pad_token_id=2, mask_prompt=mask_prompt)
    assert out["input_ids"].tolist() == [[5, 6, 7, 2, 2, 2], [8, 9, 2, 2, 2, 2], [3, 4, 5, 6, 2, 2]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]]
    x = -100
    expected = ([[x, x, 7, 2, x, x], [x, 9, x, x, x, x], [x, x, x, 6, 2, 2]] if mask_prompt else
                [[5, 6, 7, 2, x, x], [8, 9, x, x, x, x], [3, 4, 5, 6, 2, 2]])
    assert out["labels"].tolist() == expected


def test_collate_pairs_ragged():
    batch = [{"chosen_ids": ids(1, 2, 3), "rejected_ids": ids(1, 4)},
             {"chosen_ids": ids(5,), "rejected_ids": ids(6, 7, 8, 9)}]
    out = collate_pairs(batch, pad_token_id=0)
    assert out["input_ids"].tolist() == [[1, 2, 3, 0], [5, 0, 0, 0], [1, 4, 0, 0], [6, 7, 8, 9]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]


def test_collate_prompts_left_padded():
    out = collate_prompts([{"prompt_ids": ids(4, 5)}, {"prompt_ids": ids(6, 7, 8)}, {"prompt_ids": ids(9,)}], 0)
    assert out["input_ids"].tolist() == [[0, 4, 5], [6, 7, 8], [0, 0, 9]]
    assert out["attention_mask"].tolist() == [[0, 1, 1], [1, 1, 1], [0, 0, 1]]


# --- build_datasets -----------------------------------------------------------------------------

def test_build_datasets_stages_contract(tmp_path, tokenizer):
    records = make_records(40, seed=1)
    write_json(tmp_path / "d" / "train.json", records[:30])
    write_json(tmp_path / "d" / "eval.json", records[30:])
    args = dict(seed=3, max_seq_len=64, output_path=str(tmp_path / "cache"))
    (tr1, ev1), (tr2, ev2), (tr3, ev3) = (build_datasets([str(tmp_path / "d")], "2,4,4", s, tokenizer, **args)
                                          for s in (1, 2, 3))
    assert [len(d) for d in (tr1, ev1, tr2, ev2, tr3, ev3)] == [6, 2, 12, 4, 12, 4]
    eos = tokenizer.eos_token_id
    assert set(tr1[0]) == {"input_ids", "prompt_len"} and tr1[0]["input_ids"][-1] == eos
    assert set(tr2[0]) == {"chosen_ids", "rejected_ids"} and tr2[0]["rejected_ids"][-1] == eos
    assert set(tr3[0]) == {"prompt_ids"} and tr3[0]["prompt_ids"].dtype == torch.long


def test_stage_1_tokens_are_prompt_answer_eos(tmp_path, tokenizer):
    records = make_records(5, seed=2)
    write_json(tmp_path / "d" / "train.json", records)
    write_json(tmp_path / "d" / "eval.json", records[:1])
    train, _ = build_datasets([str(tmp_path / "d")], "1,0,0", 1, tokenizer, seed=0, max_seq_len=64,
                              output_path=str(tmp_path / "cache"))
    expected = set()
    for r in records:
        prompt = tokenizer(r["prompt"])["input_ids"]
        answer = tokenizer(r["chosen"], add_special_tokens=False)["input_ids"]
        expected.add((tuple(prompt + answer + [tokenizer.eos_token_id]), len(prompt)))
    got = {(tuple(x["input_ids"].tolist()), int(x["prompt_len"])) for x in train}
    assert got == expected


# --- blending, sft-only -------------------------------------------------------------------------

def numbered(name, n, rejected=True):
    return [{"prompt": f" Human: {name} {i} Assistant:", "chosen": f" c{i}"} | ({"rejected": f" r{i}"} if rejected else {})
            for i in range(n)]


def test_two_sources_split_each_then_blend(tmp_path):
    from rlhf.data.build import stage_records
    from rlhf.data.sources import Source
    a, b = Source("a", numbered("a", 23), numbered("a-eval", 9)), Source("b", numbered("b", 11), numbered("b-eval", 5))
    fractions = parse_data_split("2,4,4")
    for stage in (1, 2, 3):
        train, eval_ = stage_records([a, b], [], fractions, stage, seed=4)
        expected = [s.train[i] for s in (a, b) for i in split_parts(len(s.train), fractions, 4)[stage - 1]]
        assert sorted(r["prompt"] for r in train) == sorted(r["prompt"] for r in expected)
        assert train != expected  # shuffled after concatenation
        assert len(eval_) == sum(len(split_parts(len(s.eval), fractions, 4)[stage - 1]) for s in (a, b))
    assert stage_records([a, b], [], fractions, 2, seed=4) == stage_records([a, b], [], fractions, 2, seed=4)


def test_sft_only_data_joins_stage_1_whole(tmp_path, tokenizer):
    write_json(tmp_path / "pairs" / "train.json", make_records(20, seed=1))
    write_json(tmp_path / "pairs" / "eval.json", make_records(10, seed=2))
    sft = [{"prompt": r["prompt"], "chosen": r["chosen"]} for r in make_records(30, seed=3)]
    write_json(tmp_path / "sft.jsonl", sft, jsonl=True)
    args = dict(seed=1, max_seq_len=64, output_path=str(tmp_path / "cache"), sft_only_data_path=[str(tmp_path / "sft.jsonl")])
    train1, eval1 = build_datasets([str(tmp_path / "pairs")], "2,4,4", 1, tokenizer, **args)
    assert (len(train1), len(eval1)) == (4 + 27, 2 + 3)  # the jsonl file carves 10% off for eval
    train2, eval2 = build_datasets([str(tmp_path / "pairs")], "2,4,4", 2, tokenizer, **args)
    assert (len(train2), len(eval2)) == (8, 4)


# --- what is dropped on purpose ---------------------------------------------------------------------

def test_drops_are_counted_and_printed(tmp_path, tokenizer, capsys):
    records = make_records(10, seed=5)
    records[0]["chosen"] = " bread" * 40
    records[1]["rejected"] = " milk" * 40
    records[2]["rejected"] = records[2]["chosen"]
    write_json(tmp_path / "d" / "train.json", records)
    write_json(tmp_path / "d" / "eval.json", records[3:5])
    args = dict(seed=1, max_seq_len=30, output_path=str(tmp_path / "cache"))
    train, eval_ = build_datasets([str(tmp_path / "d")], "0,1,0", 2, tokenizer, **args)
    assert (len(train), len(eval_)) == (7, 2)
    out = capsys.readouterr().out
    assert "stage 2 train (built" in out and "dropped 3 of 10 records: 2 too long, 1 chosen==rejected" in out
    train, _ = build_datasets([str(tmp_path / "d")], "0,1,0", 2, tokenizer, **args)
    assert len(train) == 7 and "dropped 3 of 10 records" in capsys.readouterr().out  # from the cache
    train, _ = build_datasets([str(tmp_path / "d")], "1,0,0", 1, tokenizer, **args)
    assert len(train) == 9 and "dropped 1 of 10 records: 1 too long, 0 chosen==rejected" in capsys.readouterr().out
    prompts, _ = build_datasets([str(tmp_path / "d")], "0,0,1", 3, tokenizer, **args, max_prompt_len=6)
    assert all(len(p["prompt_ids"]) <= 6 for p in prompts)
    assert 0 < len(prompts) < 10  # templates give prompts of 6 and 7 tokens


# --- the cache ------------------------------------------------------------------------------------

@pytest.fixture
def count_builds(monkeypatch):
    import rlhf.data.build as build
    calls = []
    tokenize = build.tokenize_records
    monkeypatch.setattr(build, "tokenize_records", lambda *a, **k: calls.append(1) or tokenize(*a, **k))
    return calls


def test_cache_hits_on_same_inputs_and_rebuilds_on_changed_file(tmp_path, tokenizer, count_builds):
    records = make_records(20, seed=1)
    write_json(tmp_path / "d" / "train.json", records)
    write_json(tmp_path / "d" / "eval.json", records[:4])
    args = dict(seed=1, max_seq_len=64, output_path=str(tmp_path / "cache"))
    first, _ = build_datasets([str(tmp_path / "d")], "1,0,0", 1, tokenizer, **args)
    assert len(count_builds) == 2  # train and eval tokenized once each
    again, _ = build_datasets([str(tmp_path / "d")], "1,0,0", 1, tokenizer, **args)
    assert len(count_builds) == 2 and [x["input_ids"].tolist() for x in again] == [x["input_ids"].tolist() for x in first]
    # Same size, same name, different content: must not be served from the cache.
    records[0]["chosen"] = records[0]["chosen"].replace(records[0]["chosen"].split()[0], "zzz", 1)
    write_json(tmp_path / "d" / "train.json", records)
    changed, _ = build_datasets([str(tmp_path / "d")], "1,0,0", 1, tokenizer, **args)
    assert len(count_builds) == 4
    assert any(tokenizer.unk_token_id in x["input_ids"].tolist() for x in changed)
    build_datasets([str(tmp_path / "d")], "1,0,0", 1, tokenizer, **(args | {"seed": 2}))
    build_datasets([str(tmp_path / "d")], "1,0,0", 1, tokenizer, **(args | {"max_seq_len": 63}))
    assert len(count_builds) == 8
    assert not [p for p in (tmp_path / "cache").iterdir() if p.suffix != ".pt"]  # no temporary files left


class Planted:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.mkdir, (self.marker,)


def test_planted_pickle_in_cache_is_refused_not_run(tmp_path, tokenizer):
    write_json(tmp_path / "d" / "train.json", make_records(10, seed=1))
    args = dict(seed=1, max_seq_len=64, output_path=str(tmp_path / "cache"))
    build_datasets([str(tmp_path / "d")], "1,0,0", 1, tokenizer, **args)
    (cache_file,) = (tmp_path / "cache").iterdir()
    marker = tmp_path / "code-ran"
    torch.save({"train": Planted(str(marker))}, cache_file)
    with pytest.raises(RuntimeError, match="refusing to load data cache .*unpickling"):
        build_datasets([str(tmp_path / "d")], "1,0,0", 1, tokenizer, **args)
    assert not marker.exists()


# --- bad input ------------------------------------------------------------------------------------

GOOD = {"prompt": " Human: hi Assistant:", "chosen": " yes", "rejected": " no"}


@pytest.mark.parametrize("name, text, stage, message", [
    ("train.json", json.dumps([GOOD, {"prompt": "p", "rejected": "r"}]), 1, r"train.json: record 1: missing field 'chosen'"),
    ("train.json", json.dumps([GOOD, GOOD, GOOD | {"chosen": 3}]), 1, r"train.json: record 2: field 'chosen' must be a string"),
    ("train.json", json.dumps([GOOD | {"prompt": "  "}]), 1, r"train.json: record 0: empty prompt"),
    ("train.json", json.dumps([GOOD, {"prompt": "p", "chosen": "c"}]), 2, r"train.json: record 1: missing field 'rejected'"),
    ("train.json", json.dumps([GOOD | {"rejected": ["no"]}]), 2, r"record 0: field 'rejected' must be a string"),
    ("train.json", json.dumps([GOOD, "text"]), 1, r"train.json: record 1: expected an object"),
    ("train.json", json.dumps({"prompt": "p"}), 1, r"train.json: expected a JSON list"),
    ("train.json", '[\n{"prompt": "p",\n "chosen": }\n]', 1, r"train.json: malformed JSON at line 3"),
    ("train.jsonl", json.dumps(GOOD) + "\n\n" + json.dumps(GOOD) + "\n{oops\n", 1, r"train.jsonl: malformed JSON at line 4"),
    ("train.jsonl", json.dumps(GOOD) + "\n" + json.dumps(GOOD | {"prompt": None}), 1, r"train.jsonl: record 1: missing field 'prompt'"),
])
def test_bad_records_name_file_and_record(tmp_path, tokenizer, name, text, stage, message):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / name).write_text(text)
    write_json(tmp_path / "d" / "eval.json", [GOOD])
    with pytest.raises(DataError, match=message):
        build_datasets([str(tmp_path / "d")], "1,1,1", stage, tokenizer, seed=0, max_seq_len=64,
                       output_path=str(tmp_path / "cache"))


@pytest.mark.parametrize("data_split, message", [
    ("2,4", "expected 3 weights"), ("1,2,3,4", "expected 3 weights"), ("1,-1,2", "must not be negative"),
    ("0,0,0", "sum to zero"), ("a,b,c", "expected three numbers"), ("", "expected three numbers"),
])
def test_bad_data_split(data_split, message):
    with pytest.raises(DataError, match=f"--data_split.*{message}"):
        parse_data_split(data_split)


def test_bad_paths(tmp_path, tokenizer):
    args = dict(seed=0, max_seq_len=64, output_path=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"/no/such/data.json: no such file or directory"):
        build_datasets(["/no/such/data.json"], "2,4,4", 1, tokenizer, **args)
    write_json(tmp_path / "one.json", [GOOD])
    with pytest.raises(DataError, match=r"one.json: needs at least 2 records"):
        build_datasets([str(tmp_path / "one.json")], "2,4,4", 1, tokenizer, **args)
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(DataError, match=r"data.txt: a data file must end in .json or .jsonl"):
        build_datasets([str(tmp_path / "data.txt")], "2,4,4", 1, tokenizer, **args)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: neither train.json"):
        build_datasets([str(tmp_path / "empty")], "2,4,4", 1, tokenizer, **args)
    with pytest.raises(DataError, match="--data_path"):
        build_datasets([], "2,4,4", 1, tokenizer, **args)


# --- datasets sources and hub adapters ------------------------------------------------------------

def rows(make, n):
    return [make(i) for i in range(n)]


HH = lambda i: {"prompt": f"\n\nHuman: q{i}\n\nAssistant:", "response": f" good{i}", "chosen": f" good{i}",  # noqa: E731
                "rejected": f" bad{i}"}
# name -> (splits with raw rows shaped like the hub dataset, the record its row 1 becomes, the eval split)
HUB = {
    "Dahoas/rm-static": ({"train": rows(HH, 6), "test": rows(HH, 3)},
                         {"prompt": "\n\nHuman: q1\n\nAssistant:", "chosen": " good1", "rejected": " bad1"}, "test"),
    "Dahoas/full-hh-rlhf": ({"train": rows(HH, 6), "test": rows(HH, 2)},
                            {"prompt": "\n\nHuman: q1\n\nAssistant:", "chosen": " good1", "rejected": " bad1"}, "test"),
    "Dahoas/synthetic-instruct-gptj-pairwise": (
        {"train": rows(lambda i: {"prompt": f"How to {i}?", "chosen": f"Do {i}.", "rejected": "No."}, 20)},
        {"prompt": " Human: How to 1? Assistant:", "chosen": " Do 1.", "rejected": " No."}, None),
    "yitingxie/rlhf-reward-datasets": (
        {s: rows(lambda i: {"prompt": f"\n\nHuman: q{i}\n\n", "chosen": f"Assistant: good{i}",
                            "rejected": f"Assistant: bad{i}"}, 5) for s in ("train", "test")},
        {"prompt": "\n\nHuman: q1\n\nAssistant:", "chosen": " good1", "rejected": " bad1"}, "test"),
    "openai/webgpt_comparisons": (
        {"train": rows(lambda i: {"question": {"id": str(i), "full_text": f"Why {i}?", "dataset": "eli5"},
                                  "quotes_0": {"title": [], "extract": []}, "answer_0": f"Because [1] of {i} (2).",
                                  "tokens_0": [], "score_0": -1.0 + i % 2, "answer_1": f"No idea {i}.",
                                  "score_1": 0.0}, 20)},
        {"prompt": " Human: Why 1? Assistant:", "chosen": " Because of 1.", "rejected": " No idea 1."}, None),
    "stanfordnlp/SHP": (
        {s: rows(lambda i: {"post_id": str(i), "history": f"Why {i}?", "human_ref_A": f"A{i}", "human_ref_B": f"B{i}",
                            "labels": i % 2, "score_A": 3, "score_B": 2}, n) for s, n in (("train", 6), ("validation", 3), ("test", 2))},
        {"prompt": " Human: Why 1? Assistant:", "chosen": " A1", "rejected": " B1"}, "validation"),
}


def save_hub_shaped(directory, splits):
    import datasets
    datasets.DatasetDict({s: datasets.Dataset.from_list(r) for s, r in splits.items()}).save_to_disk(str(directory))
    return str(directory)


@pytest.mark.parametrize("name", sorted(HUB))
def test_hub_adapter_on_local_copy(tmp_path, monkeypatch, name):
    import datasets

    import rlhf.data.sources as sources
    splits, row_1, eval_split = HUB[name]
    local = save_hub_shaped(tmp_path / name, splits)
    loaded = []
    monkeypatch.setattr(sources, "hub_load", lambda n: loaded.append(n) or datasets.load_from_disk(local))
    for spec in (name, local):  # the hub name (through the seam) and a saved copy under the same name
        source = sources.load_source(spec, seed=3, need_rejected=True)
        records = source.train + source.eval
        assert row_1 in records
        n_train = len(splits["train"])
        if eval_split is None:
            assert (len(source.train), len(source.eval)) == (n_train - max(1, round(n_train / 10)), max(1, round(n_train / 10)))
        else:
            assert (len(source.train), len(source.eval)) == (n_train, len(splits[eval_split]))
    assert loaded == [name]


def test_other_hub_names_use_fields_as_they_are_and_hub_failures_are_data_errors(tmp_path, monkeypatch):
    import datasets

    import rlhf.data.sources as sources
    local = save_hub_shaped(tmp_path / "saved", {"train": [GOOD] * 4, "validation": [GOOD | {"chosen": " ok"}]})
    monkeypatch.setattr(sources, "hub_load", lambda name: datasets.load_from_disk(local))
    source = sources.load_source("someone/prefs", seed=0, need_rejected=True)
    assert (source.train, source.eval) == ([GOOD] * 4, [GOOD | {"chosen": " ok"}])

    def offline(name):
        raise ConnectionError("no network")
    monkeypatch.setattr(sources, "hub_load", offline)
    with pytest.raises(DataError, match="someone/prefs: not a local file or directory, and loading it from the hub "
                                        "failed: ConnectionError: no network"):
        sources.load_source("someone/prefs", seed=0, need_rejected=True)


def test_webgpt_tie_goes_to_answer_0_and_shp_label_0_prefers_b():
    from rlhf.data.sources import ADAPTERS
    webgpt = ADAPTERS["openai/webgpt_comparisons"][2]
    row = HUB["openai/webgpt_comparisons"][0]["train"][0] | {"score_0": 0.0, "score_1": 0.0}
    assert webgpt(row)["chosen"] == " Because of 0."
    shp = ADAPTERS["stanfordnlp/SHP"][2]
    assert shp(HUB["stanfordnlp/SHP"][0]["train"][0])["chosen"] == " B0"


@pytest.mark.parametrize("layout", ["train+eval", "train+test", "train+validation", "single"])
def test_save_to_disk_directories(tmp_path, tokenizer, layout):
    import datasets
    records = make_records(30, seed=1)
    data = datasets.Dataset.from_list(records)
    if layout != "single":
        data = datasets.DatasetDict({"train": data, layout.split("+")[1]: datasets.Dataset.from_list(records[:7])})
    data.save_to_disk(str(tmp_path / "saved"))
    train, eval_ = build_datasets([str(tmp_path / "saved")], "0,1,0", 2, tokenizer, seed=0, max_seq_len=64,
                                  output_path=str(tmp_path / "cache"))
    assert (len(train), len(eval_)) == ((27, 3) if layout == "single" else (30, 7))


def test_hub_row_missing_a_field_names_split_and_record(tmp_path):
    from rlhf.data.sources import load_source
    bad = [{"history": "q", "human_ref_A": "a", "human_ref_B": "b", "labels": 1}] * 3
    local = save_hub_shaped(tmp_path / "stanfordnlp" / "SHP", {"train": bad, "validation": [{"history": "q", "labels": 1}]})
    with pytest.raises(DataError, match=r"SHP\[validation\]: record 0: cannot read fields \(KeyError"):
        load_source(local, seed=0, need_rejected=True)


# --- two ranks: local rank 0 builds, the other waits and reads its file -----------------------------

def _rank_main(rank, directory):
    import os

    import torch.distributed as dist

    import rlhf.data.build as build
    os.environ["LOCAL_RANK"] = str(rank)
    dist.init_process_group("gloo", init_method=f"file://{directory}/rendezvous", rank=rank, world_size=2)
    builds = []
    build_state = build._build_state
    build._build_state = lambda *a, **k: builds.append(1) or build_state(*a, **k)
    train, _ = build_datasets([f"{directory}/d"], "2,4,4", 2, make_tokenizer(), seed=1, max_seq_len=64,
                              output_path=f"{directory}/cache")
    (Path(directory) / f"rank{rank}.json").write_text(json.dumps([len(builds), [x["chosen_ids"].tolist() for x in train]]))
    dist.destroy_process_group()


def test_two_ranks_build_once(tmp_path):
    import torch.multiprocessing as mp
    write_json(tmp_path / "d" / "train.json", make_records(30, seed=1))
    write_json(tmp_path / "d" / "eval.json", make_records(5, seed=2))
    mp.spawn(_rank_main, args=(str(tmp_path),), nprocs=2)
    (builds0, train0), (builds1, train1) = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (builds0, builds1) == (1, 0) and train0 == train1 and len(train0) == 12
