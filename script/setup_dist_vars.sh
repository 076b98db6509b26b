# Source inside srun (one task per GPU or CPU rank) to export the torchrun-style variables that
# ringX.launch.init_distributed and torch's env:// rendezvous read:
#   srun -n8 bash -c "source setup_dist_vars.sh; python ../test/test_ringX1_attn_func.py"
# MASTER_ADDR is the first host of the step (override by exporting it first); MASTER_PORT is
# derived from the job and step ids (override by exporting MASTER_PORT or RINGX_MASTER_PORT).
if [ -z "${SLURM_PROCID:-}" ]; then
  echo "setup_dist_vars.sh: SLURM_PROCID is not set; source this inside srun" >&2
  return 1 2>/dev/null || exit 1
fi
export RANK=$SLURM_PROCID
export WORLD_SIZE=${SLURM_NTASKS:-${SLURM_NPROCS}}
export LOCAL_RANK=${SLURM_LOCALID:-0}
export LOCAL_WORLD_SIZE=${SLURM_NTASKS_PER_NODE:-${SLURM_STEP_TASKS_PER_NODE%%(*}}
_ringx_nodes=${SLURM_STEP_NODELIST:-${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}}
if [ -z "${MASTER_ADDR:-}" ]; then
  if command -v scontrol >/dev/null 2>&1 && [ -n "$_ringx_nodes" ]; then
    MASTER_ADDR=$(scontrol show hostnames "$_ringx_nodes" | head -n 1)
  fi
  export MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
fi
export MASTER_PORT=${RINGX_MASTER_PORT:-${MASTER_PORT:-$((10000 + (${SLURM_JOB_ID:-0} * 17 + ${SLURM_STEP_ID:-0}) % 20000))}}
unset _ringx_nodes
