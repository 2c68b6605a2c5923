#!/bin/bash
# bash tests/slurm_cluster/stop.sh [--purge]
#
# Stops what tests/slurm_cluster/start.sh started: cancels jobs, then stops each daemon by the pid in
# its pidfile (never by process name: other SLURMs or MariaDBs on this host are left alone), and
# removes this cluster's /etc/hosts line (tagged with its directory; other clusters' lines stay).
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
# only this cluster's line (start.sh tags it with $P): other clusters on this host keep their nodes
hosts_tag="# unimrg-slurm $P"
if grep -qF -- "$hosts_tag" /etc/hosts 2>/dev/null; then
  (
    flock -w 60 9 || { echo "[slurm_cluster] timed out waiting for /tmp/unimrg-slurm-hosts.lock" >&2; exit 1; }
    awk -v tag="$hosts_tag" 'substr($0, length($0) - length(tag) + 1) != tag' /etc/hosts > "$P/hosts.tmp" \
      && cat "$P/hosts.tmp" > /etc/hosts; rm -f "$P/hosts.tmp"
  ) 9>/tmp/unimrg-slurm-hosts.lock
fi
if [ "$PURGE" = 1 ]; then
  rm -rf "$P/spool" "$P/log" "$P/run" "$P/etc" "$P/mysql" "$P/mysqlrun"
  echo "[slurm_cluster] purged state under $P"
fi
exit 0
