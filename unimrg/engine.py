"""The only module that imports DeepSpeed: distributed init, the ZeRO engine, checkpoints.

The trainer sees a small surface: ``engine(batches)`` → per-task losses, ``backward``, ``step``,
``save`` / ``load``, ``full_state_dict``. GPU ranks use NCCL and bf16; CPU ranks (tests, the demo)
use gloo with bf16 or fp32 and need no compiled DeepSpeed op.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

# DeepSpeed picks its accelerator at import time; without a GPU it must be told "cpu" first.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import deepspeed.comm  # noqa: E402

# DeepSpeed 0.19 calls torch.distributed's deprecated all_gather_into_tensor / reduce_scatter_tensor, and the
# FutureWarning comes back on every call (something resets the warnings registry each step): two stderr lines
# per collective, hundreds per step of a ZeRO-3 run, nothing a user can act on. Silenced where DeepSpeed is.
warnings.filterwarnings("ignore", category=FutureWarning,
                        message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated")

from unimrg.config import BatchPlan, Config, ConfigError, ds_config_file  # noqa: E402

BATCH_FIELDS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")


def on_gpu() -> bool:
    return torch.cuda.is_available()


def init_distributed() -> tuple[int, int, int]:
    """Join the process group from torchrun / SLURM env vars; returns (rank, world_size, local_rank)."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if on_gpu():
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    else:
        # The shared-memory comm op only serves inference all-reduce, and building it needs a
        # compiler and ~60 s: skip it so CPU ranks start with no JIT build at all.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        backend = "gloo"
    deepspeed.init_distributed(dist_backend=backend)
    return deepspeed.comm.get_rank(), deepspeed.comm.get_world_size(), local_rank


def ds_config_path(cfg: Config) -> Path:
    return ds_config_file(cfg)


def fill_batch_fields(ds: dict, plan: BatchPlan) -> dict:
    """The one function that writes DeepSpeed's batch fields; checks they agree with each other."""
    ds = dict(ds)
    ds["train_micro_batch_size_per_gpu"] = plan.micro_batch
    ds["gradient_accumulation_steps"] = plan.grad_accum
    ds["train_batch_size"] = plan.train_batch_size
    if plan.micro_batch * plan.grad_accum * plan.dp_size != plan.train_batch_size:
        raise ConfigError(f"train_batch_size {plan.train_batch_size} != micro {plan.micro_batch} × "
                          f"accumulation {plan.grad_accum} × data-parallel {plan.dp_size}")
    return ds


def resolve_ds_config(cfg: Config, plan: BatchPlan) -> dict:
    """ZeRO JSON from ds_configs/ + batch fields + precision + clipping: the config that runs."""
    path = ds_config_path(cfg)
    try:
        ds = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"train.ds_config: cannot read {path}: {e}") from None
    ds.pop("_comment", None)
    stage = ds.get("zero_optimization", {}).get("stage")
    if stage != cfg.train.zero_stage:
        raise ConfigError(f"{path} has zero_optimization.stage={stage} but train.zero_stage="
                          f"{cfg.train.zero_stage}; make them agree")
    ds = fill_batch_fields(ds, plan)
    if plan.placement == "task_parallel":
        # Ranks run different tasks in one micro-step: only ZeRO-1 without overlap reduces gradients
        # in the same (parameter) order on every rank, once per step (unimrg/batching.py).
        ds["zero_optimization"] = {**ds["zero_optimization"], "stage": 1, "overlap_comm": False}
    ds["bf16"] = {"enabled": cfg.train.precision == "bf16"}
    ds.pop("fp16", None)
    ds["gradient_clipping"] = cfg.optim.grad_clip
    return ds


def _check_zero3_internals(optimizer) -> None:
    """Engine.backward's ZeRO-3 fix reads two DeepSpeed internals (0.19.8); fail loudly, not silently
    wrong, on a DeepSpeed that renamed them."""
    missing = [a for a in ("micro_step_id", "grad_partitions_flat_buffer") if not hasattr(optimizer, a)]
    if missing:
        raise RuntimeError(f"DeepSpeed {deepspeed.__version__}: the ZeRO-3 optimizer "
                           f"{type(optimizer).__name__} has no {', '.join(missing)}; unimrg/engine.py's "
                           f"gradient-accumulation fix (Engine.backward) needs revisiting for this version")


def _to_device(batch, device):
    """Move a typed batch's tensors to the engine's device (dataclass fields, shallow)."""
    changes = {f.name: getattr(batch, f.name).to(device) for f in dataclasses.fields(batch)
               if isinstance(getattr(batch, f.name), torch.Tensor)}
    return dataclasses.replace(batch, **changes)


class Engine:
    """A DeepSpeed ZeRO engine around a UMM adapter, with a torch AdamW and our LR schedule."""

    def __init__(self, model: torch.nn.Module, ds_config: dict, optimizer: torch.optim.Optimizer,
                 lr_lambda):
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
            model_parameters=[p for p in model.parameters() if p.requires_grad])
        self.zero_stage = ds_config["zero_optimization"]["stage"]
        self.bf16 = ds_config.get("bf16", {}).get("enabled", False)
        if self.zero_stage == 3:
            _check_zero3_internals(self.ds.optimizer)

    @property
    def module(self) -> torch.nn.Module:
        return self.ds.module

    @property
    def device(self) -> torch.device:
        return self.ds.device

    def __call__(self, batches) -> dict[str, torch.Tensor]:
        return self.ds([_to_device(b, self.device) for b in batches])

    def backward(self, loss: torch.Tensor) -> None:
        if self.zero_stage == 3 and self.ds.optimizer.micro_step_id == 0:
            # First backward of an accumulation window: clear ZeRO-3's gradient partitions. DeepSpeed's
            # DeepSpeedZeroOptimizer_Stage3.partition_grads *copies* a parameter's reduced gradient into
            # grad_partitions_flat_buffer only when micro_step_id == 0 and *adds* to it otherwise, and
            # nothing zeroes that buffer after the optimizer step (zero_grad only drops param.grad). A
            # parameter that micro-step 0 does not use (round-robin: the generation modules when the
            # und batch comes first) thus adds its first gradient to the previous step's partition, and
            # one unused for a whole window gets the previous step's gradient again. Zeroing here makes
            # DeepSpeed's copy and add agree; ZeRO-1/2 zero their buffers themselves. (micro_step_id is
            # bumped at the next forward, so it is still 0 during micro-step 0's backward.)
            self.ds.optimizer.grad_partitions_flat_buffer.zero_()
        self.ds.backward(loss)

    def step(self) -> None:
        """Called after every micro-step; DeepSpeed steps the optimizer at accumulation boundaries."""
        self.ds.step()

    def step_applied(self) -> bool:
        """Did the last optimizer step update the weights? DeepSpeed skips a step whose gradients are
        not finite (fp32, and bf16 with its default ``check_grad_overflow``), on every rank alike."""
        return self.ds.was_step_applied()

    def skipped_steps(self) -> int:
        """Optimizer steps DeepSpeed skipped in this run (kept in its checkpoints)."""
        return self.ds.skipped_steps

    def grad_norm(self) -> float:
        n = self.ds.get_global_grad_norm()
        return float(n) if n is not None else float("nan")

    def lr(self) -> float:
        """The rate the next optimizer step uses."""
        return self.scheduler.optimizer.param_groups[0]["lr"]

    def save(self, save_dir: Path, tag: str, client_state: dict) -> None:
        # `latest` is written by the trainer only once every rank's extra state is on disk.
        self.ds.save_checkpoint(str(save_dir), tag=tag, client_state=client_state, save_latest=False)

    def load(self, save_dir: Path, tag: str) -> dict:
        path, client = self.ds.load_checkpoint(str(save_dir), tag=tag)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint {save_dir}/{tag}")
        # The saved optimizer holds the rate the saving run's schedule gave; take it from this run's
        # schedule at the restored step instead (they differ when a resume amends train.steps).
        sched = self.scheduler
        for group, fn, base in zip(sched.optimizer.param_groups, sched.lr_lambdas, sched.base_lrs):
            group["lr"] = base * fn(sched.last_epoch)
        self.scheduler._last_lr = [g["lr"] for g in self.scheduler.optimizer.param_groups]
        return client

    def close(self) -> None:
        """Free the engine (its hooks and buffers) before the next stage builds another."""
        self.ds.destroy()

    @contextlib.contextmanager
    def gathered(self, params) -> Iterator[None]:
        """Full parameters inside the block, whatever the ZeRO stage."""
        with deepspeed.zero.GatheredParameters(list(params), enabled=self.zero_stage == 3):
            yield

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """What ``module.state_dict()`` holds (parameters, persistent buffers), each parameter gathered
        on its own so this works at any size under ZeRO-3; equal on all ranks (collective: call on all).
        In bf16, trained parameters come from the optimizer's fp32 masters, not the bf16 module copy,
        so a later stage or an export starts from the weights training really has."""
        out = {}
        for name, p in self.module.named_parameters():
            master = deepspeed.utils.safe_get_full_fp32_param(p) if self.bf16 and p.requires_grad else None
            if master is not None:
                out[name] = master.detach().cpu().clone()
                continue
            with self.gathered([p]):
                out[name] = p.detach().cpu().clone()
        for mod_name, mod in self.module.named_modules():
            for name, b in mod.named_buffers(recurse=False):
                if b is not None and name not in mod._non_persistent_buffers_set:
                    out[f"{mod_name}.{name}" if mod_name else name] = b.detach().cpu().clone()
        # named_parameters() lists a tied weight once (Harmon's lm_head is embed_tokens); state_dict() has both.
        from unimrg.models.official_io import complete_tied
        return complete_tied(self.module, out)


def consolidated_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of a saved ZeRO checkpoint folder (RUN/checkpoints/step_N, any stage, any rank count),
    frozen parameters included, without building an engine (evaluation jobs)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    checkpoint = Path(checkpoint)
    if (checkpoint / "latest").is_file():   # a checkpoints/ folder: its `latest` tag
        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint))
    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
