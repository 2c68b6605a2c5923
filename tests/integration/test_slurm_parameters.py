"""launch/slurm.py's translation of submit.py's arguments into sbatch parameters (no cluster needed).

    python -m pytest tests/integration/test_slurm_parameters.py -q
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import submitit

from launch.slurm import master_port, parse_time, sbatch_parameters


def args(**kw) -> argparse.Namespace:
    base = dict(model="showo", recipe="paper", nodes=2, gpus_per_node=8, cpu_ranks_per_node=2, partition=None,
                account=None, qos=None, time="24:00:00", constraint=None, mem=None, max_requeues=5, slurm=[])
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.parametrize("text, minutes", [
    ("90", 90), ("10:30", 11), ("02:00:00", 120), ("1-00", 1440), ("1-02:30", 1590), ("2-00:00:01", 2881)])
def test_parse_time_reads_slurm_formats(text, minutes):
    assert parse_time(text) == minutes


def test_parse_time_rejects_garbage():
    with pytest.raises(ValueError, match="--time '3h'"):
        parse_time("3h")


def test_gpu_job_runs_one_task_per_gpu_with_nccl_env():
    p = sbatch_parameters(args(partition="gpu", account="proj", qos="high", mem="500G", constraint="h100"))
    assert (p["nodes"], p["ntasks_per_node"], p["gpus_per_node"], p["time"]) == (2, 8, 8, 1440)
    assert (p["partition"], p["account"], p["qos"], p["mem"], p["constraint"]) == ("gpu", "proj", "high", "500G", "h100")
    assert "--kill-on-bad-exit=1" in p["srun_args"]
    assert "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in p["setup"]
    assert p["job_name"] == "unimrg-showo-paper"


def test_cpu_job_uses_cpu_ranks_and_gloo_env():
    p = sbatch_parameters(args(gpus_per_node=0, cpu_ranks_per_node=1))
    assert p["ntasks_per_node"] == 1 and "gpus_per_node" not in p
    assert any("DS_ACCELERATOR=cpu" in line for line in p["setup"])


def test_extra_slurm_options_known_and_verbatim():
    p = sbatch_parameters(args(slurm=["cpus-per-task=10", "exclusive=true", "reservation=demo"]))
    assert p["cpus_per_task"] == 10 and p["exclusive"] is True
    assert p["additional_parameters"] == {"reservation": "demo"}
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        sbatch_parameters(args(slurm=["exclusive"]))


def test_sbatch_script_text(tmp_path):
    """What submitit writes into RUN/slurm/<job>/<job>_submission.sh."""
    ex = submitit.SlurmExecutor(folder=tmp_path / "%j")
    ex.update_parameters(**sbatch_parameters(args(slurm=["reservation=demo"])))
    text = ex._make_submission_file_text("python -u -m submitit.core._submit x", "uid")
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --time=1440", "#SBATCH --signal=USR2@120", "#SBATCH --reservation=demo",
                 "srun --unbuffered", "--kill-on-bad-exit=1"):
        assert line in text, text


def test_master_port_is_per_job_and_in_range():
    assert master_port("123") == master_port(123) == 10123
    assert master_port("60000") == 20000 and master_port("7_3") == 10007
    assert len({master_port(j) for j in range(1000, 1100)}) == 100


def test_repo_is_on_the_jobs_pythonpath():
    p = sbatch_parameters(args())
    assert p["setup"][0].startswith(f"export PYTHONPATH={Path(__file__).resolve().parents[2]}")
