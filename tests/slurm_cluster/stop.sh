#!/bin/bash
# bash tests/slurm_cluster/stop.sh [--purge]
#
# Stops what tests/slurm_cluster/start.sh started: cancels jobs, then stops each daemon by the pid in
# its pidfile (never by process name: other SLURMs or MariaDBs on this host are left alone), and
# removes the tagged /etc/hosts line unless another cluster on this host still uses it.
# Idempotent. --purge (or UNIMRG_SLURM_PURGE=1) also deletes the state (job state, accounting DB,
# logs) so that the next start is a fresh cluster; the munge key and the MariaDB system tables are kept
# unless the whole $UNIMRG_SLURM_DIR is removed.
set -uo pipefail
P=${UNIMRG_SLURM_DIR:-/tmp/unimrg-slurm}
PURGE=${UNIMRG_SLURM_PURGE:-0}; [ "${1:-}" = --purge ] && PURGE=1
export SLURM_CONF=$P/etc/slurm.conf

alive() { [ -s "$1" ] && grep -qs "$2" "/proc/$(cat "$1")/cmdline"; }
stop_pid() {  # stop_pid PIDFILE NAME
  alive "$1" "$2" || { rm -f "$1"; return 0; }
  local pid; pid=$(cat "$1"); kill "$pid" 2>/dev/null
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then echo "[slurm_cluster] $2 ($pid) ignored SIGTERM: SIGKILL"; kill -9 "$pid"; fi
  rm -f "$1"; echo "[slurm_cluster] stopped $2 (pid $pid)"
}

# jobs first, while slurmctld can still tell the slurmds to kill their steps
if alive "$P/run/slurmctld.pid" slurmctld; then
  jobs=$(timeout 10 squeue -h -o %A 2>/dev/null | paste -sd' ' -)
  if [ -n "$jobs" ]; then
    timeout 10 scancel $jobs 2>/dev/null
    for _ in $(seq 50); do [ -z "$(timeout 5 squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.2; done
  fi
fi
# each daemon takes ~2 s to exit: stop them in parallel, in three waves (the controller flushes its
# accounting records to slurmdbd, which needs MariaDB; everything authenticates through munged)
for f in "$P"/run/slurmd-*.pid; do [ -e "$f" ] && stop_pid "$f" slurmd & done
stop_pid "$P/run/slurmctld.pid" slurmctld & wait
stop_pid "$P/run/slurmdbd.pid" slurmdbd
stop_pid "$P/mysqlrun/mysqld.pid" mariadbd & stop_pid "$P/run/munged.pid" munged & wait
# the tagged /etc/hosts lines are shared by all clusters on this host (start.sh): removed only when
# no other cluster is registered any more
HOSTS_TAG="# unimrg-slurm" HOSTS_USERS=/tmp/unimrg-slurm-hosts.users HOSTS_LOCK=/tmp/unimrg-slurm-hosts.lock
(
  flock -w 60 9 || { echo "[slurm_cluster] timed out waiting for $HOSTS_LOCK" >&2; exit 1; }
  rm -f "$HOSTS_USERS/$(printf %s "$P" | md5sum | cut -c1-16)"
  if [ -z "$(ls -A "$HOSTS_USERS" 2>/dev/null)" ] && grep -qE " $HOSTS_TAG\$" /etc/hosts; then
    # /etc/hosts is often a bind mount (containers): rewrite it in place, never replace the file
    tmp=$(mktemp); grep -vE " $HOSTS_TAG\$" /etc/hosts > "$tmp"; cat "$tmp" > /etc/hosts; rm -f "$tmp"
  fi
) 9>"$HOSTS_LOCK"
if [ "$PURGE" = 1 ]; then
  rm -rf "$P/spool" "$P/log" "$P/run" "$P/etc" "$P/mysql" "$P/mysqlrun"
  echo "[slurm_cluster] purged state under $P"
fi
exit 0
