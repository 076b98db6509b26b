#!/bin/bash
# Train the climate ViT under Slurm (the seed project's `cd app/vit; sbatch submit_frontier_cp.sh`):
#   cd app/vit; sbatch submit_frontier_cp.sh                      # mp_p2_ringX, cp over every GCD
#   sbatch -N 2 app/vit/submit_frontier_cp.sh mp_p1_ringX --context_parallel 16 --steps 500
#   RINGX_PLATFORM=cuda RINGX_GPUS_PER_NODE=4 sbatch app/vit/submit_frontier_cp.sh mp_p2_allgather --context_parallel 4
#   RINGX_PLATFORM=cpu sbatch app/vit/submit_frontier_cp.sh debug --context_parallel 4 --steps 30   # any Slurm
# The first argument is the preset; the others go to app/vit/train.py. RINGX_PLATFORM defaults to
# frontier here; see script/app_job.sh for the rest (run directory, preemption and requeue).
#SBATCH -J ringx-vit
#SBATCH -N 1
#SBATCH -t 02:00:00
#SBATCH --exclusive
#SBATCH -o ringx-vit-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=USR1@120
#SBATCH --requeue

submit=${SLURM_SUBMIT_DIR:-$PWD}
if [ -n "${RINGX_ROOT:-}" ]; then root=$RINGX_ROOT
elif [ -f "$submit/train.py" ] && [ -f "$submit/../../script/app_job.sh" ]; then root=$(cd "$submit/../.." && pwd)
elif [ -f "$submit/script/app_job.sh" ]; then root=$submit
else echo "cannot find the RingX checkout from $submit; set RINGX_ROOT" >&2; exit 2; fi
if [ $# -eq 0 ]; then   # the seed's default run: patch 2 with ringX over every rank of the job
  nodes=${SLURM_JOB_NUM_NODES:-1}
  ranks=$([ "${RINGX_PLATFORM:-frontier}" = cpu ] && echo "${RINGX_CPU_RANKS:-4}" || echo $((nodes * ${RINGX_GPUS_PER_NODE:-8})))
  set -- mp_p2_ringX --context_parallel "$ranks" --parallel_order cp-tp-dp
fi
export RINGX_PLATFORM=${RINGX_PLATFORM:-frontier}
source "$root/script/app_job.sh" vit "$@"
