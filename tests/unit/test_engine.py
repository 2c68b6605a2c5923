"""The resolved DeepSpeed config: batch fields from one function, the stage and precision checked."""

import pytest

from unimrg.config import ConfigError, load_config, recipe_path, validate
from unimrg.engine import _check_zero3_internals, resolve_ds_config


@pytest.mark.parametrize("model", ["openuni", "harmon", "showo", "janus"])
def test_paper_recipes_resolve_on_8_gpus(model):
    cfg = load_config(recipe_path(model, "paper"), model=model)
    ds = resolve_ds_config(cfg, validate(cfg, dp_size=8))
    assert ds["train_batch_size"] == cfg.train.global_batch_size
    assert ds["train_batch_size"] == (ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 8)
    assert ds["bf16"] == {"enabled": True} and ds["gradient_clipping"] == 1.0
    assert "_comment" not in ds and ds["zero_optimization"]["stage"] == cfg.train.zero_stage == 1   # bench/scale_plan.py


def test_json_stage_must_match_train_zero_stage():
    cfg = load_config(recipe_path("openuni", "tiny"), ["train.zero_stage=3", "train.ds_config=ds_configs/zero2.json"])
    with pytest.raises(ConfigError, match="zero_optimization.stage=2 but train.zero_stage=3"):
        resolve_ds_config(cfg, validate(cfg, dp_size=2))


def test_zero3_fix_refuses_a_deepspeed_without_the_internals_it_patches():
    """Engine.backward zeroes ZeRO-3's grad partitions through two DeepSpeed internals; a DeepSpeed
    that renamed them must stop the run at engine construction, not train with stale gradients."""
    class Renamed:
        micro_step_id = 0

    with pytest.raises(RuntimeError, match="grad_partitions_flat_buffer.*unimrg/engine.py"):
        _check_zero3_internals(Renamed())
