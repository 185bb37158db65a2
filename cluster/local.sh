#!/usr/bin/env bash
# A local multi-node Ray cluster on one machine: a CPU-only head plus N worker nodes that each declare
# one GPU (a laptop without GPUs works: the embedder uses CUDA only where torch finds it).
#
#   cluster/local.sh start [N]    # head + N GPU workers (default 2); prints the job-submit address
#   cluster/local.sh add [M]      # M more GPU workers (default 1): more participant pools run at once
#   cluster/local.sh status       # nodes and resources, as Ray sees them
#   cluster/local.sh stop         # stops exactly the processes this script started
#
# Every node runs `ray start --block` in its own session; their process ids are kept in $STATE/pids,
# so `stop` never touches other Ray clusters on the machine (unlike `ray stop`).
# Token auth stays on (RAY_AUTH_MODE=token, the token in ~/.ray/auth_token) and the dashboard
# listens on 127.0.0.1 only.
#
# Settings (environment): COOPT_LOCAL_STATE (default /tmp/coopt-local), RAY_PORT (6390),
# DASHBOARD_PORT (8265), HEAD_CPUS (2), WORKER_CPUS (1), AGENT_PORT_BASE (52400), WAIT_S (180: start),
# STOP_WAIT_S (10: how long `stop` lets the nodes exit on SIGTERM before it kills what is left),
# COOPT_SIMULATED_GPUS (1: the worker nodes' GPUs are only declared, so a stage that asked for a GPU runs on the
# CPU instead of refusing; 0 on a machine whose GPUs are real and must be used).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${COOPT_LOCAL_STATE:-/tmp/coopt-local}"
RAY_PORT="${RAY_PORT:-6390}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
HEAD_CPUS="${HEAD_CPUS:-2}"
WORKER_CPUS="${WORKER_CPUS:-1}"
AGENT_PORT_BASE="${AGENT_PORT_BASE:-52400}"
WAIT_S="${WAIT_S:-180}"
STOP_WAIT_S="${STOP_WAIT_S:-10}"

# Job drivers inherit the head's environment: put this project's venv first, so `python` has Ray.
if [ -x "$REPO/.venv/bin/ray" ]; then
  export PATH="$REPO/.venv/bin:$PATH"
fi
command -v ray >/dev/null || { echo "local.sh: ray not found (run 'make setup' first)" >&2; exit 1; }
export RAY_AUTH_MODE=token
export COOPT_SIMULATED_GPUS="${COOPT_SIMULATED_GPUS:-1}"  # the nodes (and so their workers and jobs) inherit it
if [ -z "${RAY_AUTH_TOKEN:-}" ] && [ ! -s "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]; then
  ray get-auth-token --generate >/dev/null
fi

pids_alive() {
  local n=0
  if [ -f "$STATE/pids" ]; then
    while read -r pid; do kill -0 "$pid" 2>/dev/null && n=$((n + 1)); done < "$STATE/pids"
  fi
  echo "$n"
}

# ray start --block <args...> in its own session, in the background; log to $STATE/<name>.log; remember the pid.
spawn() {
  local name="$1"; shift
  setsid ray start --block --disable-usage-stats "$@" >"$STATE/$name.log" 2>&1 < /dev/null &
  echo "$!" >> "$STATE/pids"
  echo "$!"
}

# Ray gives a raylet a fixed 30 s to register; on a busy machine that can fail, so a node that did not start is
# killed and started again, up to 3 tries in all. $2 is the pid of the first try, already spawned.
launch() {
  local name="$1" pid="$2" try; shift 2
  for try in 1 2 3; do
    [ "$try" = 1 ] || pid=$(spawn "$name" "$@")
    if wait_started "$pid" "$STATE/$name.log"; then return 0; fi
    echo "local.sh: $name did not start (try $try of 3): $(grep -m1 -E 'Exception|Error' "$STATE/$name.log" || tail -n 1 "$STATE/$name.log")" >&2
    kill -KILL -- "-$pid" 2>/dev/null || true
  done
  echo "local.sh: giving up on $name; see $STATE/$name.log" >&2
  return 1
}

wait_started() {  # until `ray start` says the node is up; false if it exits or WAIT_S passes
  local pid="$1" log="$2" t0=$SECONDS
  until grep -q "Ray runtime started" "$log" 2>/dev/null; do
    kill -0 "$pid" 2>/dev/null || return 1
    [ $((SECONDS - t0)) -lt "$WAIT_S" ] || return 1
    sleep 0.5
  done
}

agent_ports() {  # distinct agent/metrics ports per node on one machine
  local base=$((AGENT_PORT_BASE + 10 * $1))
  echo "--dashboard-agent-listen-port=$base --dashboard-agent-grpc-port=$((base + 1))" \
       "--runtime-env-agent-port=$((base + 2)) --metrics-export-port=$((base + 3))"
}

worker_args() {  # `ray start` arguments of worker node $1
  # Each node its own temp dir, as on separate machines: nodes sharing one would each unpack a job's working_dir
  # into the same folder, replacing the one the job's driver runs in (its cwd vanishes mid-job).
  echo "--address=127.0.0.1:$RAY_PORT --num-gpus=1 --num-cpus=$WORKER_CPUS --temp-dir=$STATE/t$1" \
       "--labels=coopt-local-node=worker-$1 $(agent_ports "$1")"
}

# Start M more worker nodes at once (each then retried on its own if it did not start), then print the cluster's
# nodes once it lists them all.
add_workers() {
  local m="$1" have i pids=()
  have=$(find "$STATE" -maxdepth 1 -name 'worker-*.log' | wc -l)
  for i in $(seq $((have + 1)) $((have + m))); do
    # shellcheck disable=SC2046
    pids+=("$(spawn "worker-$i" $(worker_args "$i"))")
  done
  for i in $(seq $((have + 1)) $((have + m))); do
    # shellcheck disable=SC2046
    launch "worker-$i" "${pids[$((i - have - 1))]}" $(worker_args "$i") || return 1
  done
  cmd_status $((1 + have + m))
}

cmd_start() {
  local n="${1:-2}"
  if [ "$(pids_alive)" -gt 0 ]; then
    echo "local.sh: a local cluster is already running (state in $STATE); 'cluster/local.sh stop' first" >&2
    exit 1
  fi
  rm -rf "$STATE"; mkdir -p "$STATE"
  # shellcheck disable=SC2046
  set -- --head --port="$RAY_PORT" --num-cpus="$HEAD_CPUS" --num-gpus=0 --temp-dir="$STATE/t" \
    --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
    --ray-client-server-port=$((RAY_PORT + 1)) $(agent_ports 0)
  launch head "$(spawn head "$@")" "$@" || { cmd_stop >/dev/null; exit 1; }
  add_workers "$n" || exit 1
  cat <<EOF

Local cluster up: 1 head (CPU) + $n worker node(s), each declaring 1 GPU.
  Dashboard (token auth; this machine only): http://127.0.0.1:$DASHBOARD_PORT
  Submit a job:
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:$DASHBOARD_PORT --working-dir . -- \\
      python jobs/optimize.py --config configs/quick.yaml --zoo \$PWD/zoo --out \$PWD/runs/quick-cluster
  Add a GPU node: cluster/local.sh add      Stop: cluster/local.sh stop
EOF
}

cmd_add() {
  [ "$(pids_alive)" -gt 0 ] || { echo "local.sh: no local cluster running ('cluster/local.sh start' first)" >&2; exit 1; }
  add_workers "${1:-1}"
}

cmd_status() {  # the nodes and resources, once the cluster lists ${1:-1} alive nodes (or WAIT_S passed: exit 1)
  python - "$RAY_PORT" "${1:-1}" "$WAIT_S" "$STATE" <<'EOF'
import sys, time, ray
port, want, wait_s, state = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
ray.init(address=f"127.0.0.1:{port}", logging_level="ERROR", log_to_driver=False)
deadline = time.time() + wait_s
while (alive := sum(1 for n in ray.nodes() if n["Alive"])) < want:
    if time.time() > deadline:
        sys.exit(f"local.sh: only {alive} of {want} nodes came up in {wait_s:g}s; logs in {state}/*.log")
    time.sleep(0.5)
for n in sorted(ray.nodes(), key=lambda n: n["Resources"].get("GPU", 0)):
    if n["Alive"]:
        r = n["Resources"]
        print(f"node {n['NodeID'][:12]}  CPU {r.get('CPU', 0):g}  GPU {r.get('GPU', 0):g}")
print("cluster:", {k: ray.cluster_resources().get(k, 0.0) for k in ("CPU", "GPU")})  # fixed key order
EOF
}

cmd_stop() {
  if [ ! -f "$STATE/pids" ]; then echo "local.sh: nothing to stop (no $STATE/pids)"; return 0; fi
  local pid t0
  # workers first, then the head (the first pid); each `ray start --block` stops its node on SIGTERM
  tac "$STATE/pids" | while read -r pid; do kill -TERM "$pid" 2>/dev/null || true; done
  t0=$SECONDS
  # an idle node stops in a few seconds; one that ran jobs can hang for 30 s or more, so after STOP_WAIT_S
  while [ "$(pids_alive)" -gt 0 ] && [ $((SECONDS - t0)) -lt "$STOP_WAIT_S" ]; do sleep 1; done
  # whatever is left of these nodes (each ran in its own session: process group id = pid)
  while read -r pid; do kill -KILL -- "-$pid" 2>/dev/null || true; done < "$STATE/pids"
  rm -f "$STATE/pids"
  echo "local.sh: stopped the local cluster (logs kept in $STATE)"
}

case "${1:-}" in
  start) shift; cmd_start "$@" ;;
  add) shift; cmd_add "$@" ;;
  status) cmd_status ;;
  stop) cmd_stop ;;
  *) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
