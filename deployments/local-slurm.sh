#!/usr/bin/env bash
# A single-node SLURM on this machine: controller and compute node are `hostname -s`, on
# 127.0.0.1, with this machine's real CPUs and memory. For the integration tests (.ci/run) and
# for trying the slurm profiles (infrastructure=slurm-local) before a real cluster.
#
#   deployments/local-slurm.sh install   # Debian packages slurmctld slurmd slurm-client munge (root)
#   deployments/local-slurm.sh start     # munged, slurmctld, slurmd; waits until the node is idle
#   deployments/local-slurm.sh stop      # cancels jobs, stops what `start` started, by PID
#   deployments/local-slurm.sh status
#
# Idempotent: `install` does nothing when the binaries are there; `start` leaves running daemons
# alone. State, logs and PID files live in $DDR_SLURM_STATE (default /var/tmp/ddr-slurm). The
# config goes to /etc/slurm/slurm.conf, and an existing slurm.conf that this script did not write
# is never touched (then `start` refuses). Daemons run as root: this is a private test cluster.
set -euo pipefail

STATE=${DDR_SLURM_STATE:-/var/tmp/ddr-slurm}
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
MARK="# ddr local single-node SLURM (written by deployments/local-slurm.sh)"
MUNGE_SOCKET=/run/munge/munge.socket.2
BINARIES=(slurmctld slurmd sbatch squeue sinfo scontrol scancel munged munge)

log() { echo "local-slurm: $*" >&2; }

missing_binaries() {
  local missing=()
  for b in "${BINARIES[@]}"; do
    command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || missing+=("$b")
  done
  echo "${missing[*]:-}"
}

alive() { # alive PIDFILE: the PID in the file is a running process
  [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

install() {
  if [ -z "$(missing_binaries)" ]; then
    log "already installed ($(slurmctld -V 2>/dev/null || echo slurm))"
    return 0
  fi
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    log "missing: $(missing_binaries); install slurmctld slurmd slurm-client munge (needs root and apt-get)"
    return 1
  fi
  log "installing slurmctld slurmd slurm-client munge"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

write_conf() {
  if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    log "$CONF exists and was not written by this script; not touching it"
    return 1
  fi
  local host node
  host=$(hostname -s)
  # The node line as slurmd sees this machine: CPUs, sockets, cores, threads, RealMemory.
  node=$(/usr/sbin/slurmd -C 2>/dev/null | head -n 1 || slurmd -C | head -n 1)
  node=${node/NodeName=* CPUs=/NodeName=$host NodeAddr=127.0.0.1 CPUs=}
  mkdir -p "$CONF_DIR" "$STATE/ctld" "$STATE/d"
  cat >"$CONF.tmp" <<EOF
$MARK
ClusterName=ddr-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
ReturnToService=2
SlurmctldPort=6817
SlurmdPort=6818
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=60
KillWait=5
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
$node State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  mv "$CONF.tmp" "$CONF"
}

start_munge() {
  if munge -n -S "$MUNGE_SOCKET" >/dev/null 2>&1; then
    return 0 # a munged is answering (ours from an earlier start, or the system's)
  fi
  if [ ! -s /etc/munge/munge.key ]; then
    log "creating a munge key"
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  fi
  chown munge:munge /etc/munge /etc/munge/munge.key 2>/dev/null || true
  chmod 700 /etc/munge
  chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/lib/munge /var/log/munge "$STATE"
  chown munge:munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
  chmod 755 /run/munge
  rm -f "$STATE/munged.pid"
  local as_munge=()
  if id munge >/dev/null 2>&1 && command -v runuser >/dev/null; then
    as_munge=(runuser -u munge --)
    : >"$STATE/munged.pid" && chown munge "$STATE/munged.pid"
  fi
  "${as_munge[@]}" munged --socket="$MUNGE_SOCKET" --pid-file="$STATE/munged.pid" --origin=127.0.0.1 \
    --log-file=/var/log/munge/munged.log --force
  for _ in $(seq 50); do
    munge -n -S "$MUNGE_SOCKET" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  log "munged did not start; see /var/log/munge/munged.log"
  return 1
}

node_state() { sinfo -h -N -o %T 2>/dev/null | head -n 1; }

start() {
  local missing
  missing=$(missing_binaries)
  if [ -n "$missing" ]; then
    log "missing: $missing (run: $0 install)"
    return 1
  fi
  if alive "$STATE/slurmctld.pid" && alive "$STATE/slurmd.pid" && scontrol ping >/dev/null 2>&1; then
    log "already running: $(sinfo -h -N -o '%N %T %c CPUs %m MB')"
    return 0
  fi
  write_conf
  start_munge
  if ! alive "$STATE/slurmctld.pid"; then
    /usr/sbin/slurmctld -c # -c: a fresh controller state (no jobs from an earlier life)
  fi
  if ! alive "$STATE/slurmd.pid"; then
    /usr/sbin/slurmd
  fi
  local state=""
  for _ in $(seq 120); do
    state=$(node_state)
    case "$state" in
    idle | mixed | allocated) break ;;
    down* | drain* | fail*) scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
  done
  case "$state" in
  idle | mixed | allocated) log "running: $(sinfo -h -N -o '%N %T %c CPUs %m MB')" ;;
  *)
    log "the node did not become idle (state: ${state:-none}); logs: $STATE/slurmctld.log $STATE/slurmd.log"
    return 1
    ;;
  esac
}

stop_pid() { # stop_pid NAME PIDFILE
  local pidfile=$2 pid
  alive "$pidfile" || { rm -f "$pidfile"; return 0; }
  pid=$(cat "$pidfile")
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 100); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "$1 ($pid) ignored SIGTERM; killing it"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
  log "stopped $1 ($pid)"
}

stop() {
  if alive "$STATE/slurmctld.pid" && [ -f "$CONF" ] && grep -qF "$MARK" "$CONF"; then
    scancel --user="$(id -un)" 2>/dev/null || true # jobs of this private cluster only
    for _ in $(seq 50); do
      [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
      sleep 0.2
    done
  fi
  stop_pid slurmd "$STATE/slurmd.pid"
  stop_pid slurmctld "$STATE/slurmctld.pid"
  stop_pid munged "$STATE/munged.pid" # only a munged this script started has its PID file here
}

status() {
  local missing
  missing=$(missing_binaries)
  [ -z "$missing" ] || { echo "not installed (missing: $missing)"; return 1; }
  if alive "$STATE/slurmctld.pid" && alive "$STATE/slurmd.pid" && scontrol ping >/dev/null 2>&1; then
    sinfo -N -o '%N %T %c %m'
    squeue
  else
    echo "not running"
    return 1
  fi
}

case "${1:-}" in
install) install ;;
start) start ;;
stop) stop ;;
status) status ;;
*)
  echo "usage: $0 install|start|stop|status" >&2
  exit 2
  ;;
esac
