#!/bin/bash
# Attention benchmark on a generic CUDA/NCCL Slurm cluster:
#   cd script; RINGX_GPUS_PER_NODE=4 sbatch -N 2 submit_cuda.sh ringX3_attn
# Overrides as in submit_frontier.sh (SBATCH_ACCOUNT, SBATCH_PARTITION, SBATCH_TIMELIMIT, -N);
# RINGX_MODULES names modules to load; RINGX_MODE=cpu runs with gloo on CPUs on any Slurm.
#SBATCH -J ringx-bench
#SBATCH -N 1
#SBATCH -t 00:30:00
#SBATCH --exclusive
#SBATCH -o ringx-bench-%j.out
#SBATCH --signal=B:USR1@60

if [ "${RINGX_MODE:-gpu}" != cpu ]; then
  if [ -n "${RINGX_MODULES:-}" ] && command -v module >/dev/null 2>&1; then module load $RINGX_MODULES; fi
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
  export RINGX_GPUS_PER_NODE=${RINGX_GPUS_PER_NODE:-8}
  export RINGX_SRUN_GPU_FLAGS=${RINGX_SRUN_GPU_FLAGS:---cpus-per-task=${OMP_NUM_THREADS}}
fi
# sbatch runs a copy of this file: find the checkout from RINGX_ROOT or the submit directory
submit=${SLURM_SUBMIT_DIR:-$PWD}
if [ -n "${RINGX_ROOT:-}" ]; then job_body=$RINGX_ROOT/script/bench_job.sh
elif [ -f "$submit/bench_job.sh" ]; then job_body=$submit/bench_job.sh
else job_body=$submit/script/bench_job.sh; fi
source "$job_body" "$@"
