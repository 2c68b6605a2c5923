"""launch/submit.py --cluster slurm and slurm/*.sh on a real SLURM (two nodes on this machine).

    python -m pytest tests/integration/test_slurm_launch.py -q

Every run trains a tiny model (submit.py: OpenUni; sbatch: slurm/harmon.sh) with 2 CPU ranks for
STEPS steps; each is compared, step by step and exactly (fp32), with a `--cluster local` world-size-2
run of the same recipe and seed. Preemption is
the signal SLURM sends before a time limit (submitit: SIGUSR2 to the ranks; slurm/*.sh: SIGUSR1 to the
batch script), sent by hand once the first step is logged. The long runs all start with the first
test and overlap (the cluster runs two two-node jobs at a time); each test then waits for its own.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
STEPS = 30   # long enough that a signal sent after step 1 lands well before the end (~0.1 s a step)
TINY = [f"train.steps={STEPS}", "train.checkpoint_every=10", "data.num_workers=0", "train.export_final=false"]
SLURM_TWO_NODES = ["--cluster", "slurm", "--nodes", "2", "--gpus-per-node", "0",   # the command: 1 CPU rank per node
                   "--time", "30"]


def submit(*args: str, model: str = "openuni") -> list[str]:
    return [sys.executable, str(REPO / "launch" / "submit.py"), "--model", model, "--recipe", "tiny", *args]


def losses(run_dir: Path) -> dict[int, dict[str, float]]:
    """Step → all-reduced per-task losses, as rank 0 logged them (a resumed run appends)."""
    rows = [json.loads(line) for line in (run_dir / "metrics" / "rank0.jsonl").read_text().splitlines()]
    return {r["step"]: r["global_losses"] for r in rows}


def wait_for_first_step(run_dir: Path, timeout: float = 300) -> None:
    metrics = run_dir / "metrics" / "rank0.jsonl"
    end = time.time() + timeout
    while not (metrics.exists() and metrics.read_text().strip()):
        assert time.time() < end, f"no training step logged in {metrics} after {timeout} s"
        time.sleep(0.05)


class Background:
    """A command started now and awaited later, so that it runs while other tests use the cluster.
    Output goes to files: an unread pipe would stall a chatty process once its buffer is full."""

    def __init__(self, cmd: list[str], logs: Path, env: dict[str, str] | None = None):
        logs.mkdir(parents=True, exist_ok=True)
        self.out, self.err = logs / "stdout.txt", logs / "stderr.txt"
        with self.out.open("w") as out, self.err.open("w") as err:   # own session: stop() ends its children
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err, text=True,
                                         start_new_session=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            # SIGTERM first: torchrun puts its workers in sessions of their own and stops them on TERM
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def result(self, timeout: float = 300) -> subprocess.CompletedProcess:
        try:
            self.proc.wait(timeout=timeout)
        finally:
            self.stop()
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, self.out.read_text(),
                                           self.err.read_text())


class Preemption(threading.Thread):
    """Once a run logs its first step, send the job what SLURM sends before a time limit (``scancel
    ARGS JOB``). A thread, so that the job runs while other tests use the cluster."""

    def __init__(self, cluster, run: Path, job_id: Callable[[], str], *scancel_args: str):
        super().__init__(daemon=True)
        self.cluster, self.run_dir, self.job_id, self.args = cluster, run, job_id, scancel_args
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            wait_for_first_step(self.run_dir)
            self.cluster.run("scancel", *self.args, self.job_id())
        except BaseException as e:   # re-raised in the test by check()
            self.error = e

    def check(self) -> None:
        self.join(timeout=10)
        if self.error is not None:
            raise self.error


class Reference:
    """The same recipe and seed, uninterrupted, with torchrun on this machine (world size 2)."""

    def __init__(self, run: Path, data: Path, model: str = "openuni"):
        self.run = run
        self.job = Background(submit("--cluster", "local", "--cpu-ranks-per-node", "2", "--run-dir", str(run),
                                     f"data.root={data}", *TINY, model=model), run.parent / "logs")

    def losses(self) -> dict[int, dict[str, float]]:
        r = self.job.result()
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        out = losses(self.run)
        assert sorted(out) == list(range(1, STEPS + 1))
        return out


def job_ids(run: Path) -> list[str]:
    """The SLURM jobs launch/slurm.py submitted for a run folder."""
    ids = run / "slurm" / "job_ids"
    return ids.read_text().split() if ids.exists() else []


# ---- everything long starts before the first test (the cluster runs two of these jobs at a time) ----

@pytest.fixture(scope="module")
def reference(scene_root, tmp_path_factory) -> Iterator[Reference]:
    ref = Reference(tmp_path_factory.mktemp("local") / "run", scene_root)
    yield ref
    ref.job.stop()   # not awaited when its tests were deselected


@pytest.fixture(scope="module")
def harmon_data(tmp_path_factory) -> Path:
    """Scenes as the Harmon tiny recipe generates them (its own image size), written by submit.py."""
    tmp = tmp_path_factory.mktemp("harmon_data")
    r = subprocess.run(submit("--prepare-only", "--gpus-per-node", "0", "--run-dir", str(tmp / "prepare"),
                              f"data.root={tmp / 'data'}", model="harmon"),
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return tmp / "data"


@pytest.fixture(scope="module")
def harmon_reference(harmon_data, tmp_path_factory) -> Iterator[Reference]:
    ref = Reference(tmp_path_factory.mktemp("harmon_local") / "run", harmon_data, model="harmon")
    yield ref
    ref.job.stop()


@pytest.fixture(scope="module")
def failing_job(slurm_cluster, scene_root, tmp_path_factory) -> Iterator[tuple[Background, Path]]:
    """A run whose ranks cannot load model.checkpoint: a folder that exists (so validation passes) but
    holds no weights."""
    tmp = tmp_path_factory.mktemp("failing")
    not_a_checkpoint = tmp / "openuni_release"
    not_a_checkpoint.mkdir()
    job = Background(submit(*SLURM_TWO_NODES, "--run-dir", str(tmp / "run"), f"data.root={scene_root}",
                            f"model.checkpoint={not_a_checkpoint}", *TINY), tmp / "logs", slurm_cluster.env)
    yield job, not_a_checkpoint
    job.stop()
    slurm_cluster.run("scancel", *job_ids(tmp / "run"), check=False)


@pytest.fixture(scope="module")
def preempted_submit(slurm_cluster, scene_root, tmp_path_factory) -> Iterator[tuple[Background, Path, Preemption]]:
    tmp = tmp_path_factory.mktemp("preempted_submit")
    run = tmp / "run"
    job = Background(submit(*SLURM_TWO_NODES, "--run-dir", str(run), f"data.root={scene_root}", *TINY),
                     tmp / "logs", slurm_cluster.env)
    # what SLURM sends `signal_delay_s` before the time limit (submitit's --signal=USR2@...): to the ranks
    preemption = Preemption(slurm_cluster, run, lambda: job_ids(run)[0], "--signal=USR2")
    yield job, run, preemption
    job.stop()
    slurm_cluster.run("scancel", *job_ids(run), check=False)


@pytest.fixture(scope="module")
def preempted_sbatch(slurm_cluster, harmon_data, tmp_path_factory) -> Iterator[tuple[str, Path, Path, Preemption]]:
    tmp = tmp_path_factory.mktemp("preempted_sbatch")
    run, log = tmp / "run", tmp / "job.out"
    # sbatch's options override the script's 8-GPU header: two nodes, one CPU rank each
    job_id = slurm_cluster.run(
        "sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1",
        "--mem=3G", "--time=10", f"--output={log}", f"--export=ALL,RECIPE=tiny,RUN_DIR={run}",
        str(REPO / "slurm" / "harmon.sh"), f"data.root={harmon_data}", *TINY).stdout.strip()
    # what `#SBATCH --signal=B:USR1@180` makes SLURM send before the time limit: to the batch script
    preemption = Preemption(slurm_cluster, run, lambda: job_id, "--batch", "--signal=USR1")
    yield job_id, run, log, preemption
    slurm_cluster.run("scancel", job_id, check=False)


@pytest.fixture(scope="module", autouse=True)
def start_long_jobs(reference, failing_job, preempted_submit, harmon_reference, preempted_sbatch) -> None:
    """Requested by every test of this module, so all of them start with the first test (the SLURM
    jobs before the Harmon reference, which first waits for its data)."""


# ---- tests ----

def test_submit_runs_one_rank_per_node_and_matches_local(slurm_cluster, scene_root, reference, tmp_path):
    run = tmp_path / "run"
    r = subprocess.run(submit(*SLURM_TWO_NODES, "--run-dir", str(run), f"data.root={scene_root}", *TINY),
                       cwd=REPO, env=slurm_cluster.env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    job_id = re.search(r"submitted SLURM job (\d+)", r.stdout).group(1)
    assert f"tensorboard --logdir {run / 'tb'}" in r.stdout
    assert f"SLURM job {job_id} completed on all 2 ranks" in r.stdout
    job = slurm_cluster.job(job_id)
    assert (job["NumNodes"], job["NumTasks"], job["NodeList"]) == ("2", "2", "n[1-2]")
    params = json.loads((run / "slurm" / "parameters.json").read_text())
    assert (params["nodes"], params["ntasks_per_node"]) == (2, 1)
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert losses(run) == reference.losses()


def test_submit_preempted_job_checkpoints_requeues_and_resumes_exactly(slurm_cluster, preempted_submit,
                                                                       reference):
    job, run, preemption = preempted_submit
    r = job.result(timeout=400)
    preemption.check()
    out = r.stdout
    assert r.returncode == 0, out[-3000:] + r.stderr[-3000:]
    job_id = job_ids(run)[0]
    stopped = int(re.search(r"stopping at step (\d+) on a signal", out).group(1))
    assert 1 <= stopped < STEPS
    assert f"resumed from {run / 'checkpoints' / f'step_{stopped:07d}'}" in out
    assert f"SLURM job {job_id} completed on all 2 ranks after 1 requeue(s)" in out
    assert slurm_cluster.job(job_id)["Restarts"] == "1"
    assert losses(run) == reference.losses()


def test_sbatch_harmon_on_two_nodes_requeues_on_signal_and_finishes(slurm_cluster, preempted_sbatch,
                                                                    harmon_reference):
    job_id, run, log, preemption = preempted_sbatch
    job = slurm_cluster.wait(job_id, timeout=400)
    preemption.check()
    text = log.read_text()
    assert (job["JobState"], job["Restarts"], job["NodeList"]) == ("COMPLETED", "1", "n[1-2]"), text[-5000:]
    stopped = int(re.search(r"stopping at step (\d+) on a signal", text).group(1))
    assert 1 <= stopped < STEPS
    assert f"requeueing job {job_id} (requeue 1 of at most 5)" in text
    assert f"resumed from {run / 'checkpoints' / f'step_{stopped:07d}'}" in text
    assert losses(run) == harmon_reference.losses()


def test_failing_rank_is_reported_with_its_error(failing_job):
    job, not_a_checkpoint = failing_job
    r = job.result(timeout=240)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    job_id = re.search(r"submitted SLURM job (\d+)", r.stdout).group(1)
    assert f"SLURM job {job_id} ended FAILED" in r.stderr
    assert re.search(r"---- rank [01] \(first failure\):\nTraceback", r.stderr), r.stderr[-3000:]
    assert f"FileNotFoundError: OpenUni checkpoint {not_a_checkpoint}: no weights" in r.stderr


def test_refused_submission_is_reported(slurm_cluster, scene_root, tmp_path):
    r = subprocess.run(submit(*SLURM_TWO_NODES, "--partition", "no_such_partition", "--run-dir", str(tmp_path),
                              f"data.root={scene_root}", *TINY),
                       cwd=REPO, env=slurm_cluster.env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
    assert "sbatch refused the job" in r.stderr and "Invalid partition name specified" in r.stderr


@pytest.mark.parametrize("model", ["harmon", "showo", "openuni", "janus"])
def test_sbatch_headers_are_accepted(slurm_cluster, model):
    script = REPO / "slurm" / f"{model}.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    # the header as written asks for 8 GPUs per node; this cluster has 2: sbatch must reject exactly that
    r = slurm_cluster.run("sbatch", "--test-only", str(script), check=False)
    assert r.returncode != 0 and "Requested node configuration is not available" in r.stderr, r.stderr
    r = slurm_cluster.run("sbatch", "--test-only", "--gpus-per-node=2", "--ntasks-per-node=2",
                          "--cpus-per-task=1", "--mem=1G", str(script), check=False)
    assert r.returncode == 0 and "to start at" in r.stderr, r.stderr
