"""Fixtures for the integration tests; ``slurm_cluster`` brings up a real local SLURM.

    python -m pytest tests/integration -m slurm -q

``slurm_cluster`` (session scope) runs tests/slurm_cluster/start.sh — munged, MariaDB + slurmdbd,
slurmctld and two slurmd nodes n1, n2 on loopback — and stops it at the end. Each pytest session gets
its own cluster: a private state dir /tmp/unimrg-slurm-session-*, its own port block and job-id range
(a "slot", held by a lock for the session; the n1/n2 /etc/hosts line is shared, see start.sh), so
concurrent test runs on one machine do not wait for or disturb each other; clusters of sessions that
were killed are stopped and removed by the next session. UNIMRG_SLURM_DIR=DIR uses (and reuses) a cluster in DIR
instead, kept up for the next session with UNIMRG_SLURM_KEEP=1; a session that finds DIR in use by
another falls back to a private cluster.

Needs root and the packages from .ci/install_slurm.sh. Without them the `slurm` tests SKIP, naming
what is missing — unless CI=true or UNIMRG_SLURM_REQUIRED=1 (.ci/run sets it), where they FAIL. A
failed bring-up on a machine that has them FAILS the tests with the daemons' log tails;
UNIMRG_SLURM_SKIP_UNAVAILABLE=1 skips them instead.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import warnings
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
    port: int = 16817
    first_job_id: int = 1
    nodes: list[str] = field(default_factory=lambda: ["n1", "n2"])
    partition: str = "debug"

    @property
    def env(self) -> dict[str, str]:
        """Environment for SLURM clients (sbatch, submit.py, ...) and, through sbatch, for jobs; also
        what tests/slurm_cluster/{start,stop}.sh need to address this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.state_dir / "etc" / "slurm.conf"),
                "UNIMRG_SLURM_DIR": str(self.state_dir), "UNIMRG_SLURM_PORT": str(self.port),
                "UNIMRG_SLURM_FIRST_JOB_ID": str(self.first_job_id),
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


# Concurrent clusters on one host, one per "slot": slot k serves on ports PORT0 + k*SLOT_PORTS ..
# (slurmctld, slurmdbd, MariaDB, one slurmd per node; above Linux's ephemeral range 32768-60999 and
# every MASTER_PORT) and numbers jobs from (k+1)*JOBS_PER_SLOT + 1, because a job's rendezvous port is
# 10000 + job id % 50000 (launch/slurm.py): equal job ids on two clusters would share a MASTER_PORT.
# (Ids 1-1000 stay for a cluster started by hand with start.sh's defaults.)
SLOTS, PORT0, SLOT_PORTS, JOBS_PER_SLOT = 16, 61000, 20, 1000
LOCKS = Path("/tmp/unimrg-slurm-locks")
SESSION_PREFIX = "unimrg-slurm-session-"
# what start.sh runs; installed by .ci/install_slurm.sh
SLURM_BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "slurmdbd", "mariadbd", "mariadb-install-db",
                  "mariadb", "sbatch", "srun", "sacct", "sacctmgr", "scontrol", "flock")


def _try_lock(path: Path):
    """An exclusive flock on PATH, or None if another process holds it (released when the file is
    closed or this process ends, however it ends)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return f
    except BlockingIOError:
        f.close()
        return None


def _ports_free(base: int, nodes: int) -> bool:
    for port in (base, base + 2, base + 3, *range(base + 10, base + 10 + nodes)):
        with socket.socket() as s:
            # as the daemons do: a port whose last connections linger in TIME_WAIT is free for them
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("", port))
            except OSError:
                return False
    return True


def _claim_slot(nodes: int, preferred: int | None = None, running: bool = False):
    """(slot, lock) for this session: a slot no other session holds whose ports are free (a cluster
    left running by a killed session keeps its ports, so its slot is passed over). PREFERRED is the
    slot a reused state dir ran on before; if its cluster is still RUNNING it holds those ports itself."""
    order = ([preferred] if preferred is not None and 0 <= preferred < SLOTS else []) + list(range(SLOTS))
    for k in order:
        lock = _try_lock(LOCKS / f"slot{k}.lock")
        if lock is None:
            continue
        if (running and k == preferred) or _ports_free(PORT0 + k * SLOT_PORTS, nodes):
            return k, lock
        lock.close()
    pytest.fail(f"no free SLURM test slot: {SLOTS} test sessions hold {LOCKS}/slot*.lock or ports "
                f"{PORT0}-{PORT0 + SLOTS * SLOT_PORTS - 1} are taken", pytrace=False)


def _slot_cluster(state_dir: Path, slot: int, nodes: int) -> SlurmCluster:
    return SlurmCluster(state_dir, port=PORT0 + slot * SLOT_PORTS, first_job_id=(slot + 1) * JOBS_PER_SLOT + 1,
                        nodes=[f"n{i}" for i in range(1, nodes + 1)])


def _stop(state_dir: Path, purge: bool) -> None:
    subprocess.run(["bash", str(CLUSTER_SCRIPTS / "stop.sh"), *(["--purge"] if purge else [])],
                   capture_output=True, timeout=120, env={**os.environ, "UNIMRG_SLURM_DIR": str(state_dir)})


def _reap_orphans() -> None:
    """Stop and remove the private clusters of sessions that died without tearing down (their lock is
    free: flocks die with their process)."""
    for lock_path in Path("/tmp").glob(f"{SESSION_PREFIX}*.lock"):
        lock = _try_lock(lock_path)
        if lock is None:
            continue                                    # its session is alive
        state_dir = lock_path.with_suffix("")
        if state_dir.is_dir():
            _stop(state_dir, purge=True)
            shutil.rmtree(state_dir, ignore_errors=True)
        lock_path.unlink(missing_ok=True)
        lock.close()


def _private_state_dir():
    """A fresh /tmp/unimrg-slurm-session-XXXX and the lock that marks it as in use (taken before the
    directory exists, so that _reap_orphans of a concurrent session never sees it unlocked)."""
    # in /tmp, not $TMPDIR: the munge and MariaDB sockets inside must stay under the 108-byte path limit
    fd, lock_name = tempfile.mkstemp(prefix=SESSION_PREFIX, suffix=".lock", dir="/tmp")
    os.close(fd)
    lock = _try_lock(Path(lock_name))
    state_dir = Path(lock_name).with_suffix("")
    state_dir.mkdir()
    return state_dir, lock


def _start(cluster: SlurmCluster) -> str | None:
    """Run start.sh for CLUSTER; None when it is up, else what went wrong (with the daemons' log tails)."""
    try:
        r = subprocess.run(["bash", str(CLUSTER_SCRIPTS / "start.sh")], capture_output=True, text=True,
                           timeout=300, env=cluster.env)
    except subprocess.TimeoutExpired as e:
        return f"tests/slurm_cluster/start.sh timed out after 300 s:\n{e.stdout or ''}{e.stderr or ''}"
    if r.returncode != 0:
        return (f"tests/slurm_cluster/start.sh failed (exit {r.returncode}):\n{r.stdout}{r.stderr}\n"
                f"{cluster.log_tails() if (cluster.state_dir / 'log').is_dir() else ''}")
    return None


def _missing_prerequisites() -> str | None:
    if os.geteuid() != 0:
        return "not root (tests/slurm_cluster/start.sh starts munged/mariadbd as their users and edits /etc/hosts)"
    missing = [b for b in SLURM_BINARIES if shutil.which(b) is None]
    if missing:
        return f"missing {', '.join(missing)} (install the packages with `sudo .ci/install_slurm.sh`)"
    return None


def _slurm_required() -> bool:
    """CI installs SLURM (.ci/run), so there a missing SLURM is a failure, never a silent skip."""
    return (os.environ.get("UNIMRG_SLURM_REQUIRED") == "1"
            or os.environ.get("CI", "").lower() in ("1", "true", "yes"))


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    required = _slurm_required()
    missing = _missing_prerequisites()
    if missing:
        if required:
            pytest.fail(f"the slurm tests need root and the packages of .ci/install_slurm.sh: {missing} "
                        f"(required here: CI or UNIMRG_SLURM_REQUIRED=1)", pytrace=False)
        pytest.skip(f"no local SLURM: {missing}; CI=true or UNIMRG_SLURM_REQUIRED=1 makes this a failure")

    _reap_orphans()
    nodes = int(os.environ.get("UNIMRG_SLURM_NODES", "2"))
    named = os.environ.get("UNIMRG_SLURM_DIR")
    dir_lock = _try_lock(Path(named).absolute().parent / f"{Path(named).name}.lock") if named else None
    if named and dir_lock is None:
        warnings.warn(f"UNIMRG_SLURM_DIR={named} is in use by another test session: this session brings "
                      f"up a private cluster instead", stacklevel=1)
    private = dir_lock is None
    if private:
        state_dir, dir_lock = _private_state_dir()
        was_running, preferred = False, None
    else:
        state_dir = Path(named).absolute()
        was_running = _slurmctld_running(state_dir)
        try:
            preferred = int((state_dir / "slot").read_text())
        except (OSError, ValueError):
            preferred = None
    slot, slot_lock = _claim_slot(nodes, preferred, was_running)
    cluster = _slot_cluster(state_dir, slot, nodes)
    try:
        problem = _start(cluster)
        if not private:
            (state_dir / "slot").write_text(str(slot))
        if problem:
            if os.environ.get("UNIMRG_SLURM_SKIP_UNAVAILABLE") == "1" and not required:
                lines = [ln for ln in problem.splitlines() if ln.strip()]
                pytest.skip(f"no local SLURM (UNIMRG_SLURM_SKIP_UNAVAILABLE=1): {lines[0]} {lines[-1]}")
            pytest.fail(f"cannot bring up the local SLURM cluster in {state_dir}; set "
                        f"UNIMRG_SLURM_SKIP_UNAVAILABLE=1 to skip the slurm tests.\n{problem}", pytrace=False)
        yield cluster
    finally:
        if private:
            _stop(state_dir, purge=True)
            shutil.rmtree(state_dir, ignore_errors=True)
            Path(f"{state_dir}.lock").unlink(missing_ok=True)
        elif not was_running and os.environ.get("UNIMRG_SLURM_KEEP") != "1":
            _stop(state_dir, purge=False)
        slot_lock.close()
        dir_lock.close()


@pytest.fixture
def another_slurm_cluster(slurm_cluster) -> Iterator[SlurmCluster]:
    """A second private cluster beside ``slurm_cluster``, brought up exactly as a concurrent test
    session on this machine would bring up its own; stopped and removed afterwards."""
    state_dir, dir_lock = _private_state_dir()
    slot, slot_lock = _claim_slot(len(slurm_cluster.nodes))
    cluster = _slot_cluster(state_dir, slot, len(slurm_cluster.nodes))
    try:
        problem = _start(cluster)
        assert problem is None, problem
        yield cluster
    finally:
        _stop(state_dir, purge=True)
        shutil.rmtree(state_dir, ignore_errors=True)
        Path(f"{state_dir}.lock").unlink(missing_ok=True)
        slot_lock.close()
        dir_lock.close()
