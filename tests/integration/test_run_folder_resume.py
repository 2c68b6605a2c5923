"""A run folder keeps its word across launches: the bug report's run, stopped and resumed for real.

    python -m pytest tests/integration/test_run_folder_resume.py -q

Launched with train.steps=8 train.stop_after=4 optim.lr=2e-4 and a custom data.root, then resumed with
``--resume latest train.steps=12``: the resume keeps lr and data.root, runs steps 5..12 once, records
the amendment, and the logged lr of every step is the rate that step used. Ranks started by hand on an
edited config refuse to continue the checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from tests.conftest import REPO
from tests.integration.test_train_openuni import metrics, train

pytestmark = pytest.mark.slow


def schedule(steps: int, lr: float = 2e-4, warmup_fraction: float = 0.5):
    """The trainer's warm-up + cosine (unimrg.trainer.lr_lambda), for the expected values."""
    from unimrg.config import Config, OptimConfig
    from unimrg.trainer import lr_lambda
    f = lr_lambda(Config(optim=OptimConfig(lr=lr, warmup_fraction=warmup_fraction, min_lr_ratio=0.0)), steps)
    return lambda step: lr * f(step - 1)     # the rate of optimizer step `step` (1-based)


def tb_scalars(run_dir, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_stop_resume_extend_keeps_the_run_and_logs_the_lr_each_step_used(tmp_path, scene_root):
    run = tmp_path / "run"
    first = train(run, scene_root, "train.steps=8", "train.stop_after=4", "optim.lr=2e-4",
                  "optim.warmup_fraction=0.5")
    assert "run stopped (train.stop_after) at step 4/8 | final losses und " in first.stdout
    assert f"checkpoint {run / 'checkpoints' / 'step_0000004'} | continue with --resume latest" in first.stdout

    # ranks started on an edited config (here: launch/train.py by hand) refuse to continue the checkpoint
    assert (run / "checkpoints" / "step_0000004" / "config.yaml").is_file()
    edited = OmegaConf.load(run / "config.yaml")
    edited.optim.lr, edited.run.resume = 1e-3, "latest"
    OmegaConf.save(edited, tmp_path / "edited.yaml")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                          str(REPO / "launch" / "train.py"), "--config", str(tmp_path / "edited.yaml")],
                         capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert res.returncode != 0 and "optim.lr=0.001 (this run has 0.0002)" in res.stderr, res.stderr[-3000:]

    # as the README says, plus an extension; no data.root, no lr: both come from the frozen config
    second = train(run, scene_root, "--resume", "latest", "train.steps=12")
    assert "amended train.steps: 8 -> 12 from step 5" in second.stdout
    assert "run finished at step 12/12 | final losses und " in second.stdout
    assert f"final weights {run / 'final' / 'model.pt'}" in second.stdout and (run / "final" / "model.pt").is_file()

    cfg = OmegaConf.load(run / "config.yaml")
    assert (cfg.optim.lr, cfg.train.steps, cfg.data.root) == (2e-4, 12, str(scene_root))
    assert not (run / "data").exists()                   # no scenes generated into another root
    history = json.loads((run / "submission.json").read_text())
    assert [e["kind"] for e in history["launches"]] == ["first", "resume"]
    assert [(a["field"], a["from"], a["to"], a["after_step"]) for a in history["amendments"]] == [
        ("train.steps", 8, 12, 4)]

    old, new = schedule(8), schedule(12)
    expected = {s: old(s) for s in range(1, 5)} | {s: new(s) for s in range(5, 13)}
    assert old(1) != old(2) and old(5) != new(5)         # the checks below can tell the steps apart
    for rank in (0, 1):
        rows = metrics(run, rank)
        assert [r["step"] for r in rows] == list(range(1, 13))
        assert [r["lr"] for r in rows] == pytest.approx([expected[s] for s in range(1, 13)], rel=1e-9)
    tb = tb_scalars(run, "lr")
    assert sorted(tb) == list(range(1, 13))
    assert [tb[s] for s in range(1, 13)] == pytest.approx([expected[s] for s in range(1, 13)], rel=1e-6)
