"""Run configuration: defaults → YAML recipe → dotted ``key=value`` overrides (OmegaConf, strict).

    python launch/submit.py --model openuni --recipe tiny --dry-run train.steps=50

Each component's ``*Config`` lives next to the component (``ObjectiveConfig`` in objective.py,
``DataConfig`` in data/loaders.py, ``OpenUniConfig`` in models/openuni.py); this module only adds the
training / run sections and assembles them. ``batch_arithmetic`` is the one place the per-task
micro-batch, accumulation and data-parallel size are turned into DeepSpeed's batch fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from unimrg.batching import BATCH_POLICIES, LR_SCALINGS, PLACEMENTS, BatchPlan, PlanError, plan_batch
from unimrg.data.loaders import DataConfig
from unimrg.eval.intrain import EvalConfig
from unimrg.models import registry
from unimrg.models.base import ModelConfig
from unimrg.objective import ObjectiveConfig
from unimrg.tasks import TASKS

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "launch" / "recipes"


@dataclass
class OptimConfig:
    lr: float = 1e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.02
    eps: float = 1e-8
    warmup_fraction: float = 0.01   # linear warm-up over this fraction of train.steps, then cosine
    min_lr_ratio: float = 0.0       # cosine floor, as a fraction of lr
    grad_clip: float = 1.0
    # train.batch_policy=fixed_per_gpu: lr × (GPUs / train.reference_gpus) (linear) or its square root
    lr_scaling: str = "none"        # none | linear | sqrt


@dataclass
class StageConfig:
    """A block of optimizer steps with its own tasks and extra frozen modules. OpenUni's paper recipe
    has two: 2,000 four-task steps, then 2,000 pixel-only steps with the understanding model frozen.
    Each stage starts a fresh optimizer and LR schedule from the previous stage's weights."""

    steps: int = 0
    tasks: list[str] = field(default_factory=list)    # [] = objective.tasks
    freeze: list[str] = field(default_factory=list)   # module paths, or "understanding" (the adapter's)


@dataclass
class TrainConfig:
    steps: int = 1000                 # optimizer steps (we count steps, never epochs)
    micro_batch_per_task: int = 4     # samples of one task in one micro-batch on one rank
    grad_accum: int = 4               # micro-steps per optimizer step
    global_batch_size: int = 0        # optional check: samples per optimizer step over all ranks (0 = derive)
    # Scale-out (unimrg/batching.py): fixed_global keeps the recipe's global batch on any GPU count
    # that allows it (task-parallel placement when round-robin would overshoot); fixed_per_gpu keeps
    # micro-batch × accumulation per GPU (global batch grows, optim.lr_scaling applies).
    batch_policy: str = "fixed_per_gpu"
    reference_gpus: int = 0           # GPUs the recipe's micro-batch × accumulation were written for
    placement: str = "auto"           # auto | replicated | task_parallel (fixed_global only)
    precision: str = "bf16"           # "bf16" | "fp32" (fp16 is not supported: the paper's models run bf16)
    zero_stage: int = 2               # 1 | 2 | 3 (1: gradients reduced once per step, not per micro-step)
    ds_config: str = ""               # ZeRO JSON; "" = ds_configs/zero{zero_stage}.json
    seed: int = 0
    log_every: int = 1
    checkpoint_every: int = 500       # also at the end and on a preemption signal
    keep_checkpoints: int = 2
    stop_after: int = 0               # leave after this many steps (with a checkpoint); 0 = run to `steps`
    export_final: bool = True         # write consolidated weights to RUN/final/ at the end
    stages: list[StageConfig] = field(default_factory=list)   # [] = one stage of `steps` steps


@dataclass
class RunConfig:
    dir: str = "runs/default"
    resume: str = ""                  # "" (fresh) | "latest" (if any) | path to a checkpoint folder
    tensorboard: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def repo_path(path: str) -> Path:
    """A path as given, or relative to the repository (recipes name ``ds_configs/...``)."""
    p = Path(path)
    return p if p.is_absolute() or p.exists() else REPO / p


class ConfigError(ValueError):
    """A config that cannot run; the message names the fields and how to fix them."""


def recipe_path(model: str, recipe: str) -> Path:
    """``--recipe tiny`` → launch/recipes/<model>_tiny.yaml; a path is taken as is."""
    p = Path(recipe)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise FileNotFoundError(f"recipe {p} does not exist")
        return p
    p = RECIPES / f"{model}_{recipe}.yaml"
    if not p.is_file():
        have = sorted(q.stem for q in RECIPES.glob(f"{model}_*.yaml"))
        raise FileNotFoundError(f"no recipe {p}; recipes for {model}: {have}")
    return p


def read_recipe(path: str | Path):
    """A recipe YAML; ``inherit: other_recipe`` (a file beside it, without .yaml) is merged under it,
    so an ablation row states only what differs from the paper recipe."""
    raw = OmegaConf.load(path)
    parent = raw.pop("inherit", None)
    if parent is None:
        return raw
    parent_path = Path(path).parent / f"{parent}.yaml"
    if not parent_path.is_file():
        raise FileNotFoundError(f"{path}: inherit: {parent} but {parent_path} does not exist")
    return OmegaConf.merge(read_recipe(parent_path), raw)


def load_config(recipe: str | Path | None = None, overrides: list[str] = (), model: str | None = None) -> Config:
    """Merge defaults, the recipe YAML and ``key=value`` overrides into a typed ``Config``."""
    raw = read_recipe(recipe) if recipe else OmegaConf.create()
    cli = OmegaConf.from_dotlist(list(overrides))
    name = OmegaConf.select(cli, "model.name") or model or OmegaConf.select(raw, "model.name") or "openuni"
    schema = OmegaConf.structured(Config(model=registry.config_class(name)(name=name)))
    try:
        merged = OmegaConf.merge(schema, raw, cli)
    except Exception as e:  # omegaconf names the offending key; add where it came from
        raise ConfigError(f"{recipe or 'defaults'} + overrides {list(overrides)}: {e}") from None
    merged.model.name = name
    return OmegaConf.to_object(merged)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def load_resolved(path: str | Path) -> Config:
    """Load a run folder's resolved ``config.yaml`` (what every rank and every requeue reads)."""
    raw = OmegaConf.load(path)
    name = raw.model.name
    schema = OmegaConf.structured(Config(model=registry.config_class(name)(name=name)))
    try:
        return OmegaConf.to_object(OmegaConf.merge(schema, raw))
    except Exception as e:
        raise ConfigError(f"{path}: {e}") from None


def batch_arithmetic(cfg: Config, dp_size: int) -> BatchPlan:
    """Check the batch fields against each other, the schedule and the batch policy, and lay the batch
    out over ``dp_size`` ranks (unimrg/batching.py); raise naming the fields and what to change."""
    t, o = cfg.train, cfg.objective
    o.validate()
    tasks = [x for x in TASKS if x in o.tasks]   # the canonical (round-robin) order
    n = len(tasks)
    problems = []
    if t.micro_batch_per_task < 1:
        problems.append(f"train.micro_batch_per_task={t.micro_batch_per_task} must be ≥ 1")
    if t.grad_accum < 1:
        problems.append(f"train.grad_accum={t.grad_accum} must be ≥ 1")
    if dp_size < 1:
        problems.append(f"data-parallel size {dp_size} must be ≥ 1 (--nodes × ranks per node)")
    if o.schedule == "round_robin" and t.grad_accum % n:
        problems.append(f"train.grad_accum={t.grad_accum} must be a multiple of the {n} enabled tasks "
                        f"{o.tasks} under objective.schedule=round_robin (one task per micro-step, every "
                        f"task in every optimizer step); use {n * max(1, round(t.grad_accum / n))} or "
                        "objective.schedule=joint")
    for name, value, allowed in (("train.batch_policy", t.batch_policy, BATCH_POLICIES),
                                 ("train.placement", t.placement, PLACEMENTS),
                                 ("optim.lr_scaling", cfg.optim.lr_scaling, LR_SCALINGS)):
        if value not in allowed:
            problems.append(f"{name}={value!r}: choose one of {list(allowed)}")
    if t.reference_gpus < 0:
        problems.append(f"train.reference_gpus={t.reference_gpus} must be ≥ 0 (0 = no reference)")
    ref = t.micro_batch_per_task * t.grad_accum * t.reference_gpus * (n if o.schedule == "joint" else 1)
    if t.reference_gpus and t.global_batch_size and t.global_batch_size != ref:
        problems.append(f"train.global_batch_size={t.global_batch_size} but train.micro_batch_per_task × "
                        f"train.grad_accum{' × tasks (joint)' if o.schedule == 'joint' else ''} × "
                        f"train.reference_gpus = {ref}")
    if problems:
        raise ConfigError("impossible batch arithmetic: " + "; ".join(problems))
    try:
        return plan_batch(tasks=tasks, schedule=o.schedule, micro_per_task=t.micro_batch_per_task,
                          grad_accum=t.grad_accum, dp_size=dp_size, policy=t.batch_policy,
                          reference_gpus=t.reference_gpus, global_batch=t.global_batch_size,
                          placement=t.placement, zero_stage=t.zero_stage, lr=cfg.optim.lr,
                          lr_scaling=cfg.optim.lr_scaling)
    except PlanError as e:
        raise ConfigError(f"impossible batch arithmetic: {e}") from None


def plan_report(cfg: Config, dp_size: int) -> list[str]:
    """What the dry run prints: per stage, placement, per-task samples, micro-steps, effective lr."""
    stages = stage_plans(cfg)
    lines = []
    for i, (_, _, s) in enumerate(stages):
        sc = stage_config(cfg, s)
        plan = batch_arithmetic(sc, dp_size)
        lines.append(f"stage {i + 1}/{len(stages)} {sc.objective.tasks} on {dp_size} GPUs"
                     + (f" (recipe written for {cfg.train.reference_gpus})" if cfg.train.reference_gpus else "")
                     + ":")
        lines += [f"  {line}" for line in plan.report()]
    return lines


def stage_plans(cfg: Config) -> list[tuple[int, int, StageConfig]]:
    """(first step, end step, stage) per stage; the steps of the stages must add up to train.steps."""
    stages = cfg.train.stages or [StageConfig(steps=cfg.train.steps)]
    if sum(s.steps for s in stages) != cfg.train.steps or any(s.steps < 1 for s in stages):
        raise ConfigError(f"train.stages steps {[s.steps for s in stages]} must each be ≥ 1 and add up to "
                          f"train.steps={cfg.train.steps}")
    out, start = [], 0
    for s in stages:
        out.append((start, start + s.steps, s))
        start += s.steps
    return out


def stage_config(cfg: Config, stage: StageConfig) -> Config:
    """The config one stage runs with: its task list in place of objective.tasks."""
    if not stage.tasks:
        return cfg
    return dataclasses.replace(cfg, objective=dataclasses.replace(cfg.objective, tasks=list(stage.tasks)))


def validate(cfg: Config, dp_size: int) -> BatchPlan:
    """Everything ``--dry-run`` checks before any rank starts: fields, batch arithmetic, paths."""
    t = cfg.train
    if t.precision not in ("bf16", "fp32"):
        raise ConfigError(f"train.precision={t.precision!r}: use bf16 or fp32 (fp16 is not supported)")
    if t.zero_stage not in (1, 2, 3):
        raise ConfigError(f"train.zero_stage={t.zero_stage}: use 1, 2 or 3")
    if t.steps < 1 or t.stop_after < 0:
        raise ConfigError(f"train.steps={t.steps} must be ≥ 1 and train.stop_after={t.stop_after} ≥ 0")
    if t.ds_config and not repo_path(t.ds_config).is_file():
        raise ConfigError(f"train.ds_config={t.ds_config}: no such file (see ds_configs/)")
    if cfg.model.checkpoint and not Path(cfg.model.checkpoint).exists():
        raise ConfigError(f"model.checkpoint={cfg.model.checkpoint}: no such path (give a local path "
                          "to the official weights; nothing is downloaded)")
    if cfg.run.resume not in ("", "latest") and not Path(cfg.run.resume).is_dir():
        raise ConfigError(f"run.resume={cfg.run.resume}: no such checkpoint folder (or use 'latest')")
    e = cfg.eval
    if e.every < 0 or (e.every and (e.num_images < 1 or e.batch_size < 1 or e.max_new_tokens < 1)):
        raise ConfigError(f"eval.every={e.every} must be ≥ 0 (0 = off); eval.num_images={e.num_images}, "
                          f"eval.batch_size={e.batch_size}, eval.max_new_tokens={e.max_new_tokens} must be ≥ 1")
    if e.every and e.source != "scenes" and not Path(e.source).is_dir():
        raise ConfigError(f"eval.source={e.source}: use 'scenes' or an existing image folder / prepared data root")
    plans = [batch_arithmetic(stage_config(cfg, s), dp_size) for _, _, s in stage_plans(cfg)]
    return plans[0]
