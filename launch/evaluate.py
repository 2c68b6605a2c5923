"""The evaluation job of launch/submit.py: one suite on a run's weights, over all ranks (unimrg/eval/job.py).

    python launch/submit.py --job eval --suite scenes --run-dir runs/demo --cluster local --cpu-ranks-per-node 2
    python launch/submit.py --job eval --suite mmbench --benchmark /data/MMBench_DEV_EN.tsv --run-dir RUN \
        --cluster slurm --gpus-per-node 8
    python launch/submit.py --job eval --suite depth_similarity --images /data/ood_1000 \
        --depth-model /models/Depth-Anything-V2-Large-hf --run-dir runs/openuni_official --model openuni \
        model.size=full model.checkpoint=/models/openuni -- --batch-size 8

``--run-dir RUN`` picks the config: RUN/config.yaml when the run exists (trailing ``key=value`` overrides
apply on top), else ``--model`` / ``--recipe`` + overrides (e.g. official weights via ``model.checkpoint``).
The resolved config goes to RUN/eval/config.yaml; results to RUN/eval/<suite>.{json,md,answers.jsonl}
(``--out DIR``: to DIR instead).
Options after ``--`` go to unimrg.eval.job unchanged (--limit, --num-scenes, --batch-size, --image-root,
--max-new-tokens, --seed). Locally the ranks are torchrun processes; on SLURM, tasks of one submitit job.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parent.parent


def write_config(args, run_dir: Path) -> Path:
    from unimrg.config import load_config, load_resolved, recipe_path, to_yaml
    overrides = [*args.overrides, f"run.dir={run_dir}"]
    out = run_dir / "eval" / "config.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    if (run_dir / "config.yaml").is_file():
        raw = OmegaConf.merge(OmegaConf.load(run_dir / "config.yaml"), OmegaConf.from_dotlist(overrides))
        out.write_text(OmegaConf.to_yaml(raw))
        out.write_text(to_yaml(load_resolved(out)))   # strict: a misspelt override fails here, named
    else:
        from launch.submit import DEFAULT_MODEL, DEFAULT_RECIPE   # a new RUN: submit.py's defaults
        model, recipe = args.model or DEFAULT_MODEL, args.recipe or DEFAULT_RECIPE
        cfg = load_config(recipe_path(model, recipe), overrides, model=model)
        from unimrg.pretrain import apply_base
        apply_base(cfg)   # model.base=tiny: evaluate the tiny base (built if missing)
        out.write_text(to_yaml(cfg))
    return out


def job_argv(args, config: Path) -> list[str]:
    argv = ["--config", str(config), "--suite", args.suite, "--weights", args.weights]
    for flag in ("benchmark", "images", "depth_model", "sam_model", "out"):
        if getattr(args, flag, None):
            argv += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    return argv + list(args.job_args)


def submit(args) -> int:
    from unimrg.config import ConfigError
    from unimrg.eval.job import SUITES
    if args.suite not in SUITES:
        print(f"submit.py: error: --job eval needs --suite, one of {', '.join(SUITES)}", file=sys.stderr)
        return 2
    if not args.run_dir:
        print("submit.py: error: --job eval needs --run-dir RUN (results go to RUN/eval/)", file=sys.stderr)
        return 2
    run_dir = Path(args.run_dir).resolve()
    try:
        config = write_config(args, run_dir)
    except (ConfigError, FileNotFoundError, KeyError) as e:
        print(f"submit.py: error: {e}", file=sys.stderr)
        return 2
    argv = job_argv(args, config)
    nproc = args.gpus_per_node if args.gpus_per_node > 0 else args.cpu_ranks_per_node
    print(f"eval {args.suite}: {args.nodes * nproc} rank(s) on {args.cluster}; config {config}", flush=True)
    if args.cluster == "slurm":
        from launch.slurm import EvalJob, submit as submit_slurm
        return submit_slurm(args, run_dir, job=EvalJob(argv))
    if args.nodes != 1:
        print("submit.py: error: --cluster local runs on one node; use --cluster slurm for --nodes > 1",
              file=sys.stderr)
        return 2
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}".rstrip(os.pathsep))
    if args.gpus_per_node == 0:
        env.setdefault("OMP_NUM_THREADS", "1")
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
           "--nproc_per_node", str(nproc), "-m", "unimrg.eval.job", *argv]
    return subprocess.call(cmd, env=env, cwd=REPO)
