#!/usr/bin/env bash
# Set up (script/setup_env.sh) and run the whole RingX test suite. Exits non-zero on any failure.
# Extra arguments go to pytest (e.g. -k ringX3 -x).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=$(bash "$root/script/setup_env.sh" | tail -n 1)
cd "$root"
"$py" -m pytest test -q -rs "$@"
