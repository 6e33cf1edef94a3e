# Sourced by scripts/demo.sh and scripts/test.sh: create or reuse the project-local virtual
# environment in .venv, install the pinned requirements and build the project from source.
# Re-installs only what changed since the last run (hash stamps in .venv/).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "[env] creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
# DeepSpeed builds its CPU communication op on first use; one build per environment, kept with it
# (a cache shared by two environments is rebuilt in turn by each, 40-75 s per launch).
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}

stamp() { cat "$@" 2>/dev/null | sha256sum | cut -d' ' -f1; }

req_hash=$(stamp requirements-dev.txt)
if [ "$(cat .venv/.req-stamp 2>/dev/null)" != "$req_hash" ]; then
    echo "[env] installing requirements (torch 2.13.0 CPU first, so nothing pulls a CUDA torch)"
    python -m pip install -q --upgrade pip
    python -m pip install -q torch==2.13.0
    python -m pip install -q -r requirements-dev.txt
    echo "$req_hash" > .venv/.req-stamp
fi

src_hash=$(stamp setup.py pyproject.toml $(find csrc -type f | sort))
if [ "$(cat .venv/.src-stamp 2>/dev/null)" != "$src_hash" ] || ! python -c "import hybrid_engine._C" 2>/dev/null; then
    echo "[env] building hybrid_engine._C from csrc/ (pip install --no-build-isolation -e .)"
    MAX_JOBS=${MAX_JOBS:-2} python -m pip install -q --no-build-isolation --no-deps -e .
    echo "$src_hash" > .venv/.src-stamp
fi
