"""Fixtures for the integration tests; ``slurm_cluster`` brings up a real local SLURM.

    python -m pytest tests/integration -m slurm -q

``slurm_cluster`` (session scope) runs tests/slurm_cluster/start.sh — munged, MariaDB + slurmdbd,
slurmctld and two slurmd nodes n1, n2 on loopback, state under $UNIMRG_SLURM_DIR — and, if it started
the cluster, stops it at the end (keep it up for the next session with UNIMRG_SLURM_KEEP=1; a cluster
that was already up is reused and left up). Needs root and the packages from .ci/install_slurm.sh.
A failed bring-up FAILS the tests, with the daemons' log tails; set UNIMRG_SLURM_SKIP_UNAVAILABLE=1 to
skip them instead (a machine that cannot run SLURM at all). Sessions sharing a state dir take turns
(a lock file beside it).
"""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SCRIPTS = REPO / "tests" / "slurm_cluster"


@dataclass
class SlurmCluster:
    """Handle on the running test cluster: its state dir, client environment and a few helpers."""

    state_dir: Path
    nodes: list[str] = field(default_factory=lambda: ["n1", "n2"])
    partition: str = "debug"

    @property
    def env(self) -> dict[str, str]:
        """Environment for SLURM clients (sbatch, submit.py, ...) and, through sbatch, for jobs."""
        return {**os.environ, "SLURM_CONF": str(self.state_dir / "etc" / "slurm.conf"),
                "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check, timeout=timeout)

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` fields (JobState, ExitCode, Restarts, NodeList, ...) of a job."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: str, timeout: float = 240) -> dict[str, str]:
        """Wait until the job is over (not merely requeued); return its final `scontrol` fields."""
        end, info = time.time() + timeout, {}
        while time.time() < end:
            info = self.job(job_id)
            if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"):
                return info
            time.sleep(1)
        self.run("scancel", job_id, check=False)
        raise TimeoutError(f"SLURM job {job_id} still {info.get('JobState')} after {timeout:.0f} s (cancelled it); "
                           f"controller log: {self.state_dir / 'log' / 'slurmctld.log'}")

    def log_tails(self, lines: int = 15) -> str:
        out = []
        for f in sorted((self.state_dir / "log").glob("*.log")) + sorted((self.state_dir / "log").glob("*.err")):
            tail = f.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"---- {f}\n" + "\n".join(tail))
        return "\n".join(out)


def _slurmctld_running(state_dir: Path) -> bool:
    pidfile = state_dir / "run" / "slurmctld.pid"
    try:
        return b"slurmctld" in Path(f"/proc/{pidfile.read_text().strip()}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False


def _lock(state_dir: Path, timeout: float = 900):
    """One pytest session at a time per cluster (another checkout's CI run on the same machine would
    otherwise stop the cluster under this one's jobs). Released when this process ends."""
    state_dir.parent.mkdir(parents=True, exist_ok=True)
    f = open(state_dir.parent / f"{state_dir.name}.lock", "w")
    end = time.time() + timeout
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return f
        except BlockingIOError:
            if time.time() > end:
                pytest.fail(f"another test session has held {f.name} for {timeout:.0f} s", pytrace=False)
            time.sleep(2)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    state_dir = Path(os.environ.get("UNIMRG_SLURM_DIR", "/tmp/unimrg-slurm"))
    cluster = SlurmCluster(state_dir)
    lock = _lock(state_dir)
    was_running = _slurmctld_running(state_dir)
    problem = None
    if os.geteuid() != 0:
        problem = "tests/slurm_cluster/start.sh needs root (it starts munged/mariadbd and edits /etc/hosts)"
    else:
        try:
            r = subprocess.run(["bash", str(CLUSTER_SCRIPTS / "start.sh")], capture_output=True, text=True,
                               timeout=300, env={**os.environ, "UNIMRG_SLURM_DIR": str(state_dir)})
            if r.returncode != 0:
                problem = (f"tests/slurm_cluster/start.sh failed (exit {r.returncode}):\n{r.stdout}{r.stderr}\n"
                           f"{cluster.log_tails() if (state_dir / 'log').is_dir() else ''}")
        except subprocess.TimeoutExpired as e:
            problem = f"tests/slurm_cluster/start.sh timed out after 300 s:\n{e.stdout or ''}{e.stderr or ''}"
    if problem:
        if os.environ.get("UNIMRG_SLURM_SKIP_UNAVAILABLE") == "1":
            lines = [ln for ln in problem.splitlines() if ln.strip()]
            pytest.skip(f"no local SLURM (UNIMRG_SLURM_SKIP_UNAVAILABLE=1): {lines[0]} {lines[-1]}")
        pytest.fail(f"cannot bring up the local SLURM cluster; install the packages with "
                    f"`.ci/install_slurm.sh` (as root), or set UNIMRG_SLURM_SKIP_UNAVAILABLE=1 to skip "
                    f"the slurm tests.\n{problem}", pytrace=False)
    yield cluster
    if not was_running and os.environ.get("UNIMRG_SLURM_KEEP") != "1":
        subprocess.run(["bash", str(CLUSTER_SCRIPTS / "stop.sh")], capture_output=True, timeout=120,
                       env={**os.environ, "UNIMRG_SLURM_DIR": str(state_dir)})
    lock.close()
