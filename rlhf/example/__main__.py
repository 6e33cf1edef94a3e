"""python -m rlhf.example: write the synthetic task's data and base model (see rlhf.example)."""
import argparse
import os

from rlhf.example import SIZES, __doc__ as TASK_DOC, write_data, write_model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rlhf.example", description=TASK_DOC.split("\n\n")[0])
    parser.add_argument("what", choices=("data", "model", "all"),
                        help="data: train.json/eval.json in DIR; model: tokenizer + base model in DIR; "
                             "all: both, in DIR/data and DIR/base-model")
    parser.add_argument("dir", help="output directory (created if missing)")
    parser.add_argument("--num_records", "--num-records", type=int, default=20000,
                        help="preference records to write, 10%% of them to eval.json (default 20000: with "
                             "--data_split 2,4,4 the reward model trains on 7200 pairs; 2000 pairs overfit at ~75%% "
                             "held-out accuracy)")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the records and of the model's initialisation")
    parser.add_argument("--size", choices=sorted(SIZES), default="small",
                        help="base model size: tiny (~0.12M parameters, for tests) or small (~1.2M, default)")
    args = parser.parse_args(argv)
    if args.num_records < 2:
        parser.error("--num_records must be at least 2 (one train and one eval record)")
    if args.what in ("data", "all"):
        write_data(os.path.join(args.dir, "data") if args.what == "all" else args.dir, args.num_records, args.seed)
    if args.what in ("model", "all"):
        write_model(os.path.join(args.dir, "base-model") if args.what == "all" else args.dir, args.size, args.seed)


if __name__ == "__main__":
    main()
