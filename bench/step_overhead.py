"""Optimizer-step overhead of our DeepSpeed engine vs a bare PyTorch DDP step.

    python bench/step_overhead.py            # starts 2 CPU ranks itself (torchrun), prints the ratio

Same tiny OpenUni, same in-memory batches (one per task, round-robin accumulation over the 4 tasks),
torch AdamW in both, same process count. Each of ``--repeats`` rounds times ``--steps`` optimizer
steps of each, alternating so that machine noise hits both; prints the median step time of each and
the ratio ours / bare (goal ≤ 1.10).
"""

from __future__ import annotations

import argparse
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
    cfg = load_config(recipe_path("openuni", "tiny"), ["run.dir=/tmp/unused", f"train.micro_batch_per_task={args.micro}",
                                                       *(["train.ds_config=" + args.ds_config] if args.ds_config else [])])
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

    # ---- ours: the trainer's engine (ZeRO stage from --zero), fp32 like the bare step
    ours_model = copy.deepcopy(base)
    cfg.train.precision = "fp32"
    ds = eng.resolve_ds_config(cfg, plan)
    engine = eng.Engine(ours_model, ds, torch.optim.AdamW(list(ours_model.trainable_parameters()), lr=1e-4),
                        lr_lambda(cfg, cfg.train.steps))

    def ours_step():
        for b in data:
            engine.backward(sum(engine([b]).values()))
            engine.step()

    times = {"bare": [], "ours": []}
    for name, fn in (("bare", bare_step), ("ours", ours_step)):
        fn()  # warm-up
    for _ in range(args.repeats):
        for name, fn in (("bare", bare_step), ("ours", ours_step)):
            for _ in range(args.steps):
                dist.barrier()
                t0 = time.perf_counter()
                fn()
                dist.barrier()
                times[name].append(time.perf_counter() - t0)
    if rank == 0:
        b, o = statistics.median(times["bare"]), statistics.median(times["ours"])
        print(f"bare PyTorch DDP step: median {b * 1e3:.1f} ms over {len(times['bare'])} steps")
        print(f"UniMRG engine (ZeRO-{cfg.train.zero_stage}) step: median {o * 1e3:.1f} ms over {len(times['ours'])} steps")
        print(f"ratio ours / bare = {o / b:.3f}  (goal <= 1.10)")
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--ds-config", default="", help="ZeRO-2 JSON to measure (default: the tiny recipe's)")
    args = ap.parse_args()
    if "RANK" in os.environ:
        return worker(args)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    sys.exit(subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone",
                              "--nproc_per_node", str(args.nproc), __file__, *sys.argv[1:]], env=env))


if __name__ == "__main__":
    main()
