"""Stop signals on a local run (2 CPU ranks, torchrun, data.num_workers=2): every one saves, none leaks.

    python -m pytest tests/integration/test_preemption.py -q

SLURM (``scontrol requeue``, preemption, ``scancel``, the time limit) sends SIGTERM to *every* process
of the job, data-loader workers included; here the same is sent by hand. The launcher tests kill or
Ctrl-C launch/submit.py and check, by process listing, that no rank or worker survives.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from launch.local import children
from unimrg.signals import PREEMPTED_EXIT_CODE

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
STEPS = 12
RUN = ["train.checkpoint_every=100", "data.num_workers=2", f"train.steps={STEPS}"]


def submit_cmd(run_dir: Path, data: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "launch" / "submit.py"), "--model", "openuni", "--recipe", "tiny",
            "--cluster", "local", "--run-dir", str(run_dir), f"data.root={data}", *RUN, *extra]


class Launch:
    """submit.py in the background (own session, so that the test can send it a terminal's Ctrl-C)."""

    def __init__(self, run_dir: Path, data: Path, *extra: str):
        self.run_dir = run_dir
        self.log = run_dir.parent / f"{run_dir.name}.log"
        with self.log.open("w") as f:
            self.proc = subprocess.Popen(submit_cmd(run_dir, data, *extra), cwd=REPO, stdout=f,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def wait_for_step(self, step: int, timeout: float = 300) -> None:
        metrics = self.run_dir / "metrics" / "rank0.jsonl"
        end = time.time() + timeout
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= step):
            assert self.proc.poll() is None, self.output()[-3000:]
            assert time.time() < end, f"step {step} not logged after {timeout} s:\n{self.output()[-3000:]}"
            time.sleep(0.1)

    def tree(self) -> tuple[list[int], list[int], list[int]]:
        """(torchrun, ranks, data-loader workers) under submit.py, from /proc."""
        torchrun = children(self.proc.pid)
        ranks = [r for t in torchrun for r in children(t)]
        workers = [w for r in ranks for w in children(r)]
        return torchrun, ranks, workers

    def finish(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def alive(pids: list[int]) -> list[int]:
    """The pids that are still running processes (not zombies)."""
    out = []
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if stat[stat.rindex(")") + 2] != "Z":
            out.append(pid)
    return out


def assert_all_gone(pids: list[int], timeout: float = 60) -> None:
    end = time.time() + timeout
    while alive(pids) and time.time() < end:
        time.sleep(0.2)
    left = alive(pids)
    assert not left, "still running: " + "; ".join(Path(f"/proc/{p}/cmdline").read_text().replace("\0", " ")
                                                   for p in left)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, scene_root) -> Path:
    run = tmp_path_factory.mktemp("reference") / "run"
    r = subprocess.run(submit_cmd(run, scene_root), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return run


def test_sigterm_to_every_process_checkpoints_the_current_step_and_resumes_exactly(tmp_path, scene_root,
                                                                                  reference):
    run = tmp_path / "run"
    job = Launch(run, scene_root)
    job.wait_for_step(2)
    torchrun, ranks, workers = job.tree()
    assert len(ranks) == 2 and len(workers) == 2 * 2 * 4, (ranks, workers)   # 2 per task and rank
    for pid in ranks + workers:   # what slurmstepd does on `scontrol requeue`
        os.kill(pid, signal.SIGTERM)
    code = job.finish()
    out = job.output()
    assert code == PREEMPTED_EXIT_CODE, out[-3000:]
    assert "killed by signal" not in out, out[-3000:]
    stopped = int(next(line for line in out.splitlines() if "on a signal (SIGTERM)" in line).split()[3])
    assert 2 <= stopped < STEPS
    tag = f"step_{stopped:07d}"
    assert (run / "checkpoints" / "latest").read_text() == tag
    assert (run / "checkpoints" / tag / "COMPLETE").read_text().split() == ["2"]
    assert not list((run / "checkpoints").glob("partial.*"))
    assert_all_gone(torchrun + ranks + workers)

    r = subprocess.run(submit_cmd(run, scene_root, "--resume", "latest"), cwd=REPO, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / tag}" in r.stdout
    final, expected = (torch.load(p / "final" / "model.pt") for p in (run, reference))
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[k], expected[k]) for k in expected)


def test_ctrl_c_checkpoints_and_stops_every_rank(tmp_path, scene_root):
    run = tmp_path / "run"
    job = Launch(run, scene_root)
    job.wait_for_step(1)
    torchrun, ranks, workers = job.tree()
    assert len(ranks) == 2 and workers
    os.kill(job.proc.pid, signal.SIGINT)   # what a terminal's Ctrl-C sends (to its foreground group)
    code = job.finish()
    out = job.output()
    assert code == PREEMPTED_EXIT_CODE, out[-3000:]
    assert "SIGINT: the ranks finish their step, checkpoint and stop" in out
    stopped = int(next(line for line in out.splitlines() if "on a signal (SIGTERM)" in line).split()[3])
    assert (run / "checkpoints" / "latest").read_text() == f"step_{stopped:07d}"
    assert "--resume latest" in out
    assert_all_gone(torchrun + ranks + workers)


@pytest.mark.parametrize("kill", ["launcher", "torchrun"])
def test_killing_the_launcher_leaves_no_rank_running(tmp_path, scene_root, kill):
    job = Launch(tmp_path / "run", scene_root)
    job.wait_for_step(1)
    torchrun, ranks, workers = job.tree()
    assert len(torchrun) == 1 and len(ranks) == 2 and workers
    os.kill(job.proc.pid if kill == "launcher" else torchrun[0], signal.SIGKILL)
    assert_all_gone(torchrun + ranks + workers)
    job.finish(timeout=60)
