"""Failures end a job in seconds: an exception on one rank, a hung rank (watchdog), skipped steps.

    python -m pytest tests/integration/test_fail_fast.py -q

Faults are injected with the trainer's test hook ``train.debug_fault`` (unimrg/faults.py) into real
torchrun runs (2 CPU ranks, tiny OpenUni). Without the fixes the first two jobs hang for the 10-minute
process-group timeout (caught here by the 60 s waits) and the NaN run exits 0 with stale weights.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from tests.integration.test_train_openuni import metrics, train

pytestmark = pytest.mark.slow


def start(run_dir: Path, data: Path, *overrides: str) -> tuple[subprocess.Popen, Path]:
    """submit.py --cluster local in the background; its stderr goes to a file we can watch."""
    run_dir.mkdir(parents=True)
    err = run_dir.parent / f"{run_dir.name}.stderr"
    with err.open("w") as f:
        proc = subprocess.Popen([sys.executable, str(REPO / "launch" / "submit.py"), "--model", "openuni",
                                 "--recipe", "tiny", "--cluster", "local", "--run-dir", str(run_dir),
                                 f"data.root={data}", *overrides], cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=f, start_new_session=True)
    return proc, err


def ends_within(proc: subprocess.Popen, err: Path, marker: str, seconds: float, startup: float = 400) -> str:
    """Wait for ``marker`` in stderr (start-up is slow on a busy CI machine), then require the job
    to end within ``seconds``; returns stderr."""
    try:
        end = time.time() + startup
        while marker not in err.read_text(errors="replace"):
            assert proc.poll() is None, f"ended before {marker!r}:\n{err.read_text()[-4000:]}"
            assert time.time() < end, f"no {marker!r} after {startup} s:\n{err.read_text()[-4000:]}"
            time.sleep(0.2)
        t = time.time()
        try:
            proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the job still runs {seconds} s after {marker!r}:\n{err.read_text()[-4000:]}")
        assert proc.returncode != 0
        print(f"job ended {time.time() - t:.1f} s after {marker!r}")
        return err.read_text(errors="replace")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_exception_on_rank1_ends_job_fast_and_last_checkpoint_resumes_exactly(tmp_path, scene_root):
    run = tmp_path / "run"
    steps = "train.steps=18"   # tiny recipe: checkpoint_every=10
    proc, err = start(run, scene_root, steps, "train.debug_fault=raise@16:rank1")
    log = ends_within(proc, err, "injected failure on rank 1 at step 16", 60)
    assert "rank 1: error during forward of step 16 (task und): RuntimeError" in log
    assert "Traceback (most recent call last)" in log and "unimrg/trainer.py" in log
    assert (run / "checkpoints" / "latest").read_text() == "step_0000010"
    assert not (run / "final").exists()
    failed = {rank: metrics(run, rank) for rank in (0, 1)}
    assert [r["step"] for r in failed[1]] == list(range(1, 16))

    train(run, scene_root, steps, "run.resume=latest")
    for rank in (0, 1):
        # the resumed launch sets aside what the failed one logged after step 10 (rank<r>.jsonl.discarded)
        rows = metrics(run, rank)
        assert [r["step"] for r in rows] == list(range(1, 19))
        # steps 11-15 ran uninterrupted in the failed run: the resumed run must repeat them exactly
        before = {r["step"]: r for r in failed[rank]}
        for r in rows[10:15]:
            assert (r["losses"], r["grad_norm"]) == (before[r["step"]]["losses"], before[r["step"]]["grad_norm"])
    assert (run / "final" / "model.pt").is_file()


def test_watchdog_ends_a_hung_rank_naming_rank_and_phase(tmp_path, scene_root):
    # rank 1 sleeps in step 3's first forward; rank 0 then waits for it in the gradient all-reduce.
    # 15 s is shorter than start-up and the first data load take on a loaded 2-core machine (over 20 s
    # measured): those are train.startup_timeout_s's, so the watchdog must fire at step 3, not before.
    proc, err = start(tmp_path / "run", scene_root, "train.steps=5", "train.hang_timeout_s=15",
                      "train.debug_fault=hang@3:rank1")
    log = ends_within(proc, err, "error: stuck in", 30, startup=600)
    assert "(train.hang_timeout_s=15); exiting so the job ends. Python stacks:" in log
    assert re.search(r"rank [01]: error: stuck in (forward|backward|optimizer step) of step 3 \(task und\) "
                     r"for \d+ s", log), log[-4000:]
    assert 'File "' in log.split("Python stacks:")[1]   # where the main thread was stuck


def skipped_steps_scalars(run_dir: Path) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars("train/skipped_steps")]


def test_nan_on_every_step_from_3_stops_the_run_naming_the_task(tmp_path, scene_root):
    res = train(tmp_path, scene_root, "train.steps=10", "train.debug_fault=nan@3-:depth", check=False)
    assert res.returncode != 0
    assert ("SkippedStepsError: 4 optimizer steps in a row skipped (steps 3–6; more than "
            "train.max_skipped_steps=3): the loss of task depth was not finite") in res.stderr, res.stderr[-4000:]
    assert [f"warning: step {s} skipped" in res.stderr for s in (3, 4, 5, 6)] == [True, True, True, False]
    assert not (tmp_path / "final").exists()          # no stale export
    assert [r["step"] for r in metrics(tmp_path, 0)] == list(range(1, 7))
    assert skipped_steps_scalars(tmp_path) == [(1, 0), (2, 0), (3, 1), (4, 2), (5, 3), (6, 4)]


def test_one_nan_step_is_skipped_and_the_run_continues(tmp_path, scene_root):
    res = train(tmp_path, scene_root, "train.steps=5", "train.debug_fault=nan@3:depth")
    assert res.stderr.count("skipped: the loss of task depth was not finite") == 1
    assert "warning: step 3 skipped" in res.stderr
    assert skipped_steps_scalars(tmp_path) == [(1, 0), (2, 0), (3, 1), (4, 1), (5, 1)]
    final = torch.load(tmp_path / "final" / "model.pt")
    assert all(torch.isfinite(w).all() for w in final.values() if w.is_floating_point())   # NaN never applied
