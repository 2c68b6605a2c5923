"""The training loop, top to bottom. Started once per rank by launch/train.py:

    python -m torch.distributed.run --standalone --nproc_per_node 2 launch/train.py --config RUN/config.yaml

Per optimizer step: ``grad_accum`` micro-steps, each holding the tasks the objective's schedule names
(round-robin: one task; joint: all), a λ-weighted loss, ``engine.backward`` and ``engine.step``.
Logs per-task losses to TensorBoard and RUN/metrics/rank{r}.jsonl, checkpoints atomically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from unimrg import engine as eng
from unimrg.config import Config, batch_arithmetic, stage_config, stage_plans, to_yaml, validate
from unimrg.data.loaders import TaskLoaders
from unimrg.eval.intrain import Evaluator
from unimrg.models.registry import build_model
from unimrg.objective import Objective
from unimrg.tasks import TASKS

COMPLETE = "COMPLETE"   # written into a checkpoint folder once every rank's state is on disk
PREEMPTED_EXIT_CODE = 3  # a run that checkpointed on a signal and wants to be requeued


def lr_lambda(cfg: Config, steps: int):
    """Linear warm-up over ``warmup_fraction`` of ``steps``, then cosine to ``min_lr_ratio``."""
    floor = cfg.optim.min_lr_ratio
    warmup = max(1, round(cfg.optim.warmup_fraction * steps))

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def find_checkpoint(ckpt_dir: Path, resume: str) -> Path | None:
    """``latest`` → the folder named in ckpt_dir/latest if complete, else the newest complete one."""
    if resume not in ("", "latest"):
        path = Path(resume)
        if not (path / COMPLETE).exists():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
        return path
    if resume == "" or not ckpt_dir.is_dir():
        return None
    latest = ckpt_dir / "latest"
    if latest.is_file() and (ckpt_dir / latest.read_text().strip() / COMPLETE).exists():
        return ckpt_dir / latest.read_text().strip()
    complete = sorted(p for p in ckpt_dir.glob("step_*") if (p / COMPLETE).exists())
    return complete[-1] if complete else None


class TaskStreams:
    """One random stream per task (torch CPU and accelerator RNG: noise, timesteps, masks; the prompt
    RNG), seeded by the task and the rank's place among the ranks running it. What a task draws thus
    does not depend on which other tasks share the rank, so a task-parallel run draws, per task, what
    the round-robin run over the same data shards draws (tests/integration/test_batch_policy.py)."""

    def __init__(self, seed: int, group_rank: int, objective: Objective):
        self.base, self.objective = seed + 1000 * (group_rank + 1), objective
        self.devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        self.states: dict[str, dict] = {}

    def _new(self, key: str) -> dict:
        mask = sum(1 << TASKS.index(t) for t in key.split("+"))   # joint micro-steps: one stream
        seed = self.base * 32 + mask
        with torch.random.fork_rng(devices=self.devices):
            torch.manual_seed(seed)
            return {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state() if self.devices else None,
                    "python": random.Random(seed).getstate()}

    @contextlib.contextmanager
    def __call__(self, tasks: list[str]):
        key = "+".join(tasks)
        st = self.states.get(key) or self._new(key)
        saved_rng = self.objective.rng
        with torch.random.fork_rng(devices=self.devices):
            torch.set_rng_state(st["torch"])
            if self.devices:
                torch.cuda.set_rng_state(st["cuda"])
            self.objective.rng = random.Random()
            self.objective.rng.setstate(st["python"])
            try:
                yield
            finally:
                self.states[key] = {"torch": torch.get_rng_state(),
                                    "cuda": torch.cuda.get_rng_state() if self.devices else None,
                                    "python": self.objective.rng.getstate()}
                self.objective.rng = saved_rng

    def state_dict(self) -> dict:
        return dict(self.states)

    def load_state_dict(self, state: dict) -> None:
        self.states = dict(state)


class Trainer:
    """Trains one stage of a run (most runs have a single stage); ``run`` chains the stages."""

    def __init__(self, cfg: Config):
        # First thing: a preemption warning during start-up must not kill the rank.
        self.stop_requested = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self.on_signal)
        self.rank, self.world, self.local_rank = eng.init_distributed()
        validate(cfg, dp_size=self.world)
        self.run_dir = Path(cfg.run.dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.resume_from = find_checkpoint(self.ckpt_dir, cfg.run.resume)
        state = self.read_state(self.resume_from) if self.resume_from else {"step": 0, "stage": 0}

        # The stage the next step belongs to; a checkpoint at a stage's last step starts the next one.
        stages = stage_plans(cfg)
        self.stage = next((i for i, (_, end, _) in enumerate(stages) if state["step"] < end), len(stages) - 1)
        self.stage_start, self.stage_end, stage = stages[self.stage]
        self.full_cfg, self.cfg = cfg, stage_config(cfg, stage)
        cfg = self.cfg
        self.plan = batch_arithmetic(cfg, self.world)

        # Same seed on every rank for the weights; per-rank seeds for noise, masks and prompts.
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model)   # DeepSpeed casts it to bf16 if train.precision says so
        model.apply_freezing([name for f in stage.freeze for name in
                              (model.understanding_module_names() if f == "understanding" else [f])])
        self.new_stage = self.resume_from is not None and state["stage"] != self.stage
        if self.new_stage:
            # The previous stage's consolidated weights; this stage trains other parameters, so it
            # starts a fresh optimizer and LR schedule (DeepSpeed cannot load a checkpoint whose
            # frozen set differs).
            model.load_state_dict(torch.load(self.stage_export(state["stage"]), mmap=True, weights_only=True))
        self.seed_rank(cfg.train.seed + 1000 * (self.rank + 1))

        # plan.lr: optim.lr, scaled by optim.lr_scaling under train.batch_policy=fixed_per_gpu.
        optimizer = torch.optim.AdamW(model.optimizer_groups(cfg.optim.weight_decay), lr=self.plan.lr,
                                      betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
        self.ds_config = eng.resolve_ds_config(cfg, self.plan)
        self.engine = eng.Engine(model, self.ds_config, optimizer,
                                 lr_lambda(cfg, self.stage_end - self.stage_start))
        self.objective = Objective(cfg.objective, seed=cfg.train.seed + self.rank)
        # Each task's data is sharded over the ranks that run it (all ranks unless task-parallel).
        self.my_tasks = self.plan.rank_tasks(self.rank)
        group_rank, group_size = self.plan.rank_in_group(self.rank), self.plan.group_size
        self.loaders = TaskLoaders(cfg.data, self.my_tasks, self.plan.micro_per_task,
                                   cfg.model.image_size, group_rank, group_size, cfg.train.seed)
        self.streams = TaskStreams(cfg.train.seed, group_rank, self.objective)
        self.trainable = [p for p in self.engine.module.parameters() if p.requires_grad]
        self.step = 0
        self.samples_seen = defaultdict(int)   # per task, this rank
        self.writer = None
        if self.rank == 0:
            self.write_run_files()
            if cfg.run.tensorboard:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(self.run_dir / "tb"))
        (self.run_dir / "metrics").mkdir(parents=True, exist_ok=True)
        self.metrics = open(self.run_dir / "metrics" / f"rank{self.rank}.jsonl", "a")
        if self.resume_from is not None:
            self.load(self.resume_from, state, engine_state=not self.new_stage)
        self.evaluator = Evaluator(cfg.eval, self.objective.tasks, cfg.model.image_size, cfg.data.scene_seed,
                                   self.run_dir, self.rank, self.world, self.writer, cfg.train.zero_stage == 3)

    # ---- the loop ------------------------------------------------------------------------------
    def fit(self) -> int:
        """Train to the end of this stage (or ``stop_after``); returns a process exit code."""
        cfg = self.cfg
        last = min(self.stage_end, cfg.train.stop_after or self.stage_end)
        n_stages = len(cfg.train.stages) or 1
        self.log0(f"{cfg.model.name} stage {self.stage + 1}/{n_stages} {self.objective.tasks}: "
                  f"{self.plan.describe(self.objective.tasks)}; steps {self.step}→{last}"
                  f"{f' (resumed from {self.resume_from})' if self.resume_from else ''}")
        t_start, step_start = time.time(), self.step
        while self.step < last:
            t0 = time.time()
            losses, counts = self.train_step()
            self.step += 1
            self.log(losses, counts, time.time() - t0, t_start, step_start, last)
            if self.evaluator.due(self.step, last):   # all ranks (ZeRO-3); off the throughput clock and ETA
                t_start += self.evaluator.run(self.engine, self.step)
            if self.step == self.stage_end and self.stage_end < cfg.train.steps:
                self.export(self.stage_export(self.stage))   # before the checkpoint that needs it
            if self.step % cfg.train.checkpoint_every == 0 or self.step == last:
                self.save()
            if self.agree(self.stop_requested):
                if self.step % cfg.train.checkpoint_every and self.step != last:
                    self.save()
                self.log0(f"stopping at step {self.step} on a signal; resume with run.resume=latest")
                return PREEMPTED_EXIT_CODE
        if self.step == cfg.train.steps and cfg.train.export_final:
            self.export(self.run_dir / "final" / "model.pt")
        return 0

    def stage_export(self, stage: int) -> Path:
        """Consolidated weights at the end of ``stage`` (0-based): where the next stage starts from."""
        return self.run_dir / "export" / f"stage{stage + 1}" / "model.pt"

    def next_stage(self) -> bool:
        """Did this stage run to its end with another stage after it (and no stop_after before)?"""
        stop = self.cfg.train.stop_after
        return self.step == self.stage_end < self.cfg.train.steps and not (stop and self.step >= stop)

    def train_step(self) -> tuple[dict[str, float], dict[str, int]]:
        sums, n_micro, counts = defaultdict(float), defaultdict(int), defaultdict(int)
        for micro in range(self.plan.grad_accum):
            tasks = self.plan.micro_step_tasks(self.rank, micro)
            with self.streams(tasks):
                batches = [self.objective.add_prompts(self.loaders.next(t)) for t in tasks]
                task_losses = self.engine(batches)
            loss = self.objective.total(task_losses) * self.plan.loss_scale
            if self.plan.placement == "task_parallel" and micro == self.plan.grad_accum - 1:
                # ZeRO-1 reduces, at the boundary, every parameter that has a gradient, in order:
                # every rank must hold one for every trainable parameter, including those its tasks
                # never touch (zero), or the ranks' reduction buckets would differ.
                loss = loss + 0.0 * sum(p.reshape(-1)[0] for p in self.trainable if p.numel())
            self.engine.backward(loss)
            self.engine.step()
            for b in batches:
                counts[b.task] += len(b)
                sums[b.task] += task_losses[b.task].item()
                n_micro[b.task] += 1
        for t, n in counts.items():
            self.samples_seen[t] += n
        return {t: sums[t] / n_micro[t] for t in sums}, dict(counts)

    # ---- logging -------------------------------------------------------------------------------
    def log(self, losses, counts, dt, t_start, step_start, last) -> None:
        # Per task: loss sum, ranks that ran it, samples this step, samples so far (task-parallel
        # ranks run only their group's tasks).
        tasks = self.objective.tasks
        local = torch.tensor([[losses.get(t, 0.0), float(t in losses), counts.get(t, 0), self.samples_seen[t]]
                              for t in tasks], dtype=torch.float64)
        dist.all_reduce(local)
        mean = {t: row[0] / max(row[1], 1.0) for t, row in zip(tasks, local.tolist())}
        global_counts = {t: int(row[2]) for t, row in zip(tasks, local.tolist())}
        global_seen = {t: int(row[3]) for t, row in zip(tasks, local.tolist())}
        total = sum(self.cfg.objective.weights[t] * mean[t] for t in tasks)
        grad_norm, lr = self.engine.grad_norm(), self.engine.lr()
        samples_s = self.plan.train_batch_size / max(dt, 1e-9)
        skipped = self.loaders.skipped()
        print(json.dumps({"step": self.step, "stage": self.stage + 1, "losses": losses, "total": sum(
            self.cfg.objective.weights[t] * losses[t] for t in losses), "samples": counts,
            "global_losses": mean, "global_samples": global_counts, "lr": lr, "grad_norm": grad_norm,
            "skipped": skipped}),
            file=self.metrics, flush=True)
        if self.rank != 0:
            return
        if self.writer is not None:
            for t in tasks:
                self.writer.add_scalar(f"loss/{t}", mean[t], self.step)
                self.writer.add_scalar(f"samples_seen/{t}", global_seen[t], self.step)
                self.writer.add_scalar(f"data/skipped/{t}", skipped.get(t, 0), self.step)
            self.writer.add_scalar("loss/total", total, self.step)
            self.writer.add_scalar("lr", lr, self.step)
            self.writer.add_scalar("grad_norm", grad_norm, self.step)
            self.writer.add_scalar("throughput/samples_per_s", samples_s, self.step)
        if self.step % self.cfg.train.log_every == 0 or self.step == last:
            done = self.step - step_start
            eta = (time.time() - t_start) / max(done, 1) * (last - self.step)
            parts = " ".join(f"{t} {mean[t]:.4f}" for t in tasks)
            print(f"step {self.step}/{last} | loss {total:.4f} ({parts}) | lr {lr:.2e} | "
                  f"grad {grad_norm:.3f} | {samples_s:.1f} samples/s | ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}",
                  flush=True)

    def log0(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, flush=True)

    # ---- checkpoints ---------------------------------------------------------------------------
    def save(self) -> None:
        tag = f"step_{self.step:07d}"
        folder = self.ckpt_dir / tag
        self.engine.save(self.ckpt_dir, tag, client_state={"step": self.step, "stage": self.stage})
        torch.save({"step": self.step, "stage": self.stage, "loaders": self.loaders.state_dict(),
                    "objective": self.objective.state_dict(), "samples_seen": dict(self.samples_seen),
                    "task_rng": self.streams.state_dict(),
                    "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                            "numpy": np.random.get_state()}},
                   folder / f"unimrg_rank{self.rank}.pt")
        dist.barrier()
        if self.rank == 0:
            # Only now is the checkpoint whole: mark it, then point `latest` at it atomically.
            (folder / COMPLETE).write_text(f"{self.world}\n")
            tmp = self.ckpt_dir / "latest.tmp"
            tmp.write_text(tag)
            os.replace(tmp, self.ckpt_dir / "latest")
            older = sorted(p for p in self.ckpt_dir.glob("step_*") if p.name != tag)
            for old in older[:max(0, len(older) - (self.cfg.train.keep_checkpoints - 1))]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()

    def read_state(self, folder: Path) -> dict:
        """This rank's trainer state in a checkpoint (step, stage, loaders, prompt and RNG states)."""
        world = int((folder / COMPLETE).read_text().split()[0])
        if world != self.world:
            raise RuntimeError(f"{folder} was written by {world} ranks, this run has {self.world}; the "
                               "per-rank loader states cannot be re-sharded — resume with the same world size")
        return torch.load(folder / f"unimrg_rank{self.rank}.pt", weights_only=False)

    def load(self, folder: Path, state: dict, engine_state: bool) -> None:
        if engine_state:
            self.engine.load(folder.parent, folder.name)
        self.step = state["step"]
        self.loaders.load_state_dict(state["loaders"])
        self.objective.load_state_dict(state["objective"])
        if "task_rng" in state:
            self.streams.load_state_dict(state["task_rng"])
        self.samples_seen.update(state["samples_seen"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])

    def export(self, path: Path) -> None:
        """Consolidated weights (each adapter exports its official layouts from this file)."""
        sd = self.engine.full_state_dict()
        if self.rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(sd, path.with_suffix(".tmp"))
            os.replace(path.with_suffix(".tmp"), path)   # never a half-written file under the real name
        dist.barrier()

    # ---- run bookkeeping -----------------------------------------------------------------------
    def write_run_files(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.resolved.yaml").write_text(to_yaml(self.cfg))
        (self.run_dir / "ds_config.json").write_text(json.dumps(self.ds_config, indent=2))

    def on_signal(self, signum, frame) -> None:
        # Only set a flag: checkpointing mid-step would tear the accumulation.
        self.stop_requested = True

    def agree(self, flag: bool) -> bool:
        """True on every rank if any rank saw a stop signal."""
        t = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    @staticmethod
    def seed_rank(seed: int) -> None:
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)

    def close(self) -> None:
        self.loaders.close()   # energon workers otherwise linger until garbage collection
        self.engine.close()
        if self.writer is not None:
            self.writer.close()
        self.metrics.close()
        dist.barrier()


def run(cfg: Config) -> int:
    """Train every remaining stage; the next stage starts from the checkpoint the last one wrote."""
    while True:
        trainer = Trainer(cfg)
        try:
            code = trainer.fit()
            more = code == 0 and trainer.next_stage()
        finally:
            trainer.close()
            sys.stdout.flush()
        if not more:
            return code
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, resume="latest"))
