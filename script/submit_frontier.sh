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

# sbatch runs a copy of this file: find the checkout from RINGX_ROOT or the submit directory
submit=${SLURM_SUBMIT_DIR:-$PWD}
if [ -n "${RINGX_ROOT:-}" ]; then script_dir=$RINGX_ROOT/script
elif [ -f "$submit/bench_job.sh" ]; then script_dir=$submit
else script_dir=$submit/script; fi
if [ "${RINGX_MODE:-gpu}" != cpu ]; then source "$script_dir/platform_env.sh" frontier; fi
source "$script_dir/bench_job.sh" "$@"
