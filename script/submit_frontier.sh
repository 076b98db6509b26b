#!/bin/bash
# Attention benchmark on Frontier-class ROCm/RCCL nodes (8 GCDs per node):
#   cd script; sbatch submit_frontier.sh ringX1_attn
#   SBATCH_ACCOUNT=abc123 SBATCH_PARTITION=batch SBATCH_TIMELIMIT=01:00:00 sbatch -N 16 submit_frontier.sh ringX4_attn
# Node count (-N), account, partition and time follow sbatch's own overrides (command line, then
# the SBATCH_* environment variables, then the lines below). RINGX_MODULES replaces the module
# lines; RINGX_MODE=cpu runs the same job with gloo on CPUs on any Slurm (no modules, no GPUs).
# See script/bench_job.sh for the other RINGX_* variables; logs go to logs/<algo>_N<nodes>.log.
#SBATCH -J ringx-bench
#SBATCH -N 1
#SBATCH -t 00:30:00
#SBATCH --exclusive
#SBATCH -o ringx-bench-%j.out
#SBATCH --signal=B:USR1@60

if [ "${RINGX_MODE:-gpu}" != cpu ]; then
  if command -v module >/dev/null 2>&1; then
    module load ${RINGX_MODULES:-PrgEnv-gnu/8.5.0 rocm/6.1.3 craype-accel-amd-gfx90a libfabric/1.20.1}
  fi
  # RCCL over Slingshot through the aws-ofi-rccl plugin (set RINGX_RCCL_PLUGIN to its lib dir)
  [ -n "${RINGX_RCCL_PLUGIN:-}" ] && export LD_LIBRARY_PATH=$RINGX_RCCL_PLUGIN:${LD_LIBRARY_PATH:-}
  export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-hsn0}
  export NCCL_NET_GDR_LEVEL=${NCCL_NET_GDR_LEVEL:-3}
  export NCCL_CROSS_NIC=${NCCL_CROSS_NIC:-1}
  export FI_CXI_ATS=${FI_CXI_ATS:-0}
  export FI_MR_CACHE_MONITOR=${FI_MR_CACHE_MONITOR:-userfaultfd}
  export FI_CXI_DISABLE_HOST_REGISTER=${FI_CXI_DISABLE_HOST_REGISTER:-1}
  export FI_CXI_DEFAULT_CQ_SIZE=${FI_CXI_DEFAULT_CQ_SIZE:-131072}
  export MIOPEN_USER_DB_PATH=${MIOPEN_USER_DB_PATH:-/tmp/miopen-$USER}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-7}
  export RINGX_GPUS_PER_NODE=${RINGX_GPUS_PER_NODE:-8}
  export RINGX_SRUN_GPU_FLAGS=${RINGX_SRUN_GPU_FLAGS:--c7 --gpu-bind=closest}
fi
# sbatch runs a copy of this file: find the checkout from RINGX_ROOT or the submit directory
submit=${SLURM_SUBMIT_DIR:-$PWD}
if [ -n "${RINGX_ROOT:-}" ]; then job_body=$RINGX_ROOT/script/bench_job.sh
elif [ -f "$submit/bench_job.sh" ]; then job_body=$submit/bench_job.sh
else job_body=$submit/script/bench_job.sh; fi
source "$job_body" "$@"
