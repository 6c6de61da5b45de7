#!/usr/bin/env bash
# Start a single-machine Ray head to try `ray job submit` locally, with Ray token authentication on.
#
#   cluster/start_local.sh
#   NUM_CPUS=4 GCS_PORT=6380 DASHBOARD_PORT=8266 AGENT_PORT=52366 cluster/start_local.sh
#
# Settings (environment, default): GCS_PORT (6379), DASHBOARD_PORT (8265), CLIENT_PORT (10001),
# AGENT_PORT (52365), NUM_CPUS (all cores), STARTUP_TIMEOUT_S (120), MEDSR_LOCAL_RAY_DIR (pid, log and env
# files; ~/.local/state/medsr-dist/local-ray). Change the ports if another Ray runs on this machine.
#
# The dashboard listens on 127.0.0.1 only, but Ray's GCS and node services listen on all interfaces:
# one more reason to keep token authentication on.
#
# Token auth, the documented way (https://docs.ray.io/en/latest/ray-security/token-auth.html): the token
# lives in ~/.ray/auth_token (created by `ray get-auth-token --generate` if missing; RAY_AUTH_TOKEN or
# RAY_AUTH_TOKEN_PATH take precedence when set) and every Ray process, the head and each client such as
# `ray job submit`, runs with RAY_AUTH_MODE=token. The env file printed at the end sets that for a shell.
#
# The head runs as `ray start --head --block` in its own session; cluster/stop_local.sh stops that head
# alone (`ray stop` would stop every Ray instance of this user on the machine). Jobs inherit this shell's
# environment, e.g. the AWS credentials they need to reach s3:// paths.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RAY="${RAY:-$repo_root/.venv/bin/ray}"
if [[ ! -x "$RAY" ]]; then
  RAY="$(command -v ray)" || { echo "ray not found: run 'make install' or set RAY=/path/to/ray" >&2; exit 1; }
fi
PYTHON="$(dirname "$RAY")/python"
[[ -x "$PYTHON" ]] || PYTHON=python3

GCS_PORT="${GCS_PORT:-6379}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
CLIENT_PORT="${CLIENT_PORT:-10001}"
AGENT_PORT="${AGENT_PORT:-52365}"  # the head's dashboard agent, which runs submitted jobs
NUM_CPUS="${NUM_CPUS:-$(nproc)}"
STATE_DIR="${MEDSR_LOCAL_RAY_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/medsr-dist/local-ray}"
STARTUP_TIMEOUT_S="${STARTUP_TIMEOUT_S:-120}"

mkdir -p "$STATE_DIR"
pid_file="$STATE_DIR/head.pid"
log_file="$STATE_DIR/head.log"
env_file="$STATE_DIR/env.sh"

if [[ -f "$pid_file" ]] && kill -0 "$(cat "$pid_file")" 2>/dev/null; then
  echo "A local head is already running (pid $(cat "$pid_file")); stop it with cluster/stop_local.sh" >&2
  exit 1
fi

token="$("$RAY" get-auth-token --generate 2>/dev/null)"

# PATH: `python` in job entrypoints means the interpreter that has ray and medsr_dist.
# RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0: on stop, skip the up-to-30 s drain meant for Serve replicas.
PATH="$(dirname "$RAY"):$PATH" RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0 RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 \
  setsid "$RAY" start --head --block \
    --node-ip-address 127.0.0.1 \
    --port "$GCS_PORT" \
    --dashboard-host 127.0.0.1 \
    --dashboard-port "$DASHBOARD_PORT" \
    --ray-client-server-port "$CLIENT_PORT" \
    --dashboard-agent-listen-port "$AGENT_PORT" \
    --num-cpus "$NUM_CPUS" \
    --disable-usage-stats \
    >"$log_file" 2>&1 </dev/null &
head_pid=$!
echo "$head_pid" >"$pid_file"

# Ready once the Jobs API answers an authenticated request and the agent that runs jobs is healthy
# (a port clash, e.g. with another Ray on this machine, shows up here rather than at the first submit).
if ! "$PYTHON" - "$head_pid" "$STARTUP_TIMEOUT_S" "$token" \
    "http://127.0.0.1:$DASHBOARD_PORT/api/jobs/" "http://127.0.0.1:$AGENT_PORT/api/healthz" <<'PY'
import os, sys, time, urllib.request
pid, timeout, token, urls = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4:]
deadline = time.monotonic() + timeout
while urls and time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("the head exited during startup")
    request = urllib.request.Request(urls[0], headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            if response.status == 200:
                urls.pop(0)
                continue
    except OSError:
        pass
    time.sleep(1)
if urls:
    sys.exit(f"no answer from {urls[0]} within {timeout:.0f} s")
PY
then
  echo "Ray head failed to start; last lines of $log_file:" >&2
  tail -n 40 "$log_file" >&2
  "$repo_root/cluster/stop_local.sh" >/dev/null
  exit 1
fi

cat >"$env_file" <<ENV
# Source this in the shell that talks to the local Ray head (written by cluster/start_local.sh).
export RAY_AUTH_MODE=token
export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT
export RAY_ADDRESS=127.0.0.1:$GCS_PORT
ENV

cat <<MSG
Ray head running (pid $head_pid, log $log_file)
  Jobs API / dashboard: http://127.0.0.1:$DASHBOARD_PORT
  GCS address:          127.0.0.1:$GCS_PORT
Token authentication is on; clients need RAY_AUTH_MODE=token and the token (in ~/.ray/auth_token here):
  source $env_file
  ray job submit --address http://127.0.0.1:$DASHBOARD_PORT --working-dir . -- python jobs/train.py ...
Stop it with: cluster/stop_local.sh
MSG
