#!/usr/bin/env bash
# A Prefect server and a process worker on this machine, for running ddr's deployments from the UI.
#
#   deployments/prefect-local.sh start    # server on 127.0.0.1:4200, work pools, a worker for ddr-local
#   deployments/prefect-local.sh deploy   # prefect deploy --all (or: deploy ddr-capture/local ...)
#   deployments/prefect-local.sh stop     # stops the worker and the server, by PID
#   deployments/prefect-local.sh status
#   deployments/prefect-local.sh env      # prints `export PREFECT_API_URL=...` for your shell
#
# Run it from anywhere; it works in the repository root. Settings (environment):
#   DDR_PREFECT_HOST  address the server binds to (default 127.0.0.1; on a cluster's login node, an
#                     address the compute nodes reach, since SLURM workers report task runs to it)
#   DDR_PREFECT_PORT  default 4200
#   DDR_PREFECT_POOL  the pool the worker serves (default ddr-local; ddr-slurm on a login node)
#   PREFECT_HOME      Prefect's home: profiles and the server's sqlite database (default ~/.prefect)
#   DDR_PREFECT_STATE PID and log files (default $PREFECT_HOME/ddr-local)
set -euo pipefail
cd "$(dirname "$0")/.."

HOST=${DDR_PREFECT_HOST:-127.0.0.1}
PORT=${DDR_PREFECT_PORT:-4200}
POOL=${DDR_PREFECT_POOL:-ddr-local}
export PREFECT_HOME=${PREFECT_HOME:-$HOME/.prefect}
STATE=${DDR_PREFECT_STATE:-$PREFECT_HOME/ddr-local}
CLIENT_HOST=$HOST
[ "$HOST" = 0.0.0.0 ] && CLIENT_HOST=$(hostname -f)
export PREFECT_API_URL=${PREFECT_API_URL:-http://$CLIENT_HOST:$PORT/api}
export PREFECT_SERVER_ANALYTICS_ENABLED=${PREFECT_SERVER_ANALYTICS_ENABLED:-false}
export DO_NOT_TRACK=${DO_NOT_TRACK:-1}
export MLFLOW_DISABLE_TELEMETRY=${MLFLOW_DISABLE_TELEMETRY:-true}
PREFECT=${PREFECT:-$(command -v prefect || echo .venv/bin/prefect)}

log() { echo "prefect-local: $*" >&2; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

PYTHON=${PYTHON:-$(dirname "$PREFECT")/python}
healthy() {
  "$PYTHON" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + "/health", timeout=2)' \
    "$PREFECT_API_URL" >/dev/null 2>&1
}

ensure_pools() {
  for pool in ddr-local ddr-slurm; do
    "$PREFECT" work-pool inspect "$pool" >/dev/null 2>&1 || "$PREFECT" work-pool create "$pool" --type process >/dev/null
  done
  log "work pools ddr-local and ddr-slurm (type process) exist"
}

start() {
  mkdir -p "$STATE"
  if alive "$STATE/server.pid"; then
    log "server already running (PID $(cat "$STATE/server.pid"))"
  else
    # setsid: the server and its children form a process group `stop` can end by this PID.
    setsid "$PREFECT" server start --host "$HOST" --port "$PORT" >"$STATE/server.log" 2>&1 &
    echo $! >"$STATE/server.pid"
    log "server starting (PID $!), log $STATE/server.log"
  fi
  for _ in $(seq 240); do
    healthy && break
    alive "$STATE/server.pid" || { tail -20 "$STATE/server.log" >&2; log "server exited"; return 1; }
    sleep 0.5
  done
  healthy || { log "server not healthy after 120 s; see $STATE/server.log"; return 1; }
  ensure_pools
  if alive "$STATE/worker.pid"; then
    log "worker already running (PID $(cat "$STATE/worker.pid"))"
  else
    setsid "$PREFECT" worker start --pool "$POOL" --type process >"$STATE/worker.log" 2>&1 &
    echo $! >"$STATE/worker.pid"
    log "worker for $POOL started (PID $!), log $STATE/worker.log"
  fi
  log "UI and API: ${PREFECT_API_URL%/api}   (in your shell: eval \"\$($0 env)\")"
}

stop_group() { # stop_group NAME PIDFILE: SIGTERM the process group, again after 10 s (an idle worker may
  # need a second one), then SIGKILL.
  local pid
  alive "$2" || { rm -f "$2"; return 0; }
  pid=$(cat "$2")
  for signal in TERM TERM KILL; do
    kill -"$signal" -- "-$pid" 2>/dev/null || kill -"$signal" "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
      kill -0 "$pid" 2>/dev/null || break 2
      sleep 0.1
    done
  done
  rm -f "$2"
  log "stopped $1 (PID $pid)"
}

stop() {
  stop_group worker "$STATE/worker.pid"
  stop_group server "$STATE/server.pid"
}

status() {
  local ok=0
  if alive "$STATE/server.pid"; then echo "server: PID $(cat "$STATE/server.pid"), $PREFECT_API_URL"; else echo "server: not running"; ok=1; fi
  if alive "$STATE/worker.pid"; then echo "worker: PID $(cat "$STATE/worker.pid"), pool $POOL"; else echo "worker: not running"; ok=1; fi
  return $ok
}

deploy() {
  healthy || { log "no server at $PREFECT_API_URL (run: $0 start)"; return 1; }
  ensure_pools
  if [ $# -eq 0 ]; then
    "$PREFECT" --no-prompt deploy --all
  else
    local names=()
    for name in "$@"; do names+=(-n "$name"); done
    "$PREFECT" --no-prompt deploy "${names[@]}"
  fi
}

command=${1:-}
shift || true
case "$command" in
start) start ;;
stop) stop ;;
status) status ;;
deploy) deploy "$@" ;;
env) echo "export PREFECT_API_URL=$PREFECT_API_URL" ;;
*)
  echo "usage: $0 start|stop|status|deploy [flow/deployment ...]|env" >&2
  exit 2
  ;;
esac
