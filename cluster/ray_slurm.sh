#!/usr/bin/env bash
# Start a Ray cluster inside a SLURM allocation, run one driver command on it, stop what it started.
#
#   bash cluster/ray_slurm.sh COMMAND [ARGS...]     # inside sbatch (cluster/ray_slurm.sbatch) or salloc
#
# - Head: on this node (the allocation's first), in its own process group.
# - Workers: one `srun --overlap --nodes=1 --ntasks=1 -w NODE` per other node, running this script
#   in node mode (`--node`), which starts `ray start --block` with that node's CPUs/GPUs/memory.
# - Every Ray process gets a short per-job --temp-dir (AF_UNIX paths: 107 bytes), explicit head ports
#   derived from the job id (so jobs sharing a node never meet), token authentication (a per-job
#   token file, mode 600), the dashboard on 127.0.0.1, and RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0.
# - Starts the workers once the head is registered, then waits until every node has joined (polls
#   ray.nodes(); RAY_SLURM_JOIN_TIMEOUT, clear error). While the driver runs, a worker node whose Ray
#   stopped is started again (RAY_SLURM_NODE_RESTARTS).
# - MLflow: MLFLOW_TRACKING_URI (a store on shared storage) is passed to the driver; with
#   RAY_SLURM_MLFLOW_UI=1 an `mlflow server` on that store is started on the head, bound to 127.0.0.1.
# - Prints the `ssh -L` command for the dashboard and the MLflow UI.
# - On SIGUSR1 (`#SBATCH --signal=B:USR1@SECONDS`): SIGINT to the driver (Ray Tune saves its state),
#   wait up to RAY_SLURM_DRAIN_S, stop the cluster, `scontrol requeue` this job; the requeued run
#   (SLURM_RESTART_COUNT > 0) appends RAY_SLURM_RESUME_ARGS (default: --resume) to the command.
# - On exit, scancel (SIGTERM) or error: stops only its own processes — by process group, then any
#   process carrying this run's RAY_SLURM_TAG in its environment — never `ray stop`.
#
# Knobs (environment; all optional):
#   RAY_SLURM_STATE_DIR   folder for per-job state (token, logs); must be visible from every node
#                         (default: $SLURM_SUBMIT_DIR/.ray_slurm); the job uses STATE_DIR/$SLURM_JOB_ID
#   RAY_SLURM_TMP_ROOT    node-local root for Ray's temp dir (temp dir = ROOT/ray_<jobid>); default: $TMPDIR
#                         (node-local at OSC, flushed at the job's end) when ROOT/ray_<jobid> stays within 45
#                         characters (AF_UNIX socket paths: 107 bytes), else /tmp
#   RAY_SLURM_PORT_BASE   first of the head's ports (GCS, dashboard, client, MLflow = base+0..3);
#                         default 20000 + 100 * (job id % 100), moved up when one is taken
#   RAY_SLURM_WORKER_PORTS  "MIN-MAX" port range for Ray workers (default: ports chosen by the OS)
#   RAY_SLURM_JOIN_TIMEOUT  seconds to wait for all nodes (default 300)
#   RAY_SLURM_DRAIN_S     seconds the driver gets to save after SIGINT (default 60)
#   RAY_SLURM_REQUEUE     1: requeue after SIGUSR1 (default); 0: just stop (chain with --dependency)
#   RAY_SLURM_MAX_RESTARTS  stop requeueing after this many restarts (default 20)
#   RAY_SLURM_NODE_RESTARTS  restart a worker node's Ray that stopped while the driver runs, at most
#                         this many times in all (default 3; 0: never)
#   RAY_SLURM_RESUME_ARGS arguments appended to the command on a requeued run (default "--resume")
#   RAY_SLURM_MLFLOW_UI   1: serve MLFLOW_TRACKING_URI with `mlflow server` on 127.0.0.1 (default 0)
#   RAY_SLURM_LOGIN_HOST  host for the ssh command (default: OSC_LOGIN_HOSTS[SLURM_CLUSTER_NAME], e.g.
#                         pitzer -> pitzer.osc.edu, else SLURM_SUBMIT_HOST)
#   RAY_SLURM_HEAD_IP     the head's address for the other nodes (default: first of `hostname -I`)
set -uo pipefail

# OSC clusters and their login hosts (for the ssh command). The one definition on this side;
# lora_diffusion/cluster.py's CLUSTERS names the same (tests/test_cluster.py checks). Owens was
# decommissioned on 2025-02-03.
declare -A OSC_LOGIN_HOSTS=([pitzer]=pitzer.osc.edu [ascend]=ascend.osc.edu [cardinal]=cardinal.osc.edu)

SELF=$(readlink -f "${BASH_SOURCE[0]}")
say() { printf '[ray_slurm %(%H:%M:%S)T] %s\n' -1 "$*"; }
die() { printf '[ray_slurm %(%H:%M:%S)T] error: %s\n' -1 "$*" >&2; exit 2; }
# Credentials in URIs never reach the job output: scheme://user:***@host, scheme://***@host.
redact() { sed -E 's#(://)([^/?#[:space:]:@]*):[^?#[:space:]]*@#\1\2:***@#g; s#(://)[^/?#[:space:]:@]+@#\1***@#g' <<<"$*"; }

# ---------------------------------------------------------------- process helpers (both modes)
# Stop a process group: TERM, poll up to $2 s, KILL.
stop_groups() {  # timeout pgid...
  local timeout=$1 g left
  shift
  for g in "$@"; do [[ -n $g ]] && kill -TERM -- "-$g" 2>/dev/null; done
  for ((i = 0; i < timeout * 5; i++)); do
    left=0
    for g in "$@"; do [[ -n $g ]] && kill -0 -- "-$g" 2>/dev/null && left=1; done
    ((left)) || return 0
    sleep 0.2
  done
  for g in "$@"; do [[ -n $g ]] && kill -KILL -- "-$g" 2>/dev/null; done
  return 0
}

# PIDs on this node whose environment carries RAY_SLURM_TAG=$RAY_SLURM_TAG (one grep over /proc;
# grep itself carries the tag and is gone by the time its PID is checked).
tagged_pids() {
  local f pid
  for f in $(grep -lzxF "RAY_SLURM_TAG=$RAY_SLURM_TAG" /proc/[0-9]*/environ 2>/dev/null); do
    pid=${f#/proc/}
    pid=${pid%/environ}
    [[ $pid == "$$" || $pid == "$BASHPID" ]] && continue
    kill -0 "$pid" 2>/dev/null && echo "$pid"
  done
}

kill_tagged() {  # TERM every tagged process, then KILL what is left after 3 s
  local pids
  pids=$(tagged_pids)
  [[ -z $pids ]] && return 0
  kill -TERM $pids 2>/dev/null
  for _ in $(seq 15); do
    pids=$(tagged_pids)
    [[ -z $pids ]] && return 0
    sleep 0.2
  done
  say "killing leftovers: $(tr '\n' ' ' <<<"$pids")"
  kill -KILL $pids 2>/dev/null
  return 0
}

# Ray's memory resource and object store from the SLURM allocation (Ray would report the host's).
ray_memory_args() {  # cpus
  local mb=${SLURM_MEM_PER_NODE:-}
  [[ -z $mb && -n ${SLURM_MEM_PER_CPU:-} ]] && mb=$((SLURM_MEM_PER_CPU * $1))
  [[ -z $mb ]] && return 0
  local bytes=$((mb * 1024 * 1024))
  local store=$((bytes * 3 / 10))
  ((store < 100 * 1024 * 1024)) && store=$((100 * 1024 * 1024))
  echo "--memory=$((bytes - store)) --object-store-memory=$store"
}

gpus_here() {
  if [[ -n ${SLURM_GPUS_ON_NODE:-} ]]; then echo "$SLURM_GPUS_ON_NODE"
  elif [[ -n ${CUDA_VISIBLE_DEVICES:-} && $CUDA_VISIBLE_DEVICES != NoDevFiles ]]; then
    tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .
  else echo 0; fi
}

worker_port_args() {
  if [[ -n ${RAY_SLURM_WORKER_PORTS:-} ]]; then
    [[ $RAY_SLURM_WORKER_PORTS =~ ^([0-9]+)-([0-9]+)$ ]] || die "RAY_SLURM_WORKER_PORTS='$RAY_SLURM_WORKER_PORTS': expected MIN-MAX, e.g. 30000-30999"
    echo "--min-worker-port=${BASH_REMATCH[1]} --max-worker-port=${BASH_REMATCH[2]}"
  else
    echo "--min-worker-port=0 --max-worker-port=0"
  fi
}

# ---------------------------------------------------------------- node mode (started via srun)
if [[ ${1:-} == --node ]]; then
  : "${RAY_SLURM_HEAD_ADDR:?node mode needs RAY_SLURM_HEAD_ADDR}" "${RAY_SLURM_TAG:?}" "${RAY_SLURM_TMP:?}"
  export RAY_SLURM_TAG="$RAY_SLURM_TAG.node${SLURM_NODEID:-x}"   # this node's processes only
  # The head's choice of temp dir ($TMPDIR/ray_<job> or /tmp/ray_<job>) when its folder exists here too.
  [[ -d $(dirname "$RAY_SLURM_TMP") ]] || export RAY_SLURM_TMP=/tmp/$(basename "$RAY_SLURM_TMP")
  cpus=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-$(nproc)}}
  gpus=$(gpus_here)
  wports=$(worker_port_args) || exit 2
  # shellcheck disable=SC2046
  setsid ray start --address="$RAY_SLURM_HEAD_ADDR" --block --disable-usage-stats \
    --temp-dir="$RAY_SLURM_TMP" --num-cpus="$cpus" --num-gpus="$gpus" $(ray_memory_args "$cpus") \
    --dashboard-agent-listen-port=0 $wports &
  NODE_RAY=$!
  node_stop() {
    trap '' TERM INT
    stop_groups 8 "$NODE_RAY"
    kill_tagged
    echo "[ray_slurm node ${SLURMD_NODENAME:-?}] stopped; no process of this node's Ray is left"
    exit 0
  }
  trap node_stop TERM INT
  echo "[ray_slurm node $(hostname -s)/${SLURMD_NODENAME:-?}] ray start (pid $NODE_RAY): $cpus CPUs, $gpus GPUs, temp dir $RAY_SLURM_TMP"
  wait "$NODE_RAY"
  echo "[ray_slurm node ${SLURMD_NODENAME:-?}] ray start exited ($?)"
  node_stop
fi

# ---------------------------------------------------------------- head mode: checks first
REQUEUE_WANTED=0
trap 'REQUEUE_WANTED=1' USR1   # SIGUSR1 while starting: skip the driver, requeue (handler below)
(($#)) || die "usage: ray_slurm.sh COMMAND [ARGS...] (inside a SLURM job: sbatch or salloc)"
[[ -n ${SLURM_JOB_ID:-} ]] || die "SLURM_JOB_ID is not set: run this inside a SLURM job (sbatch cluster/ray_slurm.sbatch, or salloc)"
JOB=$SLURM_JOB_ID
RESTART=${SLURM_RESTART_COUNT:-0}
export RAY_SLURM_TAG="$JOB.$RESTART.$$"
STATE_ROOT=${RAY_SLURM_STATE_DIR:-${SLURM_SUBMIT_DIR:-$PWD}/.ray_slurm}
STATE=$STATE_ROOT/$JOB
LOGS=$STATE/logs/run$RESTART
# Ray's temp dir (sockets, session logs): node-local. Ray's longest socket path is about TMP + 60
# characters and AF_UNIX allows 107, so TMP may have at most 45.
if [[ -n ${RAY_SLURM_TMP_ROOT:-} ]]; then
  export RAY_SLURM_TMP=$RAY_SLURM_TMP_ROOT/ray_$JOB
  ((${#RAY_SLURM_TMP} <= 45)) || die "Ray temp dir '$RAY_SLURM_TMP' is ${#RAY_SLURM_TMP} characters; keep it under 46 (AF_UNIX socket paths are limited to 107 bytes): set RAY_SLURM_TMP_ROOT to a short node-local folder"
  TMP_WHY="RAY_SLURM_TMP_ROOT"
elif [[ -n ${TMPDIR:-} && -d ${TMPDIR:-} ]] && ((${#TMPDIR} + ${#JOB} + 5 <= 45)); then
  export RAY_SLURM_TMP=${TMPDIR%/}/ray_$JOB
  TMP_WHY="\$TMPDIR: node-local, flushed at the job's end"
else
  export RAY_SLURM_TMP=/tmp/ray_$JOB
  if [[ -n ${TMPDIR:-} ]]; then TMP_WHY="/tmp: \$TMPDIR ('$TMPDIR') is not a folder or too long for Ray's sockets (ROOT/ray_$JOB must fit in 45 characters)"
  else TMP_WHY="/tmp: \$TMPDIR is not set"; fi
fi
say "Ray temp dir: $RAY_SLURM_TMP ($TMP_WHY)"
JOIN_TIMEOUT=${RAY_SLURM_JOIN_TIMEOUT:-300}
DRAIN_S=${RAY_SLURM_DRAIN_S:-60}
MAX_NODE_RESTARTS=${RAY_SLURM_NODE_RESTARTS:-3}
for v in JOIN_TIMEOUT DRAIN_S MAX_NODE_RESTARTS; do [[ ${!v} =~ ^[0-9]+$ ]] || die "$v='${!v}' must be a whole number of seconds"; done
WPORTS=$(worker_port_args) || exit 2
command -v ray >/dev/null || die "'ray' is not on PATH: activate the project's venv in the job script (see cluster/README.md)"
command -v scontrol >/dev/null || die "'scontrol' is not on PATH"
USER=${USER:-$(id -un)}

mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
((${#NODES[@]})) || die "could not expand SLURM_JOB_NODELIST='${SLURM_JOB_NODELIST:-}'"
# CPUs per node, in node order: SLURM_JOB_CPUS_PER_NODE looks like "48(x2),24".
CPUS=()
IFS=',' read -ra _groups <<<"${SLURM_JOB_CPUS_PER_NODE:-}"
for g in "${_groups[@]}"; do
  if [[ $g =~ ^([0-9]+)\(x([0-9]+)\)$ ]]; then
    for ((i = 0; i < BASH_REMATCH[2]; i++)); do CPUS+=("${BASH_REMATCH[1]}"); done
  elif [[ $g =~ ^[0-9]+$ ]]; then CPUS+=("$g"); fi
done
HEAD_NODE=${NODES[0]}
HEAD_CPUS=${SLURM_CPUS_ON_NODE:-${CPUS[0]:-$(nproc)}}
HEAD_IP=${RAY_SLURM_HEAD_IP:-$(hostname -I 2>/dev/null | awk '{print $1}')}
[[ -n $HEAD_IP ]] || HEAD_IP=$(hostname --ip-address | awk '{print $1}')

# Head ports: GCS, dashboard, Ray client, MLflow UI. Derived from the job id; moved up by 100
# while one of them is taken on this node.
if [[ -n ${RAY_SLURM_PORT_BASE:-} ]]; then
  [[ $RAY_SLURM_PORT_BASE =~ ^[0-9]+$ ]] && ((RAY_SLURM_PORT_BASE >= 1024 && RAY_SLURM_PORT_BASE <= 65500)) ||
    die "RAY_SLURM_PORT_BASE='$RAY_SLURM_PORT_BASE' must be a port number in 1024..65500"
  BASE=$RAY_SLURM_PORT_BASE
else
  BASE=$(python - "$JOB" <<'PY'
import socket, sys
job = int(sys.argv[1])
def free(port):
    with socket.socket() as s:
        try:
            s.bind(("", port))
            return True
        except OSError:
            return False
for k in range(100):
    base = 20000 + 100 * ((job + k) % 100)
    if all(free(base + i) for i in range(4)):
        print(base)
        break
PY
)
  [[ -n $BASE ]] || die "no free block of 4 ports found in 20000..29999 on $(hostname -s)"
fi
GCS_PORT=$BASE DASH_PORT=$((BASE + 1)) CLIENT_PORT=$((BASE + 2)) MLFLOW_PORT=$((BASE + 3))

# ---------------------------------------------------------------- cleanup (EXIT, TERM, INT)
HEAD_PID="" DRIVER_PID="" MLFLOW_PID="" WATCHDOG_PID="" WORKER_PIDS=() CLEANED=""
cleanup() {
  [[ -n $CLEANED ]] && return
  CLEANED=1
  trap '' TERM INT USR1
  say "stopping: driver ${DRIVER_PID:--}, mlflow ${MLFLOW_PID:--}, workers ${WORKER_PIDS[*]:--}, head ${HEAD_PID:--}"
  [[ -n $WATCHDOG_PID ]] && kill -KILL -- "-$WATCHDOG_PID" 2>/dev/null
  # SIGTERM to the worker steps (not to srun: srun turns it into SIGKILL): node mode stops its
  # node's Ray and leftovers. `scancel --signal` reaches job steps only, never this batch shell.
  ((${#WORKER_PIDS[@]})) && { scancel --signal=TERM "$JOB" 2>/dev/null || kill -TERM "${WORKER_PIDS[@]}" 2>/dev/null; }
  stop_groups 8 "$DRIVER_PID" "$MLFLOW_PID" "$HEAD_PID"
  local p
  for p in "${WORKER_PIDS[@]}"; do
    for _ in $(seq 40); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$p" 2>/dev/null
  done
  kill_tagged
  rm -rf "$RAY_SLURM_TMP"
  say "stopped; no process of this run is left on $(hostname -s)"
}
trap cleanup EXIT
trap 'say "SIGTERM: job cancelled or out of time"; exit 143' TERM
trap 'exit 130' INT
on_usr1() {
  REQUEUE_WANTED=1
  say "SIGUSR1: time limit near; asking the driver to save and stop (SIGINT; up to ${DRAIN_S} s)"
  if [[ -n $DRIVER_PID ]] && kill -0 "$DRIVER_PID" 2>/dev/null; then
    kill -INT -- "-$DRIVER_PID" 2>/dev/null
    setsid bash -c "sleep $DRAIN_S; kill -TERM -- -$DRIVER_PID; sleep 10; kill -KILL -- -$DRIVER_PID" </dev/null >/dev/null 2>&1 &
    WATCHDOG_PID=$!
    disown "$WATCHDOG_PID"
  fi
}
trap on_usr1 USR1

# ---------------------------------------------------------------- state, token, environment
umask 077
mkdir -p "$LOGS" || die "cannot create the job's state folder '$STATE' (RAY_SLURM_STATE_DIR must be writable and visible from every node)"
chmod 700 "$STATE_ROOT" "$STATE"
rm -rf "$RAY_SLURM_TMP"
TOKEN_FILE=$STATE/ray_token
od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$TOKEN_FILE"
chmod 600 "$TOKEN_FILE"
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$TOKEN_FILE
unset RAY_AUTH_TOKEN
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 RAY_USAGE_STATS_ENABLED=0
# Ray gives its dashboard 60 s to start and then fails the whole head; on a busy node (seen on the
# 2-core test machine under load) that is too short.
export RAY_DASHBOARD_STARTUP_TIMEOUT_S=${RAY_DASHBOARD_STARTUP_TIMEOUT_S:-180}
export RAY_SLURM_HEAD_ADDR=$HEAD_IP:$GCS_PORT
unset RAY_ADDRESS   # `ray start --head` must not try to join another cluster

say "job $JOB (run $RESTART) on ${#NODES[@]} node(s): ${NODES[*]}; head $HEAD_NODE ($HEAD_IP)"
say "state: $STATE (token: $TOKEN_FILE); logs: $LOGS"
say "ports: GCS $GCS_PORT, dashboard $DASH_PORT (127.0.0.1), client $CLIENT_PORT, MLflow UI $MLFLOW_PORT"

# ---------------------------------------------------------------- head
HEAD_GPUS=$(gpus_here)
# shellcheck disable=SC2046
RAY_API_SERVER_ADDRESS=http://127.0.0.1:$DASH_PORT setsid ray start --head --block --disable-usage-stats \
  --node-ip-address="$HEAD_IP" --port="$GCS_PORT" --ray-client-server-port="$CLIENT_PORT" \
  --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$DASH_PORT" \
  --dashboard-agent-listen-port=0 $WPORTS \
  --temp-dir="$RAY_SLURM_TMP" --num-cpus="$HEAD_CPUS" --num-gpus="$HEAD_GPUS" $(ray_memory_args "$HEAD_CPUS") \
  >"$LOGS/head.log" 2>&1 </dev/null &
HEAD_PID=$!
say "head: ray start (pid $HEAD_PID): $HEAD_CPUS CPUs, $HEAD_GPUS GPUs"

# ---------------------------------------------------------------- MLflow UI (optional)
if [[ ${RAY_SLURM_MLFLOW_UI:-0} == 1 ]]; then
  case ${MLFLOW_TRACKING_URI:-} in
    "" | http://* | https://*)
      say "MLflow UI: not started (MLFLOW_TRACKING_URI='$(redact "${MLFLOW_TRACKING_URI:-}")' is not a local store)" ;;
    *)
      command -v mlflow >/dev/null || die "RAY_SLURM_MLFLOW_UI=1 but 'mlflow' is not on PATH"
      # The store by environment (MLFLOW_BACKEND_STORE_URI), not on the command line `ps` shows.
      MLFLOW_BACKEND_STORE_URI=$MLFLOW_TRACKING_URI MLFLOW_DISABLE_TELEMETRY=true setsid mlflow server \
        --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 >"$LOGS/mlflow.log" 2>&1 </dev/null &
      MLFLOW_PID=$!
      say "MLflow UI: mlflow server (pid $MLFLOW_PID) on 127.0.0.1:$MLFLOW_PORT for $(redact "$MLFLOW_TRACKING_URI")" ;;
  esac
fi

# ---------------------------------------------------------------- workers
start_worker() {  # node index (1..): one srun step running this script in node mode
  local n=$1 node=${NODES[$1]} c=${CPUS[$1]:-$HEAD_CPUS} gres=()
  ((HEAD_GPUS > 0)) && gres=(--gres="gpu:$HEAD_GPUS")
  srun --overlap --nodes=1 --ntasks=1 -w "$node" --cpus-per-task="$c" "${gres[@]}" --kill-on-bad-exit=0 \
    --open-mode=append --output="$LOGS/worker-$node.log" bash "$SELF" --node </dev/null &
  WORKER_PIDS[n - 1]=$!
  say "worker on $node: srun (pid $!), $c CPUs"
}
# ---------------------------------------------------------------- wait until the nodes joined
# wait_for_nodes LABEL WANT PID...: polls ray.nodes() until WANT nodes are alive (RAY_SLURM_JOIN_TIMEOUT);
# fails at once when one of the PIDs exits. Exit 3: the head phase timed out (the cluster phase decides).
wait_for_nodes() {
  RAY_ADDRESS=$RAY_SLURM_HEAD_ADDR python - "$@" "$JOIN_TIMEOUT" <<'PY' &
import os, sys, time
label, want, pids, timeout = sys.argv[1], int(sys.argv[2]), [int(p) for p in sys.argv[3:-1]], float(sys.argv[-1])
start = time.time()
def dead():
    out = []
    for p in pids:
        try:
            os.kill(p, 0)
        except ProcessLookupError:
            out.append(p)
    return out
import ray
connected, alive, err = False, [], ""
while time.time() - start < timeout:
    if dead():
        sys.exit(f"Ray process(es) {dead()} exited before the cluster was up (see the logs folder)")
    try:
        if not connected:
            ray.init(address=os.environ["RAY_ADDRESS"], logging_level="ERROR", log_to_driver=False)
            connected = True
        alive = [n for n in ray.nodes() if n["Alive"]]
        if len(alive) >= want:
            cpus = sum(n["Resources"].get("CPU", 0) for n in alive)
            gpus = sum(n["Resources"].get("GPU", 0) for n in alive)
            print(f"[ray_slurm] {label} up: {len(alive)}/{want} nodes, {cpus:g} CPUs, {gpus:g} GPUs "
                  f"after {time.time() - start:.1f} s", flush=True)
            sys.exit(0)
    except Exception as e:  # head not up yet
        err = f"{type(e).__name__}: {e}"
    time.sleep(1)
if label == "head":
    sys.exit(3)
sys.exit(f"only {len(alive)} of {want} nodes joined the Ray cluster within {timeout:g} s "
         f"(RAY_SLURM_JOIN_TIMEOUT); last error: {err or '-'}; see the logs folder")
PY
  WAITER=$!
  while kill -0 "$WAITER" 2>/dev/null; do wait "$WAITER"; done
  wait "$WAITER"
}
# The head first: a worker that starts before the head is registered in GCS gives up ("No node info
# found for head node") on a busy node.
say "waiting for the head, then for ${#NODES[@]} node(s) to join (timeout ${JOIN_TIMEOUT} s each)"
wait_for_nodes head 1 "$HEAD_PID"
rc=$?
((rc == 0 || rc == 3)) || die "Ray head did not come up (logs: $LOGS)"
for ((n = 1; n < ${#NODES[@]}; n++)); do start_worker "$n"; done
wait_for_nodes cluster "${#NODES[@]}" "$HEAD_PID" "${WORKER_PIDS[@]}" || die "Ray cluster did not come up (logs: $LOGS)"

# ---------------------------------------------------------------- how to watch it
default_login=${OSC_LOGIN_HOSTS[${SLURM_CLUSTER_NAME:-none}]:-${SLURM_SUBMIT_HOST:-$(hostname -f)}}
LOGIN=${RAY_SLURM_LOGIN_HOST:-$default_login}
tunnel="ssh -N -L $DASH_PORT:127.0.0.1:$DASH_PORT"
[[ -n $MLFLOW_PID ]] && tunnel+=" -L $MLFLOW_PORT:127.0.0.1:$MLFLOW_PORT"
tunnel+=" -J $USER@$LOGIN $USER@$HEAD_NODE"
say "watch from your laptop: $tunnel"
say "  Ray dashboard: http://localhost:$DASH_PORT (token: ssh $USER@$LOGIN cat $TOKEN_FILE)"
[[ -n $MLFLOW_PID ]] && say "  MLflow UI:     http://localhost:$MLFLOW_PORT"

# ---------------------------------------------------------------- the driver
cmd=("$@")
if ((RESTART > 0)); then
  read -ra resume <<<"${RAY_SLURM_RESUME_ARGS---resume}"
  cmd+=("${resume[@]}")
fi
if ((REQUEUE_WANTED)); then
  say "time limit reached while starting; not starting the driver"
  DRIVER_RC=0
else
  say "driver: $(redact "${cmd[*]}")"
  RAY_ADDRESS=$RAY_SLURM_HEAD_ADDR RAY_API_SERVER_ADDRESS=http://127.0.0.1:$DASH_PORT \
    RAY_SLURM_DASHBOARD_PORT=$DASH_PORT RAY_SLURM_NUM_NODES=${#NODES[@]} \
    setsid "${cmd[@]}" </dev/null &
  DRIVER_PID=$!
  # While the driver runs: a worker node whose Ray stopped (its processes killed, the raylet crashed)
  # gets a fresh `ray start` on the same node, up to RAY_SLURM_NODE_RESTARTS times in all; Ray Train
  # then restarts the interrupted trial from its last checkpoint (train.max_failures), or Tune records
  # it failed and goes on.
  NODE_RESTARTS=0
  while kill -0 "$DRIVER_PID" 2>/dev/null; do
    for ((n = 1; n < ${#NODES[@]}; n++)); do
      p=${WORKER_PIDS[n - 1]}
      [[ -z $p ]] || kill -0 "$p" 2>/dev/null || ((REQUEUE_WANTED)) || {
        wait "$p" 2>/dev/null
        if ((NODE_RESTARTS < MAX_NODE_RESTARTS)); then
          NODE_RESTARTS=$((NODE_RESTARTS + 1))
          say "worker on ${NODES[n]}: its Ray stopped (srun pid $p ended); restarting it ($NODE_RESTARTS of $MAX_NODE_RESTARTS, RAY_SLURM_NODE_RESTARTS)"
          start_worker "$n"
        else
          say "worker on ${NODES[n]}: its Ray stopped (srun pid $p ended); not restarting it ($MAX_NODE_RESTARTS restarts already, RAY_SLURM_NODE_RESTARTS)"
          WORKER_PIDS[n - 1]=""
        fi
      }
    done
    sleep 2 &
    wait $! 2>/dev/null
  done
  wait "$DRIVER_PID"
  DRIVER_RC=$?
  say "driver exited with $DRIVER_RC"
fi

if ((REQUEUE_WANTED)) && ((DRIVER_RC == 0)) && [[ -n $DRIVER_PID ]]; then
  say "the driver finished (exit 0) before the time limit; not requeueing"
elif ((REQUEUE_WANTED)) && [[ ${RAY_SLURM_REQUEUE:-1} == 1 ]]; then
  if ((RESTART >= ${RAY_SLURM_MAX_RESTARTS:-20})); then
    say "not requeueing: $RESTART restarts already (RAY_SLURM_MAX_RESTARTS)"
    exit "$DRIVER_RC"
  fi
  cleanup
  say "requeueing job $JOB; the next run resumes with: ${RAY_SLURM_RESUME_ARGS---resume}"
  scontrol requeue "$JOB" || die "scontrol requeue $JOB failed (submit with --requeue, or chain: sbatch --dependency=afterany:$JOB ...)"
  exit 0
fi
exit "$DRIVER_RC"
