"""The Table 3 reader and the sweep's argument checks (no training: run folders written here).

    python -m pytest -q tests/unit/test_table3.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from launch import submit
from unimrg.eval import table

ROWS = [["und"], ["und", "pix"], ["und", "pix", "depth"], ["und", "pix", "depth", "seg"]]


def fake_run(path, tasks, seed, metrics=None, final=True, logged_step=0):
    """A run folder as the trainer and the scenes suite leave it (only the files the table reads)."""
    path.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"model": {"name": "harmon"}, "objective": {"tasks": tasks},
                                     "train": {"seed": seed, "steps": 20}}), path / "config.yaml")
    if logged_step:
        (path / "metrics").mkdir()
        (path / "metrics" / "rank0.jsonl").write_text("".join(json.dumps({"step": s}) + "\n"
                                                              for s in range(1, logged_step + 1)))
    if final:
        (path / "final").mkdir()
        (path / "final" / "model.pt").write_bytes(b"weights")
    if metrics is not None:
        (path / "eval").mkdir()
        (path / "eval" / "scenes.json").write_text(json.dumps({"metrics": metrics}))
    return path


def scene_metrics(k):
    return {"und_accuracy/closer": 0.5 + k / 10, "und_accuracy/left_right": 0.3, "und_accuracy/count": 0.25,
            "und_accuracy/exists": 1.0, "und_accuracy/hallucination": 0.0, "depth_similarity": 0.7 + k / 100,
            "seg_boundary_f1": 0.2, "recon_psnr": 12.0 + k}


def test_rows_in_paper_order_with_mean_and_std_over_seeds(tmp_path, capsys):
    runs = [fake_run(tmp_path / f"r{i}s{s}", tasks, s, scene_metrics(s))
            for i, tasks in reversed(list(enumerate(ROWS))) for s in (0, 1)]
    assert table.main([str(r) for r in runs]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| harmon")]
    marks = [[c.strip() == "✓" for c in line.split("|")[2:6]] for line in rows]
    assert marks == [[t in tasks for t in ("und", "pix", "depth", "seg")] for tasks in ROWS]
    cells = [c.strip() for c in rows[0].split("|")[1:-1]]
    # spatial = mean(closer, left_right): seeds 0.40, 0.45 → 42.5 ± 3.5; halluc. = mean(exists, absent) = 50
    assert cells[5:] == ["42.5 ± 3.5", "25.0 ± 0.0", "50.0 ± 0.0", "70.5 ± 0.7", "20.0 ± 0.0", "12.5 ± 0.7",
                         "2/2 (0,1)"]
    assert "incomplete" not in out


def test_missing_and_unfinished_runs_are_named_and_fail(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    done = fake_run(sweep / "und" / "seed0", ["und"], 0, scene_metrics(0))
    fake_run(sweep / "und" / "seed1", ["und"], 1, final=False, logged_step=7)
    fake_run(sweep / "und_pix" / "seed0", ["und", "pix"], 0, metrics=None)
    broken = fake_run(tmp_path / "broken", ["und"], 2, metrics={})
    (broken / "eval" / "scenes.json").write_text('{"metrics": {"und_acc')
    jobs = [{"row": "und", "recipe": "und_tiny", "tasks": ["und"], "seed": s,
             "run_dir": str(sweep / "und" / f"seed{s}")} for s in (0, 1)]
    jobs += [{"row": "und_pix", "recipe": "und_pix_tiny", "tasks": ["und", "pix"], "seed": 0,
              "run_dir": str(sweep / "und_pix" / "seed0")},
             {"row": "und_pix_depth_seg", "recipe": "tiny", "tasks": ["und", "pix", "depth", "seg"], "seed": 0,
              "run_dir": str(sweep / "und_pix_depth_seg" / "seed0")}]
    (sweep / "sweep.json").write_text(json.dumps({"model": "harmon", "jobs": jobs}))
    assert table.main([str(sweep), str(broken)]) == 1
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| harmon")]
    assert len(rows) == 3 and rows[0].startswith("| harmon * ") and "1/3 (0)" in rows[0]
    assert f"{broken} (harmon, und, seed 2): unreadable eval/scenes.json" in out
    assert "n/a" in rows[1] and "0/1" in rows[1] and "n/a" in rows[2]
    assert f"{sweep / 'und' / 'seed1'} (harmon, und, seed 1): training unfinished (reached step 7 of 20" in out
    assert f"{sweep / 'und_pix' / 'seed0'} (harmon, und + pix, seed 0): not evaluated" in out
    assert f"{sweep / 'und_pix_depth_seg' / 'seed0'} (harmon, und + pix + depth + seg, seed 0): never started" in out
    assert str(done) + " " not in out


@pytest.mark.parametrize("extra,message", [
    ([], "needs --run-dir"),
    (["--run-dir", "RUN", "train.seed=3"], "sets train.seed"),
    (["--run-dir", "RUN", "--recipe", "tiny"], "leave out --recipe"),
    (["--run-dir", "RUN", "--seeds", "0"], "--seeds 0"),
    (["--run-dir", "RUN", "train.grad_accum=3"], "impossible batch arithmetic"),   # und + pix: 2 tasks
])
def test_sweep_refuses_bad_arguments_before_starting(tmp_path, capsys, extra, message):
    argv = ["--sweep", "table3", "--model", "harmon", "--gpus-per-node", "0",
            *[str(tmp_path / a) if a == "RUN" else a for a in extra]]
    assert submit.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.rglob("config.yaml"))


@pytest.mark.parametrize("model", ["harmon", "openuni"])
def test_a_rerun_must_be_the_same_sweep(tmp_path, model):
    from launch import sweep
    args = submit.parse_args(["--sweep", "table3", "--model", model, "--seeds", "2", "--gpus-per-node", "0",
                              "--run-dir", str(tmp_path), "train.steps=3"])
    manifest = sweep.write_manifest(args, tmp_path)
    assert [(j["row"], j["seed"]) for j in manifest["jobs"]][:5] == [
        ("und", 0), ("und_pix", 0), ("und_pix_depth", 0), ("und_pix_depth_seg", 0), ("und", 1)]
    assert manifest["jobs"][2]["tasks"] == ["und", "pix", "depth"]
    assert sweep.write_manifest(args, tmp_path) == manifest            # the same command again: fine
    args.overrides = ["train.steps=4"]
    with pytest.raises(ValueError, match="describes another sweep"):
        sweep.write_manifest(args, tmp_path)


def test_a_rerun_skips_finished_runs_resumes_started_ones_and_evaluates_trained_ones(tmp_path):
    from launch import sweep
    args = submit.parse_args(["--sweep", "table3", "--model", "harmon", "--gpus-per-node", "0",
                              "--run-dir", str(tmp_path), "train.steps=3"])
    manifest = sweep.write_manifest(args, tmp_path)
    runs = [Path(j["run_dir"]) for j in manifest["jobs"]]
    fake_run(runs[0], ["und"], 0, scene_metrics(0))                        # finished
    fake_run(runs[1], ["und", "pix"], 0, final=False)                     # started, no final weights
    fake_run(runs[2], ["und", "pix", "depth"], 0)                         # trained, not evaluated
    cmds = [sweep.job_commands(manifest, i) for i in range(4)]
    assert cmds[0] is None
    train, evaluate = cmds[1]
    assert train[-2:] == ["--resume", "latest"] and "train.steps=3" not in train   # frozen config.yaml
    assert evaluate[2:4] == ["unimrg.eval.job", "--config"] and str(runs[1] / "config.yaml") in evaluate
    assert len(cmds[2]) == 1 and "unimrg.eval.job" in cmds[2][0]
    fresh = cmds[3][0]
    assert fresh[fresh.index("--recipe") + 1] == "tiny" and fresh[-2:] == ["train.steps=3", "train.seed=0"]
    assert "--resume" not in fresh
