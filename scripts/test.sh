#!/usr/bin/env bash
# Sets up .venv (see setup_env.sh) and runs the whole test suite on the CPU.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k shard -x`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
cd "$root"
# TRITON_INTERPRET: tests/conftest.py sets it (interpreter without CUDA, compiled kernels with it)
exec "${PIRL_VENV:-$root/.venv}/bin/python" -m pytest "$@"
