#!/usr/bin/env bash
# Create ./.venv with distsft and its dev tools. Idempotent: reruns only when pyproject.toml changed.
#
# torch is installed first, pinned, because an unpinned `torch` can resolve to a multi-GB CUDA build on
# a CPU-only machine. TORCH_SPEC picks another build, for example on a GPU machine:
#   TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
STAMP=.venv/.distsft-installed
if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
# shellcheck disable=SC2086
.venv/bin/python -m pip install -q ${TORCH_SPEC:-torch==2.13.0}
.venv/bin/python -m pip install -q -e ".[dev]"
touch "$STAMP"
