"""Batch plans: how a recipe's batch is laid out over data-parallel ranks and micro-steps.

    python launch/submit.py --model openuni --recipe paper --nodes 8 --gpus-per-node 8 --dry-run

``unimrg.config.batch_arithmetic`` turns the recipe fields into the arguments of ``plan_batch``; this
module is plain arithmetic (no torch, no config), so the planner is unit-tested over every recipe
and GPU count in milliseconds.

Two batch policies (``train.batch_policy``):

* ``fixed_per_gpu``: the recipe's micro-batch and accumulation hold on every GPU, the global batch
  grows with the GPU count and ``optim.lr_scaling`` (none | linear | sqrt) scales the learning rate by
  the ratio of global batches to the one at ``train.reference_gpus``.
* ``fixed_global``: the paper's global batch (and so its per-task counts per optimizer step) holds
  at any GPU count that allows it. Placements, in order of preference:

  - ``replicated``: every rank runs the recipe's schedule (round-robin: the same task on every rank
    in a micro-step; joint: all tasks), the micro-batch shrinks (never above the recipe's) and the
    accumulation changes to keep the global batch;
  - ``task_parallel``: the ranks are split into ``groups`` (a divisor of the task count), each owning
    ``tasks / groups`` tasks and running them round-robin; in one micro-step ranks of different
    groups run different tasks. The gradient of an optimizer step equals the replicated one's: every
    task still contributes its paper count of samples, each loss a mean over its micro-batch, and
    DeepSpeed averages over ``accumulation × ranks`` either way (joint recipes get ``loss_scale =
    tasks``, because a joint micro-step sums the task losses where a one-task micro-step has one).
    Ranks running different graphs in one micro-step rule out per-micro-step gradient reduction in
    backward hooks (ZeRO-2: reduction order follows the graph, so ranks would reduce mismatched
    buckets) and per-module parameter gathers (ZeRO-3: deadlock). Task-parallel plans therefore run
    ZeRO-1 without communication overlap (gradients kept locally and reduced once per step, in
    parameter order) and the trainer gives every trainable parameter a gradient on every rank.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

BATCH_POLICIES = ("fixed_global", "fixed_per_gpu")
LR_SCALINGS = ("none", "linear", "sqrt")
PLACEMENTS = ("auto", "replicated", "task_parallel")


class PlanError(ValueError):
    """No layout satisfies the request; the message says what to change."""


@dataclass
class BatchPlan:
    """DeepSpeed's batch fields, where each task runs, and the learning rate the run uses."""

    micro_batch: int            # train_micro_batch_size_per_gpu: samples in one micro-step on one rank
    grad_accum: int             # gradient_accumulation_steps
    dp_size: int                # data-parallel ranks
    train_batch_size: int       # micro_batch × grad_accum × dp_size
    per_task_per_step: int      # samples of each of a rank's tasks per optimizer step on one rank
    tasks: list[str] = field(default_factory=list)   # enabled tasks, in round-robin order
    schedule: str = "round_robin"                     # the recipe's objective.schedule
    placement: str = "replicated"                     # "replicated" | "task_parallel"
    groups: int = 1                                   # task groups (task_parallel); 1 = replicated
    micro_per_task: int = 0                           # samples of one task in one micro-batch
    loss_scale: float = 1.0                           # multiplies the λ-weighted loss (see module doc)
    zero_stage: int = 2                               # the ZeRO stage that runs (1 under task_parallel)
    policy: str = "fixed_per_gpu"
    lr: float = 0.0                                   # optim.lr × lr_factor: what the schedule peaks at
    lr_factor: float = 1.0

    # ---- where each task runs --------------------------------------------------------------------
    @property
    def group_size(self) -> int:
        return self.dp_size // self.groups

    def group_of(self, rank: int) -> int:
        return rank // self.group_size

    def rank_in_group(self, rank: int) -> int:
        """This rank's data-parallel rank among the ranks sharing its tasks (its loaders' shard)."""
        return rank % self.group_size

    def group_tasks(self, group: int) -> list[str]:
        per = len(self.tasks) // self.groups
        return self.tasks[group * per:(group + 1) * per]

    def rank_tasks(self, rank: int) -> list[str]:
        return self.group_tasks(self.group_of(rank))

    def micro_step_tasks(self, rank: int, micro: int) -> list[str]:
        """Tasks whose batches make up micro-step ``micro`` of an optimizer step on ``rank``."""
        if self.placement == "replicated" and self.schedule == "joint":
            return list(self.tasks)
        mine = self.rank_tasks(rank)
        return [mine[micro % len(mine)]]

    @property
    def per_task_global(self) -> int:
        """Samples of each task per optimizer step over all ranks (equal for every task)."""
        return self.train_batch_size // len(self.tasks)

    # ---- reports ---------------------------------------------------------------------------------
    def describe(self, tasks: list[str] | None = None) -> str:
        tasks = tasks or self.tasks
        where = (f"task-parallel: {self.groups} groups of {self.group_size} ranks"
                 if self.placement == "task_parallel" else f"{self.schedule}, every rank")
        return (f"{self.per_task_global} per task × {len(tasks)} tasks = {self.train_batch_size} samples per "
                f"optimizer step on {self.dp_size} ranks ({where}; micro-batch {self.micro_batch}, "
                f"accumulation {self.grad_accum}, lr {self.lr:.3g})")

    def report(self) -> list[str]:
        """The dry run's lines for this plan."""
        if self.placement == "task_parallel":
            spans = ", ".join(f"{'+'.join(self.group_tasks(g))}: ranks {g * self.group_size}–"
                              f"{(g + 1) * self.group_size - 1}" for g in range(self.groups))
            placement = (f"task-parallel, {self.groups} groups × {self.group_size} ranks ({spans}); each "
                         f"micro-step holds one task's batch per rank; runs as ZeRO-1 without overlap whatever "
                         f"the ZeRO JSON says (gradients reduced once per step; a full gradient buffer per GPU)")
        elif self.schedule == "joint":
            placement = "replicated joint: every micro-step holds every task on every rank"
        else:
            placement = "replicated round-robin: all ranks run the same task in a micro-step"
        scale = (f", ×{self.loss_scale:g} loss scale (a joint micro-step sums the task losses)"
                 if self.loss_scale != 1 else "")
        return [f"placement: {placement}",
                "per task per optimizer step: " + ", ".join(f"{t} {self.per_task_global}" for t in self.tasks)
                + f" (global batch {self.train_batch_size}, {self.policy})",
                f"micro-batch {self.micro_batch} per rank ({self.micro_per_task} per task), micro-steps "
                f"{self.grad_accum} per optimizer step{scale}",
                f"effective lr {self.lr:.3g} (×{self.lr_factor:.4g})"]

    def as_dict(self) -> dict:
        return asdict(self)


def _replicated(per_rank: int, n: int, joint: bool, micro_max: int) -> tuple[int, int] | None:
    """(micro per task, accumulation) with the fewest micro-steps, micro ≤ the recipe's."""
    unit, step = (n, 1) if joint else (1, n)   # samples per micro-step per task-sample; accumulation step
    for accum in range(step, per_rank + 1, step):
        if per_rank % (accum * unit) == 0 and per_rank // (accum * unit) <= micro_max:
            return per_rank // (accum * unit), accum
    return None


def _task_parallel(per_rank: int, n: int, dp: int, micro_max: int) -> tuple[int, int, int] | None:
    """(groups, micro, accumulation): fewest micro-steps, then fewest groups."""
    best = None
    for groups in (k for k in range(2, n + 1) if n % k == 0 and dp % k == 0):
        step = n // groups   # each rank cycles through its group's tasks, all of them every step
        for accum in range(step, per_rank + 1, step):
            if per_rank % accum == 0 and per_rank // accum <= micro_max:
                if best is None or accum < best[2]:
                    best = (groups, per_rank // accum, accum)
                break
    return best


def _fixed_global(batch: int, n: int, joint: bool, micro: int, dp: int, placement: str, zero_stage: int):
    """A plan tuple (placement, groups, micro per task, accumulation) or a reason it fails."""
    if batch % dp:
        return f"{batch} samples do not split evenly over {dp} ranks"
    per_rank = batch // dp
    if placement in ("auto", "replicated"):
        got = _replicated(per_rank, n, joint, micro)
        if got:
            return ("replicated", 1, *got)
        if placement == "replicated":
            unit = "micro-steps of all tasks" if joint else "whole rounds of the tasks"
            return f"{per_rank} samples per rank cannot be {unit} with a micro-batch ≤ {micro} per task"
    got = _task_parallel(per_rank, n, dp, micro * (n if joint else 1))
    if not got:
        return (f"no task-parallel split either (needs a task-group count dividing both the {n} tasks "
                f"and the {dp} ranks, and whole rounds of each group's tasks)")
    if zero_stage == 3:
        return ("it needs task-parallel placement, which runs on ZeRO-1 (ZeRO-3 gathers parameters "
                "per module on every rank together: ranks running different tasks would deadlock); "
                "set train.zero_stage=2 with a ZeRO-2 JSON (it runs as ZeRO-1)")
    return ("task_parallel", *got)


def plan_batch(*, tasks: list[str], schedule: str, micro_per_task: int, grad_accum: int, dp_size: int,
               policy: str, reference_gpus: int, global_batch: int, placement: str, zero_stage: int,
               lr: float, lr_scaling: str) -> BatchPlan:
    """The plan for ``dp_size`` ranks; raises PlanError naming what to change."""
    n, joint = len(tasks), schedule == "joint"
    per_micro = micro_per_task * (n if joint else 1)    # samples in one recipe micro-step on one rank
    reference = per_micro * grad_accum * reference_gpus  # the recipe's global batch (0: no reference)
    if policy == "fixed_per_gpu":
        if placement == "task_parallel":
            raise PlanError("train.placement=task_parallel needs train.batch_policy=fixed_global "
                            "(fixed_per_gpu keeps the recipe's per-rank micro-steps)")
        if global_batch and not reference_gpus and global_batch != per_micro * grad_accum * dp_size:
            raise PlanError(
                f"train.global_batch_size={global_batch} but train.micro_batch_per_task × train.grad_accum × "
                f"data-parallel size{' × tasks (joint)' if joint else ''} = {per_micro} × {grad_accum} × "
                f"{dp_size} = {per_micro * grad_accum * dp_size}; set train.reference_gpus to the GPU count "
                "the recipe was written for, or train.batch_policy=fixed_global")
        plan = ("replicated", 1, micro_per_task, grad_accum)
        ratio = dp_size / reference_gpus if reference_gpus else 1.0
    else:
        batch = global_batch or reference
        if not batch:
            raise PlanError("train.batch_policy=fixed_global needs the global batch to keep: set "
                            "train.global_batch_size or train.reference_gpus")
        plan = _fixed_global(batch, n, joint, micro_per_task, dp_size, placement, zero_stage)
        if isinstance(plan, str):
            working = [w for w in range(1, batch + 1) if not isinstance(
                _fixed_global(batch, n, joint, micro_per_task, w, placement, zero_stage), str)]
            raise PlanError(
                f"train.batch_policy=fixed_global keeps {batch} samples per optimizer step "
                f"({batch // n} per task), impossible on {dp_size} ranks: {plan}. GPU counts that keep it: "
                f"{working}; or scale the batch with train.batch_policy=fixed_per_gpu "
                f"({per_micro * grad_accum} per GPU, optim.lr_scaling=none|linear|sqrt"
                f"{'' if reference_gpus else ' with train.reference_gpus'})")
        ratio = 1.0
    where, groups, micro, accum = plan
    factor = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[lr_scaling]
    tp = where == "task_parallel"
    micro_batch = micro * (n if joint and not tp else 1)
    mine = n // groups if (tp or not joint) else 1       # tasks a rank cycles through
    return BatchPlan(
        micro_batch=micro_batch, grad_accum=accum, dp_size=dp_size,
        train_batch_size=micro_batch * accum * dp_size, per_task_per_step=micro * accum // mine,
        tasks=list(tasks), schedule=schedule, placement=where, groups=groups, micro_per_task=micro,
        loss_scale=float(n) if tp and joint else 1.0, zero_stage=1 if tp else zero_stage, policy=policy,
        lr=lr * factor, lr_factor=factor)
