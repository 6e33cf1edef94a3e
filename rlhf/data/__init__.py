"""The data pipeline of the three RLHF stages: records {"prompt", "chosen", "rejected"} (prompts as the
data gives them, " Human: ... Assistant:"), each step taking its part of every source.

sources: every kind of --data_path source, read into validated {"prompt", "chosen", "rejected"} dicts.
build:   --data_split arithmetic, blending, tokenization, the content-keyed cache.
collate: padding ragged records into batches.
loaders: each rank's share of a dataset, and Cycle (a loader read for ever, with a resumable position).
"""
from rlhf.data.build import RaggedDataset, build_datasets, parse_data_split, split_parts
from rlhf.data.collate import collate_pairs, collate_prompts, collate_sft
from rlhf.data.sources import DataError, Source, load_source

__all__ = ["DataError", "RaggedDataset", "Source", "build_datasets", "collate_pairs", "collate_prompts",
           "collate_sft", "load_source", "parse_data_split", "split_parts"]
