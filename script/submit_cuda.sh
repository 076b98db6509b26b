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

# sbatch runs a copy of this file: find the checkout from RINGX_ROOT or the submit directory
submit=${SLURM_SUBMIT_DIR:-$PWD}
if [ -n "${RINGX_ROOT:-}" ]; then script_dir=$RINGX_ROOT/script
elif [ -f "$submit/bench_job.sh" ]; then script_dir=$submit
else script_dir=$submit/script; fi
if [ "${RINGX_MODE:-gpu}" != cpu ]; then source "$script_dir/platform_env.sh" cuda; fi
source "$script_dir/bench_job.sh" "$@"
