#!/usr/bin/env bash
# A real single-machine SLURM for the cluster tests: Debian's slurmctld + two slurmd daemons
# simulating nodes n1 and n2 on this host, munge for authentication, no systemd.
#
#   sudo bash cluster/local/slurm_up.sh     # install when missing, configure, start, wait until idle
#   sudo bash cluster/local/slurm_down.sh   # stop what slurm_up.sh started (by PID)
#
# Idempotent: a second call with everything up returns at once and prints "already up".
# Prints "started" when it started daemons (the caller then owns them and calls slurm_down.sh).
# Knobs (env): LOCAL_SLURM_CPUS (CPUs per simulated node; default: this machine's core count),
# LOCAL_SLURM_MEM_MB (RealMemory per node; default: half of this machine's memory).
# It writes /etc/slurm/slurm.conf and /etc/slurm/epilog.sh, and refuses to overwrite a
# slurm.conf it did not write: it is for test machines, never for a real cluster.
set -euo pipefail

MARK="# lora-diffusion local SLURM (written by cluster/local/slurm_up.sh)"
CONF=/etc/slurm/slurm.conf
EPILOG=/etc/slurm/epilog.sh
STATE=/run/lora-diffusion-slurm
LOG=/var/log/slurm
NODES=(n1 n2)

log() { echo "[slurm_up] $*" >&2; }
die() { echo "[slurm_up] error: $*" >&2; exit 1; }

[[ $(id -u) == 0 ]] || die "must run as root (it installs packages and starts slurmctld/slurmd/munged)"

# 1. Packages (apt-get update first: a fresh machine has no package lists).
missing=()
for cmd_pkg in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge; do
  command -v "${cmd_pkg%%:*}" >/dev/null 2>&1 || [[ -x /usr/sbin/${cmd_pkg%%:*} ]] || missing+=("${cmd_pkg#*:}")
done
if ((${#missing[@]})); then
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi

alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# 2. Already up? (munged, slurmctld and both slurmd alive and the nodes answer)
all_up=1
alive /run/munge/munged.pid || all_up=0
alive /run/slurmctld.pid || all_up=0
for n in "${NODES[@]}"; do alive "/run/slurmd-$n.pid" || all_up=0; done
if ((all_up)) && sinfo -h >/dev/null 2>&1; then
  echo "already up"
  exit 0
fi

# 3. Configuration.
if [[ -f $CONF ]] && ! grep -qxF "$MARK" "$CONF"; then
  die "$CONF exists and was not written by this script; refusing to overwrite a real SLURM configuration"
fi
host=$(hostname -s)
cpus=${LOCAL_SLURM_CPUS:-$(nproc)}
mem_mb=${LOCAL_SLURM_MEM_MB:-$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))}
mkdir -p /etc/slurm "$LOG" /var/spool/slurmctld "$STATE"
for n in "${NODES[@]}"; do mkdir -p "/var/spool/slurmd/$n"; done
chown slurm: /var/spool/slurmctld "$LOG"
cat >"$CONF" <<CONF
$MARK
# Two simulated nodes on host $host ($cpus CPUs, ${mem_mb} MB each; the nodes share the machine).
ClusterName=localcluster
SlurmctldHost=$host(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without a default, one job takes a node's whole memory and blocks the next.
DefMemPerCPU=1000
SchedulerType=sched/backfill
ReturnToService=2
SlurmdParameters=config_overrides
MailProg=/bin/true
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG/jobcomp.log
# Safety net: kills what a job left behind (processes carrying its SLURM_JOB_ID) and logs it.
Epilog=$EPILOG
InactiveLimit=0
KillWait=10
MinJobAge=600
Waittime=0
NodeName=n[1-2] NodeHostname=$host NodeAddr=127.0.0.1 Port=[17001-17002] CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF

cat >"$EPILOG" <<'EPI'
#!/bin/bash
# Runs as root on each (simulated) node when a job ends: kill every process whose environment
# carries this job's SLURM_JOB_ID, and log each kill to /var/log/slurm/epilog.log.
# Skips prolog/epilog scripts themselves (both simulated nodes run theirs at once on this host)
# and processes of the job's other (simulated) node.
[ -n "$SLURM_JOB_ID" ] || exit 0
for f in $(grep -lzxF "SLURM_JOB_ID=$SLURM_JOB_ID" /proc/[0-9]*/environ 2>/dev/null); do
  d=${f%/environ}
  pid=${d#/proc/}
  [ "$pid" = "$$" ] && continue
  env=$(tr '\0' '\n' 2>/dev/null <"$f") || continue
  grep -q '^SLURM_SCRIPT_CONTEXT=' <<<"$env" && continue
  # This node's processes only (the simulated nodes share one host, a real node sees only its own).
  grep -qxF "SLURMD_NODENAME=$SLURMD_NODENAME" <<<"$env" || continue
  cmd=$(tr '\0' ' ' 2>/dev/null <"$d/cmdline" | cut -c1-160)
  kill -9 "$pid" 2>/dev/null && echo "$(date +%FT%T) job=$SLURM_JOB_ID node=$SLURMD_NODENAME killed pid=$pid $cmd" >>/var/log/slurm/epilog.log
done
exit 0
EPI
chmod 755 "$EPILOG"
touch "$STATE/started"

# 4. munge (the package makes the key; make one when missing).
if ! alive /run/munge/munged.pid; then
  [[ -f /etc/munge/munge.key ]] || { mungekey --create >/dev/null 2>&1 || /usr/sbin/mungekey -c; chown munge: /etc/munge/munge.key; }
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge: /run/munge /var/log/munge /var/lib/munge
  runuser -u munge -- /usr/sbin/munged
  echo munged >>"$STATE/started"
fi

# 5. slurmctld (-c: start from a clean state; this cluster holds nothing worth keeping) and slurmd.
if ! alive /run/slurmctld.pid; then
  /usr/sbin/slurmctld -c
  echo slurmctld >>"$STATE/started"
fi
for n in "${NODES[@]}"; do
  if ! alive "/run/slurmd-$n.pid"; then
    /usr/sbin/slurmd -N "$n"
    echo "slurmd-$n" >>"$STATE/started"
  fi
done

# 6. Wait until both nodes are idle (poll; resume nodes left down by an earlier run).
deadline=$((SECONDS + 90))
while :; do
  states=$(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u || true)
  if [[ $(grep -c ' idle$' <<<"$states") -ge ${#NODES[@]} ]]; then break; fi
  if grep -qE ' (down|drain|drng)' <<<"$states"; then
    scontrol update nodename=n[1-2] state=resume >/dev/null 2>&1 || true
  fi
  ((SECONDS < deadline)) || die "nodes not idle after 90 s: $(tr '\n' ';' <<<"$states") (see $LOG/slurmctld.log, $LOG/slurmd-n1.log)"
  sleep 1
done
echo "started"
