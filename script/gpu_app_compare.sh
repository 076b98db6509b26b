#!/usr/bin/env bash
# The GPT app against Hugging Face transformers (plain and with Liger-Kernel) on one GPU, in one
# call: tokens/s, MFU and peak memory per row (script/app_compare.py says what each row runs).
#   bash script/gpu_app_compare.sh                      Llama 3.2 1B shapes at 32,768 tokens
#   bash script/gpu_app_compare.sh --config llama3-8b --n_layers 8 --rows app-compile
# Liger-Kernel is optional: without it the hf-liger rows report the import error and the app
# says which path it took. Results under $OUT (default runs/app_compare).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${RINGX_PYTHON:-python}
exec "$PY" script/app_compare.py --out "${OUT:-runs/app_compare}" "$@"
