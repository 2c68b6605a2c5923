"""Validate a recipe, snapshot it into a run folder, and start the ranks (locally or on SLURM).

    python launch/submit.py --model openuni --recipe tiny --cluster local --run-dir runs/demo
    python launch/submit.py --model showo --nodes 2 --gpus-per-node 8 --cluster slurm --partition gpu
    python launch/submit.py --model openuni --recipe paper --nodes 1 --gpus-per-node 8 --dry-run
    python launch/submit.py --job eval --suite scenes --run-dir runs/demo --cluster local   (launch/evaluate.py)

Trailing ``key=value`` arguments override the recipe (``train.steps=50 data.root=/data/unimrg``).
The run folder gets ``config.yaml`` (resolved; what every rank and every requeue reads) and
``submission.json`` (the launch parameters), so a crashed job can be resubmitted as is.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from unimrg.config import ConfigError, load_config, plan_report, recipe_path, to_yaml, validate  # noqa: E402
from unimrg.data.loaders import check_data_paths, ensure_scene_data  # noqa: E402
from unimrg.models import registry  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--job", choices=("train", "preprocess", "eval"), default="train",
                    help="train a model, make depth / segmentation targets (launch/preprocess.py), or evaluate "
                         "(launch/evaluate.py)")
    ap.add_argument("--model", default="openuni", help=f"one of {registry.names()}")
    ap.add_argument("--recipe", default="tiny", help="name (launch/recipes/<model>_<name>.yaml) or a YAML path")
    ap.add_argument("--cluster", choices=("local", "slurm"), default="local")
    ap.add_argument("--run-dir", default=None, help="run folder (default runs/<model>_<recipe>)")
    ap.add_argument("--resume", default=None, help="'latest' or a checkpoint folder (sets run.resume)")
    ap.add_argument("--dry-run", action="store_true", help="validate config, batch arithmetic and paths; start nothing")
    ap.add_argument("--prepare-only", action="store_true",
                    help="write the run folder (config, data) and start nothing: slurm/*.sh do this before srun")
    g = ap.add_argument_group("resources")
    g.add_argument("--nodes", type=int, default=1)
    g.add_argument("--gpus-per-node", type=int, default=None,
                   help="one rank per GPU; 0 = CPU ranks (default: GPUs visible here, else 0)")
    g.add_argument("--cpu-ranks-per-node", type=int, default=None,
                   help="ranks per node when --gpus-per-node 0 (default: 2 ranks in all, at least 1 per node)")
    pre = ap.add_argument_group("--job preprocess (options after `--` go to unimrg.targets.job)")
    pre.add_argument("--out", help="DATA_ROOT written by unimrg.targets.ingest; becomes the trainer's data.root "
                     "(--job eval: results folder, default RUN/eval)")
    pre.add_argument("--images", help="image list (default DATA_ROOT/images.jsonl); --job eval: image folder "
                     "or prepared data root")
    pre.add_argument("--depth-model", help="local HF folder of Depth Anything V2")
    pre.add_argument("--sam-model", help="local HF folder of SAM")
    ev = ap.add_argument_group("--job eval (options after `--` go to unimrg.eval.job)")
    ev.add_argument("--suite", help="scenes | depth_similarity | seg_boundary_f1 | recon_psnr | a benchmark")
    ev.add_argument("--benchmark", help="the benchmark's local file in its published format")
    ev.add_argument("--weights", default="auto", help="auto (final/model.pt, latest checkpoint, model.checkpoint) "
                    "| none | a file | a checkpoint folder")
    s = ap.add_argument_group("SLURM")
    s.add_argument("--partition")
    s.add_argument("--account")
    s.add_argument("--qos")
    s.add_argument("--time", default="24:00:00", help="wall-clock limit, HH:MM:SS")
    s.add_argument("--constraint")
    s.add_argument("--mem", help="memory per node, e.g. 500G")
    s.add_argument("--max-requeues", type=int, default=5)
    s.add_argument("--detach", action="store_true",
                   help="return once submitted (default: follow rank 0's log and report the outcome)")
    s.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE", help="extra sbatch parameter")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    argv = list(sys.argv[1:] if argv is None else argv)
    job_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    args = ap.parse_intermixed_args(argv)   # overrides may come before or after options
    args.job_args = job_args
    if args.gpus_per_node is None:
        import torch
        args.gpus_per_node = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if args.cpu_ranks_per_node is None:
        args.cpu_ranks_per_node = max(1, 2 // args.nodes)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        ap.error(f"overrides must be key=value, got {bad}")
    return args


def ranks_per_node(args) -> int:
    return args.gpus_per_node if args.gpus_per_node > 0 else args.cpu_ranks_per_node


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.job == "preprocess":
        from launch.preprocess import submit as submit_preprocess
        return submit_preprocess(args)
    if args.job == "eval":
        from launch.evaluate import submit as submit_eval
        return submit_eval(args)
    run_dir = Path(args.run_dir or REPO / "runs" / f"{args.model}_{Path(args.recipe).stem}").resolve()
    overrides = [*args.overrides, f"run.dir={run_dir}"]
    if args.resume is not None:
        overrides.append(f"run.resume={args.resume}")
    dp_size = args.nodes * ranks_per_node(args)
    try:
        cfg = load_config(recipe_path(args.model, args.recipe), overrides, model=args.model)
        plan = validate(cfg, dp_size)
        if args.dry_run:
            if not cfg.data.scenes:   # a scenes recipe generates its data on the first real launch
                check_data_paths(cfg.data, cfg.objective.tasks)
        else:
            ensure_scene_data(cfg.data, cfg.objective.tasks)
    except (ConfigError, FileNotFoundError, KeyError) as e:
        print(f"submit.py: error: {e}", file=sys.stderr)
        return 2
    print(f"{cfg.model.name} ({cfg.model.size}) {plan.describe(cfg.objective.tasks)}")
    if args.dry_run:   # the batch plan for this GPU count, stage by stage
        print("\n".join(plan_report(cfg, dp_size)))
    if args.dry_run:
        print("dry run: config, batch arithmetic and paths are valid; nothing started")
        return 0

    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.yaml"
    config_path.write_text(to_yaml(cfg))
    submission = {k: v for k, v in vars(args).items() if k != "overrides"} | {
        "overrides": args.overrides, "argv": sys.argv, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "git_sha": git_sha(), "batch_plan": plan.as_dict()}
    (run_dir / "submission.json").write_text(json.dumps(submission, indent=2))
    print(f"run folder {run_dir}\nTensorBoard: tensorboard --logdir {run_dir / 'tb'}", flush=True)
    if args.prepare_only:
        return 0

    if args.cluster == "slurm":
        from launch.slurm import submit
        return submit(args, run_dir)
    if args.nodes != 1:
        print("submit.py: error: --cluster local runs on one node; use --cluster slurm for --nodes > 1",
              file=sys.stderr)
        return 2
    return run_local(config_path, ranks_per_node(args), gpu=args.gpus_per_node > 0)


def run_local(config_path: Path, nproc: int, gpu: bool) -> int:
    """torchrun on this machine, one rank per GPU (or ``nproc`` CPU ranks over gloo)."""
    env = dict(os.environ)
    if not gpu:
        env.setdefault("OMP_NUM_THREADS", "1")
        env["DS_ACCELERATOR"] = "cpu"
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
           "--nproc_per_node", str(nproc), str(REPO / "launch" / "train.py"), "--config", str(config_path)]
    return subprocess.call(cmd, env=env)


def git_sha() -> str:
    try:
        return subprocess.check_output(["git", "-C", str(REPO), "rev-parse", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
