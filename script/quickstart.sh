#!/usr/bin/env bash
# Set up (script/setup_env.sh) and run the main job: all four ringX algorithms on 4 ranks checked
# against the float64 reference, printing a table of errors and times. Extra arguments go to
# `python -m ringX.selfcheck` (e.g. --nproc 2 --seqlen-per-rank 512).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=$(bash "$root/script/setup_env.sh" | tail -n 1)
cd "$root"
exec "$py" -m ringX.selfcheck "$@"
