"""The SLURM path of launch/submit.py: a submitit job with one task per GPU (or CPU rank).

    python launch/submit.py --model openuni --recipe tiny --cluster slurm --nodes 2 --gpus-per-node 0 \
        --run-dir runs/demo

submit.py has already validated the recipe and written RUN/config.yaml and RUN/submission.json; this
module adds RUN/slurm/parameters.json (the sbatch parameters), submits :class:`TrainJob` and, unless
``--detach``, follows rank 0's log until the job ends and reports the outcome (a failing rank's
traceback, not a hang).

Every task runs ``launch.train.main(["--config", ...])`` in-process after exporting the
torch.distributed variables from SLURM's (MASTER_ADDR = first host of the allocation, MASTER_PORT
derived from the job id — the same rule as slurm/*.sh).

Preemption and time limits: submitit asks SLURM for SIGUSR2 ``signal_delay_s`` before the limit
(``scancel --signal=USR2`` does the same). :class:`TrainJob` forwards it to the trainer's own stop
handler (unimrg/trainer.py sets a flag; at the next optimizer-step boundary all ranks agree, save a
checkpoint and leave with ``PREEMPTED_EXIT_CODE``); then rank 0 lets submitit call
:meth:`TrainJob.checkpoint` and ``scontrol requeue`` the job. The requeued job (same id,
SLURM_RESTART_COUNT > 0) resumes from ``latest``. Requeues are bounded by ``--max-requeues``.
SIGTERM (``scontrol requeue``, preemption, ``scancel``) reaches every process of the job: the trainer
saves the same way (loader workers ignore it, unimrg/signals.py) and SLURM requeues the job itself.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import submitit

REPO = Path(__file__).resolve().parent.parent

# SLURM job states after which nothing more happens to the job (REQUEUED/PENDING/RUNNING are not).
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL",
                   "PREEMPTED", "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT", "REVOKED"}


def master_port(job_id: str | int) -> int:
    """Rendezvous port of a job: the same on every node, different for concurrent jobs, stable across
    requeues (same job id). slurm/*.sh use the same formula."""
    return 10000 + int(str(job_id).split("_")[0]) % 50000


def parse_time(value: str) -> int:
    """SLURM's --time formats → whole minutes (rounded up): M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", value.strip())
    if not m:
        raise ValueError(f"--time {value!r}: use minutes, HH:MM:SS or D-HH:MM:SS")
    days, a, b, c = (int(x) if x is not None else None for x in m.groups())
    if days is not None:                 # D-H[:M[:S]]
        h, mi, s = a, b or 0, c or 0
    elif c is not None:                  # H:M:S
        h, mi, s = a, b, c
    elif b is not None:                  # M:S
        h, mi, s = 0, a, b
    else:                                # M
        h, mi, s = 0, a, 0
    return (days or 0) * 1440 + h * 60 + mi + (1 if s else 0)


def _value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "yes"):
        return True
    return int(text) if text.isdigit() else text


def sbatch_parameters(args) -> dict[str, Any]:
    """submitit.SlurmExecutor parameters (sbatch's names, ``-`` → ``_``) from submit.py's arguments."""
    gpus = args.gpus_per_node
    tasks_per_node = gpus if gpus > 0 else args.cpu_ranks_per_node
    time_min = parse_time(args.time)
    setup = [f"export PYTHONPATH={REPO}${{PYTHONPATH:+:$PYTHONPATH}}"]   # to unpickle launch.slurm.TrainJob
    if gpus > 0:
        # a rank that dies makes NCCL abort the others instead of leaving them in a collective forever
        setup += ["export TORCH_NCCL_ASYNC_ERROR_HANDLING=1", "export NCCL_DEBUG=${NCCL_DEBUG:-WARN}",
                  "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"]
    else:   # CPU ranks over gloo, as `--cluster local` runs them
        setup += ["export DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES=", "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}"]
    params: dict[str, Any] = {
        "job_name": f"unimrg-{args.model}-{Path(args.recipe).stem}",
        "nodes": args.nodes,
        "ntasks_per_node": tasks_per_node,
        "time": time_min,
        # SIGUSR2 two minutes before the limit (time to finish a step and save); at most half the limit
        "signal_delay_s": min(120, time_min * 30),
        # one rank failing (exception, non-zero exit) ends the step: the others are not left waiting
        # in a collective for the gloo/NCCL timeout
        "srun_args": ["--kill-on-bad-exit=1"],
        "setup": setup,
    }
    if gpus > 0:
        params["gpus_per_node"] = gpus
    for flag in ("partition", "account", "qos", "constraint", "mem"):
        if getattr(args, flag, None):
            params[flag] = getattr(args, flag)
    valid = submitit.SlurmExecutor._valid_parameters()
    extra: dict[str, Any] = {}
    for item in args.slurm:
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--slurm {item!r}: expected KEY=VALUE (an sbatch option without its dashes, "
                             "e.g. --slurm cpus_per_task=10 --slurm exclusive=true)")
        key = key.strip().lstrip("-").replace("-", "_")
        if key in valid and key not in ("additional_parameters", "setup", "srun_args"):
            params[key] = _value(val)
        else:                             # any other sbatch option goes through verbatim
            extra[key] = _value(val)
    if extra:
        params["additional_parameters"] = extra
    return params


def submit(args, run_dir: Path, job: submitit.helpers.Checkpointable | None = None) -> int:
    """Submit RUN to SLURM (``job``: what every task runs, default training); return a process exit code
    (0: submitted, or finished if waiting)."""
    run_dir = Path(run_dir)
    try:
        params = sbatch_parameters(args)
    except ValueError as e:
        print(f"submit.py: error: {e}", file=sys.stderr)
        return 2
    slurm_dir = run_dir / "slurm"
    slurm_dir.mkdir(parents=True, exist_ok=True)
    (slurm_dir / "parameters.json").write_text(json.dumps(params, indent=2) + "\n")
    executor = submitit.SlurmExecutor(folder=slurm_dir / "%j", max_num_timeout=args.max_requeues)
    executor.update_parameters(**params)
    try:
        job = executor.submit(job or TrainJob(str(run_dir / "config.yaml"), max_requeues=args.max_requeues))
    except submitit.core.utils.FailedJobError as e:   # sbatch refused: bad partition, account, limits...
        print(f"submit.py: error: sbatch refused the job (parameters: {slurm_dir / 'parameters.json'}):\n{e}",
              file=sys.stderr)
        return 2
    with (slurm_dir / "job_ids").open("a") as f:   # one line per submission of this run folder
        f.write(f"{job.job_id}\n")
    n = params["nodes"] * params["ntasks_per_node"]
    print(f"submitted SLURM job {job.job_id}: {params['nodes']} node(s) × {params['ntasks_per_node']} "
          f"rank(s); sbatch script {job.paths.submission_file}\n"
          f"logs: {job.paths.folder}/{job.job_id}_<rank>_log.{{out,err}} (ranks 0..{n - 1}); "
          f"metrics: {run_dir / 'metrics'}; TensorBoard events: {run_dir / 'tb'}", flush=True)
    if getattr(args, "detach", False):
        print(f"not waiting (--detach). Follow: tail -f {job.paths.stdout}; stop: scancel {job.job_id}")
        return 0
    return wait(job)


# ---------------------------------------------------------------------------------------- in the job

class TrainJob(submitit.helpers.Checkpointable):
    """What every SLURM task runs: the per-rank entry point, with preemption handled cooperatively."""

    def __init__(self, config: str, max_requeues: int = 5, requeues: int = 0):
        self.config = config             # RUN/config.yaml, as submit.py wrote it
        self.max_requeues = max_requeues
        self.requeues = requeues         # how many times this job requeued itself so far
        self._preempt_signal = False

    def __call__(self) -> dict:
        env = export_torch_distributed_env()
        from unimrg.trainer import PREEMPTED_EXIT_CODE   # here: submit.py need not import deepspeed

        self._preempt_signal = False
        self._submitit_handler = signal.getsignal(signal.SIGUSR2)   # submitit's checkpoint_and_try_requeue
        signal.signal(signal.SIGUSR2, self._on_usr2)
        from launch.train import main

        code = main(["--config", self.config_for_this_start(env.rank)])
        if code == 0:
            return {"rank": env.rank, "status": "finished", "requeues": self.requeues}
        if code == PREEMPTED_EXIT_CODE:
            # SIGTERM from `submitit _interrupt()` / a preempting scheduler may reach the trainer
            # a moment before SIGUSR2 does: give the latter a second to arrive.
            for _ in range(20):
                if self._preempt_signal:
                    break
                time.sleep(0.1)
            if self._preempt_signal:
                # Rank 0: submitit calls self.checkpoint(), dumps it, runs `scontrol requeue` and
                # exits; other ranks return here and are stopped by the requeue.
                self._submitit_handler(signal.SIGUSR2, None)
                return {"rank": env.rank, "status": "preempted", "requeues": self.requeues}
            raise RuntimeError(f"rank {env.rank}: stopped by SIGTERM (cancelled, or preempted by SLURM which "
                               "then requeues it itself); a checkpoint was saved: resubmit with --resume latest")
        raise RuntimeError(f"rank {env.rank}: launch/train.py exited with code {code}")

    def _on_usr2(self, signum, frame) -> None:
        self._preempt_signal = True
        trainer_handler = signal.getsignal(signal.SIGUSR1)
        if callable(trainer_handler):    # the trainer is up: ask it to save at the next step boundary
            trainer_handler(signum, frame)
        else:
            # Still importing / building the model: nothing to save that the last checkpoint lacks.
            # submitit's default: rank 0 requeues now (resuming from `latest`), others wait for it.
            self._submitit_handler(signum, frame)

    def __getstate__(self) -> dict:
        # pickled at submission and at each requeue: leave out the live signal handler
        return {k: v for k, v in self.__dict__.items() if k != "_submitit_handler"}

    def config_for_this_start(self, rank: int) -> str:
        """RUN/config.yaml on the first start; on a requeued start (by us or by SLURM), the same config
        with ``run.resume: latest`` if the run has a complete checkpoint by then."""
        restarts = max(self.requeues, int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0))
        if restarts == 0:
            return self.config
        from omegaconf import OmegaConf

        from unimrg.runfolder import find_checkpoint
        cfg = OmegaConf.load(self.config)
        if find_checkpoint(Path(cfg.run.dir) / "checkpoints", "latest") is None:
            return self.config   # preempted before the first checkpoint: start as submitted
        cfg.run.resume = "latest"
        out = Path(self.config).with_name("config.requeued.yaml")
        tmp = out.with_name(f".{out.name}.rank{rank}")   # every rank writes the same bytes, atomically
        tmp.write_text(OmegaConf.to_yaml(cfg))
        os.replace(tmp, out)
        return str(out)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission | None:
        """Called by submitit on rank 0 once the trainer has saved: what the requeued job runs."""
        if self.requeues >= self.max_requeues:
            print(f"not requeuing: requeued {self.requeues} time(s) already (--max-requeues {self.max_requeues}); "
                  "the latest checkpoint is on disk: resubmit with --resume latest to continue", flush=True)
            return None   # submitit then fails the job with "Job not requeued because: ..."
        return submitit.helpers.DelayedSubmission(TrainJob(self.config, self.max_requeues, self.requeues + 1))


class EvalJob(submitit.helpers.Checkpointable):
    """Every SLURM task of ``--job eval``: unimrg.eval.job on its rank (no requeue: rerunning is cheap)."""

    def __init__(self, argv: list[str]):
        self.argv = argv

    def __call__(self) -> dict:
        env = export_torch_distributed_env()
        from unimrg.eval.job import main
        code = main(self.argv)
        if code != 0:
            raise RuntimeError(f"rank {env.rank}: unimrg.eval.job exited with code {code}")
        return {"rank": env.rank, "status": "finished", "requeues": 0}

    def checkpoint(self, *args: Any, **kwargs: Any) -> None:
        return None


def export_torch_distributed_env() -> submitit.helpers.TorchDistributedEnvironment:
    """RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT from SLURM's variables."""
    job_id = os.environ["SLURM_JOB_ID"]
    os.environ["MASTER_PORT"] = str(master_port(job_id))   # TorchDistributedEnvironment reads it
    # Every task sees all the node's GPUs and the trainer picks cuda:LOCAL_RANK, so do not narrow
    # CUDA_VISIBLE_DEVICES (export()'s default would leave rank k with one device it calls cuda:0).
    return submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)


# ------------------------------------------------------------------------------------ watching the job

def job_state(job_id: str) -> str:
    """Current state from slurmctld (authoritative while it remembers the job), else from accounting."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    m = re.search(r"\bJobState=(\S+)", out.stdout)
    if out.returncode == 0 and m:
        return m.group(1)
    out = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State"], capture_output=True, text=True)
    lines = [ln.split()[0] for ln in out.stdout.splitlines() if ln.strip()]
    return lines[-1] if lines else "UNKNOWN"


def wait(job: submitit.SlurmJob, poll_s: float = 2.0) -> int:
    """Stream rank 0's log until the job reaches a terminal state; report it. Ctrl-C stops watching only."""
    log, offset, t0, state, previous = Path(job.paths.stdout), 0, time.time(), "PENDING", ""
    try:
        while True:
            state = job_state(job.job_id)
            offset = _stream(log, offset)
            # twice in a row: a preempted job may pass through PREEMPTED on its way to being requeued
            if state in TERMINAL_STATES and state == previous:
                _stream(log, offset)
                break
            previous = state
            # poll every 2 s for the first two minutes, then every 30 s (sacct/scontrol load on big clusters)
            time.sleep(poll_s if time.time() - t0 < 120 or state in TERMINAL_STATES else 30)
    except KeyboardInterrupt:
        print(f"\nstopped watching; job {job.job_id} keeps running (scancel {job.job_id} stops it)")
        return 130
    return report(job, state)


def _stream(path: Path, offset: int) -> int:
    if not path.exists():
        return offset
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read()
    if data:
        sys.stdout.write(data.decode(errors="replace"))
        sys.stdout.flush()
    return offset + len(data)


def report(job: submitit.SlurmJob, state: str) -> int:
    """0 if every rank finished; else print each failed rank's traceback (earliest first) and return 1."""
    from submitit.core.utils import pickle_load

    outcomes = []                           # (mtime, rank, "success"|"error", payload)
    for rank in range(job.num_tasks):
        p = job.task(rank).paths.result_pickle
        if p.exists():
            kind, payload = pickle_load(p)
            outcomes.append((p.stat().st_mtime, rank, kind, payload))
    finished = [o for o in outcomes if o[2] == "success" and isinstance(o[3], dict) and o[3].get("status") == "finished"]
    if state == "COMPLETED" and len(finished) == job.num_tasks:
        requeues = max(o[3].get("requeues", 0) for o in finished)
        print(f"SLURM job {job.job_id} completed on all {job.num_tasks} ranks"
              f"{f' after {requeues} requeue(s)' if requeues else ''}")
        return 0
    print(f"SLURM job {job.job_id} ended {state}", file=sys.stderr)
    errors = sorted(o for o in outcomes if o[2] == "error")
    for i, (_, rank, _, tb) in enumerate(errors):
        head = "first failure" if i == 0 else "then"
        print(f"---- rank {rank} ({head}):\n{tb.rstrip()}", file=sys.stderr)
    if not errors:   # killed without a Python traceback (OOM, time limit, node failure, scancel)
        for rank in range(job.num_tasks):
            err = Path(job.task(rank).paths.stderr)
            if err.exists() and err.stat().st_size:
                tail = err.read_text(errors="replace").splitlines()[-15:]
                print(f"---- rank {rank} stderr (last lines of {err}):\n" + "\n".join(tail), file=sys.stderr)
    print(f"logs: {job.paths.folder}", file=sys.stderr)
    return 1
