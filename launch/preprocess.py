"""The preprocessing job of launch/submit.py: depth / segmentation targets as a job array, then finalize.

    python launch/submit.py --job preprocess --cluster local --out DATA_ROOT --gpus-per-node 0 \
        --depth-model /models/Depth-Anything-V2-Large-hf --sam-model /models/sam-vit-huge -- --shard-size 1000
    python launch/submit.py --job preprocess --cluster slurm --out DATA_ROOT --nodes 8 --gpus-per-node 8 ...

Run ``python -m unimrg.targets.ingest ... --out DATA_ROOT`` first (it writes DATA_ROOT/images.jsonl).
One task per GPU (or CPU rank): task i of n runs ``python -m unimrg.targets.job`` on shards i, i+n, ...
Locally the tasks are processes on this machine; on SLURM they are the array of slurm/preprocess.sh
(submitted with sbatch, so both paths run the same script), followed by its ``finalize`` job.
Options after ``--`` go to unimrg.targets.job unchanged. Re-running skips finished shards.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def job_command(args, task: int | None = None, num_tasks: int | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "unimrg.targets.job"]
    if task is None:
        return cmd + ["finalize", "--out", str(args.out)]
    return cmd + ["--images", str(args.images), "--out", str(args.out), "--task-id", str(task),
                  "--num-tasks", str(num_tasks), "--depth-model", args.depth_model,
                  "--sam-model", args.sam_model, *args.job_args]


def check(args) -> str | None:
    """What is wrong with the arguments (named), or None."""
    if not args.out:
        return "--job preprocess needs --out DATA_ROOT (the folder `unimrg.targets.ingest --out` wrote)"
    args.images = args.images or str(Path(args.out) / "images.jsonl")
    for flag, path in (("--images", args.images), ("--depth-model", args.depth_model), ("--sam-model", args.sam_model)):
        if not path or not Path(path).exists():
            return (f"{flag} {path!r} does not exist (local paths only: images.jsonl from unimrg.targets.ingest, "
                    "HF-format Depth Anything V2 and SAM folders)")
    return None


def run_local(args, num_tasks: int) -> int:
    """All tasks as processes here (one per GPU if any), then finalize."""
    procs = []
    for i in range(num_tasks):
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        if args.gpus_per_node > 0:
            env["CUDA_VISIBLE_DEVICES"] = str(i)
        procs.append(subprocess.Popen(job_command(args, i, num_tasks), env=env, cwd=REPO))
    failed = [i for i, p in enumerate(procs) if p.wait() != 0]
    if failed:
        print(f"submit.py: error: preprocessing tasks {failed} failed (see their output above); re-run the "
              "same command to redo only unfinished shards", file=sys.stderr)
        return 1
    return subprocess.call(job_command(args), cwd=REPO)


def sbatch_options(args) -> list[str]:
    opts = [f"--time={args.time}"]
    for flag in ("partition", "account", "qos", "constraint", "mem"):
        if getattr(args, flag, None):
            opts.append(f"--{flag}={getattr(args, flag)}")
    return opts + [f"--{item.split('=', 1)[0].lstrip('-').replace('_', '-')}={item.split('=', 1)[1]}"
                   for item in args.slurm]


def run_slurm(args, num_tasks: int) -> int:
    """slurm/preprocess.sh as an array of ``num_tasks``, then its finalize job (afterok)."""
    env = dict(os.environ, DEPTH_MODEL=args.depth_model, SAM_MODEL=args.sam_model, IMAGES=str(args.images))
    gpu = [f"--gpus-per-node={1 if args.gpus_per_node > 0 else 0}"]
    logs = Path(args.out) / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    def sbatch(*extra: str) -> str:
        res = subprocess.run(["sbatch", "--parsable", *sbatch_options(args), *extra], cwd=REPO, env=env,
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"sbatch refused the job: {res.stderr.strip()}")
        return res.stdout.strip().split(";")[0]

    try:
        array = sbatch(*gpu, f"--array=0-{num_tasks - 1}", f"--output={logs}/%x-%A_%a.out",
                       "slurm/preprocess.sh", str(args.out), *args.job_args)
        final = sbatch("--gpus-per-node=0", "--array=0", f"--dependency=afterok:{array}",
                       f"--output={logs}/%x-finalize-%A.out", "slurm/preprocess.sh", "finalize", str(args.out))
    except RuntimeError as e:
        print(f"submit.py: error: {e}", file=sys.stderr)
        return 2
    print(f"submitted array job {array} ({num_tasks} tasks) and finalize job {final}; logs in {logs}", flush=True)
    if args.detach:
        return 0
    state = wait_for(final)
    print(f"finalize job {final}: {state}; summary {Path(args.out) / 'summary.json'}")
    return 0 if state == "COMPLETED" else 1


def wait_for(job_id: str, poll_s: float = 2.0) -> str:
    """Block until the job leaves the queue; its final state from accounting."""
    while subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip():
        time.sleep(poll_s)
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State"], capture_output=True, text=True)
    states = [s.split()[0] for s in out.stdout.split() if s.strip()]
    return states[-1] if states else "UNKNOWN"


def submit(args) -> int:
    problem = check(args)
    if problem:
        print(f"submit.py: error: {problem}", file=sys.stderr)
        return 2
    num_tasks = args.nodes * (args.gpus_per_node if args.gpus_per_node > 0 else args.cpu_ranks_per_node)
    print(f"preprocessing {args.images} into {args.out}: {num_tasks} task(s) on {args.cluster}", flush=True)
    return run_local(args, num_tasks) if args.cluster == "local" else run_slurm(args, num_tasks)
