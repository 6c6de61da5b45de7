#!/usr/bin/env bash
# Stop the Ray head started by cluster/start_local.sh, and only it (unlike `ray stop`, which stops every
# Ray instance of this user on the machine).
#
# SIGTERM makes `ray start --block` shut down the processes it started; anything left in its process
# group (workers, agents) is then killed.
set -euo pipefail

STATE_DIR="${MEDSR_LOCAL_RAY_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/medsr-dist/local-ray}"
STOP_TIMEOUT_S="${STOP_TIMEOUT_S:-60}"
pid_file="$STATE_DIR/head.pid"

if [[ ! -f "$pid_file" ]]; then
  echo "No local head recorded in $pid_file; nothing to stop."
  exit 0
fi
pid="$(cat "$pid_file")"

# Guard against a stale pid file whose pid now belongs to an unrelated process.
if ! ps -o args= -p "$pid" 2>/dev/null | grep -q "start --head --block"; then
  echo "Process $pid is not a running local Ray head; removing stale $pid_file."
  rm -f "$pid_file" "$STATE_DIR/env.sh"
  exit 0
fi

kill -TERM "$pid"
for _ in $(seq "$STOP_TIMEOUT_S"); do
  kill -0 "$pid" 2>/dev/null || break
  sleep 1
done
# start_local.sh ran the head under setsid, so its process group id is its pid.
kill -KILL -- "-$pid" 2>/dev/null || true

rm -f "$pid_file" "$STATE_DIR/env.sh"
echo "Stopped the local Ray head (pid $pid)."
