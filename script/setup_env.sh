#!/usr/bin/env bash
# Prepare a Python environment for RingX and print its interpreter path on the last line.
#   RINGX_PYTHON=/path/to/python   use an existing interpreter (e.g. a cluster's conda env with a
#                                  GPU build of torch); nothing is created
#   RINGX_VENV=DIR                 where to create the virtual environment (default: .venv)
#   RINGX_TORCH=SPEC               torch requirement when torch is missing (default torch==2.13.0)
#   RINGX_TORCH_INDEX=URL          extra pip index for torch, e.g. https://download.pytorch.org/whl/cpu
#   RINGX_DEEPSPEED=0              do not install deepspeed (optional engine of the GPT app)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -n "${RINGX_PYTHON:-}" ]; then
  py=$RINGX_PYTHON
else
  venv=${RINGX_VENV:-$root/.venv}
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv" >&2
  py=$venv/bin/python
fi
if ! "$py" -c "import torch" >/dev/null 2>&1; then
  echo "[setup_env] installing ${RINGX_TORCH:-torch==2.13.0}" >&2
  "$py" -m pip install -q ${RINGX_TORCH_INDEX:+--extra-index-url "$RINGX_TORCH_INDEX"} "${RINGX_TORCH:-torch==2.13.0}" >&2
fi
if ! "$py" -c "import ringX, pytest, hypothesis, numpy, yaml, transformers, safetensors" >/dev/null 2>&1; then
  echo "[setup_env] installing ringX (editable) with its test extras" >&2
  "$py" -m pip install -q -e "$root[test]" >&2
fi
if [ "${RINGX_DEEPSPEED:-1}" = 1 ] && ! "$py" -c "import deepspeed" >/dev/null 2>&1; then
  echo "[setup_env] installing deepspeed (the GPT app's optional ZeRO engine; RINGX_DEEPSPEED=0 skips)" >&2
  DS_BUILD_OPS=0 "$py" -m pip install -q -e "$root[deepspeed]" >&2 || echo "[setup_env] could not install deepspeed" >&2
fi
echo "$py"
