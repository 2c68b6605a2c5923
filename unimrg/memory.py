"""Per-GPU memory of a run's model states under ZeRO-1/2/3, without DeepSpeed (``--dry-run --gpu-mem-gb``).

    python launch/submit.py --model openuni --recipe paper --nodes 1 --gpus-per-node 8 --dry-run --gpu-mem-gb 80 ...
    python bench/memory_plan.py          # the same numbers as a table, 1..64 GPUs

The model is built on the meta device (no weights) with the run's freezing; the byte counts are
DeepSpeed's own estimators without offload (``estimate_zero2_model_states_mem_needs``,
``estimate_zero3_model_states_mem_needs``; tests/unit check they agree), applied to the *trainable*
parameters: bf16 weights + bf16 and fp32 gradients + fp32 master weights + Adam moments. Frozen
parameters hold bf16 weights only: replicated under ZeRO-1/2, partitioned under ZeRO-3. ZeRO-1
keeps the full bf16 gradient buffer. Activations are not included (they depend on the batch).
"""

from __future__ import annotations

import dataclasses

GiB = 1024 ** 3


def param_stats(model_cfg, freeze: list[str] = ()) -> dict[str, int]:
    """total / trainable / frozen parameters and the largest single module's own parameters (ZeRO-3
    gathers one module at a time) of ``model_cfg``'s architecture with its freezing applied."""
    import torch

    from unimrg.models import registry
    cls = registry.adapter_class(model_cfg.name)
    with torch.device("meta"):
        model = cls(dataclasses.replace(model_cfg, checkpoint=None))
    model.apply_freezing([n for f in freeze for n in (model.understanding_module_names() if f == "understanding"
                                                        else [f])])
    params = list(model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    return {"total": total, "trainable": trainable, "frozen": total - trainable, "largest_layer": largest}


def model_state_bytes(stats: dict[str, int], zero_stage: int, gpus: int) -> int:
    """Bytes per GPU of model states (no offload) on ``gpus`` data-parallel GPUs."""
    p, frozen = stats["trainable"], stats["frozen"]
    if zero_stage == 3:
        return 4 * stats["largest_layer"] + int(18 * p / gpus) + int(2 * frozen / gpus)
    if zero_stage == 2:
        return 2 * p + int(18 * p / gpus) + 2 * frozen
    if zero_stage == 1:   # gradients not partitioned: the bf16 buffer is whole on every GPU
        return 4 * p + int(16 * p / gpus) + 2 * frozen
    raise ValueError(f"zero_stage={zero_stage}: use 1, 2 or 3")


def run_estimate(cfg, gpus: int) -> dict[int, float]:
    """GiB per GPU of ``cfg``'s model states under each ZeRO stage, for its stage (of train.stages) with
    the most trainable parameters."""
    stages = cfg.train.stages or [None]
    stats = max((param_stats(cfg.model, s.freeze if s else []) for s in stages), key=lambda s: s["trainable"])
    return {z: model_state_bytes(stats, z, gpus) / GiB for z in (1, 2, 3)}
