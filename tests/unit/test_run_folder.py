"""The run folder contract at launch time (``--prepare-only``: the folder is written, no rank starts).

    OMP_NUM_THREADS=1 python -m pytest tests/unit/test_run_folder.py -q

The checkpoint here is the marker the trainer writes last (tests/integration/test_run_folder_resume.py trains
and resumes for real).
"""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from launch import submit
from launch.train import parse_args as train_args


def launch(capsys, run, *args: str) -> tuple[int, str]:
    code = submit.main(["--model", "openuni", "--recipe", "tiny", "--prepare-only", "--gpus-per-node", "0",
                        "--run-dir", str(run), *args])
    out = capsys.readouterr()
    return code, out.out + out.err


def fake_checkpoint(run, step: int, world: int = 2) -> None:
    folder = run / "checkpoints" / f"step_{step:07d}"
    folder.mkdir(parents=True)
    (folder / "COMPLETE").write_text(f"{world}\n")
    (run / "checkpoints" / "latest").write_text(folder.name)


@pytest.fixture
def run(tmp_path, scene_root, capsys):
    """A run launched with the bug report's overrides, holding a checkpoint at step 4."""
    run = tmp_path / "run"
    code, out = launch(capsys, run, f"data.root={scene_root}", "train.steps=8", "train.stop_after=4", "optim.lr=2e-4")
    assert code == 0, out
    fake_checkpoint(run, 4)
    return run


def frozen(run):
    return OmegaConf.load(run / "config.yaml")


def test_resume_reuses_the_frozen_config(capsys, run, scene_root):
    code, out = launch(capsys, run, "--resume", "latest")   # no data.root, no lr: taken from the folder
    assert code == 0, out
    cfg = frozen(run)
    assert (cfg.optim.lr, cfg.train.steps, cfg.data.root) == (2e-4, 8, str(scene_root))
    assert cfg.train.stop_after == 0 and cfg.run.resume == "latest"   # per launch: this one runs to the end
    history = json.loads((run / "submission.json").read_text())
    assert [(e["launch"], e["kind"]) for e in history["launches"]] == [(1, "first"), (2, "resume")]
    assert history["launches"][1]["resumed_from"].endswith("step_0000004") and history["amendments"] == []


def test_resume_refuses_an_override_that_changes_the_run(capsys, run, scene_root):
    before = (run / "config.yaml").read_text()
    code, out = launch(capsys, run, "--resume", "latest", "optim.lr=1e-3")
    assert code == 2 and "optim.lr=0.001 (this run has 0.0002)" in out and "--run-dir" in out
    code, out = launch(capsys, run, "run.resume=latest", "data.root=/elsewhere")
    assert code == 2 and "data.root='/elsewhere'" in out
    assert (run / "config.yaml").read_text() == before                     # nothing written
    code, out = launch(capsys, run, "--resume", "latest", "optim.lr=2e-4", f"data.root={scene_root}")
    assert code == 0, out                                                  # the same values: no change


def test_resumable_fields_are_recorded_as_amendments(capsys, run):
    code, out = launch(capsys, run, "--resume", "latest", "train.steps=12", "train.checkpoint_every=2")
    assert code == 0 and "amended train.steps: 8 -> 12 from step 5" in out
    assert frozen(run).train.steps == 12
    history = json.loads((run / "submission.json").read_text())
    assert {(a["field"], a["from"], a["to"], a["after_step"], a["launch"]) for a in history["amendments"]} == {
        ("train.steps", 8, 12, 4, 2), ("train.checkpoint_every", 10, 2, 4, 2)}
    assert "# amended at launch 2: train.steps 8 -> 12 from step 5 on" in (run / "config.yaml").read_text()
    code, out = launch(capsys, run, "--resume", "latest", "train.steps=3")
    assert code == 2 and "below step 4" in out


def test_launch_into_a_folder_with_checkpoints_needs_resume_or_a_new_run_dir(capsys, run, scene_root):
    code, out = launch(capsys, run, f"data.root={scene_root}")
    assert code == 2 and "--resume latest" in out and "new --run-dir" in out and "step_0000004" in out


def test_resume_with_another_model_recipe_or_rank_count_is_refused(capsys, run):
    code, out = submit.main(["--model", "harmon", "--prepare-only", "--gpus-per-node", "0", "--run-dir", str(run),
                             "--resume", "latest"]), capsys.readouterr().err
    assert code == 2 and "openuni run" in out
    code, out = launch(capsys, run, "--resume", "latest", "--recipe", "paper")
    assert code == 2 and "--recipe tiny" in out
    code, out = launch(capsys, run, "--resume", "latest", "--cpu-ranks-per-node", "1")
    assert code == 2 and "written by 2 ranks" in out


def test_train_accepts_the_deepspeed_launchers_local_rank():
    assert train_args(["--local_rank=3", "--config", "RUN/config.yaml"]).local_rank == 3
    assert train_args(["--config", "c.yaml", "--local-rank", "1"]).local_rank == 1
    assert train_args(["--config", "c.yaml"]).local_rank is None


def test_dry_run_of_a_resume_shows_the_amendment_and_writes_nothing(capsys, run):
    before = {p.name: p.read_text() for p in (run / "config.yaml", run / "submission.json")}
    code, out = launch(capsys, run, "--resume", "latest", "train.steps=20", "--dry-run")
    assert code == 0 and "from step_0000004" in out and "amended train.steps: 8 -> 20 from step 5" in out
    assert before == {p.name: p.read_text() for p in (run / "config.yaml", run / "submission.json")}


def test_steps_logged_after_the_resumed_checkpoint_are_set_aside(tmp_path):
    """A launch killed after step 6 with its last checkpoint at 4: the resume re-runs 5 and 6."""
    from unimrg.trainer import Trainer
    path = tmp_path / "rank0.jsonl"
    path.write_text("".join(json.dumps({"step": s, "lr": 0.1}) + "\n" for s in range(1, 7)))
    Trainer.set_aside_rows_after(path, 4)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
    discarded = tmp_path / "rank0.jsonl.discarded"
    assert [json.loads(line)["step"] for line in discarded.read_text().splitlines()] == [5, 6]
