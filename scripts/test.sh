#!/usr/bin/env bash
# The test command: set up .venv (see env.sh) and run the whole test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k allocator`.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
export OMP_WAIT_POLICY=PASSIVE OPENBLAS_NUM_THREADS=1
python -m pytest "$@"
