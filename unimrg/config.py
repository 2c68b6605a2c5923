"""Run configuration: defaults → YAML recipe → dotted ``key=value`` overrides (OmegaConf, strict).

    python launch/submit.py --model openuni --recipe tiny --dry-run train.steps=50

Each component's ``*Config`` lives next to the component (``ObjectiveConfig`` in objective.py,
``DataConfig`` in data/loaders.py, ``OpenUniConfig`` in models/openuni.py); this module only adds the
training / run sections and assembles them. ``batch_arithmetic`` is the one place the per-task
micro-batch, accumulation and data-parallel size are turned into DeepSpeed's batch fields.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from unimrg.batching import BATCH_POLICIES, LR_SCALINGS, PLACEMENTS, BatchPlan, PlanError, plan_batch
from unimrg.data.loaders import DataConfig, und_text_ratio
from unimrg.faults import FaultSpecError, parse_fault
from unimrg.eval.intrain import EvalConfig
from unimrg.models import registry
from unimrg.models.base import ModelConfig
from unimrg.objective import ObjectiveConfig
from unimrg.pretrain import PretrainConfig
from unimrg.tasks import TASKS

REPO = Path(__file__).resolve().parent.parent
# Shipped folders. In a checkout: REPO/launch/recipes and REPO/ds_configs. In an installed (non-editable)
# copy REPO is site-packages: the recipes are package data of `launch` (same relative path) and setup.py
# installs ds_configs/ as package data inside unimrg/.
RECIPES = REPO / "launch" / "recipes"
DS_CONFIGS = REPO / "ds_configs" if (REPO / "ds_configs").is_dir() else Path(__file__).resolve().parent / "ds_configs"


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
    Each stage starts a fresh optimizer and LR schedule from the previous stage's weights; the data
    loaders of the tasks it keeps continue where they were, those of tasks it adds start at the beginning."""

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
    checkpoint_every: int = 500       # also at the end and on a preemption signal; 0 = only those
    keep_checkpoints: int = 2
    stop_after: int = 0               # leave after this many steps (with a checkpoint); 0 = run to `steps`
    export_final: bool = True         # write consolidated weights to RUN/final/ at the end
    stages: list[StageConfig] = field(default_factory=list)   # [] = one stage of `steps` steps
    # a rank making no progress this long (stuck in a collective, the data, the file system) logs
    # its rank and phase and exits non-zero, so the job ends (0 = off); covers a checkpoint save too
    hang_timeout_s: float = 900
    # start-up (model, engine, a resume load, loader workers) and each stage's first optimizer step (its first
    # batch, first collectives, e.g. NCCL communicator set-up) get this long instead (the larger of the two)
    startup_timeout_s: float = 1800
    max_skipped_steps: int = 3        # more consecutive skipped steps (non-finite loss/grads) stop the run
    debug_fault: str = ""             # TEST HOOK (unimrg/faults.py): inject an exception, hang or NaN


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
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)   # model.base=tiny / --job pretrain


def repo_path(path: str) -> Path:
    """A path as given, or relative to the repository (recipes name ``ds_configs/...``, found in an
    installed copy too)."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    if p.parts and p.parts[0] == "ds_configs":
        return DS_CONFIGS.joinpath(*p.parts[1:])
    return REPO / p


class ConfigError(ValueError):
    """A config that cannot run; the message names the fields and how to fix them."""


def recipe_path(model: str, recipe: str) -> Path:
    """``--recipe tiny`` → launch/recipes/<model>_tiny.yaml; a path is taken as is."""
    if model not in registry.names():
        raise ConfigError(f"unknown model {model!r}; registered models: {', '.join(registry.names())} "
                          "(unimrg/models/registry.py)")
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
    cfg = OmegaConf.to_object(merged)
    resolve_resolution(cfg.model)
    return cfg


def resolve_resolution(model) -> None:
    """Fill ``model.image_size`` / ``model.target_size`` left at 0 with the adapter's native sizes, so
    the resolved config (what every rank reads) states the numbers the loaders use."""
    res = registry.adapter_class(model.name).resolve_resolution(model)
    model.image_size, model.target_size = res.image, res.target


def check_resolution(model) -> None:
    """A full-size model runs at its checkpoint's resolution unless the recipe says otherwise on purpose."""
    if model.size != "full" or model.non_native_resolution:
        return
    native = registry.adapter_class(model.name).native_resolution(model)
    if (model.image_size, model.target_size) != (native.image, native.target):
        raise ConfigError(
            f"model.image_size={model.image_size} / model.target_size={model.target_size}, but the released "
            f"{model.name} checkpoint runs at {native.image} (input images) / {native.target} (generation "
            f"targets): the loaders would resize every image and target to a size the model was not trained "
            f"at. Leave both unset (0 = native), or set model.non_native_resolution=true to run at other sizes")


def shape_report(cfg: Config, tasks: list[str]) -> str:
    """Per task: the sides the loaders deliver and the model's tokens per sample / sequence lengths."""
    cls = registry.adapter_class(cfg.model.name)
    m = cfg.model
    lines = [f"resolution: input images {m.image_size} px, generation targets {m.target_size} px "
             f"(native {cls.native_resolution(m).image} / {cls.native_resolution(m).target})",
             f"preprocessing ({m.preprocessing}): {cls.image_transforms(m).describe()}"]
    per_task = cfg.train.micro_batch_per_task
    for t in tasks:
        shapes = f"images ({per_task}, 3, {m.image_size}, {m.image_size})" + (
            "" if t == "und" else f", targets ({per_task}, 3, {m.target_size}, {m.target_size})")
        plan = ", ".join(f"{k} {v}" for k, v in cls.sequence_plan(m, t).items())
        lines.append(f"  {t:5s} {shapes}; {plan}")
    return "\n".join(lines)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def load_resolved(path: str | Path) -> Config:
    """Load a run folder's resolved ``config.yaml`` (what every rank and every requeue reads)."""
    raw = OmegaConf.load(path)
    name = raw.model.name
    schema = OmegaConf.structured(Config(model=registry.config_class(name)(name=name)))
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(schema, raw))
    except Exception as e:
        raise ConfigError(f"{path}: {e}") from None
    resolve_resolution(cfg.model)
    return cfg


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


def ds_config_file(cfg: Config) -> Path:
    """The ZeRO JSON a run reads: train.ds_config, else ds_configs/zero{train.zero_stage}.json."""
    return repo_path(cfg.train.ds_config) if cfg.train.ds_config else DS_CONFIGS / f"zero{cfg.train.zero_stage}.json"


# DeepSpeed JSON blocks the recipe owns: the trainer builds AdamW and the warm-up + cosine schedule itself
# and hands them to DeepSpeed, so a block here would be ignored while ds_config.json claimed it ran.
RECIPE_OWNED = {"optimizer": "optim.lr / optim.betas / optim.eps / optim.weight_decay",
                "scheduler": "optim.warmup_fraction / optim.min_lr_ratio"}


def check_ds_config(cfg: Config) -> None:
    """The ZeRO JSON agrees with the recipe: same stage, no optimizer / scheduler of its own."""
    path = ds_config_file(cfg)
    try:
        ds = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"train.ds_config: cannot read {path}: {e}") from None
    stage = ds.get("zero_optimization", {}).get("stage") if isinstance(ds, dict) else None
    if stage != cfg.train.zero_stage:
        raise ConfigError(f"{path} has zero_optimization.stage={stage} but train.zero_stage={cfg.train.zero_stage}; "
                          f"make them agree (e.g. train.ds_config=ds_configs/zero{cfg.train.zero_stage}.json)")
    owned = [k for k in RECIPE_OWNED if k in ds]
    if owned:
        raise ConfigError(f"{path} has a {' and a '.join(repr(k) for k in owned)} block: the recipe owns them "
                          f"({'; '.join(RECIPE_OWNED[k] for k in owned)}); remove the block from the JSON and "
                          "set those fields instead")


def _path_fields(model_cfg) -> list[str]:
    """The model fields that name files or folders the run reads (official weights, tokenizers)."""
    return [f.name for f in dataclasses.fields(model_cfg)
            if f.name in ("checkpoint", "tokenizer") or f.name.endswith(("_path", "_checkpoint"))]


def check_inputs(cfg: Config) -> None:
    """What the ranks will read, checked before they start: official weights at full size, and every
    model path readable. (Data: ``unimrg.data.loaders.check_data_paths``; the ZeRO JSON: ``validate``.)"""
    m = cfg.model
    if m.init not in ("official", "random"):
        raise ConfigError(f"model.init={m.init!r}: use official (load model.checkpoint) or random")
    if m.init == "random" and m.checkpoint:
        raise ConfigError(f"model.init=random but model.checkpoint={m.checkpoint} is set: drop one of them")
    if m.size != "tiny" and m.init == "official" and not m.checkpoint:
        raise ConfigError(f"model.size={m.size} without official weights: set model.checkpoint=<local path to the "
                          f"released {m.name} weights> (nothing is downloaded), or model.init=random to train "
                          "the full-size model from random weights on purpose")
    problems = []
    for name in _path_fields(m):
        value = getattr(m, name)
        if not value:
            continue
        p = Path(value)
        if not p.exists():
            problems.append(f"model.{name}={value}: no such file or folder")
        elif not os.access(p, os.R_OK | (os.X_OK if p.is_dir() else 0)):
            problems.append(f"model.{name}={value}: not readable by this user")
    if problems:
        raise ConfigError("; ".join(problems) + " (give local paths to the official files; nothing is downloaded)")


def validate(cfg: Config, dp_size: int) -> BatchPlan:
    """Everything ``--dry-run`` checks before any rank starts: fields, batch arithmetic, paths."""
    t = cfg.train
    if t.precision not in ("bf16", "fp32"):
        raise ConfigError(f"train.precision={t.precision!r}: use bf16 or fp32 (fp16 is not supported)")
    if t.checkpoint_every < 0:
        raise ConfigError(f"train.checkpoint_every={t.checkpoint_every} must be ≥ 0 (0 = checkpoint only at the "
                          "end and on a preemption signal)")
    if t.zero_stage not in (1, 2, 3):
        raise ConfigError(f"train.zero_stage={t.zero_stage}: use 1, 2 or 3")
    if t.steps < 1 or t.stop_after < 0:
        raise ConfigError(f"train.steps={t.steps} must be ≥ 1 and train.stop_after={t.stop_after} ≥ 0")
    if t.startup_timeout_s < 0:
        raise ConfigError(f"train.startup_timeout_s={t.startup_timeout_s} must be ≥ 0 (it is the start-up's "
                          "allowance; train.hang_timeout_s=0 turns the watchdog off)")
    if t.hang_timeout_s < 0 or t.max_skipped_steps < 0:
        raise ConfigError(f"train.hang_timeout_s={t.hang_timeout_s} and train.max_skipped_steps="
                          f"{t.max_skipped_steps} must be ≥ 0 (hang_timeout_s=0 turns the watchdog off)")
    try:
        fault = parse_fault(t.debug_fault)
    except FaultSpecError as e:
        raise ConfigError(str(e)) from None
    if fault and fault.task and fault.task not in cfg.objective.tasks:
        raise ConfigError(f"train.debug_fault={t.debug_fault!r}: task {fault.task!r} is not in "
                          f"objective.tasks={cfg.objective.tasks}")
    if t.ds_config and not repo_path(t.ds_config).is_file():
        raise ConfigError(f"train.ds_config={t.ds_config}: no such file (see ds_configs/)")
    check_ds_config(cfg)
    if cfg.model.checkpoint and not Path(cfg.model.checkpoint).exists():
        raise ConfigError(f"model.checkpoint={cfg.model.checkpoint}: no such path (give a local path "
                          "to the official weights; nothing is downloaded)")
    try:
        und_text_ratio(cfg.data)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    check_resolution(cfg.model)
    if cfg.model.smoke and cfg.model.size != "full":
        raise ConfigError(f"model.smoke=true narrows the full architecture; model.size={cfg.model.size!r} must be 'full'")
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
