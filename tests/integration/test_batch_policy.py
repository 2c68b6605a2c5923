"""Task-parallel placement on real DeepSpeed ranks: the same global batch laid out two ways trains the same.

    python -m pytest tests/integration/test_batch_policy.py -q

World size 1, round-robin (und, pix, und, pix: 4 micro-steps of 1) against world size 2, task-parallel
(rank 0 runs und, rank 1 pix: 2 micro-steps of 1 each; the recipe's ZeRO-2 JSON runs as ZeRO-1; stopped
after step 2 and resumed). Rank 0 never touches the generation modules, so the step also checks that
every rank reduces a gradient for every parameter (without that, the ranks' reductions mismatch: gloo
fails "Received data size doesn't match expected size"). fp32, tiny OpenUni, generated scenes.
Also: the dry run of every paper recipe on 8×8 GPUs prints its plan.
"""

from __future__ import annotations

import json

import pytest

from launch.submit import main as submit_main
from tests.integration.test_train_openuni import metrics, train

COMMON = ["objective.tasks=[und,pix]", "train.micro_batch_per_task=1", "train.grad_accum=4", "train.steps=4",
          "train.export_final=false", "train.checkpoint_every=100", "run.tensorboard=false"]


@pytest.mark.parametrize("model,batch,placement", [("openuni", 128, "task-parallel, 4 groups × 16 ranks"),
                                                   ("harmon", 512, "replicated round-robin"),
                                                   ("showo", 320, "task-parallel, 4 groups × 16 ranks")])
def test_dry_run_of_each_paper_recipe_on_8x8_gpus_prints_the_plan(tmp_path, scene_root, model, batch, placement,
                                                                  capsys):
    # In-process (the same main() as the command line): a subprocess would spend its time importing.
    code = submit_main(["--model", model, "--recipe", "paper", "--nodes", "8", "--gpus-per-node", "8", "--dry-run",
                        "--run-dir", str(tmp_path / "run"), f"data.root={scene_root}", "model.init=random"])
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    assert "on 64 GPUs (recipe written for 8)" in out and placement in out
    assert f"(global batch {batch}, fixed_global)" in out and "micro-steps" in out and "effective lr" in out
    assert not (tmp_path / "run").exists()


def test_dry_run_of_an_impossible_count_says_what_to_change(tmp_path, scene_root, capsys):
    code = submit_main(["--model", "openuni", "--recipe", "und_pix_depth", "--nodes", "8", "--gpus-per-node", "8",
                        "--dry-run", f"data.root={scene_root}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "GPU counts that keep it: [" in err and "train.batch_policy=fixed_per_gpu" in err


@pytest.mark.slow
def test_task_parallel_world_2_trains_like_round_robin_world_1(tmp_path, scene_root):
    ref, tp = tmp_path / "round_robin_ws1", tmp_path / "task_parallel_ws2"
    train(ref, scene_root, "--cpu-ranks-per-node", "1", *COMMON)
    # Interrupted after step 2 and resumed: a task-parallel run resumes exactly too.
    tp_args = [*COMMON, "train.batch_policy=fixed_global", "train.global_batch_size=4", "train.placement=task_parallel"]
    res = train(tp, scene_root, *tp_args, "train.stop_after=2")
    assert "task-parallel: 2 groups of 1 ranks" in res.stdout
    train(tp, scene_root, *tp_args, "run.resume=latest")

    ds = json.loads((tp / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 1 and ds["zero_optimization"]["overlap_comm"] is False
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (1, 2, 4)

    # Each rank ran only its group's task, and every step covered both tasks with the paper's counts.
    assert all(r["samples"] == {"und": 2} for r in metrics(tp, 0))
    assert all(r["samples"] == {"pix": 2} for r in metrics(tp, 1))
    a, b = metrics(ref, 0), metrics(tp, 0)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["global_samples"] for r in a] == [r["global_samples"] for r in b] == [{"und": 2, "pix": 2}] * 4
    # Same losses up to float reordering of the gradient sums (step 1 exactly: same weights, same data).
    assert a[0]["global_losses"] == b[0]["global_losses"]
    for ra, rb in zip(a, b):
        for t in ("und", "pix"):
            assert rb["global_losses"][t] == pytest.approx(ra["global_losses"][t], rel=1e-4, abs=1e-6), (ra, rb)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4)
    # The run moved: a test comparing four copies of the initial loss would prove nothing.
    assert a[-1]["global_losses"] != a[0]["global_losses"]
