#!/usr/bin/env bash
# Stop the local SLURM that cluster/local/slurm_up.sh started: cancel this cluster's jobs, then stop
# the daemons it started, by the PIDs in their pid files (TERM, then KILL after 15 s).
set -uo pipefail
STATE=/run/lora-diffusion-slurm
[[ -f $STATE/started ]] || { echo "[slurm_down] nothing started by slurm_up.sh"; exit 0; }
grep -qx slurmctld "$STATE/started" && {
  # Jobs on this private test cluster only; wait (bounded) until they are gone.
  scancel --full --quiet --state=RUNNING,PENDING 2>/dev/null || scancel --quiet --user="$(id -un)" 2>/dev/null || true
  for _ in $(seq 30); do [[ -z $(squeue -h 2>/dev/null) ]] && break; sleep 1; done
}
stop_pidfile() {  # pid file, expected program name (guards against a reused PID)
  local f=$1 prog=$2 pid
  [[ -f $f ]] || return 0
  pid=$(cat "$f")
  [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$prog" ]] || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.5; done
  kill -KILL "$pid" 2>/dev/null || true
}
tac "$STATE/started" | while read -r d; do
  case $d in
    slurmd-*) stop_pidfile "/run/$d.pid" slurmd ;;
    slurmctld) stop_pidfile /run/slurmctld.pid slurmctld ;;
    munged) stop_pidfile /run/munge/munged.pid munged ;;
  esac
done
rm -f "$STATE/started"
echo "[slurm_down] stopped"
