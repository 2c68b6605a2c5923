"""`--sweep table3` of launch/submit.py: the paper's Table 3 ablation rows × seeds as independent jobs.

    python launch/submit.py --sweep table3 --model harmon --seeds 3 --cluster local --run-dir runs/t3_harmon
    python launch/submit.py --sweep table3 --model harmon --seeds 3 --cluster slurm --run-dir /scratch/t3 \
        --partition cpu --time 01:00:00 train.steps=40
    python -m unimrg.eval.table runs/t3_harmon          (the table, once the runs are done)

Rows (``SWEEPS``): und; und + pix; und + pix + depth; und + pix + depth + seg, each the model's tiny recipe
with that task set (``launch/recipes/<model>_<row>_tiny.yaml``, ``inherit: <model>_tiny``; the last row
is ``<model>_tiny`` itself). Layout under ``--run-dir DIR``:

    DIR/sweep.json                  the manifest: model, rows, seeds, overrides, one entry per job
    DIR/<row>/seed<k>/              a normal run folder (config.yaml, checkpoints, final/, tb/) with
                                    train.seed=k; data.scene_seed stays the recipe's, so every seed trains
                                    on the same scenes and is scored on the same held-out scenes
    DIR/<row>/seed<k>/eval/scenes.json   the end-of-run `scenes` suite (unimrg/eval/job.py)
    DIR/logs/                       one log per job (SLURM array task, or local job)

One job = train the run (``submit.py --cluster local``: torchrun on the machine the job runs on), then
the ``scenes`` suite on its final weights (``python -m unimrg.eval.job``, one process). The suite generates
depth, segmentation and reconstruction for every row — also for the tasks a row did not train, which is
what shows a row's generation collapsing — and answers the held-out scene questions. Trailing
``key=value`` overrides apply to every row (``train.seed`` is the sweep's). A re-run of the same command
skips finished jobs (final weights and scenes.json present), resumes a run with checkpoints from
``latest`` and starts the rest.

Locally the jobs run as many at a time as the cores hold (``local_parallel``: with the default two CPU
ranks per run on a 2-core machine, one after another; with ``--cpu-ranks-per-node 1``, two; on GPUs one,
as each run takes them all), in manifest order, under the same
process-group ownership as the preprocessing job (launch/preprocess.py): stopping the launcher stops the
running job. On SLURM they are one array of ``slurm/sweep.sh`` (submitted with launch/preprocess.py's
sbatch code; one task per job, each on one node).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# sweep -> [(row folder, recipe suffix)]; the recipe is launch/recipes/<model>_<suffix>.yaml
SWEEPS = {"table3": [("und", "und_tiny"), ("und_pix", "und_pix_tiny"), ("und_pix_depth", "und_pix_depth_tiny"),
                     ("und_pix_depth_seg", "tiny")]}


def run_name(row: str, seed: int) -> str:
    return f"{row}/seed{seed}"


def write_manifest(args, out: Path) -> dict:
    """DIR/sweep.json: every job (row, recipe, task set, seed, run folder); a re-run must describe the same."""
    tasks = {row: row_tasks(args, recipe) for row, recipe in SWEEPS[args.sweep]}
    # seed-major: a sweep stopped part-way has whole tables for its first seeds, not whole rows
    jobs = [{"row": row, "recipe": recipe, "tasks": tasks[row], "seed": seed, "run_dir": str(out / run_name(row, seed))}
            for seed in range(args.seeds) for row, recipe in SWEEPS[args.sweep]]
    manifest = {"sweep": args.sweep, "model": args.model, "seeds": args.seeds, "eval_scenes": args.eval_scenes,
                "overrides": list(args.overrides), "resources": resources(args), "jobs": jobs}
    path = out / "sweep.json"
    if path.is_file():   # a re-run must be the same sweep: otherwise its runs would mix two experiments
        old = json.loads(path.read_text())
        same = {k: v for k, v in manifest.items() if k != "resources"}
        if {k: v for k, v in old.items() if k != "resources"} != same:
            raise ValueError(f"{path} describes another sweep (model {old['model']}, seeds {old['seeds']}, overrides "
                             f"{old['overrides']}): re-run with its arguments to finish it, or use a new --run-dir")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def resources(args) -> list[str]:
    return ["--nodes", "1", "--gpus-per-node", str(args.gpus_per_node),
            "--cpu-ranks-per-node", str(args.cpu_ranks_per_node)]


def job_commands(manifest: dict, index: int) -> list[list[str]] | None:
    """The submit.py commands of job ``index`` still to run (train, eval); None when it is finished."""
    job = manifest["jobs"][index]
    run = Path(job["run_dir"])
    done_train = (run / "final" / "model.pt").is_file()
    if done_train and (run / "eval" / "scenes.json").is_file():
        return None
    submit = [sys.executable, str(REPO / "launch" / "submit.py")]
    cmds = []
    if not done_train:
        resume = ["--resume", "latest"] if (run / "config.yaml").is_file() else []
        cmds.append([*submit, "--model", manifest["model"], "--recipe", job["recipe"], "--cluster", "local",
                     "--run-dir", str(run), *manifest["resources"], *resume,
                     *([] if resume else [*manifest["overrides"], f"train.seed={job['seed']}"])])
    # one process, no launcher: at tiny size the suite takes seconds, a torchrun start more (unimrg/eval/job.py)
    cmds.append([sys.executable, "-m", "unimrg.eval.job", "--config", str(run / "config.yaml"), "--suite", "scenes",
                 "--num-scenes", str(manifest["eval_scenes"]), "--out", str(run / "eval")])
    return cmds


def run_job(manifest_path: Path, index: int) -> int:
    """One job, where it runs (a local child process or a SLURM array task): train, then evaluate."""
    manifest = json.loads(Path(manifest_path).read_text())
    job = manifest["jobs"][index]
    cmds = job_commands(manifest, index)
    if cmds is None:
        print(f"{run_name(job['row'], job['seed'])}: finished already", flush=True)
        return 0
    for cmd in cmds:
        print(f"{run_name(job['row'], job['seed'])}: {' '.join(cmd)}", flush=True)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        code = subprocess.call(cmd, cwd=REPO, env=env)
        if code != 0:
            return code
    return 0


def job_argv(manifest_path: Path, index: int) -> list[str]:
    return [sys.executable, str(REPO / "launch" / "sweep.py"), "job", str(manifest_path), str(index)]


def local_parallel(args) -> int:
    """Jobs at once on this machine: one on GPUs (each job takes them all); on CPU as many as the cores hold
    (2 cores, 2 ranks per run: one job; 1 rank per run: two)."""
    if args.gpus_per_node > 0:
        return 1
    return max(1, (os.cpu_count() or 1) // args.cpu_ranks_per_node)


def run_local(manifest_path: Path, manifest: dict, parallel: int = 1) -> int:
    """The jobs, ``parallel`` at a time in manifest order, each in a process group the launcher owns
    (launch/preprocess.py)."""
    from launch.preprocess import STOP_SIGNALS, _die_with_launcher, _Stopped, end_tasks
    logs = manifest_path.parent / "logs"
    logs.mkdir(exist_ok=True)
    procs: list[subprocess.Popen] = []
    running: dict[subprocess.Popen, tuple[str, Path]] = {}
    failed: list[str] = []

    def stop(signum, frame):
        raise _Stopped(signum)

    def reap(block: bool) -> None:
        while running and (block or any(p.poll() is not None for p in running)):
            done = [p for p in running if p.poll() is not None]
            if not done:
                time.sleep(0.5)
                continue
            for p in done:
                name, log = running.pop(p)
                if p.returncode != 0:
                    failed.append(name)
                    print(f"{name}: failed (exit {p.returncode}); see {log}", file=sys.stderr, flush=True)
            block = False

    previous = {s: signal.signal(s, stop) for s in STOP_SIGNALS}
    t0 = time.time()
    try:
        for i, job in enumerate(manifest["jobs"]):
            while len(running) >= parallel:
                reap(block=True)
            name = run_name(job["row"], job["seed"])
            log = logs / f"{name.replace('/', '_')}.log"
            print(f"[{i + 1}/{len(manifest['jobs'])}] {name} (log {log}), {time.time() - t0:.0f} s so far", flush=True)
            with log.open("a") as f:
                env = dict(os.environ, PYTHONUNBUFFERED="1")
                procs.append(subprocess.Popen(job_argv(manifest_path, i), cwd=REPO, env=env, stdout=f,
                                              stderr=subprocess.STDOUT, process_group=0,
                                              preexec_fn=_die_with_launcher))
            running[procs[-1]] = (name, log)
        while running:
            reap(block=True)
    except _Stopped as e:
        print(f"submit.py: {e}: ending the running job(s); re-run the same command to resume (finished runs are "
              "kept, a run with checkpoints resumes from the latest)", file=sys.stderr, flush=True)
        return 128 + e.signum
    finally:
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        end_tasks(procs)
        for s, handler in previous.items():
            signal.signal(s, handler)
    return report(manifest_path.parent, manifest, time.time() - t0)


def report(out: Path, manifest: dict, seconds: float) -> int:
    """One line: how many runs are finished (final weights + scenes.json), naming the others; 1 if any."""
    left = [run_name(j["row"], j["seed"]) for i, j in enumerate(manifest["jobs"]) if job_commands(manifest, i)]
    n = len(manifest["jobs"])
    print(f"sweep {manifest['sweep']} ({manifest['model']}): {n - len(left)} of {n} jobs finished in {seconds:.0f} s"
          + (f"; unfinished: {', '.join(left)} (logs in {out / 'logs'}; re-run the same command to redo them)"
             if left else "") + f"\ntable: python -m unimrg.eval.table {out}", flush=True)
    return 1 if left else 0


def run_slurm(args, manifest_path: Path, manifest: dict) -> int:
    """slurm/sweep.sh as one array, a task per job (launch/preprocess.py submits and waits)."""
    from launch.preprocess import sbatch, wait_for
    t0 = time.time()
    n = len(manifest["jobs"])
    logs = manifest_path.parent / "logs"
    logs.mkdir(exist_ok=True)
    ranks = args.gpus_per_node if args.gpus_per_node > 0 else args.cpu_ranks_per_node
    # sbatch takes an option's last value: ours come after --slurm's, so leave out what the user set there
    given = {item.split("=", 1)[0].lstrip("-").replace("_", "-") for item in args.slurm}
    cpus = [] if "cpus-per-task" in given else [f"--cpus-per-task={ranks}"]
    try:
        array = sbatch(args, dict(os.environ), f"--job-name=unimrg-{args.sweep}-{args.model}", f"--array=0-{n - 1}",
                       "--nodes=1", "--ntasks=1", *cpus, f"--gpus-per-node={args.gpus_per_node}",
                       f"--output={logs}/%x-%A_%a.out", "slurm/sweep.sh", str(manifest_path))
    except RuntimeError as e:
        print(f"submit.py: error: {e}", file=sys.stderr)
        return 2
    names = ", ".join(run_name(j["row"], j["seed"]) for j in manifest["jobs"])
    print(f"submitted array job {array} ({n} tasks: {names})"
          f"; logs in {logs}\ntable once done: python -m unimrg.eval.table {manifest_path.parent}", flush=True)
    if args.detach:
        return 0
    wait_for(array)
    return report(manifest_path.parent, manifest, time.time() - t0)


def submit(args) -> int:
    """Entry from launch/submit.py (``--sweep``)."""
    from launch.submit import DEFAULT_MODEL
    args.model = args.model or DEFAULT_MODEL
    if args.recipe is not None:
        print(f"submit.py: error: --sweep {args.sweep} picks the recipes itself (<model>_<row>_tiny); leave out "
              f"--recipe", file=sys.stderr)
        return 2
    if not args.run_dir:
        print(f"submit.py: error: --sweep {args.sweep} needs --run-dir DIR (one run folder per row and seed under "
              "it)", file=sys.stderr)
        return 2
    if args.job != "train" or args.nodes != 1 or args.resume or args.prepare_only or args.dry_run:
        print("submit.py: error: --sweep runs every row on one node (--nodes 1) as a fresh training job; leave out "
              "--job, --resume (re-run the same command to resume), --prepare-only and --dry-run", file=sys.stderr)
        return 2
    if args.seeds < 1:
        print(f"submit.py: error: --seeds {args.seeds} must be ≥ 1", file=sys.stderr)
        return 2
    if any(o.split("=", 1)[0] in ("train.seed", "run.dir", "run.resume") for o in args.overrides):
        print("submit.py: error: --sweep sets train.seed (--seeds), run.dir and run.resume itself; drop them from "
              "the overrides", file=sys.stderr)
        return 2
    out = Path(args.run_dir).resolve()
    try:
        manifest = write_manifest(args, out)
    except (ValueError, FileNotFoundError) as e:
        print(f"submit.py: error: {e}", file=sys.stderr)
        return 2
    try:
        build_base(args)
    except Exception as e:   # a bad base field or a failed build: nothing has started yet
        print(f"submit.py: error: tiny base: {e}", file=sys.stderr)
        return 2
    print(f"sweep {args.sweep}: {args.model}, {len(SWEEPS[args.sweep])} rows × {args.seeds} seed(s) = "
          f"{len(manifest['jobs'])} runs under {out} on {args.cluster}", flush=True)
    if args.cluster == "slurm":
        return run_slurm(args, out / "sweep.json", manifest)
    return run_local(out / "sweep.json", manifest, local_parallel(args))


def build_base(args) -> None:
    """The rows start from the same cached tiny base (``model.base``, unimrg/pretrain.py): build it here, once,
    before any job, so that parallel local jobs or array tasks do not each build it."""
    from unimrg.config import load_config, recipe_path
    from unimrg.pretrain import apply_base
    seen = set()
    for _, recipe in SWEEPS[args.sweep]:
        cfg = load_config(recipe_path(args.model, recipe), [*args.overrides, "run.dir=/nonexistent"], model=args.model)
        key = (cfg.model.base, str(cfg.model), str(cfg.pretrain))
        if key not in seen:
            seen.add(key)
            apply_base(cfg)


def row_tasks(args, recipe: str) -> list[str]:
    """The row's task set; its recipe must resolve and validate with the overrides before any job starts."""
    from unimrg.config import ConfigError, load_config, recipe_path, validate
    world = args.gpus_per_node if args.gpus_per_node > 0 else args.cpu_ranks_per_node
    try:
        cfg = load_config(recipe_path(args.model, recipe), [*args.overrides, "run.dir=/nonexistent"], model=args.model)
        validate(cfg, world)
    except (ConfigError, KeyError) as e:
        raise ValueError(f"{args.model}_{recipe}.yaml with {args.overrides}: {e}") from e
    return list(cfg.objective.tasks)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="one job of a sweep (what slurm/sweep.sh and the local launcher run)")
    ap.add_argument("what", choices=("job",))
    ap.add_argument("manifest", type=Path, help="DIR/sweep.json")
    ap.add_argument("index", type=int, help="the job's index in the manifest (the SLURM array task id)")
    a = ap.parse_args(argv)
    return run_job(a.manifest, a.index)


if __name__ == "__main__":
    sys.exit(main())
