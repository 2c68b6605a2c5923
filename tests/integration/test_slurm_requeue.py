"""`scontrol requeue` of a running training job on a real SLURM (two nodes on this machine), with
data-loader workers: SIGTERM to every process of the job must still end in a checkpoint.

    python -m pytest tests/integration/test_slurm_requeue.py -q

The requeued job must end with weights bit-identical to an uninterrupted `--cluster local` run.
"""

from __future__ import annotations

import re

import pytest
import torch

from tests.integration.test_slurm_launch import (SLURM_TWO_NODES, STEPS, Background, job_ids, losses, submit,
                                                 wait_for_first_step)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# as TINY in test_slurm_launch.py, with the paper recipes' loader workers (2 here) and the final export
RUN = [f"train.steps={STEPS}", "train.checkpoint_every=100", "data.num_workers=2"]


def test_scontrol_requeue_with_loader_workers_checkpoints_and_resumes_exactly(slurm_cluster, scene_root, tmp_path):
    ref = tmp_path / "local"
    reference = Background(submit("--cluster", "local", "--cpu-ranks-per-node", "2", "--run-dir", str(ref),
                                  f"data.root={scene_root}", *RUN), tmp_path / "local_logs")
    run = tmp_path / "run"
    job = Background(submit(*SLURM_TWO_NODES, "--run-dir", str(run), f"data.root={scene_root}", *RUN),
                     tmp_path / "logs", slurm_cluster.env)
    try:
        wait_for_first_step(run)
        # what preemption with PreemptMode=REQUEUE does too: SIGTERM to every process of the job, then requeue
        slurm_cluster.run("scontrol", "requeue", job_ids(run)[0])
        r = job.result(timeout=500)
        out = r.stdout
        assert r.returncode == 0, out[-3000:] + r.stderr[-3000:]
        job_id = job_ids(run)[0]
        assert "killed by signal" not in out + r.stderr
        stopped = int(re.search(r"stopping at step (\d+) on a signal \(SIGTERM\)", out).group(1))
        assert 1 <= stopped < STEPS   # the step the signal interrupted, not the last periodic checkpoint
        assert f"resumed from {run / 'checkpoints' / f'step_{stopped:07d}'}" in out
        assert f"SLURM job {job_id} completed on all 2 ranks" in out
        assert slurm_cluster.job(job_id)["Restarts"] == "1"

        local = reference.result(timeout=300)
        assert local.returncode == 0, local.stdout[-3000:] + local.stderr[-3000:]
        assert losses(run) == losses(ref)
        final, expected = (torch.load(p / "final" / "model.pt") for p in (run, ref))
        assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in expected)
    finally:
        job.stop()
        reference.stop()
        slurm_cluster.run("scancel", *job_ids(run), check=False)
