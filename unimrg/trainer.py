"""The training loop, top to bottom. Started once per rank by launch/train.py:

    python -m torch.distributed.run --standalone --nproc_per_node 2 launch/train.py --config RUN/config.yaml

Per optimizer step: ``grad_accum`` micro-steps, each holding the tasks the objective's schedule names
(round-robin: one task; joint: all), a λ-weighted loss, ``engine.backward`` and ``engine.step``.
Logs per-task losses to TensorBoard and RUN/metrics/rank{r}.jsonl, checkpoints atomically.
Fails fast: an exception on one rank is logged with its rank and ends the job in seconds (``run``);
a rank without progress for ``train.hang_timeout_s`` is ended by the ``Watchdog``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
import traceback
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from unimrg import durable, engine as eng
from unimrg.config import Config, batch_arithmetic, stage_config, stage_plans, to_yaml, validate
from unimrg.data.batches import UnderstandingBatch
from unimrg.data.loaders import UND_TEXT, TaskLoaders
from unimrg.models.official_io import load_adapter_state
from unimrg.faults import parse_fault
from unimrg.eval.intrain import Evaluator
from unimrg.models.registry import build_model
from unimrg.objective import Objective
from unimrg.tasks import TASKS
from unimrg.runfolder import COMPLETE, check_checkpoint_config, find_checkpoint
from unimrg.signals import PREEMPTED_EXIT_CODE, PREEMPTION_SIGNALS  # noqa: F401 (re-exported)


def checkpoint_due(step: int, every: int) -> bool:
    """A periodic checkpoint at ``step``? ``train.checkpoint_every=0``: none (only the end and signals)."""
    return every > 0 and step % every == 0

class SkippedStepsError(RuntimeError):
    """More than ``train.max_skipped_steps`` optimizer steps in a row were skipped (non-finite)."""


class Watchdog(threading.Thread):
    """Turns a rank that makes no progress for ``timeout_s`` into a logged error and a non-zero exit.

    The trainer calls ``progress(phase)`` as it moves (a tuple assignment: nothing on the hot path);
    if the phase has not changed for its limit the thread prints the rank, the phase and every thread's
    Python stack, and ends the process, so torchrun / ``srun --kill-on-bad-exit`` end the job. Start-up
    phases and each stage's first step (``startup=True``) get ``startup_s`` (at least ``timeout_s``):
    a first batch from freshly spawned loader workers, or the first collective of 64 ranks, is slow but
    not stuck, and a short ``train.hang_timeout_s`` must not end a run there."""

    def __init__(self, timeout_s: float, rank: int | str, startup_s: float = 0.0):
        super().__init__(daemon=True, name="unimrg-watchdog")
        self.timeout_s, self.rank = timeout_s, rank
        self.startup_s = max(startup_s, timeout_s)
        self.state = ("start-up", time.monotonic(), self.startup_s)
        self.done = threading.Event()
        if timeout_s > 0:
            self.start()

    @property
    def phase(self) -> str:
        return self.state[0]

    def progress(self, phase: str, startup: bool = False) -> None:
        self.state = (phase, time.monotonic(), self.startup_s if startup else self.timeout_s)

    def run(self) -> None:
        while not self.done.wait(min(1.0, self.timeout_s / 4)):
            phase, since, limit = self.state
            if time.monotonic() - since > limit:
                setting = "train.startup_timeout_s" if limit > self.timeout_s else "train.hang_timeout_s"
                print(f"rank {self.rank}: error: stuck in {phase} for {time.monotonic() - since:.0f} s "
                      f"({setting}={limit:g}); exiting so the job ends. Python stacks:",
                      file=sys.stderr, flush=True)
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                sys.stdout.flush()
                os._exit(1)

    def stop(self) -> None:
        self.done.set()


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

    def __init__(self, cfg: Config, watchdog: Watchdog | None = None):
        self.watchdog = watchdog or Watchdog(0, "?")
        # First thing: a preemption warning during start-up must not kill the rank.
        self.stop_requested, self.stop_signal = False, ""
        for sig in PREEMPTION_SIGNALS:
            previous = signal.getsignal(sig)
            if sig == signal.SIGUSR2 and callable(previous) and not isinstance(getattr(previous, "__self__", None), Trainer):
                continue   # launch/slurm.py's TrainJob owns SIGUSR2 (to requeue) and forwards it here
            signal.signal(sig, self.on_signal)
        self.rank, self.world, self.local_rank = eng.init_distributed()
        validate(cfg, dp_size=self.world)
        self.run_dir = Path(cfg.run.dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        # Now, not at the first checkpoint 250 steps later (every rank: they fail together)
        durable.check_writable(self.run_dir)
        durable.check_writable(self.ckpt_dir, "checkpoint folder")
        self.resume_from = find_checkpoint(self.ckpt_dir, cfg.run.resume)
        if self.resume_from is not None:
            check_checkpoint_config(self.resume_from, cfg)   # e.g. launch/train.py on an edited config
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
        self.watchdog.progress("start-up: building the model and the DeepSpeed engine", startup=True)
        model = build_model(cfg.model)   # DeepSpeed casts it to bf16 if train.precision says so
        model.apply_freezing([name for f in stage.freeze for name in
                              (model.understanding_module_names() if f == "understanding" else [f])])
        self.new_stage = self.resume_from is not None and state["stage"] != self.stage
        if self.new_stage:
            # The previous stage's consolidated weights; this stage trains other parameters, so it
            # starts a fresh optimizer and LR schedule (DeepSpeed cannot load a checkpoint whose
            # frozen set differs).
            path = self.stage_export(state["stage"])
            load_adapter_state(model, torch.load(path, mmap=True, weights_only=True), str(path))
        self.seed_rank(cfg.train.seed + 1000 * (self.rank + 1))

        # plan.lr: optim.lr, scaled by optim.lr_scaling under train.batch_policy=fixed_per_gpu.
        optimizer = torch.optim.AdamW(model.optimizer_groups(cfg.optim.weight_decay), lr=self.plan.lr,
                                      betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
        self.ds_config = eng.resolve_ds_config(cfg, self.plan)
        self.engine = eng.Engine(model, self.ds_config, optimizer,
                                 lr_lambda(cfg, self.stage_end - self.stage_start))
        self.watchdog.progress("start-up: starting the data loaders", startup=True)
        self.objective = Objective(cfg.objective, seed=cfg.train.seed + self.rank)
        # Each task's data is sharded over the ranks that run it (all ranks unless task-parallel).
        self.my_tasks = self.plan.rank_tasks(self.rank)
        group_rank, group_size = self.plan.rank_in_group(self.rank), self.plan.group_size
        self.loaders = TaskLoaders(cfg.data, self.my_tasks, self.plan.micro_per_task,
                                   cfg.model.image_size, group_rank, group_size, cfg.train.seed,
                                   target_size=cfg.model.target_size,
                                   transforms=type(model).image_transforms(cfg.model))   # the release's
        self.streams = TaskStreams(cfg.train.seed, group_rank, self.objective)
        self.trainable = [p for p in self.engine.module.parameters() if p.requires_grad]
        if self.loaders.text_ratio > 0:
            self.log0(f"und stream: {self.loaders.text_ratio:.1%} text-only conversations from "
                      f"{cfg.data.path(UND_TEXT)} (data.und_text_ratio={cfg.data.und_text_ratio})")
        self.step = 0
        self.last_losses: dict[str, float] = {}   # the last step's all-reduced per-task losses
        self.samples_seen = defaultdict(int)   # per task, this rank
        # Each task's batch shapes as the adapter received them, logged with this stage's first step
        # (the paper-shape smoke tests check them; a wrong resolution or batch shows at a glance).
        self.batch_shapes: dict[str, dict] | None = {}
        self.skips_in_row = 0                  # consecutive skipped optimizer steps
        self.fault = parse_fault(cfg.train.debug_fault)   # TEST HOOK; None in real runs
        self.writer = None
        if self.rank == 0:
            self.write_run_files()
            if cfg.run.tensorboard:
                from torch.utils.tensorboard import SummaryWriter
                # hide events an earlier, killed launch logged after the step this one starts from
                self.writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=state["step"] + 1)
        (self.run_dir / "metrics").mkdir(parents=True, exist_ok=True)
        metrics_path = self.run_dir / "metrics" / f"rank{self.rank}.jsonl"
        self.set_aside_rows_after(metrics_path, state["step"])
        self.metrics = open(metrics_path, "a")
        if self.resume_from is not None:
            self.watchdog.progress(f"start-up: loading {self.resume_from}", startup=True)
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
            # this launch's first step is still start-up for the watchdog (train.startup_timeout_s)
            losses, counts = self.train_step(startup=self.step == step_start)
            self.step += 1
            self.watchdog.progress(f"logging / checkpointing after step {self.step}")
            self.log(losses, counts, time.time() - t0, t_start, step_start, last)
            self.check_skipped(losses)
            if self.evaluator.due(self.step, last):   # all ranks (ZeRO-3); off the throughput clock and ETA
                t_start += self.evaluator.run(self.engine, self.step)
            if self.step == self.stage_end and self.stage_end < cfg.train.steps:
                self.export(self.stage_export(self.stage))   # before the checkpoint that needs it
            periodic = checkpoint_due(self.step, cfg.train.checkpoint_every)
            if periodic or self.step == last:
                self.save()
            if self.agree(self.stop_requested):
                if not periodic and self.step != last:
                    self.save()
                self.log0(f"stopping at step {self.step} on a signal ({self.stop_signal or 'on another rank'}), "
                          f"checkpoint {self.ckpt_dir / f'step_{self.step:07d}'}; resume with run.resume=latest")
                self.summary("preempted")
                return PREEMPTED_EXIT_CODE
        final = None
        if self.step == cfg.train.steps and cfg.train.export_final:
            final = self.run_dir / "final" / "model.pt"
            self.export(final)
        if self.step == cfg.train.steps or not self.next_stage():
            self.summary("finished" if self.step == cfg.train.steps else "stopped (train.stop_after)", final)
        return 0

    def stage_export(self, stage: int) -> Path:
        """Consolidated weights at the end of ``stage`` (0-based): where the next stage starts from."""
        return self.run_dir / "export" / f"stage{stage + 1}" / "model.pt"

    def next_stage(self) -> bool:
        """Did this stage run to its end with another stage after it (and no stop_after before)?"""
        stop = self.cfg.train.stop_after
        return self.step == self.stage_end < self.cfg.train.steps and not (stop and self.step >= stop)

    def train_step(self, startup: bool = False) -> tuple[dict[str, float], dict[str, int]]:
        self.step_lr = self.engine.lr()   # the rate this step uses (the schedule moves on at its end)
        sums, n_micro, counts = defaultdict(float), defaultdict(int), defaultdict(int)
        for micro in range(self.plan.grad_accum):
            tasks = self.plan.micro_step_tasks(self.rank, micro)
            where = f"step {self.step + 1} (task {'+'.join(tasks)})"
            self.watchdog.progress(f"loading the data of {where}", startup=startup)
            with self.streams(tasks):
                batches = [self.objective.add_prompts(self.loaders.next(t)) for t in tasks]
                if self.batch_shapes is not None:
                    for b in batches:
                        self.batch_shapes.setdefault(b.task, batch_shapes(b))
                self.watchdog.progress(f"forward of {where}", startup=startup)
                task_losses = self.debug_fault(self.engine(batches))
            loss = self.objective.total(task_losses) * self.plan.loss_scale
            if self.plan.placement == "task_parallel" and micro == self.plan.grad_accum - 1:
                # ZeRO-1 reduces, at the boundary, every parameter that has a gradient, in order:
                # every rank must hold one for every trainable parameter, including those its tasks
                # never touch (zero), or the ranks' reduction buckets would differ.
                loss = loss + 0.0 * sum(p.reshape(-1)[0] for p in self.trainable if p.numel())
            self.watchdog.progress(f"backward of {where}", startup=startup)
            self.engine.backward(loss)
            self.watchdog.progress(f"optimizer step of {where}", startup=startup)
            self.engine.step()
            for b in batches:
                counts[b.task] += len(b)
                if isinstance(b, UnderstandingBatch) and self.loaders.text_ratio > 0:
                    counts[UND_TEXT] += b.text_only()     # of counts[und]: text-only conversations
                sums[b.task] += task_losses[b.task].item()
                n_micro[b.task] += 1
        for t, n in counts.items():
            self.samples_seen[t] += n
        return {t: sums[t] / n_micro[t] for t in sums}, dict(counts)

    def debug_fault(self, task_losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """TEST HOOK (``train.debug_fault``, unimrg/faults.py): raise, hang or make a loss NaN."""
        f, step = self.fault, self.step + 1
        if f is None or not f.hits(step, self.rank):
            return task_losses
        if f.kind == "raise":
            raise RuntimeError(f"train.debug_fault: injected failure on rank {self.rank} at step {step}")
        if f.kind == "hang":
            time.sleep(10**9)
        # times NaN (not plus): the gradients become NaN too, as in a real divergence
        return {t: loss * float("nan") if f.task in ("", t) else loss for t, loss in task_losses.items()}

    def check_skipped(self, losses: dict[str, float]) -> None:
        """Skipped-step guard. DeepSpeed skips an optimizer step whose gradients are not finite; count
        it (``train/skipped_steps``), warn, and stop after more than ``train.max_skipped_steps`` in a
        row: a run whose every step is skipped must not go on and export stale weights."""
        applied, bad = self.engine.step_applied(), [t for t, v in losses.items() if not math.isfinite(v)]
        if self.writer is not None:
            self.writer.add_scalar("train/skipped_steps", self.engine.skipped_steps(), self.step)
        if applied:
            if bad:   # a DeepSpeed config with bf16.check_grad_overflow=false; nothing saved at this step
                raise SkippedStepsError(
                    f"step {self.step}: the loss of task {', '.join(bad)} is not finite on rank {self.rank} "
                    f"but the optimizer step was applied, so the weights may hold NaN now; resume from the "
                    f"last checkpoint ({self.ckpt_dir}) with gradient overflow checks on")
            self.skips_in_row = 0
            return
        self.skips_in_row += 1
        # the skip is the same on every rank (DeepSpeed all-reduces the overflow); which task, is not
        flags = torch.tensor([float(t in bad) for t in self.objective.tasks])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        bad = [t for t, f in zip(self.objective.tasks, flags.tolist()) if f]
        what = (f"the loss of task {', '.join(bad)} was not finite" if bad else
                f"the gradients were not finite (grad norm {self.engine.grad_norm()}) with finite losses")
        limit = self.cfg.train.max_skipped_steps
        if self.skips_in_row > limit:
            raise SkippedStepsError(
                f"{self.skips_in_row} optimizer steps in a row skipped (steps {self.step - self.skips_in_row + 1}"
                f"–{self.step}; more than train.max_skipped_steps={limit}): {what}. The weights are still "
                f"those of step {self.step - self.skips_in_row}; last complete checkpoint: "
                f"{find_checkpoint(self.ckpt_dir, 'latest') or 'none'}. Check that task's data, or lower "
                "optim.lr, before resuming")
        if self.rank == 0:
            print(f"warning: step {self.step} skipped: {what}; {self.engine.skipped_steps()} skipped in this run, "
                  f"{self.skips_in_row} in a row (more than train.max_skipped_steps={limit} stop the run)",
                  file=sys.stderr, flush=True)

    # ---- logging -------------------------------------------------------------------------------
    def log(self, losses, counts, dt, t_start, step_start, last) -> None:
        # Per task: loss sum, ranks that ran it, samples this step, samples so far (task-parallel
        # ranks run only their group's tasks).
        tasks = self.objective.tasks
        rows = [*tasks, UND_TEXT]   # every rank all-reduces the same rows, whatever tasks it runs
        local = torch.tensor([[losses.get(t, 0.0), float(t in losses), counts.get(t, 0), self.samples_seen[t]]
                              for t in rows], dtype=torch.float64)
        dist.all_reduce(local)
        mean = {t: row[0] / max(row[1], 1.0) for t, row in zip(tasks, local.tolist())}
        global_counts = {t: int(row[2]) for t, row in zip(rows, local.tolist()) if t in tasks or row[2]}
        global_seen = {t: int(row[3]) for t, row in zip(rows, local.tolist())}
        self.last_losses = mean
        total = sum(self.cfg.objective.weights[t] * mean[t] for t in tasks)
        grad_norm, lr = self.engine.grad_norm(), self.step_lr
        samples_s = self.plan.train_batch_size / max(dt, 1e-9)
        skipped = self.loaders.skipped()
        print(json.dumps({"step": self.step, "stage": self.stage + 1, "losses": losses, "total": sum(
            self.cfg.objective.weights[t] * losses[t] for t in losses), "samples": counts,
            "global_losses": mean, "global_samples": global_counts, "lr": lr, "grad_norm": grad_norm,
            "skipped": skipped} | ({"batch_shapes": self.batch_shapes} if self.batch_shapes else {})),
            file=self.metrics, flush=True)
        self.batch_shapes = None
        if self.rank != 0:
            return
        if self.writer is not None:
            for t in tasks:
                self.writer.add_scalar(f"loss/{t}", mean[t], self.step)
                self.writer.add_scalar(f"samples_seen/{t}", global_seen[t], self.step)
                self.writer.add_scalar(f"data/skipped/{t}", skipped.get(t, 0), self.step)
            if global_seen[UND_TEXT]:
                self.writer.add_scalar(f"samples_seen/{UND_TEXT}", global_seen[UND_TEXT], self.step)
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

    def summary(self, status: str, final: Path | None = None) -> None:
        """One line on rank 0 at the end of a launch: how far, the last losses, where the weights are."""
        if self.rank != 0:
            return
        latest = find_checkpoint(self.ckpt_dir, "latest")
        losses = " ".join(f"{t} {v:.4f}" for t, v in self.last_losses.items()) or "none (no step this launch)"
        where = [f"final weights {final}"] if final else []
        where += [f"checkpoint {latest}"] if latest else []
        print(f"run {status} at step {self.step}/{self.full_cfg.train.steps} | final losses {losses} | "
              f"{' | '.join(where) or 'no weights written'}"
              f"{'' if final or self.step == self.full_cfg.train.steps else ' | continue with --resume latest'}",
              flush=True)

    def log0(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, flush=True)

    # ---- checkpoints ---------------------------------------------------------------------------
    def save(self) -> None:
        """Write step_N so that it is either absent or whole on disk: into ``partial.step_N``, fsynced,
        marked COMPLETE, renamed (an existing step_N is replaced whole, never written into), then
        ``latest``. A write failure names the path and the cause (full disk, read-only folder)."""
        tag = f"step_{self.step:07d}"
        folder, partial = self.ckpt_dir / tag, self.ckpt_dir / f"partial.{tag}"
        try:
            if self.rank == 0:   # a crashed save's leftovers; and no old file may survive in `partial`
                self.ckpt_dir.mkdir(parents=True, exist_ok=True)
                for old in self.ckpt_dir.glob("partial.step_*"):
                    shutil.rmtree(old)
            dist.barrier()
            self.engine.save(self.ckpt_dir, partial.name, client_state={"step": self.step, "stage": self.stage})
            torch.save({"step": self.step, "stage": self.stage, "loaders": self.loaders.state_dict(),
                        "objective": self.objective.state_dict(), "samples_seen": dict(self.samples_seen),
                        "task_rng": self.streams.state_dict(),
                        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                                "numpy": np.random.get_state()}},
                       partial / f"unimrg_rank{self.rank}.pt")
            dist.barrier()
            if self.local_rank == 0:   # this node's page cache holds what its ranks wrote
                durable.fsync_tree(partial)
            dist.barrier()
            if self.rank == 0:
                # Only now is the checkpoint whole: mark it, publish it under its name, point `latest` at it.
                durable.write_durably(partial / "config.yaml", to_yaml(self.full_cfg))   # what a resume must continue
                durable.write_durably(partial / COMPLETE, f"{self.world}\n")
                if folder.exists():   # re-saving a step (a run restarted without resume): replace it whole
                    replaced = self.ckpt_dir / f"replaced.{tag}"
                    shutil.rmtree(replaced, ignore_errors=True)
                    os.replace(folder, replaced)
                    os.replace(partial, folder)
                    shutil.rmtree(replaced)
                else:
                    os.replace(partial, folder)
                durable.fsync_path(self.ckpt_dir)
                durable.write_durably(self.ckpt_dir / "latest", tag)
                older = sorted(p for p in self.ckpt_dir.glob("step_*") if p.name != tag)
                for old in older[:max(0, len(older) - (self.cfg.train.keep_checkpoints - 1))]:
                    shutil.rmtree(old, ignore_errors=True)
        except (OSError, RuntimeError) as e:   # torch.save reports write failures as RuntimeError
            latest = find_checkpoint(self.ckpt_dir, "latest") if self.ckpt_dir.is_dir() else None
            msg = durable.describe_write_error(e, partial, self.ckpt_dir, str(latest) if latest else None)
            if msg is None:
                raise
            shutil.rmtree(partial, ignore_errors=True)   # give the space back; older checkpoints stay
            raise durable.RunFolderError(msg) from e
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
        # A stage may add tasks the previous one did not train (a curriculum); only there may a task
        # have no saved position. A plain resume with a changed task set still refuses.
        self.loaders.load_state_dict(state["loaders"], new_tasks=tuple(self.objective.tasks) if self.new_stage else ())
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

    @staticmethod
    def set_aside_rows_after(path: Path, step: int) -> None:
        """Steps after the resumed checkpoint that a killed launch had logged: they are re-run now, so
        they move to ``<file>.discarded`` and every step appears once in the metrics."""
        if not path.is_file():
            return
        keep, drop = [], []
        for line in path.read_text().splitlines(keepends=True):
            (drop if line.strip() and json.loads(line)["step"] > step else keep).append(line)
        if drop:
            with open(path.with_suffix(".jsonl.discarded"), "a") as f:
                f.writelines(drop)
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(keep))
            os.replace(tmp, path)

    def on_signal(self, signum, frame) -> None:
        # Only set a flag: checkpointing mid-step would tear the accumulation.
        self.stop_requested = True
        self.stop_signal = self.stop_signal or signal.Signals(signum).name

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

    def close(self, ok: bool = True) -> None:
        """Free workers, engine and files. ``ok=False`` (after an error, the process about to exit)
        only flushes the logs: no collective, as the other ranks may be anywhere and a barrier would
        hang until the process-group timeout, and no worker joins (exiting ends the workers)."""
        if ok:
            self.loaders.close()   # energon workers otherwise linger until garbage collection
            self.engine.close()
        if self.writer is not None:
            self.writer.close()
        self.metrics.close()
        if ok:
            dist.barrier()


def abort_process_group(timeout_s: float = 10) -> None:
    """Abort this rank's process group, so that peers blocked in a collective with it fail now instead
    of at the timeout (gloo: their sockets close; NCCL: communicators abort). Best effort, bounded."""
    if not (dist.is_available() and dist.is_initialized()):
        return

    def abort():
        try:
            dist.distributed_c10d._abort_process_group()
        except Exception:   # noqa: BLE001 -- private API; exiting closes the connections anyway
            pass
    t = threading.Thread(target=abort, daemon=True)
    t.start()
    t.join(timeout_s)


def batch_shapes(b) -> dict:
    """Shapes and dtypes of a task batch's tensors (and its prompt count), JSON-ready."""
    out = {"images": [*b.images.shape, str(b.images.dtype).removeprefix("torch.")]}
    targets = getattr(b, "targets", None)
    if targets is not None:
        out["targets"] = [*targets.shape, str(targets.dtype).removeprefix("torch.")]
        out["prompts"] = len(b.prompts)
    else:
        out["conversations"] = len(b.conversations)
    return out


def run(cfg: Config) -> int:
    """Train every remaining stage; the next stage starts from the checkpoint the last one wrote.

    On an exception: log it with the rank and phase, clean up without collectives, abort the process
    group and re-raise (launch/train.py then exits at once; under submitit the error is recorded)."""
    watchdog = Watchdog(cfg.train.hang_timeout_s, os.environ.get("RANK", "0"), cfg.train.startup_timeout_s)
    trainer = None
    try:
        while True:
            watchdog.progress("start-up (model, engine, data loaders, resume)", startup=True)
            trainer = Trainer(cfg, watchdog)
            code = trainer.fit()
            more = code == 0 and trainer.next_stage()
            watchdog.progress("closing the stage")
            trainer.close()
            trainer = None
            if not more:
                return code
            cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, resume="latest"))
    except BaseException as e:
        print(f"rank {os.environ.get('RANK', '0')}: error during {watchdog.phase}: {type(e).__name__}: {e}\n"
              f"{traceback.format_exc()}", file=sys.stderr, flush=True)
        e.unimrg_reported = True   # launch/train.py: do not print it twice
        try:
            if trainer is not None:
                trainer.close(ok=False)
        except Exception:   # noqa: BLE001 -- the first error is the one to report
            pass
        abort_process_group()
        raise
    finally:
        watchdog.stop()
        sys.stdout.flush()
