"""Memory and communication per optimizer step: every model at full size, ZeRO-1/2/3 × round-robin/joint
× 8, 16, 64 GPUs (8 per node); names the fastest layout that fits.

    python bench/scale_plan.py                                   # all models, NVLink 450 GB/s, IB 400 Gb/s
    python bench/scale_plan.py --models openuni --ib-gbit 200 --nvlink-gbyte 300 --gpu-mem 80 --json plan.json

Parameter counts come from the real architectures built on the meta device with the paper's freezing
(unimrg.memory.param_stats). Model-state memory is DeepSpeed's estimator arithmetic (unimrg.memory.
model_state_bytes). The batch layout is the run's own (unimrg.config.batch_arithmetic, the recipe's
train.batch_policy=fixed_global): at 64 GPUs OpenUni and Show-o get task-parallel placement, which runs
as ZeRO-1 whatever the JSON says (unimrg/batching.py) — the table shows those rows as ZeRO-1.

Communication, per GPU per optimizer step, in bf16 (2 bytes) with Ψ = 2 × trainable parameters:

* ZeRO-1: gradients reduced once per step (reduce-scatter of Ψ), updated parameters all-gathered once (Ψ).
* ZeRO-2: gradients reduce-scattered after *every micro-step* (accumulation × Ψ), parameters all-gathered
  once (Ψ).
* ZeRO-3: per micro-step, trainable parameters all-gathered in forward and again in backward (2Ψ),
  frozen parameters in forward (2 × frozen), gradients reduce-scattered (Ψ); no step-end all-gather.

``collective_payloads`` lists these as (collective, bytes of the full tensor) — the unit test
(tests/integration/test_scale_plan.py) checks the ZeRO-1/2 ones byte for byte against the collectives a
real DeepSpeed engine issues at world size 2 (on gloo DeepSpeed reduces with all-reduce: same payload).
Round-robin micro-steps leave some trainable parameters without a gradient and ZeRO-2 reduces only the
others: the table's all-of-Ψ per micro-step is an upper bound (tiny OpenUni: 3.09 Ψ over 4 micro-steps,
not 4). ZeRO-3 is the plain model (tiny models keep every parameter whole under DeepSpeed's
persistence threshold, so no test at world size 2 can count its gathers). Wire bytes use the hierarchical (intra-node first, then inter-node) algorithm:
a reduce-scatter or all-gather of S bytes over l GPUs per node and n nodes moves S(l−1)/l per GPU over
NVLink and S(n−1)/(n·l) per GPU over the network; time = intra / NVLink + inter / IB per GPU (no overlap
with compute assumed: an upper bound on what the step pays).

Activations: a coarse transformer estimate at the paper's per-task micro-batch (34 · tokens · hidden
bytes per layer with SDPA attention, Korthikanti et al. 2022; 2 · tokens · hidden per layer plus one full
layer under activation checkpointing) over each model's backbone(s), ×1.25 for the rest;
bench/gpu_suite.py measures the real peak against it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from functools import lru_cache
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

GiB = 1024 ** 3
GPUS = (8, 16, 64)
SCHEDULES = ("round_robin", "joint")

# Backbones per model at full size: (name, layers, hidden, tokens per sample, activation-checkpointed).
# Tokens: OpenUni — Qwen2.5-1.5B sees 256 image + ~300 text tokens (und) or prompt + 256 queries (gen);
# SANA-1.6B (20 layers, 2240 wide) 16×16 latents at 512 px; InternViT-300M 1,025 patches at 448 px.
# Harmon — Qwen2.5-1.5B over 1,024 + 64 image tokens + ~128 text at 512 px; MAR decoder 1,088 tokens.
# Show-o — Phi-1.5 (24 layers, 2048 wide) over 1,024 image tokens (512 px) + 128 text tokens.
BACKBONES = {
    "openuni": [("qwen2.5-1.5b", 28, 1536, 600, False), ("sana-1.6b", 20, 2240, 256, False),
                ("internvit-300m", 24, 1024, 1025, False), ("connector", 6, 1536, 256, False)],
    "harmon": [("qwen2.5-1.5b", 28, 1536, 1216, True), ("mar-decoder", 16, 1280, 1088, True)],
    "showo": [("phi-1.5", 24, 2048, 1160, False)],
    # Janus-Pro-1B: DeepSeek-LLM-1.5B over 576 SigLIP features + ~40 prompt tokens + 576 codes (generation);
    # SigLIP-L (frozen) over 576 patches at 384 px.
    "janus": [("deepseek-llm-1.5b", 24, 2048, 1200, False), ("siglip-l", 24, 1024, 576, False)],
}


def activation_bytes(model: str, samples: int, smoke: bool = False) -> int:
    """Estimated activation bytes (bf16) of one micro-step of ``samples`` samples on one rank (joint: all
    tasks' samples; task-parallel and round-robin: one task's)."""
    if smoke:
        return 0   # tiny models: noise next to the allocator's own overhead
    total = 0
    for _, layers, hidden, tokens, ckpt in BACKBONES[model]:
        per_layer = 34 * tokens * hidden * samples
        total += (2 * tokens * hidden * samples * layers + per_layer) if ckpt else per_layer * layers
    return int(total * 1.25)


@lru_cache(maxsize=None)
def stats_for(model: str, size: str = "full") -> dict[str, int]:
    from unimrg.memory import param_stats
    from unimrg.models import registry
    return param_stats(registry.config_class(model)(name=model, size=size))


def collective_payloads(stats: dict[str, int], zero: int, micro_steps: int, used: list[int] | None = None,
                        dtype_bytes: int = 2) -> list[tuple[str, int]]:
    """(collective, full-tensor bytes) per optimizer step per the module docstring's model.

    ``used``: trainable parameters that get a gradient in each micro-step (round-robin: a task's
    micro-step leaves other tasks' heads without one, and ZeRO-2 reduces only those that have one);
    default all of them, an upper bound. ZeRO-1 reduces the whole gradient buffer once either way."""
    psi, frozen = dtype_bytes * stats["trainable"], dtype_bytes * stats["frozen"]
    used_b = [dtype_bytes * u for u in used] if used else [psi] * micro_steps
    if zero == 1:
        return [("reduce_scatter", psi), ("all_gather", psi)]
    if zero == 2:
        return [("reduce_scatter", u) for u in used_b] + [("all_gather", psi)]
    if zero == 3:
        return [("all_gather", 2 * psi + frozen), ("reduce_scatter", psi)] * micro_steps
    raise ValueError(zero)


def wire_bytes(payloads, gpus: int, per_node: int) -> tuple[float, float]:
    """(intra-node, inter-node) bytes each GPU sends, hierarchical algorithm."""
    local, nodes = min(gpus, per_node), math.ceil(gpus / per_node)
    intra = sum(s * (local - 1) / local for _, s in payloads)
    inter = sum(s * (nodes - 1) / (nodes * local) for _, s in payloads)
    return intra, inter


def paper_config(model: str, schedule: str, zero: int, smoke: bool = False):
    from unimrg.config import load_config, recipe_path
    over = ["run.dir=/tmp/unused", f"objective.schedule={schedule}", f"train.zero_stage={zero}",
            f"train.ds_config=ds_configs/zero{zero}{'_tiny' if smoke else ''}.json"]
    base = load_config(recipe_path(model, "tiny" if smoke else "paper"), ["run.dir=/tmp/unused"])
    t, n = base.train, len(base.objective.tasks)
    if schedule != base.objective.schedule:
        # the same samples per task per optimizer step under the other schedule
        if schedule == "joint":
            over.append(f"train.grad_accum={max(1, t.grad_accum // n)}")
        else:
            over.append(f"train.grad_accum={t.grad_accum * n}")
        if t.global_batch_size and t.reference_gpus:
            over.append(f"train.global_batch_size={t.global_batch_size}")
    return load_config(recipe_path(model, "tiny" if smoke else "paper"), over)


def row(model: str, schedule: str, zero: int, gpus: int, args, smoke: bool = False) -> dict:
    from unimrg.config import ConfigError, batch_arithmetic
    from unimrg.memory import model_state_bytes
    r = {"model": model, "schedule": schedule, "zero": zero, "gpus": gpus, "nodes": math.ceil(gpus / args.per_node)}
    try:
        cfg = paper_config(model, schedule, zero, smoke)
        plan = batch_arithmetic(cfg, gpus)
    except ConfigError as e:
        return {**r, "status": "impossible", "why": str(e)[:200]}
    stats = stats_for(model, "tiny" if smoke else "full")
    eff = plan.zero_stage   # task-parallel plans run ZeRO-1
    pay = collective_payloads(stats, eff, plan.grad_accum)
    intra, inter = wire_bytes(pay, gpus, args.per_node)
    states = model_state_bytes(stats, eff, gpus)
    act = activation_bytes(model, plan.micro_batch, smoke)
    t = intra / (args.nvlink_gbyte * 1e9) + inter / (args.ib_gbit / 8 * 1e9)
    return {**r, "status": "ok", "runs_as_zero": eff, "placement": plan.placement, "micro_per_task": plan.micro_per_task,
            "micro_batch": plan.micro_batch,
            "micro_steps": plan.grad_accum, "states_gib": states / GiB, "activations_gib": act / GiB,
            "total_gib": (states + act) / GiB, "fits": (states + act) / GiB <= args.gpu_mem,
            "intra_gb": intra / 1e9, "inter_gb": inter / 1e9, "comm_s": t}


def defaults() -> argparse.Namespace:
    return build_parser().parse_args([])


def pick(model: str, gpus: int, args=None, smoke: bool = False, schedule: str | None = None) -> dict:
    """The fastest layout (least communication time) that fits, under the recipe's schedule; ties go to
    the lower ZeRO stage (fewer, larger collectives)."""
    from unimrg.config import load_config, recipe_path
    args = args or defaults()
    schedule = schedule or load_config(recipe_path(model, "tiny" if smoke else "paper"),
                                       ["run.dir=/tmp/unused"]).objective.schedule
    rows = [row(model, schedule, z, gpus, args, smoke) for z in (1, 2, 3)]
    ok = [r for r in rows if r["status"] == "ok" and r["fits"]]
    if not ok:
        return {"model": model, "gpus": gpus, "zero": None, "why": "nothing fits"}
    best = min(ok, key=lambda r: (round(r["comm_s"], 4), r["runs_as_zero"]))
    return {**best, "zero": best["runs_as_zero"]}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*")
    ap.add_argument("--gpus", nargs="*", type=int, default=list(GPUS))
    ap.add_argument("--per-node", type=int, default=8)
    ap.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU")
    ap.add_argument("--nvlink-gbyte", type=float, default=450.0, help="NVLink GB/s per GPU, one direction (H100: 450)")
    ap.add_argument("--ib-gbit", type=float, default=400.0, help="network Gb/s per GPU (200 or 400 Gb/s InfiniBand)")
    ap.add_argument("--smoke", action="store_true", help="tiny models (tests)")
    ap.add_argument("--json", type=Path, help="also write every row here")
    return ap


def main(argv=None) -> list[dict]:
    from unimrg.models import registry
    args = build_parser().parse_args(argv)
    rows, picks = [], []
    for model in args.models or registry.names():
        s = stats_for(model, "tiny" if args.smoke else "full")
        print(f"\n{model}: {s['trainable'] / 1e6:,.1f}M trainable, {s['frozen'] / 1e6:,.1f}M frozen; "
              f"NVLink {args.nvlink_gbyte:g} GB/s, network {args.ib_gbit:g} Gb/s per GPU, {args.gpu_mem:g} GiB GPUs")
        print(f"  {'sched':<11} {'GPUs':>4} {'ZeRO':>4} {'runs':>4} {'placement':<13} {'µ×acc':>6} {'states':>7} "
              f"{'activ':>6} {'total':>6} {'fits':>4} {'NVL GB':>7} {'IB GB':>6} {'comm s':>7}")
        for sched in SCHEDULES:
            for g in args.gpus:
                for z in (1, 2, 3):
                    r = row(model, sched, z, g, args, args.smoke)
                    rows.append(r)
                    if r["status"] != "ok":
                        print(f"  {sched:<11} {g:>4} {z:>4}  impossible: {r['why'][:90]}")
                        continue
                    print(f"  {sched:<11} {g:>4} {z:>4} {r['runs_as_zero']:>4} {r['placement']:<13} "
                          f"{r['micro_per_task']:>2}×{r['micro_steps']:<3} {r['states_gib']:>7.1f} "
                          f"{r['activations_gib']:>6.1f} {r['total_gib']:>6.1f} {'yes' if r['fits'] else 'NO':>4} "
                          f"{r['intra_gb']:>7.1f} {r['inter_gb']:>6.2f} {r['comm_s']:>7.3f}")
        for g in args.gpus:
            p = pick(model, g, args, args.smoke)
            picks.append(p)
            print(f"  fastest that fits on {g} GPUs ({p.get('schedule', '?')}): "
                  + (f"ZeRO-{p['zero']} {p['placement']}, {p['total_gib']:.1f} GiB, {p['comm_s']:.3f} s comm/step"
                     if p["zero"] else p["why"]))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "picks": picks}, indent=1))
    return rows


if __name__ == "__main__":
    main()
