"""What ``launch/submit.py --dry-run`` (and every launch, before ranks start) must catch.

    OMP_NUM_THREADS=1 python -m pytest tests/unit/test_dry_run_checks.py -q
"""

from __future__ import annotations

import json

import pytest

from launch import submit
from unimrg.config import REPO


def dry_run(capsys, model: str, recipe: str, *overrides: str, gpus: int = 0, extra: tuple = ()) -> tuple[int, str, str]:
    code = submit.main(["--model", model, "--recipe", recipe, "--dry-run", "--gpus-per-node", str(gpus),
                        *extra, *overrides])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_full_size_without_official_weights_needs_model_init_random(capsys, scene_root):
    code, _, err = dry_run(capsys, "showo", "paper", f"data.root={scene_root}", gpus=8)
    assert code == 2 and "model.checkpoint" in err and "model.init=random" in err
    code, out, _ = dry_run(capsys, "showo", "paper", f"data.root={scene_root}", "model.init=random", gpus=8)
    assert code == 0 and "dry run" in out
    code, _, err = dry_run(capsys, "showo", "paper", f"data.root={scene_root}", "model.init=random",
                           f"model.checkpoint={scene_root}", gpus=8)
    assert code == 2 and "drop one" in err


def test_the_launch_header_of_a_multi_stage_run_counts_the_first_stage(capsys, scene_root):
    # the batch the header describes is stage 1's; it used to be multiplied by every stage's tasks
    code, out, err = dry_run(capsys, "openuni", "tiny", f"data.root={scene_root}", "objective.tasks=[und,depth]",
                             "train.stages=[{steps: 10, tasks: [depth]}, {steps: 10}]")
    assert code == 0, err
    assert "stage 1/2: 16 per task × 1 tasks = 16 samples per optimizer step" in out
    assert "stage 2/2 ['und', 'depth'] on 2 GPUs" in out        # the per-stage plan lines


def test_zero_stage_disagreeing_with_the_json_is_caught_before_ranks_start(capsys, scene_root):
    code, _, err = dry_run(capsys, "openuni", "tiny", f"data.root={scene_root}", "train.zero_stage=3")
    assert code == 2
    assert "zero_optimization.stage=2" in err and "train.zero_stage=3" in err and "zero2_tiny.json" in err


@pytest.mark.parametrize("block", ["optimizer", "scheduler"])
def test_optimizer_or_scheduler_block_in_the_json_is_refused(capsys, scene_root, tmp_path, block):
    ds = json.loads((REPO / "ds_configs" / "zero2_tiny.json").read_text())
    ds[block] = {"type": "AdamW" if block == "optimizer" else "WarmupLR", "params": {}}
    path = tmp_path / "zero2_with_block.json"
    path.write_text(json.dumps(ds))
    code, _, err = dry_run(capsys, "openuni", "tiny", f"data.root={scene_root}", f"train.ds_config={path}")
    assert code == 2 and f"'{block}' block" in err and "the recipe owns them" in err and str(path) in err


@pytest.mark.parametrize("model,field", [("harmon", "llm_path"), ("harmon", "vae_path"),
                                         ("showo", "magvit_checkpoint"), ("showo", "clip_checkpoint"),
                                         ("showo", "tokenizer"), ("openuni", "tokenizer"),
                                         ("openuni", "internvl_path")])
def test_every_model_path_the_run_reads_must_exist(capsys, scene_root, tmp_path, model, field):
    missing = tmp_path / "no_such_weights"
    code, _, err = dry_run(capsys, model, "tiny", f"data.root={scene_root}", f"model.{field}={missing}")
    assert code == 2 and f"model.{field}={missing}: no such file or folder" in err


def test_missing_data_root_is_named(capsys, tmp_path):
    code, _, err = dry_run(capsys, "openuni", "tiny", f"data.root={tmp_path / 'nothing'}", "data.scenes=0")
    assert code == 2 and "not a prepared Energon dataset" in err


def test_memory_estimate_against_gpu_mem_gb(capsys, scene_root):
    """Show-o-1.3B's model states on 8 GPUs: ~8.9 GiB under ZeRO-1 (the recipe's), ~3.6 GiB under ZeRO-3."""
    args = ("showo", "paper", f"data.root={scene_root}", "model.init=random")
    code, _, err = dry_run(capsys, *args, gpus=8, extra=("--gpu-mem-gb", "5"))
    assert code == 2 and "more than --gpu-mem-gb 5" in err and "ZeRO-3" in err and "train.zero_stage=3" in err
    code, out, _ = dry_run(capsys, *args, gpus=8, extra=("--gpu-mem-gb", "80"))
    assert code == 0 and "memory: model states" in out and "under ZeRO-1 on 8 GPU(s)" in out


def test_memory_estimate_is_deepspeeds():
    """unimrg.memory (no DeepSpeed import at dry run) gives DeepSpeed's own estimator numbers."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from unimrg.memory import model_state_bytes
    stats = {"trainable": 1_300_000_000, "frozen": 0, "largest_layer": 50_000_000, "total": 1_300_000_000}
    for gpn, nodes in ((8, 1), (8, 8), (1, 1)):
        _, z2 = estimate_zero2_model_states_mem_needs(stats["trainable"], gpn, nodes, cpu_offload=False)
        _, z3, _ = estimate_zero3_model_states_mem_needs(stats["trainable"], stats["largest_layer"], gpn, nodes,
                                                         cpu_offload=False, cpu_offload_params=False)
        assert model_state_bytes(stats, 2, gpn * nodes) == z2
        assert model_state_bytes(stats, 3, gpn * nodes) == z3
