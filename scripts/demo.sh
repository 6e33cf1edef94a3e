#!/usr/bin/env bash
# The main job: set up .venv (see env.sh) and run the generation benchmark, Hugging Face generate
# against hybrid_engine on OPT-125m (random weights, real configuration), side by side.
# Extra arguments go to the benchmark, e.g. `bash scripts/demo.sh --dtype bf16 --new-tokens 64`.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m bench.generation --model opt-125m "$@"
