"""Config merging, recipes and the batch arithmetic that --dry-run checks."""

import pytest

from unimrg.config import ConfigError, batch_arithmetic, load_config, recipe_path, validate


def test_tiny_recipe_with_overrides():
    cfg = load_config(recipe_path("openuni", "tiny"), ["train.steps=7", "run.dir=/tmp/x"], model="openuni")
    assert cfg.train.steps == 7
    assert cfg.model.size == "tiny"
    assert cfg.data.root == "/tmp/x/data"          # interpolation resolved against the override


def test_unknown_key_is_an_error_naming_it():
    with pytest.raises(ConfigError, match="no_such_field"):
        load_config(recipe_path("openuni", "tiny"), ["train.no_such_field=1"])


def test_paper_recipe_batch_arithmetic():
    cfg = load_config(recipe_path("openuni", "paper"))
    plan = validate(cfg, dp_size=8)
    # 4 per task × 4 tasks × 8 GPUs; round-robin: one task per micro-step.
    assert (plan.micro_batch, plan.grad_accum, plan.train_batch_size, plan.per_task_per_step) == (4, 4, 128, 4)
    assert cfg.optim.lr == 1e-5 and cfg.train.steps == 4000
    assert [(s.steps, s.tasks, s.freeze) for s in cfg.train.stages] == [(2000, [], []), (2000, ["pix"], ["understanding"])]


def test_global_batch_check_without_reference_gpus_names_the_fields():
    # (The paper recipes keep their global batch on other GPU counts: tests/unit/test_batching.py.)
    cfg = load_config(recipe_path("openuni", "paper"), ["train.batch_policy=fixed_per_gpu", "train.reference_gpus=0"])
    with pytest.raises(ConfigError, match=r"train.global_batch_size=128.*train.micro_batch_per_task"):
        validate(cfg, dp_size=4)


def test_round_robin_needs_accumulation_multiple_of_tasks():
    cfg = load_config(recipe_path("openuni", "tiny"), ["train.grad_accum=3"])
    with pytest.raises(ConfigError, match=r"train.grad_accum=3 must be a multiple of the 4 enabled tasks"):
        batch_arithmetic(cfg, 2)


def test_joint_schedule_packs_all_tasks_in_a_micro_step():
    cfg = load_config(recipe_path("openuni", "tiny"), ["objective.schedule=joint", "train.grad_accum=5"])
    plan = batch_arithmetic(cfg, 2)
    assert (plan.micro_batch, plan.per_task_per_step, plan.train_batch_size) == (8, 10, 80)


@pytest.mark.parametrize("row,tasks,ga", [("und", ["und"], 4), ("und_pix", ["und", "pix"], 4),
                                          ("und_pix_depth", ["und", "pix", "depth"], 3)])
def test_table3_rows_inherit_the_paper_recipe(row, tasks, ga):
    cfg = load_config(recipe_path("openuni", row))
    assert cfg.objective.tasks == tasks and cfg.train.grad_accum == ga
    assert cfg.optim.lr == 1e-5          # inherited
    validate(cfg, dp_size=8)


def test_checkpoint_every_zero_means_only_end_and_signals_and_negative_is_refused():
    from unimrg.trainer import checkpoint_due
    assert [s for s in range(1, 9) if checkpoint_due(s, 4)] == [4, 8]
    assert not any(checkpoint_due(s, 0) for s in range(1, 9))     # used to divide by zero
    cfg = load_config(recipe_path("openuni", "tiny"), ["train.checkpoint_every=-1"], model="openuni")
    with pytest.raises(ConfigError, match="train.checkpoint_every=-1"):
        validate(cfg, 2)
