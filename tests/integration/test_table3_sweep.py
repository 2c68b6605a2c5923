"""`--sweep table3` end to end at toy length: 4 Harmon runs (one rank each, 2 steps), the scenes suite on
each, and the table from them; then one run left unevaluated is named.

    python -m pytest -q -m slow tests/integration/test_table3_sweep.py
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from tests.conftest import REPO, run_submit

pytestmark = pytest.mark.slow

ROWS = {"und": ["und"], "und_pix": ["und", "pix"], "und_pix_depth": ["und", "pix", "depth"],
        "und_pix_depth_seg": ["und", "pix", "depth", "seg"]}


def table(*paths) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "unimrg.eval.table", *map(str, paths)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_toy_sweep_makes_four_runs_and_their_table(tmp_path):
    out = tmp_path / "t3"
    res = run_submit(["--sweep", "table3", "--model", "harmon", "--seeds", "1", "--cluster", "local",
                      "--gpus-per-node", "0", "--cpu-ranks-per-node", "1", "--eval-scenes", "2", "--run-dir", str(out),
                      "train.steps=2", "train.checkpoint_every=2", "eval.every=0"])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "4 of 4 jobs finished" in res.stdout
    for row, tasks in ROWS.items():
        run = out / row / "seed0"
        cfg = OmegaConf.load(run / "config.yaml")
        assert list(cfg.objective.tasks) == tasks and cfg.train.seed == 0 and cfg.train.steps == 2
        assert (run / "final" / "model.pt").is_file() and (run / "eval" / "scenes.json").is_file()

    t = table(out)
    assert t.returncode == 0, t.stdout + t.stderr
    rows = [line for line in t.stdout.splitlines() if line.startswith("| harmon")]
    assert [[c.strip() == "✓" for c in line.split("|")[2:6]] for line in rows] == \
        [[t in tasks for t in ("und", "pix", "depth", "seg")] for tasks in ROWS.values()]
    # every row scored every column, also the generation tasks it did not train
    assert all("n/a" not in line and line.rstrip().endswith("1/1 (0) |") for line in rows)

    (out / "und_pix" / "seed0" / "eval" / "scenes.json").unlink()
    shutil.rmtree(out / "und" / "seed0")
    t = table(out)
    assert t.returncode == 1
    assert f"{out / 'und_pix' / 'seed0'} (harmon, und + pix, seed 0): not evaluated" in t.stdout
    assert f"{out / 'und' / 'seed0'} (harmon, und, seed 0): never started" in t.stdout
