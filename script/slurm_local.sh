#!/usr/bin/env bash
# A private single-node Slurm for tests and CI on one machine (root needed to start it).
#   bash script/slurm_local.sh start   install (apt) if missing, write a config, start munged,
#                                      slurmctld and slurmd; prints `export SLURM_CONF=...`
#   bash script/slurm_local.sh stop    stop exactly the daemons `start` started (by PID)
#   bash script/slurm_local.sh status  sinfo
# RINGX_SLURM_DIR (default /tmp/ringx-slurm) holds config, state, logs and PID files;
# RINGX_SLURM_CPUS (default 8) is the CPU count declared for the node (oversubscribes real cores).
set -euo pipefail
dir=${RINGX_SLURM_DIR:-/tmp/ringx-slurm}
conf=$dir/slurm.conf
log() { echo "[slurm_local] $*" >&2; }

install() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v srun >/dev/null \
    && command -v munged >/dev/null && return 0
  [ "$(id -u)" = 0 ] || { log "Slurm is not installed and installing it needs root"; exit 1; }
  log "installing slurmd slurmctld slurm-client munge"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q slurmd slurmctld slurm-client munge >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1; apt-get install -y -q slurmd slurmctld slurm-client munge >/dev/null; }
}

start_munge() {
  if pgrep -x munged >/dev/null; then return 0; fi
  mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
  [ -s /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
  chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key; chmod 0755 /run/munge
  runuser -u munge -- munged
  pgrep -x munged > "$dir/munged.pid"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

write_conf() {
  local host; host=$(hostname -s)
  mkdir -p "$dir/state" "$dir/spool" "$dir/log"
  cat > "$conf" <<CONF
ClusterName=ringx
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmctldPort=${RINGX_SLURMCTLD_PORT:-$(free_port)}
SlurmdPort=${RINGX_SLURMD_PORT:-$(free_port)}
AuthType=auth/munge
# a requeued job becomes eligible cred_expire + 1 s after it ended (default 120 s)
AuthInfo=cred_expire=5
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
# look at pending jobs every second (defaults 60 s and 30 s): a requeued job starts once eligible
SchedulerParameters=sched_interval=1,bf_interval=1
MpiDefault=none
ReturnToService=2
KillWait=5
InactiveLimit=0
NodeName=$host NodeAddr=127.0.0.1 CPUs=${RINGX_SLURM_CPUS:-8} State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
CONF
}

start() {
  install
  mkdir -p "$dir"
  write_conf
  start_munge
  export SLURM_CONF=$conf
  slurmctld -f "$conf"
  slurmd -f "$conf"
  for _ in $(seq 1 60); do
    state=$(sinfo -h -o %T 2>/dev/null | head -n 1 || true)
    case "$state" in idle*|mix*|alloc*) log "node $state"; echo "export SLURM_CONF=$conf"; return 0;; esac
    sleep 0.5
  done
  log "Slurm did not come up; logs in $dir/log"; stop; exit 1
}

stop() {
  for name in slurmd slurmctld munged; do
    f=$dir/$name.pid
    [ -s "$f" ] || continue
    pid=$(cat "$f"); kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$f"
  done
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) SLURM_CONF=$conf sinfo ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
