"""Validate a recipe, snapshot it into a run folder, and start the ranks (locally or on SLURM).

    python launch/submit.py --model openuni --recipe tiny --cluster local --run-dir runs/demo
    python launch/submit.py --model showo --nodes 2 --gpus-per-node 8 --cluster slurm --partition gpu
    python launch/submit.py --model openuni --recipe paper --nodes 1 --gpus-per-node 8 --dry-run
    python launch/submit.py --job eval --suite scenes --run-dir runs/demo --cluster local   (launch/evaluate.py)
    python launch/submit.py --sweep table3 --model harmon --seeds 3 --cluster local --run-dir runs/t3   (launch/sweep.py)
    python launch/submit.py --job pretrain --model harmon --recipe tiny   (the cached tiny base, unimrg/pretrain.py)

Trailing ``key=value`` arguments override the recipe (``train.steps=50 data.root=/data/unimrg``).
The run folder gets ``config.yaml`` (resolved; what every rank and every requeue reads) and
``submission.json`` (the history of launches), so a crashed job can be resubmitted as is. The first
launch freezes config.yaml; ``--resume latest`` reuses it (unimrg/runfolder.py: which overrides a
resume may still change, and how they are recorded).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from unimrg import runfolder  # noqa: E402
from unimrg.config import (ConfigError, check_inputs, load_config, plan_report, recipe_path,  # noqa: E402
                           shape_report, stage_config, stage_plans, validate)
from unimrg.data.loaders import check_data_paths, ensure_scene_data  # noqa: E402
from unimrg.durable import RunFolderError, check_writable  # noqa: E402
from unimrg.models import registry  # noqa: E402

DEFAULT_MODEL, DEFAULT_RECIPE = "openuni", "tiny"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--job", choices=("train", "preprocess", "eval", "pretrain"), default="train",
                    help="train a model, make depth / segmentation targets (launch/preprocess.py), evaluate "
                         "(launch/evaluate.py), or build the cached tiny base (unimrg/pretrain.py)")
    ap.add_argument("--model", default=None, choices=registry.names(), help=f"one of {registry.names()} (default {DEFAULT_MODEL}; "
                                                  "a resume takes the run's)")
    ap.add_argument("--recipe", default=None, help="name (launch/recipes/<model>_<name>.yaml) or a YAML path "
                                                   f"(default {DEFAULT_RECIPE}; a resume takes the run's)")
    ap.add_argument("--cluster", choices=("local", "slurm"), default="local")
    ap.add_argument("--run-dir", default=None, help="run folder (default runs/<model>_<recipe>)")
    ap.add_argument("--resume", default=None, help="'latest' or a checkpoint folder (sets run.resume): reuses "
                    "RUN/config.yaml as frozen at the first launch")
    ap.add_argument("--dry-run", action="store_true", help="validate config, batch arithmetic and paths; start nothing")
    ap.add_argument("--gpu-mem-gb", type=float, default=None,
                    help="GiB per GPU: check the estimated model-state memory of this layout fits (unimrg/memory.py)")
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
    sw = ap.add_argument_group("--sweep (launch/sweep.py): rows × seeds as independent runs under --run-dir")
    sw.add_argument("--sweep", choices=("table3",), help="table3: the ablation rows und; +pix; +depth; +seg")
    sw.add_argument("--seeds", type=int, default=1, help="seeds per row (train.seed = 0 … N−1)")
    sw.add_argument("--eval-scenes", type=int, default=32, help="held-out scenes of each run's `scenes` evaluation")
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
    if args.sweep:
        from launch.sweep import submit as submit_sweep
        return submit_sweep(args)
    if args.job == "preprocess":
        args.model, args.recipe = args.model or DEFAULT_MODEL, args.recipe or DEFAULT_RECIPE
        from launch.preprocess import submit as submit_preprocess
        return submit_preprocess(args)
    if args.job == "eval":   # a new RUN's config comes from --model / --recipe (defaults as for training)
        from launch.evaluate import submit as submit_eval
        args.model, args.recipe = args.model or DEFAULT_MODEL, args.recipe or DEFAULT_RECIPE
        return submit_eval(args)
    if args.job == "pretrain":
        return pretrain(args)
    # An installed copy (no checkout around it) keeps its runs in the current folder, not in site-packages.
    runs = REPO / "runs" if (REPO / "setup.py").is_file() else Path.cwd() / "runs"
    run_dir = Path(args.run_dir or runs / f"{args.model or DEFAULT_MODEL}_"
                   f"{Path(args.recipe or DEFAULT_RECIPE).stem}").resolve()
    given = runfolder.override_keys(args.overrides)
    resume = args.resume or next((o.split("=", 1)[1] for o in args.overrides if o.startswith("run.resume=")), "")
    overrides = [o for o in args.overrides if not o.startswith("run.resume=")] + [f"run.dir={run_dir}"]
    dp_size = args.nodes * ranks_per_node(args)
    try:
        if resume and (run_dir / "config.yaml").is_file():
            cfg, amendments, ckpt = runfolder.resume_config(run_dir, overrides, resume)
            kind = "resume"
            first = runfolder.read_history(run_dir)["launches"][:1]
            check_same_run(args, cfg, first[0] if first else {})
            if ckpt is not None and runfolder.checkpoint_world(ckpt) != dp_size:
                raise ConfigError(f"{ckpt} was written by {runfolder.checkpoint_world(ckpt)} ranks; this launch has "
                                  f"{dp_size} (--nodes × ranks per node): resume with the same number of ranks")
        else:
            if not resume:
                runfolder.refuse_fresh_launch(run_dir)
            args.model, args.recipe = args.model or DEFAULT_MODEL, args.recipe or DEFAULT_RECIPE
            cfg = load_config(recipe_path(args.model, args.recipe), overrides, model=args.model)
            cfg.run.resume = resume
            from unimrg.pretrain import apply_base
            apply_base(cfg, build=not args.dry_run)   # model.base=tiny → the cached base's weight fields
            amendments, ckpt = [], None
            kind = "restart" if (run_dir / "config.yaml").is_file() else "first"
        plan = validate(cfg, dp_size)
        stages = stage_plans(cfg)      # validate's plan is the first stage's: describe it with its tasks
        first = f"stage 1/{len(stages)}: " if len(stages) > 1 else ""
        print(f"{cfg.model.name} ({cfg.model.size}) {first}"
              f"{plan.describe(stage_config(cfg, stages[0][2]).objective.tasks)}")
        stage_tasks = [t for s in cfg.train.stages for t in s.tasks]
        print(shape_report(cfg, list(dict.fromkeys([*cfg.objective.tasks, *stage_tasks]))), flush=True)
        check_inputs(cfg)
        if args.gpu_mem_gb is not None:
            check_memory(cfg, args)
        check_writable(run_dir)   # before the dry run says "valid", not as a raw OSError at submit
        if args.dry_run:
            if not cfg.data.scenes:   # a scenes recipe generates its data on the first real launch
                check_data_paths(cfg.data, cfg.objective.tasks)
        else:
            ensure_scene_data(cfg.data, cfg.objective.tasks)
    except (ConfigError, FileNotFoundError, KeyError, RunFolderError) as e:
        print(f"submit.py: error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:   # the batch plan for this GPU count, stage by stage
        print("\n".join(plan_report(cfg, dp_size)))
    if kind == "resume":
        print(f"resuming {run_dir} from {ckpt.name if ckpt else 'the start (no checkpoint yet)'} with its frozen "
              f"config.yaml" + "".join(f"; amended {a['field']}: {a['from']!r} -> {a['to']!r} from step "
                                       f"{a['after_step'] + 1}" for a in amendments))
    if args.dry_run:
        print("dry run: config, batch arithmetic, paths and run folder are valid; nothing started")
        return 0

    run_dir.mkdir(parents=True, exist_ok=True)
    entry = {k: v for k, v in vars(args).items() if k != "overrides"} | {
        "kind": kind, "resumed_from": str(ckpt) if ckpt else None, "overrides": args.overrides,
        "given": sorted(given), "argv": sys.argv, "git_sha": git_sha(), "batch_plan": plan.as_dict()}
    runfolder.write_launch(run_dir, cfg, entry, amendments)
    config_path = run_dir / "config.yaml"
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


def pretrain(args) -> int:
    """``--job pretrain``: build (or find) the tiny base of --model / --recipe in the cache; print where."""
    from unimrg.pretrain import ensure_base
    args.model, args.recipe = args.model or DEFAULT_MODEL, args.recipe or DEFAULT_RECIPE
    try:
        cfg = load_config(recipe_path(args.model, args.recipe), args.overrides, model=args.model)
        if cfg.model.size != "tiny":
            raise ConfigError(f"--job pretrain: model.size={cfg.model.size!r}; the in-house base is built for "
                              "tiny recipes only (full-size runs load released weights)")
        entry = ensure_base(cfg)
    except (ConfigError, FileNotFoundError, KeyError, ValueError) as e:
        print(f"submit.py: error: {e}", file=sys.stderr)
        return 2
    print(f"tiny base {entry.path}\nfiles sha256 {entry.file_hash()}\n"
          + "\n".join(f"model.{k}={v}" for k, v in entry.sources.items()))
    return 0


def check_same_run(args, cfg, first: dict) -> None:
    """--model / --recipe given at resume must be the run's (they are not re-read: config.yaml is)."""
    if args.model not in (None, cfg.model.name):
        raise ConfigError(f"--model {args.model}: {cfg.run.dir} is a {cfg.model.name} run; resume it without "
                          "--model (or with its own), or start a new run with a new --run-dir")
    recipe = first.get("recipe")
    if args.recipe is not None and recipe is not None and Path(args.recipe).stem != Path(recipe).stem:
        raise ConfigError(f"--recipe {args.recipe}: {cfg.run.dir} was launched with --recipe {recipe}; a resume "
                          "reuses its frozen config.yaml (leave --recipe out), or start a new run with a new --run-dir")
    args.model, args.recipe = cfg.model.name, recipe or args.recipe or DEFAULT_RECIPE


def check_memory(cfg, args) -> None:
    """Model states per GPU for this layout and ZeRO stage against --gpu-mem-gb (activations come on top)."""
    from unimrg.memory import run_estimate
    gpus = args.nodes * ranks_per_node(args)
    est = run_estimate(cfg, gpus)
    need, stage = est[cfg.train.zero_stage], cfg.train.zero_stage
    print(f"memory: model states ≈ {need:.1f} GiB per GPU under ZeRO-{stage} on {gpus} GPU(s) (activations "
          f"not included); --gpu-mem-gb {args.gpu_mem_gb:g} leaves {args.gpu_mem_gb - need:.1f} GiB")
    if need > args.gpu_mem_gb:
        fits = [f"ZeRO-{z} ({est[z]:.1f} GiB: train.zero_stage={z} train.ds_config=ds_configs/zero{z}.json)"
                for z in (1, 2, 3) if z != stage and est[z] <= args.gpu_mem_gb]
        raise ConfigError(f"model states need ≈ {need:.1f} GiB per GPU under ZeRO-{stage} on {gpus} GPU(s), more "
                          f"than --gpu-mem-gb {args.gpu_mem_gb:g}: "
                          + (f"use {' or '.join(fits)}" if fits else "use more GPUs (--nodes)"))


def run_local(config_path: Path, nproc: int, gpu: bool) -> int:
    """torchrun on this machine, one rank per GPU (or ``nproc`` CPU ranks over gloo), stopped with
    this process (launch/local.py)."""
    from launch.local import run_local as run
    return run(config_path, nproc, gpu)


def git_sha() -> str:
    try:
        return subprocess.check_output(["git", "-C", str(REPO), "rev-parse", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
