"""The preprocessing job of launch/submit.py: depth / segmentation targets as a job array, then finalize.

    python launch/submit.py --job preprocess --cluster local --out DATA_ROOT --gpus-per-node 0 \
        --depth-model /models/Depth-Anything-V2-Large-hf --sam-model /models/sam-vit-huge -- --shard-size 1000
    python launch/submit.py --job preprocess --cluster slurm --out DATA_ROOT --nodes 8 --gpus-per-node 8 ...

Run ``python -m unimrg.targets.ingest ... --out DATA_ROOT`` first (it writes DATA_ROOT/images.jsonl).
One task per GPU (or CPU rank): task i of n runs ``python -m unimrg.targets.job`` on shards i, i+n, ...
Locally the tasks are processes on this machine; on SLURM they are the array of slurm/preprocess.sh
(submitted with sbatch, so both paths run the same script), followed by its ``finalize`` job.
Options after ``--`` go to unimrg.targets.job unchanged. Re-running skips finished shards.

Locally, every task runs in a process group of its own that the launcher owns: when the launcher is
killed (SIGTERM, SIGHUP) or interrupted (SIGINT, Ctrl-C) it ends every task's group (SIGTERM, then
SIGKILL after ``STOP_GRACE_S``) before it exits, and on Linux a task also gets SIGTERM if the launcher
dies without that chance (SIGKILL). Nothing keeps running as an orphan; re-run the command to resume.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
STOP_GRACE_S = 10.0   # a task's group gets SIGKILL this long after SIGTERM


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


class _Stopped(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _die_with_launcher() -> None:
    """In the child before exec: SIGTERM when the launcher dies, even by SIGKILL (Linux prctl)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG = 1


def _spawn(cmd: list[str], env: dict | None = None) -> subprocess.Popen:
    # process_group=0: the task leads a new group, so ending it also ends anything it started
    return subprocess.Popen(cmd, env=env, cwd=REPO, process_group=0, preexec_fn=_die_with_launcher)


def end_tasks(procs: list[subprocess.Popen], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM every still-running task's process group, SIGKILL what is left after ``grace_s``."""
    def signal_groups(sig: int) -> None:
        for p in procs:
            try:
                os.killpg(p.pid, sig)   # the group outlives its leader while a child of it runs
            except ProcessLookupError:
                pass
    signal_groups(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    signal_groups(signal.SIGKILL)
    for p in procs:
        p.wait()


def run_local(args, num_tasks: int) -> int:
    """All tasks as processes here (one per GPU if any), then finalize; a stop signal ends them all."""
    procs: list[subprocess.Popen] = []

    def stop(signum, frame):
        raise _Stopped(signum)

    previous = {s: signal.signal(s, stop) for s in STOP_SIGNALS}
    try:
        for i in range(num_tasks):
            env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
            if args.gpus_per_node > 0:
                env["CUDA_VISIBLE_DEVICES"] = str(i)
            procs.append(_spawn(job_command(args, i, num_tasks), env=env))
        failed = [i for i, p in enumerate(procs) if p.wait() != 0]
        if failed:
            print(f"submit.py: error: preprocessing tasks {failed} failed (see their output above); re-run the "
                  "same command to redo only unfinished shards", file=sys.stderr)
            return 1
        procs.append(_spawn(job_command(args)))
        return procs[-1].wait()
    except _Stopped as e:
        running = sum(p.poll() is None for p in procs)
        print(f"submit.py: {e}: ending {running} running preprocessing process(es); re-run the same command "
              "to resume (finished shards are kept)", file=sys.stderr, flush=True)
        return 128 + e.signum
    finally:
        for s in STOP_SIGNALS:       # a second signal must not interrupt the clean-up
            signal.signal(s, signal.SIG_IGN)
        end_tasks(procs)
        for s, handler in previous.items():
            signal.signal(s, handler)


def sbatch_options(args) -> list[str]:
    opts = [f"--time={args.time}"]
    for flag in ("partition", "account", "qos", "constraint", "mem"):
        if getattr(args, flag, None):
            opts.append(f"--{flag}={getattr(args, flag)}")
    return opts + [f"--{item.split('=', 1)[0].lstrip('-').replace('_', '-')}={item.split('=', 1)[1]}"
                   for item in args.slurm]


def sbatch(args, env: dict, *extra: str) -> str:
    """``sbatch --parsable`` with submit.py's SLURM options, then ``extra``; the job id (launch/sweep.py too)."""
    res = subprocess.run(["sbatch", "--parsable", *sbatch_options(args), *extra], cwd=REPO, env=env,
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"sbatch refused the job: {res.stderr.strip()}")
    return res.stdout.strip().split(";")[0]


def run_slurm(args, num_tasks: int) -> int:
    """slurm/preprocess.sh as an array of ``num_tasks``, then its finalize job (afterok)."""
    env = dict(os.environ, DEPTH_MODEL=args.depth_model, SAM_MODEL=args.sam_model, IMAGES=str(args.images))
    gpu = [f"--gpus-per-node={1 if args.gpus_per_node > 0 else 0}"]
    logs = Path(args.out) / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    try:
        array = sbatch(args, env, *gpu, f"--array=0-{num_tasks - 1}", f"--output={logs}/%x-%A_%a.out",
                       "slurm/preprocess.sh", str(args.out), *args.job_args)
        final = sbatch(args, env, "--gpus-per-node=0", "--array=0", f"--dependency=afterok:{array}",
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
