"""The local SLURM of tests/slurm_cluster/ itself: two nodes, accounting, fake GPUs, idempotent bring-up.

    python -m pytest tests/integration/test_slurm_cluster.py -q
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]


def test_two_nodes_run_one_task_each_and_resolve(slurm_cluster):
    # MASTER_ADDR comes from the first node name, so node names must resolve (the /etc/hosts line)
    r = slurm_cluster.run("srun", "-N2", "--ntasks-per-node=1", "-t", "1", "bash", "-c",
                          'echo "$SLURMD_NODENAME $SLURM_PROCID $(getent hosts $(scontrol show hostnames '
                          '$SLURM_JOB_NODELIST | head -n1) | cut -d" " -f1)"')
    assert sorted(r.stdout.split("\n")[:2]) == ["n1 0 127.0.0.1", "n2 1 127.0.0.1"], r.stdout + r.stderr


def test_accounting_records_jobs(slurm_cluster):
    # submitit (and launch/slurm.py after slurmctld forgets a job) ask `sacct`: it must know the job
    job_id = slurm_cluster.run("sbatch", "--parsable", "-N1", "-t", "1", "--wrap", "true").stdout.strip()
    assert slurm_cluster.wait(job_id, timeout=60)["JobState"] == "COMPLETED"
    for _ in range(50):   # the controller sends the record to slurmdbd asynchronously
        state = slurm_cluster.run("sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State").stdout.strip()
        if state:
            break
        time.sleep(0.2)
    assert state == "COMPLETED"


def test_fake_gpus_are_allocated_per_node(slurm_cluster):
    r = slurm_cluster.run("srun", "-N2", "--gpus-per-node=2", "--ntasks-per-node=1", "-t", "1", "bash", "-c",
                          'echo "$SLURM_GPUS_ON_NODE $CUDA_VISIBLE_DEVICES"')
    assert r.stdout.split("\n")[:2] == ["2 0,1", "2 0,1"], r.stdout + r.stderr


def test_bring_up_is_idempotent(slurm_cluster):
    pids = {p.name: p.read_text() for p in (slurm_cluster.state_dir / "run").glob("*.pid")}
    r = subprocess.run(["bash", str(REPO / "tests" / "slurm_cluster" / "start.sh")], capture_output=True,
                       text=True, timeout=120, env=slurm_cluster.env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert {p.name: p.read_text() for p in (slurm_cluster.state_dir / "run").glob("*.pid")} == pids
    assert "slurmctld + 2 slurmd up" in r.stdout


def test_a_concurrent_sessions_cluster_runs_beside_and_stops_alone(slurm_cluster, another_slurm_cluster):
    # two test runs on one machine: each cluster has its own ports and job ids (→ MASTER_PORTs), and
    # stopping one leaves the other's node names resolvable (/etc/hosts)
    other = another_slurm_cluster
    assert other.port != slurm_cluster.port and other.first_job_id != slurm_cluster.first_job_id
    ids = [c.run("sbatch", "--parsable", "-N1", "-t", "1", "--wrap", "true").stdout.strip()
           for c in (slurm_cluster, other)]
    assert [int(i) - c.first_job_id in range(1000) for c, i in zip((slurm_cluster, other), ids)] == [True, True], ids
    assert slurm_cluster.wait(ids[0], timeout=60)["JobState"] == other.wait(ids[1], timeout=60)["JobState"] == "COMPLETED"
    r = subprocess.run(["bash", str(REPO / "tests" / "slurm_cluster" / "stop.sh")], capture_output=True,
                       text=True, timeout=120, env=other.env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert [socket.gethostbyname(n) for n in slurm_cluster.nodes] == ["127.0.0.1"] * len(slurm_cluster.nodes)
    test_two_nodes_run_one_task_each_and_resolve(slurm_cluster)
