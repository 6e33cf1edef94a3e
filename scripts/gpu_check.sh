#!/usr/bin/env bash
# The GPU check (a device machine: one NVIDIA GPU, its own torch/triton/transformers, no registry, no DeepSpeed).
#   bash scripts/gpu_check.sh prepare   # here: DeepSpeed and what it needs as Python 3.12 wheels, in .gpu/whl
#   bash scripts/gpu_check.sh run       # there (device tool: carry [".gpu"]); logs and JUnit XML under $OUT
# run: build hybrid_engine._C against the device's torch, then `pytest --device cuda`: the Triton kernels compiled
# (not interpreted) against the reference, generation parity with transformers for every family, HybridEngine
# under ZeRO-3 on NCCL against transformers (fp32, TF32 off), PPO steps and rlhf.train's example on CUDA.
# Each phase has a time limit (BUILD_S, TEST_S seconds) so that one call leaves device time for a rerun; the tests
# run in WORKERS pytest-xdist processes (the device image has pytest-xdist).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
WHEELS=.gpu/whl
PY312=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_17_x86_64
       --platform manylinux2014_x86_64 --platform any)
# the wheels DeepSpeed 0.19.8 needs that the device image lacks (its image has the rest: see the device README)
NEEDED=(hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5)
# test_gpu.py first: pytest-xdist hands out tests in this order, and its rlhf.train example is the longest test
TESTS=(tests/test_gpu.py tests/test_generation.py tests/test_families.py tests/test_kernels.py
       tests/test_families_kernels.py)

prepare() {
    mkdir -p "$WHEELS"
    python -m pip wheel -q --no-deps --no-build-isolation -w "$WHEELS" deepspeed==0.19.8 || exit 1
    python -m pip download -q --no-deps "${PY312[@]}" -d "$WHEELS" "${NEEDED[@]}" || exit 1
    ls -l "$WHEELS"
}

run() {
    local out=${OUT:-/tmp/gpu-check} start=$SECONDS
    mkdir -p "$out"
    export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:/tmp/site"
    nvidia-smi -L
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$WHEELS"/*.whl || exit 1
    python3 -c "import torch, triton, transformers, deepspeed; print('torch', torch.__version__, 'triton',
triton.__version__, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__, torch.cuda.get_device_name())"
    timeout "${BUILD_S:-150}" python3 setup.py build_ext --inplace -j 16 > "$out/build.log" 2>&1
    echo "build rc=$? at $((SECONDS - start)) s"; tail -3 "$out/build.log"
    timeout "${TEST_S:-480}" python3 -m pytest -p no:cacheprovider -o addopts="" -ra -q --device cuda -n "${WORKERS:-8}" --durations 15 \
        --junitxml "$out/tests.xml" "${TESTS[@]}" "$@" 2>&1 | tee "$out/tests.log" | tail -40
    echo "tests rc=${PIPESTATUS[0]} at $((SECONDS - start)) s"
}

case "${1:-}" in
    prepare) prepare ;;
    run) shift; run "$@" ;;
    *) echo "usage: bash scripts/gpu_check.sh prepare|run [pytest arguments]" >&2; exit 2 ;;
esac
