# Platform environment for RingX jobs, sourced inside a batch job:
#   source script/platform_env.sh frontier|cuda|cpu
# frontier: ROCm/RCCL modules and Slingshot settings (RINGX_MODULES replaces the module list,
# RINGX_RCCL_PLUGIN points at the aws-ofi-rccl plugin); cuda: optional RINGX_MODULES, NCCL
# asynchronous error handling; cpu: nothing (gloo on CPUs, any Slurm). Every variable keeps a
# value already set in the environment. Sets RINGX_GPUS_PER_NODE and RINGX_SRUN_GPU_FLAGS.
ringx_platform=${1:-cuda}
case "$ringx_platform" in
frontier)
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
  ;;
cuda)
  if [ -n "${RINGX_MODULES:-}" ] && command -v module >/dev/null 2>&1; then module load $RINGX_MODULES; fi
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
  export RINGX_GPUS_PER_NODE=${RINGX_GPUS_PER_NODE:-8}
  export RINGX_SRUN_GPU_FLAGS=${RINGX_SRUN_GPU_FLAGS:---cpus-per-task=${OMP_NUM_THREADS}}
  ;;
cpu) ;;
*) echo "unknown platform '$ringx_platform' (expected frontier, cuda or cpu)" >&2; return 2 2>/dev/null || exit 2;;
esac
