#!/bin/bash
# bash tests/slurm_cluster/start.sh        (as root; packages from .ci/install_slurm.sh)
#
# Brings up a real SLURM 22.05 "cluster" on this one machine, for the tests marked `slurm`:
# munged, MariaDB + slurmdbd (accounting: submitit polls `sacct`, and without it a cancelled job is
# never seen as finished), slurmctld, and one slurmd per fake node n1..nN on loopback (Debian's slurmd
# is built with MULTIPLE_SLURMD, so `slurmd -N n2` is a second node on the same host).
#
# Idempotent: daemons that are already up are kept; a changed slurm.conf restarts the SLURM daemons.
# Everything (configs, munge key and socket, MariaDB datadir, spool, logs, pidfiles) lives under
# $UNIMRG_SLURM_DIR. The one thing touched outside it is a tagged line in /etc/hosts (shared by all
# clusters on this host, removed when the last one stops), because node names must resolve: jobs compute
# MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1). Several clusters may run at
# once (the test fixture starts one per pytest session): give each its own directory, port block
# (UNIMRG_SLURM_PORT) and first job id (UNIMRG_SLURM_FIRST_JOB_ID).
# Clients need SLURM_CONF=$UNIMRG_SLURM_DIR/etc/slurm.conf (printed at the end; /etc/slurm is untouched).
#
# Environment (all optional):
#   UNIMRG_SLURM_DIR        state directory                    [/tmp/unimrg-slurm]
#   UNIMRG_SLURM_NODES      number of nodes                    [2]
#   UNIMRG_SLURM_NODE_CPUS  CPUs advertised per node           [2]
#   UNIMRG_SLURM_NODE_MEM   MiB advertised per node            [8000]
#   UNIMRG_SLURM_FAKE_GPUS  fake "gpu" GRES per node (char devices cloned from /dev/null), so that
#                           `--gpus-per-node` headers are accepted and CUDA_VISIBLE_DEVICES is set [2]
#   UNIMRG_SLURM_PORT       base port: slurmctld=P, slurmdbd=P+2, MariaDB=P+3, slurmd=P+10.. [16817]
#   UNIMRG_SLURM_FIRST_JOB_ID  first job id of a fresh cluster; jobs take MASTER_PORT=10000+id%50000,
#                           so concurrent clusters need disjoint id ranges [1]
# Facts behind the settings: /work/shared/notes/slurm-local.md (verified there on Debian 12).
set -euo pipefail

P=${UNIMRG_SLURM_DIR:-/tmp/unimrg-slurm}
NODES=${UNIMRG_SLURM_NODES:-2}
NODE_CPUS=${UNIMRG_SLURM_NODE_CPUS:-2}
NODE_MEM=${UNIMRG_SLURM_NODE_MEM:-8000}
FAKE_GPUS=${UNIMRG_SLURM_FAKE_GPUS:-2}
PORT=${UNIMRG_SLURM_PORT:-16817}
FIRST_JOB_ID=${UNIMRG_SLURM_FIRST_JOB_ID:-1}
for v in NODES NODE_CPUS NODE_MEM FAKE_GPUS PORT FIRST_JOB_ID; do
  [[ "${!v}" =~ ^[0-9]+$ ]] || { echo "[slurm_cluster] ERROR: UNIMRG_SLURM_$v=${!v}: expected a number" >&2; exit 1; }
done
CTLD_PORT=$PORT DBD_PORT=$((PORT + 2)) DB_PORT=$((PORT + 3)) SLURMD_PORT0=$((PORT + 10))
export SLURM_CONF=$P/etc/slurm.conf
MUNGE_SOCKET=$P/munge/munge.socket
T0=$(date +%s%N)

log() { local ms=$(( ($(date +%s%N) - T0) / 1000000 )); printf '[slurm_cluster %3d.%01ds] %s\n' $((ms / 1000)) $((ms % 1000 / 100)) "$*"; }
die() { echo "[slurm_cluster] ERROR: $*" >&2; exit 1; }
# alive PIDFILE NAME: the pidfile names a running process whose command line contains NAME
# (a stale pidfile from an earlier boot may name an unrelated process).
alive() { [ -s "$1" ] && grep -qs "$2" "/proc/$(cat "$1")/cmdline"; }
# wait_for TRIES CMD...: retry CMD every 0.2 s; on the last try let its error through
wait_for() { local n=$1; shift; for _ in $(seq "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done; "$@"; }
tail_log() { echo "---- $1" >&2; tail -n 20 "$1" >&2 2>/dev/null || true; }
stop_pid() {  # stop_pid PIDFILE NAME — by pid, never by process name
  alive "$1" "$2" || { rm -f "$1"; return 0; }
  local pid; pid=$(cat "$1"); kill "$pid"
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && kill -9 "$pid"; rm -f "$1"
}

[ "$(id -u)" = 0 ] || die "must run as root (it starts munged/mariadbd as their own users and edits /etc/hosts)"
for b in munged slurmctld slurmd slurmdbd mariadbd mariadb-install-db sbatch sacctmgr; do
  command -v "$b" >/dev/null || die "'$b' not found: install the packages with: sudo .ci/install_slurm.sh"
done
mkdir -p "$P"/{etc,run,log,spool/ctld,munge}
for i in $(seq 1 "$NODES"); do mkdir -p "$P/spool/n$i"; done
NODELIST="n[1-$NODES]"; [ "$NODES" = 1 ] && NODELIST=n1

# ---------- 1. node names resolve to loopback ----------
# All clusters on this host name their nodes n1..nN, resolved by shared lines tagged "# unimrg-slurm".
# Lines are only appended (a single append never shows readers a half-written /etc/hosts, unlike a
# rewrite, which would make a concurrent cluster's jobs fail to resolve their nodes); each cluster
# registers in $HOSTS_USERS and stop.sh removes the lines when the last one stops. A host-wide lock
# serialises the edits.
HOSTS_TAG="# unimrg-slurm" HOSTS_USERS=/tmp/unimrg-slurm-hosts.users HOSTS_LOCK=/tmp/unimrg-slurm-hosts.lock
(
  flock -w 60 9 || die "timed out waiting for $HOSTS_LOCK"
  mkdir -p "$HOSTS_USERS"; echo "$P" > "$HOSTS_USERS/$(printf %s "$P" | md5sum | cut -c1-16)"
  have=" $({ grep -E " $HOSTS_TAG\$" /etc/hosts || true; } | sed "s/$HOSTS_TAG\$//" | tr -s ' \t' ' ' | tr '\n' ' ') "
  need=""; for i in $(seq 1 "$NODES"); do [[ "$have" == *" n$i "* ]] || need="$need n$i"; done
  if [ -n "$need" ]; then
    [ -z "$(tail -c1 /etc/hosts)" ] || echo >> /etc/hosts   # the file may lack its last newline
    echo "127.0.0.1$need $HOSTS_TAG" >> /etc/hosts
  fi
) 9>"$HOSTS_LOCK"

# ---------- 2. slurm.conf (+ gres.conf, slurmdbd.conf) ----------
GRES_TYPES="" NODE_GRES=""
if [ "$FAKE_GPUS" -gt 0 ]; then
  GRES_TYPES="GresTypes=gpu" NODE_GRES="Gres=gpu:$FAKE_GPUS"
  # slurmd drops GPUs without File= and rejects regular files: use char devices (same as /dev/null)
  mkdir -p "$P/fakegpu"
  for g in $(seq 0 $((FAKE_GPUS - 1))); do
    [ -c "$P/fakegpu/nvidia$g" ] || { rm -f "$P/fakegpu/nvidia$g"; mknod -m 666 "$P/fakegpu/nvidia$g" c 1 3; }
  done
  echo "AutoDetect=off
NodeName=$NODELIST Name=gpu File=$P/fakegpu/nvidia[0-$((FAKE_GPUS - 1))]" > "$P/etc/gres.conf"
else
  rm -f "$P/etc/gres.conf"
fi
cat > "$P/etc/slurm.conf.new" <<EOF
# Generated by tests/slurm_cluster/start.sh — a single-host test cluster; do not edit by hand.
ClusterName=unimrg
# concurrent clusters on one host: disjoint job ids, hence disjoint MASTER_PORTs (launch/slurm.py)
FirstJobId=$FIRST_JOB_ID
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# private munged; a requeued job may only restart cred_expire+1 s after it stopped (default 120)
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=5
MpiDefault=none
# no cgroups in containers / CI: track processes by parent pid, bind nothing
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# without it a job without --mem takes a node's whole memory and jobs cannot share a node
DefMemPerCPU=500
# the advertised CPUs/memory win over what this host has (else a small CI runner drains the nodes)
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
# schedule every 2 s (default 60) so that tests do not wait for the scheduler
SchedulerParameters=sched_interval=2,bf_interval=2
ReturnToService=2
MailProg=/bin/true
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
# for slurmdbd connections the munge socket comes from here, not from AuthInfo
AccountingStoragePass=$MUNGE_SOCKET
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
StateSaveLocation=$P/spool/ctld
SlurmdSpoolDir=$P/spool/%n
SlurmctldPidFile=$P/run/slurmctld.pid
SlurmdPidFile=$P/run/slurmd-%n.pid
SlurmctldLogFile=$P/log/slurmctld.log
SlurmdLogFile=$P/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# finished jobs stay visible to scontrol/squeue for 5 min (tests read their exit codes)
MinJobAge=300
KillWait=5
$GRES_TYPES
NodeName=$NODELIST NodeHostname=localhost NodeAddr=127.0.0.1 Port=[$SLURMD_PORT0-$((SLURMD_PORT0 + NODES - 1))] CPUs=$NODE_CPUS RealMemory=$NODE_MEM $NODE_GRES State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
CONF_CHANGED=0
if ! cmp -s "$P/etc/slurm.conf.new" "$P/etc/slurm.conf"; then
  mv "$P/etc/slurm.conf.new" "$P/etc/slurm.conf"; CONF_CHANGED=1
else
  rm "$P/etc/slurm.conf.new"
fi
# a state dir brought up again on another port block: the running daemons listen on the old ports
if [ -s "$P/run/port" ] && [ "$(cat "$P/run/port")" != "$PORT" ]; then
  for f in "$P"/run/slurmd-*.pid; do [ -e "$f" ] && stop_pid "$f" slurmd; done
  stop_pid "$P/run/slurmctld.pid" slurmctld; stop_pid "$P/run/slurmdbd.pid" slurmdbd
  stop_pid "$P/mysqlrun/mysqld.pid" mariadbd
fi
echo "$PORT" > "$P/run/port"
# slurmdbd reads slurmdbd.conf from the directory of $SLURM_CONF
cat > "$P/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$P/log/slurmdbd.log
PidFile=$P/run/slurmdbd.pid
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=unimrg
StorageLoc=slurm_acct_db
EOF
chmod 600 "$P/etc/slurmdbd.conf"   # slurmdbd refuses a world-readable config (it holds a password)

# ---------- 3. munged: private key and socket ----------
chown munge:munge "$P/munge"; chmod 755 "$P/munge"   # clients (root) reach the socket inside it
if [ ! -s "$P/munge/munge.key" ]; then
  mungekey --create --keyfile="$P/munge/munge.key"
  chown munge:munge "$P/munge/munge.key"; chmod 400 "$P/munge/munge.key"
fi
if ! alive "$P/run/munged.pid" munged; then
  touch "$P/run/munged.pid" "$P/log/munged.log"
  chown munge:munge "$P/run/munged.pid" "$P/log/munged.log"
  su -s /bin/sh munge -c "munged --force --key-file=$P/munge/munge.key --socket=$MUNGE_SOCKET \
    --pid-file=$P/run/munged.pid --log-file=$P/log/munged.log --seed-file=$P/munge/munged.seed" \
    || { tail_log "$P/log/munged.log"; die "munged did not start"; }
fi
wait_for 50 sh -c "munge -S $MUNGE_SOCKET -n | unmunge -S $MUNGE_SOCKET" || die "munge round trip failed"
log "munged up"

# ---------- 4. MariaDB (private datadir, 127.0.0.1:$DB_PORT) + slurmdbd ----------
DB=$P/mysql; DBRUN=$P/mysqlrun
mkdir -p "$DB" "$DBRUN"; chown mysql:mysql "$DB" "$DBRUN"
install_db() {
  # --no-defaults: ignore /etc/mysql/*.cnf, so a system MariaDB (if any) is neither used nor disturbed
  mariadb-install-db --no-defaults --user=mysql --datadir="$DB" --auth-root-authentication-method=socket \
    --skip-test-db > "$P/log/mariadb-install.log" 2>&1 && return 0
  # its log ends in a page of generic advice: show the server's own error lines
  grep -iE '\[error\]|error:|failed' "$P/log/mariadb-install.log" | head -n 15 >&2
  return 1
}
if [ ! -d "$DB/mysql" ]; then
  # once seen failing (1 in ~20) while three other test clusters started: one retry on a clean datadir
  install_db || { log "mariadb-install-db failed; retrying once"; find "$DB" -mindepth 1 -delete; install_db; } \
    || die "mariadb-install-db failed (log: $P/log/mariadb-install.log)"
fi
if ! alive "$DBRUN/mysqld.pid" mariadbd; then
  setsid mariadbd --no-defaults --user=mysql --datadir="$DB" --socket="$DBRUN/mysqld.sock" \
    --pid-file="$DBRUN/mysqld.pid" --bind-address=127.0.0.1 --port="$DB_PORT" --skip-name-resolve \
    --log-error="$P/log/mariadb.err" --innodb-buffer-pool-size=32M --performance-schema=OFF \
    </dev/null >/dev/null 2>&1 &
fi
wait_for 200 mariadb --no-defaults -S "$DBRUN/mysqld.sock" -e 'select 1' || { tail_log "$P/log/mariadb.err"; die "MariaDB did not start"; }
mariadb --no-defaults -S "$DBRUN/mysqld.sock" -e "
  create database if not exists slurm_acct_db;
  create user if not exists 'slurm'@'127.0.0.1' identified by 'unimrg';
  grant all on slurm_acct_db.* to 'slurm'@'127.0.0.1';"
log "MariaDB up"
if ! alive "$P/run/slurmdbd.pid" slurmdbd; then
  slurmdbd || { tail_log "$P/log/slurmdbd.log"; die "slurmdbd did not start"; }
fi
wait_for 50 timeout 5 sacctmgr -n show cluster || { tail_log "$P/log/slurmdbd.log"; die "slurmdbd does not answer"; }
# 22.05's slurmctld does not register its cluster itself; without it accounting silently drops jobs
sacctmgr -n -P show cluster format=cluster | grep -qx unimrg || sacctmgr -i add cluster unimrg >/dev/null
log "slurmdbd up"

# ---------- 5. slurmctld + one slurmd per node ----------
if [ "$CONF_CHANGED" = 1 ]; then   # node/partition changes need a restart, not `scontrol reconfigure`
  for f in "$P"/run/slurmd-*.pid; do [ -e "$f" ] && stop_pid "$f" slurmd; done
  stop_pid "$P/run/slurmctld.pid" slurmctld
fi
if ! alive "$P/run/slurmctld.pid" slurmctld; then
  slurmctld || { tail_log "$P/log/slurmctld.log"; die "slurmctld did not start"; }
fi
wait_for 100 scontrol ping || { tail_log "$P/log/slurmctld.log"; die "slurmctld does not answer"; }
for i in $(seq 1 "$NODES"); do
  alive "$P/run/slurmd-n$i.pid" "slurmd" || slurmd -N "n$i" || { tail_log "$P/log/slurmd-n$i.log"; die "slurmd n$i did not start"; }
done
# nodes drained by an earlier run (e.g. a killed slurmd) stay drained in the saved state: resume them
for _ in $(seq 100); do
  states=$(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u)
  [ "$(echo "$states" | grep -cE ' (idle|alloc|mix|comp)$' || true)" = "$NODES" ] && break
  bad=$(echo "$states" | awk '$2 ~ /drain|down|fail/ && $2 !~ /\*/ {print $1}' | paste -sd, -)
  [ -n "$bad" ] && scontrol update NodeName="$bad" State=RESUME >/dev/null 2>&1 || true
  sleep 0.2
done
echo "$states" | grep -cE ' (idle|alloc|mix|comp)$' | grep -qx "$NODES" || {
  sinfo -N -o '%N %t %E' >&2; tail_log "$P/log/slurmctld.log"; die "nodes are not up (logs: $P/log/)"; }
log "slurmctld + $NODES slurmd up: $(echo "$states" | paste -sd' ' -)"
echo "export SLURM_CONF=$SLURM_CONF"
