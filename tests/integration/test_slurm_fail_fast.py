"""An exception on one rank of a real two-node SLURM job ends the job in seconds; it resumes exactly.

    python -m pytest tests/integration/test_slurm_fail_fast.py -q

The exception is injected with the trainer's test hook ``train.debug_fault`` (unimrg/faults.py). Before
the fix the failing rank waited in ``dist.barrier()`` for the 10-minute process-group timeout and never
exited, so ``srun --kill-on-bad-exit`` could not act.
"""

from __future__ import annotations

import re
import subprocess
from datetime import datetime

import pytest

from tests.integration.test_slurm_launch import REPO, SLURM_TWO_NODES, TINY, Background, job_ids, losses, submit

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_exception_on_rank1_ends_slurm_job_fast_and_resumes_exactly(slurm_cluster, scene_root, tmp_path):
    run = tmp_path / "run"
    job = Background(submit(*SLURM_TWO_NODES, "--run-dir", str(run), f"data.root={scene_root}", *TINY,
                            "train.debug_fault=raise@15:rank1"), tmp_path / "logs", slurm_cluster.env)
    try:
        r = job.result(timeout=400)
    finally:
        slurm_cluster.run("scancel", *job_ids(run), check=False)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    job_id = re.search(r"submitted SLURM job (\d+)", r.stdout).group(1)
    assert f"SLURM job {job_id} ended FAILED" in r.stderr, r.stderr[-3000:]
    assert re.search(r"---- rank 1 \(first failure\):\nTraceback", r.stderr), r.stderr[-3000:]
    assert "injected failure on rank 1 at step 15" in r.stderr

    # from the failure (rank 1's submitit result, written as the exception left the trainer) to the end
    failed_at = (run / "slurm" / job_id / f"{job_id}_1_result.pkl").stat().st_mtime
    ended_at = datetime.strptime(slurm_cluster.job(job_id)["EndTime"], "%Y-%m-%dT%H:%M:%S").timestamp()
    assert ended_at - failed_at < 60, f"job ended {ended_at - failed_at:.0f} s after rank 1 failed"
    assert (run / "checkpoints" / "latest").read_text() == "step_0000010"

    before = losses(run)
    assert sorted(before) == list(range(1, 15))
    r = subprocess.run(submit(*SLURM_TWO_NODES, "--run-dir", str(run), f"data.root={scene_root}", *TINY,
                              "run.resume=latest"), cwd=REPO, env=slurm_cluster.env, capture_output=True,
                       text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / 'step_0000010'}" in r.stdout
    after = losses(run)   # steps 11-14 now as the resumed run logged them
    assert sorted(after) == list(range(1, 31))
    assert [after[s] for s in range(11, 15)] == [before[s] for s in range(11, 15)]
