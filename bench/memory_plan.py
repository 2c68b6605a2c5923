"""Per-GPU model-state memory of every registered model under ZeRO-2 / ZeRO-3, from 1 to 64 GPUs.

    python bench/memory_plan.py                       # all registered models, 1..64 GPUs, 8 per node
    python bench/memory_plan.py --models openuni --gpus 8 --gpu-mem 80 --all-cold

Builds each model's full-size architecture on the meta device (no weights), applies the paper's freezing,
and applies (unimrg/memory.py) DeepSpeed's own estimators (`deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs`
and `deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs`, the functions behind the
`*_all_cold` printers) with the *trainable* parameter count: bf16 weights + grads + fp32 master weights +
Adam moments, no offload. Frozen parameters (vision encoder, VAE) hold only bf16 weights: replicated under
ZeRO-2, partitioned under ZeRO-3 — added on top. Activations are not included (they depend on the batch);
the "headroom" column is what remains of ``--gpu-mem`` for them.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

GiB = 1024 ** 3


def param_stats(name: str) -> dict[str, int]:
    """Parameter counts of the registered model ``name`` at full size with the paper's freezing."""
    from unimrg.memory import param_stats as stats_of
    from unimrg.models import registry
    return stats_of(registry.config_class(name)(name=name, size="full"))


def layout(gpus: int, per_node: int) -> tuple[int, int]:
    """(gpus_per_node, nodes) for ``gpus`` GPUs packed ``per_node`` to a node."""
    return min(gpus, per_node), math.ceil(gpus / per_node)


def plan(stats: dict[str, int], gpus: int, per_node: int) -> dict[str, float]:
    """GiB per GPU of model states under ZeRO-2 and ZeRO-3 (no offload): unimrg.memory, which
    submit.py's --gpu-mem-gb check uses too."""
    from unimrg.memory import model_state_bytes
    return {"zero2": model_state_bytes(stats, 2, gpus) / GiB, "zero3": model_state_bytes(stats, 3, gpus) / GiB}


def main(argv=None) -> dict[str, dict[int, dict[str, float]]]:
    from unimrg.models import registry
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=registry.names())
    ap.add_argument("--gpus", nargs="*", type=int, default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--per-node", type=int, default=8)
    ap.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU, for the headroom column")
    ap.add_argument("--all-cold", action="store_true", help="also print DeepSpeed's own *_all_cold tables "
                                                            "(all parameters counted as trainable)")
    args = ap.parse_args(argv)
    results: dict[str, dict[int, dict[str, float]]] = {}
    for name in args.models:
        try:
            stats = param_stats(name)
        except Exception as e:  # a model whose full-size build is not available yet
            print(f"\n{name}: skipped ({type(e).__name__}: {e})")
            continue
        print(f"\n{name}: {stats['total'] / 1e6:,.1f}M params, {stats['trainable'] / 1e6:,.1f}M trainable, "
              f"{stats['frozen'] / 1e6:,.1f}M frozen, largest module {stats['largest_layer'] / 1e6:,.1f}M")
        print(f"  {'GPUs':>5} {'nodes':>5} | {'ZeRO-2 GiB/GPU':>14} {'headroom':>9} | {'ZeRO-3 GiB/GPU':>14} "
              f"{'headroom':>9}")
        results[name] = {}
        for g in args.gpus:
            r = plan(stats, g, args.per_node)
            results[name][g] = r
            print(f"  {g:>5} {layout(g, args.per_node)[1]:>5} | {r['zero2']:>14.1f} {args.gpu_mem - r['zero2']:>9.1f} "
                  f"| {r['zero3']:>14.1f} {args.gpu_mem - r['zero3']:>9.1f}")
        if args.all_cold:
            from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
            from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold
            for g in args.gpus:
                gpn, nodes = layout(g, args.per_node)
                estimate_zero2_model_states_mem_needs_all_cold(stats["total"], gpn, nodes)
                estimate_zero3_model_states_mem_needs_all_cold(stats["total"], stats["largest_layer"], gpn, nodes)
    return results


if __name__ == "__main__":
    main()
