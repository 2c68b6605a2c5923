"""bench/scale_plan.py: its communication model against the collectives a real DeepSpeed engine issues,
and the paper recipes' ZeRO stage against its pick.

    OMP_NUM_THREADS=1 python -m pytest tests/integration/test_scale_plan.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COLLECTIVES = {"all_reduce": "reduce", "reduce": "reduce", "reduce_scatter_tensor": "reduce",
               "all_gather_into_tensor": "gather", "all_gather": "gather", "broadcast": "broadcast"}


def count_collectives_worker(out: str) -> None:
    """Per rank: wrap torch.distributed's collectives, run an optimizer step of tiny OpenUni (fp32,
    round-robin) under ZeRO-1 and ZeRO-2 through unimrg.engine, record bytes per kind of collective."""
    sys.path.insert(0, str(REPO))
    import torch
    import torch.distributed as dist

    from bench.step_overhead import batches
    from unimrg import engine as eng
    from unimrg.config import load_config, recipe_path, validate
    from unimrg.models.registry import build_model
    from unimrg.objective import Objective
    from unimrg.trainer import lr_lambda

    log: list[tuple[str, int]] = []
    for name in COLLECTIVES:
        orig = getattr(dist, name)

        def wrapped(*a, _orig=orig, _name=name, **k):
            # the first tensor argument: for all_gather_into_tensor / reduce_scatter_tensor the full-size one
            t = a[0] if a else next(v for v in k.values() if isinstance(v, (torch.Tensor, list, tuple)))
            log.append((_name, sum(x.numel() * x.element_size() for x in t) if isinstance(t, (list, tuple))
                        else t.numel() * t.element_size()))
            return _orig(*a, **k)
        setattr(dist, name, wrapped)

    rank, world, _ = eng.init_distributed()
    result = {}
    for stage in (1, 2):
        cfg = load_config(recipe_path("openuni", "tiny"), ["run.dir=/tmp/unused", "train.precision=fp32",
                          f"train.zero_stage={stage}", f"train.ds_config=ds_configs/zero{stage}_tiny.json"])
        plan = validate(cfg, world)
        torch.manual_seed(0)
        model = build_model(cfg.model)
        obj = Objective(cfg.objective, seed=0)
        data = {b.task: b for b in batches(cfg.model.image_size, plan.micro_per_task)}
        # trainable parameters each micro-step gives a gradient (plain autograd, before DeepSpeed)
        used = []
        for m in range(plan.grad_accum):
            model.zero_grad(set_to_none=True)
            obj.total(model([data[t] for t in plan.micro_step_tasks(rank, m)])).backward()
            used.append(sum(p.numel() for p in model.parameters() if p.requires_grad and p.grad is not None))
        model.zero_grad(set_to_none=True)
        e = eng.Engine(model, eng.resolve_ds_config(cfg, plan), torch.optim.AdamW(model.optimizer_groups(0.0), lr=1e-4),
                       lr_lambda(cfg, 10))

        def step():
            for m in range(plan.grad_accum):
                e.backward(obj.total(e([data[t] for t in plan.micro_step_tasks(rank, m)])))
                e.step()
        step()           # the first step may build buffers; count the second
        log.clear()
        step()
        result[stage] = {"log": list(log), "used": used, "micro_steps": plan.grad_accum,
                         "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
        e.close()
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


@pytest.mark.slow
def test_tiny_model_byte_counts_equal_counted_collectives(tmp_path):
    sys.path.insert(0, str(REPO))
    from bench.scale_plan import collective_payloads
    out = tmp_path / "counts.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           __file__, str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads(out.read_text())
    for stage, r in got.items():
        counted = {"reduce": 0, "gather": 0}
        for name, nbytes in r["log"]:
            if nbytes > 64:   # skip the scalar all-reduces (overflow flag, gradient norm)
                counted[COLLECTIVES[name]] += nbytes
        stats = {"trainable": r["trainable"], "frozen": 0}
        plan = collective_payloads(stats, int(stage), r["micro_steps"], used=r["used"], dtype_bytes=4)
        predicted = {"reduce": sum(b for n, b in plan if n == "reduce_scatter"),
                     "gather": sum(b for n, b in plan if n == "all_gather")}
        assert counted == predicted, (stage, counted, predicted)
    # the ZeRO-2 round-robin step reduces more than ZeRO-1's: the reason the recipes run ZeRO-1
    assert sum(b for _, b in got["2"]["log"]) > sum(b for _, b in got["1"]["log"])


@pytest.mark.slow
def test_paper_recipes_use_the_planned_zero_stage():
    sys.path.insert(0, str(REPO))
    from bench.scale_plan import pick
    from unimrg.config import load_config, recipe_path
    from unimrg.models import registry
    for model in registry.names():
        cfg = load_config(recipe_path(model, "paper"), ["run.dir=/tmp/unused"])
        for gpus in (8, 16, 64):
            p = pick(model, gpus)
            assert p["zero"] == cfg.train.zero_stage or p["placement"] == "task_parallel" and p["zero"] == 1, \
                (model, gpus, p["zero"], cfg.train.zero_stage)


if __name__ == "__main__":
    count_collectives_worker(sys.argv[1])
