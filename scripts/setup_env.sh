#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment in .venv and installs pirl_fast with
# its pinned dependencies. Idempotent: a second run only checks that everything is there.
# Usage: source this file or run it; both leave .venv ready.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${PIRL_VENV:-$root/.venv}"
py="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating virtual environment $venv"
  "$py" -m venv "$venv"
fi
stamp="$venv/.pirl_fast-installed"
# Reinstall when pyproject.toml changed since the last install.
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
  echo "[setup] installing pirl_fast and its pinned dependencies (first time: a few minutes)"
  log="$venv/pip-install.log"
  if ! "$venv/bin/python" -m pip install -e "$root[dev]" >"$log" 2>&1 \
     || ! "$venv/bin/python" -c "import torch, torchvision, nvidia.dali, webdataset, hydra, pirl_fast"; then
    tail -n 40 "$log" >&2
    echo "[setup] install failed; the full pip log is $log" >&2
    exit 1
  fi
  touch "$stamp"
fi
