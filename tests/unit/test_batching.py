"""The batch planner (unimrg/batching.py via unimrg.config.batch_arithmetic): every paper recipe on
8×8 GPUs, task-parallel placement, impossible combinations, fixed_per_gpu learning-rate scaling.

    python -m pytest tests/unit/test_batching.py -q
"""

import math

import pytest

from unimrg.config import ConfigError, batch_arithmetic, load_config, plan_report, recipe_path, stage_config, \
    stage_plans, validate

PAPER = {"openuni": 128, "harmon": 512, "showo": 320, "janus": 512}


def paper(model, *overrides):
    return load_config(recipe_path(model, "paper"), list(overrides), model=model)


def stage_plan(cfg, stage, dp):
    return batch_arithmetic(stage_config(cfg, stage_plans(cfg)[stage][2]), dp)


@pytest.mark.parametrize("model", sorted(PAPER))
def test_every_paper_recipe_plans_on_8x8_gpus_keeping_its_global_batch(model):
    cfg = paper(model)
    assert cfg.train.batch_policy == "fixed_global" and cfg.train.reference_gpus == 8
    validate(cfg, dp_size=64)
    for i in range(len(stage_plans(cfg))):
        plan = stage_plan(cfg, i, 64)
        assert plan.train_batch_size == PAPER[model] == plan.micro_batch * plan.grad_accum * 64
        assert plan.per_task_global * len(plan.tasks) == PAPER[model]
        # Every task gets its count: sum over ranks and micro-steps of the batches each rank runs.
        seen = {t: 0 for t in plan.tasks}
        for rank in range(64):
            for micro in range(plan.grad_accum):
                for t in plan.micro_step_tasks(rank, micro):
                    seen[t] += plan.micro_per_task
        assert seen == {t: plan.per_task_global for t in plan.tasks}
        assert plan.lr == cfg.optim.lr
    text = "\n".join(plan_report(cfg, 64))
    assert "per task per optimizer step" in text and "effective lr" in text and "micro-steps" in text


def test_at_the_reference_gpu_count_the_plan_is_the_recipe():
    for model in PAPER:
        cfg = paper(model)
        plan = stage_plan(cfg, 0, 8)
        assert (plan.placement, plan.micro_per_task, plan.grad_accum) == (
            "replicated", cfg.train.micro_batch_per_task, cfg.train.grad_accum)


def test_openuni_on_64_gpus_is_task_parallel_16_ranks_per_task_2_samples_each():
    cfg = paper("openuni")
    plan = stage_plan(cfg, 0, 64)
    assert (plan.placement, plan.groups, plan.group_size, plan.micro_batch, plan.grad_accum) == (
        "task_parallel", 4, 16, 2, 1)
    assert plan.zero_stage == 1 and plan.loss_scale == 1
    assert [plan.rank_tasks(r) for r in (0, 15, 16, 63)] == [["und"], ["und"], ["pix"], ["seg"]]
    assert [plan.rank_in_group(r) for r in (0, 15, 16, 63)] == [0, 15, 0, 15]   # each task's data shards
    stage2 = stage_plan(cfg, 1, 64)          # pixel-only: one task, replicated is enough
    assert (stage2.placement, stage2.micro_batch, stage2.grad_accum, stage2.train_batch_size) == ("replicated", 2, 1, 128)


def test_harmon_on_64_gpus_stays_round_robin_with_micro_batch_2():
    plan = stage_plan(paper("harmon"), 0, 64)
    assert (plan.placement, plan.micro_batch, plan.grad_accum, plan.zero_stage) == ("replicated", 2, 4, 1)


def test_showo_joint_on_64_gpus_scales_the_one_task_loss_to_the_joint_gradient():
    plan = stage_plan(paper("showo"), 0, 64)
    assert (plan.placement, plan.groups, plan.micro_batch, plan.grad_accum) == ("task_parallel", 4, 5, 1)
    # A joint micro-step's loss is Σ_t λ_t L_t; a one-task micro-step holds one term: ×4 keeps the step.
    assert plan.loss_scale == 4 and plan.per_task_global == 80


def test_task_groups_smaller_than_the_task_count():
    # 2 ranks, 4 tasks: rank 0 cycles und/pix, rank 1 depth/seg; each task 2 × 1 per step.
    cfg = load_config(recipe_path("openuni", "tiny"), ["train.batch_policy=fixed_global",
                                                       "train.global_batch_size=8", "train.placement=task_parallel"])
    plan = batch_arithmetic(cfg, 2)
    assert (plan.groups, plan.micro_per_task, plan.grad_accum) == (2, 2, 2)
    assert [plan.micro_step_tasks(0, m) for m in range(2)] == [["und"], ["pix"]]
    assert [plan.micro_step_tasks(1, m) for m in range(2)] == [["depth"], ["seg"]]


def test_impossible_combination_names_working_gpu_counts_and_the_other_policy():
    cfg = load_config(recipe_path("openuni", "und_pix_depth"))    # 96 = 4 × 3 tasks × 8 GPUs
    with pytest.raises(ConfigError) as e:
        validate(cfg, dp_size=64)
    msg = str(e.value)
    assert "impossible on 64 ranks" in msg and "train.batch_policy=fixed_per_gpu" in msg
    working = [int(x) for x in msg.split("GPU counts that keep it: [")[1].split("]")[0].split(", ")]
    assert 8 in working and 48 in working and 64 not in working
    for w in working:
        validate(cfg, dp_size=w)     # every count it names does plan


def test_zero3_cannot_run_task_parallel():
    with pytest.raises(ConfigError, match=r"ZeRO-3.*deadlock"):
        batch_arithmetic(paper("openuni", "train.zero_stage=3"), 64)


def test_fixed_per_gpu_scales_batch_and_lr_by_the_rule():
    lr = 1e-5
    for rule, factor in (("none", 1.0), ("linear", 8.0), ("sqrt", math.sqrt(8))):
        cfg = paper("openuni", "train.batch_policy=fixed_per_gpu", f"optim.lr_scaling={rule}")
        plan = stage_plan(cfg, 0, 64)
        assert (plan.placement, plan.micro_batch, plan.grad_accum, plan.train_batch_size) == ("replicated", 4, 4, 1024)
        assert plan.lr == pytest.approx(lr * factor)
        assert f"effective lr {lr * factor:.3g}" in "\n".join(plan_report(cfg, 64))
    # fixed_global keeps the batch, so the rule has nothing to scale.
    assert stage_plan(paper("openuni", "optim.lr_scaling=linear"), 0, 64).lr == lr


def test_bad_policy_values_are_named():
    with pytest.raises(ConfigError, match="train.batch_policy='fixed'"):
        batch_arithmetic(paper("openuni", "train.batch_policy=fixed"), 8)
    with pytest.raises(ConfigError, match=r"train.global_batch_size=100 .*train.reference_gpus = 128"):
        batch_arithmetic(paper("openuni", "train.global_batch_size=100"), 8)


def test_task_parallel_plan_runs_the_zero2_json_as_zero1_without_overlap():
    from unimrg.engine import resolve_ds_config
    cfg = paper("openuni", "train.zero_stage=2", "train.ds_config=ds_configs/zero2_3.6b.json")
    ds = resolve_ds_config(cfg, stage_plan(cfg, 0, 64))
    zo = ds["zero_optimization"]
    assert (zo["stage"], zo["overlap_comm"]) == (1, False)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (2, 1, 128)
    assert resolve_ds_config(cfg, stage_plan(cfg, 0, 8))["zero_optimization"]["stage"] == 2   # replicated: as written
