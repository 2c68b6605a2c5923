#!/bin/bash
# .ci/install_slurm.sh — install the Debian 12 packages that tests/slurm_cluster/start.sh needs.
#
# Run as root on a fresh Debian 12 (bookworm) machine; installs slurm-wlm 22.05 + munge 0.5 +
# MariaDB 10.11 (~40 s). apt starts no services here (no systemd): tests/slurm_cluster/start.sh
# starts every daemon by hand under a private state directory. Idempotent: already-installed
# packages are skipped without touching the network.
set -euo pipefail

# slurmctld/slurmd/slurm-client: the cluster; munge: its authentication; slurmdbd + mariadb-server:
# accounting, without which `sacct` fails and submitit never notices a cancelled job (it hangs).
# procps (pgrep/ps) and iproute2 (ss) are used by the bring-up's diagnostics only.
PKGS=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server mariadb-client procps)

if [ "$(id -u)" != 0 ]; then
  echo "error: $0 must run as root (it calls apt-get install)" >&2
  exit 1
fi
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "[install_slurm] all packages present: ${PKGS[*]}"
  exit 0
fi
echo "[install_slurm] installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# policy-rc.d 101 = "do not start services" — on a machine that does have an init system, the
# package scripts would otherwise start slurmctld/munge/mariadb on the system default ports and
# configs, which collide with the private cluster that tests/slurm_cluster/start.sh brings up.
created_policy=0
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod +x /usr/sbin/policy-rc.d
  created_policy=1
fi
trap '[ $created_policy = 1 ] && rm -f /usr/sbin/policy-rc.d' EXIT
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "[install_slurm] installed: $(slurmctld -V), $(munged --version 2>&1 | head -n1), $(mariadbd --version | cut -d' ' -f1-4)"
