#!/usr/bin/env bash
# Set up a virtual environment in .venv with codecllm installed (editable).
#   bash setup.sh         the package and its runtime dependencies (+ triton on Linux x86-64)
#   bash setup.sh test    also the test and benchmark tools
# torch is installed first, pinned, only where the venv has none: an unpinned torch requirement
# on a machine without one would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
.venv/bin/python -c "import torch" 2>/dev/null || "${PIP[@]}" "torch==${TORCH_VERSION:-2.13.0}"
extras="gpu"
[ "${1:-}" = "test" ] && extras="gpu,test,bench"
"${PIP[@]}" -e ".[${extras}]"
