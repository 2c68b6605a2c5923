"""Optimizer-step overhead of our DeepSpeed engine vs a bare PyTorch DDP step.

    python bench/step_overhead.py            # starts 2 CPU ranks itself (torchrun), prints the ratio

Same tiny OpenUni, same in-memory batches (one per task, round-robin accumulation over the 4 tasks),
torch AdamW in both, same process count. Each of ``--repeats`` rounds times ``--steps`` optimizer
steps of each variant, interleaved so that machine noise hits all; prints the median step time of each
and the ratio ours / bare (goal ≤ 1.10) for every ZeRO JSON given. ZeRO-2 reduce-scatters gradients
after every micro-step (4 per step here) where DDP's no_sync reduces once; ZeRO-1 reduces once too.
"""

from __future__ import annotations

import argparse
import json
import copy
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def batches(image_size: int, micro: int):
    import torch

    from unimrg.data.batches import GenerationBatch, UnderstandingBatch
    from unimrg.data.scenes import make_scene
    from unimrg.objective import Objective, ObjectiveConfig

    scenes = [make_scene(0, i, image_size) for i in range(micro)]
    images = torch.stack([torch.from_numpy(s.image).permute(2, 0, 1) for s in scenes])
    depth = torch.stack([torch.from_numpy(s.depth)[None].expand(3, -1, -1) for s in scenes]).float()
    seg = torch.stack([torch.from_numpy(s.boundary).permute(2, 0, 1) for s in scenes]).float() / 255
    obj = Objective(ObjectiveConfig(), seed=0)
    out = [UnderstandingBatch(images=images, conversations=[s.conversation for s in scenes])]
    for task, target in (("pix", images.float() / 255), ("depth", depth), ("seg", seg)):
        out.append(obj.add_prompts(GenerationBatch(task=task, images=images, targets=target)))
    return out


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from unimrg import engine as eng
    from unimrg.config import load_config, recipe_path, validate
    from unimrg.models.registry import build_model
    from unimrg.trainer import lr_lambda

    rank, world, _ = eng.init_distributed()
    cfg = load_config(recipe_path("openuni", "tiny"), ["run.dir=/tmp/unused", f"train.micro_batch_per_task={args.micro}"])
    plan = validate(cfg, world)
    torch.manual_seed(0)
    base = build_model(cfg.model)
    data = batches(cfg.model.image_size, args.micro)

    # ---- bare PyTorch: DDP + AdamW, no_sync on all but the last micro-step, clip 1.0
    bare = copy.deepcopy(base)
    ddp = torch.nn.parallel.DistributedDataParallel(bare, find_unused_parameters=True)
    opt = torch.optim.AdamW(list(bare.trainable_parameters()), lr=1e-4)

    def bare_step():
        for i, b in enumerate(data):
            ctx = ddp.no_sync() if i < len(data) - 1 else torch.enable_grad()
            with ctx:
                loss = sum(ddp([b]).values()) / len(data)
                loss.backward()
        torch.nn.utils.clip_grad_norm_(bare.trainable_parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    # ---- ours: the trainer's engine for each ZeRO JSON, fp32 like the bare step
    steps = {"bare": bare_step}
    for path in args.ds_config:
        stage = json.loads((REPO / path).read_text())["zero_optimization"]["stage"]
        c = load_config(recipe_path("openuni", "tiny"), [
            "run.dir=/tmp/unused", f"train.micro_batch_per_task={args.micro}", "train.precision=fp32",
            f"train.ds_config={path}", f"train.zero_stage={stage}"])
        model = copy.deepcopy(base)
        engine = eng.Engine(model, eng.resolve_ds_config(c, plan),
                            torch.optim.AdamW(list(model.trainable_parameters()), lr=1e-4), lr_lambda(c, c.train.steps))

        def ours_step(engine=engine):
            for b in data:
                engine.backward(sum(engine([b]).values()))
                engine.step()
        steps[f"ZeRO-{stage} ({path})"] = ours_step

    times = {name: [] for name in steps}
    for fn in steps.values():
        fn()  # warm-up
    for _ in range(args.repeats):   # interleaved, so that machine noise hits every variant alike
        for name, fn in steps.items():
            for _ in range(args.steps):
                dist.barrier()
                t0 = time.perf_counter()
                fn()
                dist.barrier()
                times[name].append(time.perf_counter() - t0)
    if rank == 0:
        bare = statistics.median(times["bare"])
        print(f"bare PyTorch DDP step (no_sync accumulation): median {bare * 1e3:.1f} ms over {len(times['bare'])} steps")
        for name in list(steps)[1:]:
            ours = statistics.median(times[name])
            print(f"UniMRG engine, {name}: median {ours * 1e3:.1f} ms; ratio ours / bare = {ours / bare:.3f}  (goal <= 1.10)")
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--ds-config", nargs="+", default=["ds_configs/zero2_tiny.json", "ds_configs/zero1_tiny.json"],
                    help="ZeRO JSONs to measure (default: the tiny recipe's ZeRO-2, and ZeRO-1)")
    args = ap.parse_args()
    if "RANK" in os.environ:
        return worker(args)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    sys.exit(subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone",
                              "--nproc_per_node", str(args.nproc), __file__, *sys.argv[1:]], env=env))


if __name__ == "__main__":
    main()
