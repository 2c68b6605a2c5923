"""End to end on generated images with tiny random models: ingestion → targets → Energon → the trainer's loaders.

    OMP_NUM_THREADS=1 python -m pytest tests/integration/test_preprocess_job.py -q

The job is killed (SIGKILL) after its first finished shard and re-run: finished shards are not
recomputed, nothing half-written survives, and the result equals an uninterrupted run byte for byte.
A corrupt and a missing image are reported (at ingestion and in the job) and the job still finishes.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from unimrg.data.loaders import DataConfig, TaskLoaders
from unimrg.targets.ingest import IngestConfig, ingest
from unimrg.targets.job import finalize, main as job_main
from unimrg.targets.tiny import save_tiny_models
from unimrg.tasks import DEPTH, PIX, SEG, TASKS, UND

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true")]

REPO = Path(__file__).resolve().parents[2]
SIZES = [(40, 30), (32, 48), (50, 50), (44, 33), (36, 36), (30, 41)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("preprocess")
    depth_dir, sam_dir = save_tiny_models(tmp / "models")
    root = tmp / "images"
    (root / "coco").mkdir(parents=True)
    rng = np.random.default_rng(0)
    records = []
    for i, (w, h) in enumerate(SIZES):
        img = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(0, 256, 3)))
        ImageDraw.Draw(img).ellipse([w // 4, h // 4, 3 * w // 4, 3 * h // 4], fill=(200, 30, 30))
        img.save(root / "coco" / f"{i}.jpg")
        records.append({"id": str(i), "image": f"coco/{i}.jpg",
                        "conversations": [{"from": "human", "value": f"<image>\nWhat is in picture {i}?"},
                                          {"from": "gpt", "value": "A red ellipse."}]})
    (root / "coco" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    records += [
        {"id": "m", "image": "coco/missing.jpg", "conversations": records[0]["conversations"]},
        {"id": "c", "image": "coco/corrupt.jpg", "conversations": records[0]["conversations"]},
        {"id": "t", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    ]
    (tmp / "llava.json").write_text(json.dumps(records))
    out = tmp / "resumed"
    s = ingest(IngestConfig(llava=[str(tmp / "llava.json")], image_roots=[str(root)], out=str(out),
                            shard_size=4, workers=2))
    assert (s.image_records, s.failed_images, s.text_only_records) == (6, 2, 1)
    # the job must survive bad entries too (a hand-made list, or files that broke after ingestion)
    images = tmp / "images.jsonl"
    images.write_text((out / "images.jsonl").read_text()
                      + json.dumps({"key": "gone", "path": str(root / "coco" / "gone.jpg")}) + "\n"
                      + str(root / "coco" / "corrupt.jpg") + "\n")
    args = ["--images", str(images), "--shard-size", "1", "--depth-model", str(depth_dir),
            "--sam-model", str(sam_dir), "--points-per-side", "2", "--pred-iou-thresh", "0",
            "--stability-score-thresh", "0", "--device", "cpu"]
    return tmp, out, args


def tars(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for s in (PIX, DEPTH, SEG) for p in sorted((root / s).glob("*.tar"))}


def test_kill_rerun_equals_uninterrupted_and_reports(data):
    tmp, out, args = data
    n_shards = len(SIZES) + 2

    # uninterrupted reference, two array tasks
    ref = tmp / "reference"
    for task in range(2):
        job_main([*args, "--out", str(ref), "--task-id", str(task), "--num-tasks", "2"])
    finalize(ref)

    # the same job in a subprocess, killed right after its first shard is done
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "unimrg.targets.job", *args, "--out", str(out)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    first = out / "progress" / "shard-000000.json"
    deadline = time.time() + 240
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = sorted(p.name for p in (out / "progress").glob("shard-*.json"))
    assert done_before and len(done_before) < n_shards, f"kill did not land mid-run: {done_before}"
    stamps = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for s in (PIX, DEPTH, SEG)
              for p in (out / s).glob("*.tar")}
    assert stamps

    summary = job_main([*args, "--out", str(out)])
    assert summary["shards_skipped"] == len(done_before)
    assert summary["shards_done"] == n_shards - len(done_before)
    for p, stamp in stamps.items():
        if any(p.name.startswith(d.removesuffix(".json")) for d in done_before):
            assert (p.stat().st_ino, p.stat().st_mtime_ns) == stamp, f"{p} was recomputed"
    assert not list(out.glob("*/*.tmp-*")), "a half-written shard survived the re-run"
    again = job_main([*args, "--out", str(out)])
    assert again["shards_skipped"] == n_shards and again["shards_done"] == 0

    final = finalize(out)
    assert tars(out) == tars(ref) and len(tars(out)) == 3 * len(SIZES)   # empty shards write no tar
    assert final["samples"] == len(SIZES) and final["failed"] == 2 and set(final["streams"]) == set(TASKS)

    report = [json.loads(x) for x in (out / "report.jsonl").read_text().splitlines()]
    by = {(r["stage"], Path(r["path"]).name): r["reason"] for r in report if "path" in r}
    assert by[("ingest", "missing.jpg")].startswith("missing:")
    assert by[("ingest", "corrupt.jpg")].startswith("corrupt:")
    assert by[("targets", "gone.jpg")].startswith("missing:")
    assert by[("targets", "corrupt.jpg")].startswith("corrupt:")


def test_trainer_loaders_read_all_four_streams(data):
    _, out, _ = data
    if not (out / "summary.json").is_file():
        pytest.skip("needs the finalized dataset of the previous test")
    cfg = DataConfig(root=str(out), num_workers=1, shuffle_buffer_size=2, max_samples_per_sequence=2)
    with TaskLoaders(cfg, TASKS, micro_batch=2, image_size=32, rank=0, world_size=1, seed=0) as loaders:
        batches = {t: loaders.next(t) for t in TASKS}
        assert loaders.skipped() == {t: 0 for t in TASKS}
    assert batches[UND].images.shape == (2, 3, 32, 32) and "<image>" in batches[UND].conversations[0][0]["value"]
    for t in (PIX, DEPTH, SEG):
        b = batches[t]
        assert b.targets.shape == (2, 3, 32, 32) and b.targets.min() >= 0 and b.targets.max() <= 1
        assert torch_equal_channels(b.targets) or t == PIX
    seg = batches[SEG].targets
    assert set(seg.unique().tolist()) <= {0.0, 1.0}


def torch_equal_channels(x) -> bool:
    return bool((x[:, 0] == x[:, 1]).all() and (x[:, 1] == x[:, 2]).all())


def test_changed_settings_are_refused(data):
    tmp, out, args = data
    if not (out / "progress" / "plan.json").is_file():
        pytest.skip("needs the job of the first test")
    with pytest.raises(ValueError, match="different settings"):
        job_main([*args[:-2], "--box-nms-thresh", "0.5", "--device", "cpu", "--out", str(out)])
    with pytest.raises(RuntimeError, match="not finished"):
        job_main([*args, "--out", str(tmp / "fresh"), "--task-id", "0", "--num-tasks", "8"])
        finalize(tmp / "fresh")


@pytest.mark.slurm
def test_sbatch_array_then_finalize(data, slurm_cluster):
    """slurm/preprocess.sh as a 2-task array on the local cluster, then its finalize job."""
    tmp, _, args = data
    root = tmp / "slurm-root"
    ingest(IngestConfig(llava=[str(tmp / "llava.json")], image_roots=[str(tmp / "images")], out=str(root),
                        workers=1))
    opts = dict(zip(args[::2], args[1::2]))
    env = {**slurm_cluster.env, "DEPTH_MODEL": opts["--depth-model"], "SAM_MODEL": opts["--sam-model"]}
    common = ["--parsable", "--gpus-per-node=0", "--cpus-per-task=1", "--mem=2G"]
    job_args = ["--shard-size", "2", "--points-per-side", "2", "--pred-iou-thresh", "0",
                "--stability-score-thresh", "0"]
    array = subprocess.run(["sbatch", *common, "--array=0-1", f"--output={tmp}/pre-%A_%a.out",
                            "slurm/preprocess.sh", str(root), *job_args],
                           cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout.strip()
    fin = subprocess.run(["sbatch", *common, "--array=0", f"--dependency=afterok:{array}",
                          f"--output={tmp}/fin-%A.out", "slurm/preprocess.sh", "finalize", str(root)],
                         cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout.strip()
    info = slurm_cluster.wait(fin, timeout=300)
    logs = "\n".join(p.read_text() for p in sorted(tmp.glob("*.out")))
    assert info["JobState"] == "COMPLETED", logs
    summary = json.loads((root / "summary.json").read_text())
    assert summary["samples"] == len(SIZES) and set(summary["streams"]) == set(TASKS)
    assert "task 0 of 2" in logs and "task 1 of 2" in logs


JOB_OPTS = ["--shard-size", "2", "--points-per-side", "2", "--pred-iou-thresh", "0", "--stability-score-thresh", "0"]


def submit_preprocess(data, root: Path, *launch: str):
    tmp, _, args = data
    ingest(IngestConfig(llava=[str(tmp / "llava.json")], image_roots=[str(tmp / "images")], out=str(root),
                        workers=1))
    opts = dict(zip(args[::2], args[1::2]))
    return subprocess.run([sys.executable, "launch/submit.py", "--job", "preprocess", "--out", str(root),
                           "--depth-model", opts["--depth-model"], "--sam-model", opts["--sam-model"],
                           "--gpus-per-node", "0", *launch, "--", *JOB_OPTS],
                          cwd=REPO, capture_output=True, text=True, timeout=600)


def test_submit_py_preprocess_local_runs_the_array_and_finalizes(data):
    """`submit.py --job preprocess --cluster local`: two task processes, then finalize."""
    root = data[0] / "submit-local"
    res = submit_preprocess(data, root, "--cluster", "local", "--cpu-ranks-per-node", "2")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "2 task(s) on local" in res.stdout
    summary = json.loads((root / "summary.json").read_text())
    assert summary["samples"] == len(SIZES) and set(summary["streams"]) == set(TASKS)

    # the prepared folder is a data.root: the trainer runs all four tasks on it
    run = data[0] / "train-on-prepared"
    res = subprocess.run([sys.executable, "launch/submit.py", "--model", "openuni", "--recipe", "tiny",
                          "--run-dir", str(run), f"data.root={root}", "train.steps=2", "train.export_final=false"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    rows = [json.loads(line) for line in (run / "metrics" / "rank0.jsonl").read_text().splitlines()]
    assert [set(r["losses"]) for r in rows] == [set(TASKS)] * 2


@pytest.mark.slurm
def test_submit_py_preprocess_on_slurm(data, slurm_cluster):
    """`submit.py --job preprocess --cluster slurm --nodes 2`: the sbatch array + finalize, waited for."""
    root = data[0] / "submit-slurm"
    env_backup = dict(os.environ)
    os.environ.update(slurm_cluster.env)
    try:
        res = submit_preprocess(data, root, "--cluster", "slurm", "--nodes", "2", "--cpu-ranks-per-node", "1",
                                "--time", "10", "--mem", "2G", "--slurm", "cpus-per-task=1")
    finally:
        os.environ.clear()
        os.environ.update(env_backup)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "finalize job" in res.stdout and "COMPLETED" in res.stdout
    assert json.loads((root / "summary.json").read_text())["samples"] == len(SIZES)


def _children(pid: int) -> set[int]:
    """Live processes whose parent is ``pid`` (from /proc)."""
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.add(int(stat.parent.name))
    return out


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for p in pids:
        try:
            state = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(p)
    return alive


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_stopping_the_local_launcher_ends_its_tasks(data, sig):
    """Killing (SIGTERM), interrupting (SIGINT) or SIGKILL-ing only the launcher leaves no task running."""
    tmp, _, args = data
    root = tmp / f"stopped-{sig.name}"
    ingest(IngestConfig(llava=[str(tmp / "llava.json")], image_roots=[str(tmp / "images")], out=str(root),
                        workers=1))
    opts = dict(zip(args[::2], args[1::2]))
    launcher = subprocess.Popen(
        [sys.executable, "launch/submit.py", "--job", "preprocess", "--cluster", "local", "--out", str(root),
         "--depth-model", opts["--depth-model"], "--sam-model", opts["--sam-model"], "--gpus-per-node", "0",
         "--cpu-ranks-per-node", "2", "--", *JOB_OPTS],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tasks: set[int] = set()
    deadline = time.time() + 120
    while len(tasks) < 2 and launcher.poll() is None and time.time() < deadline:
        tasks |= _children(launcher.pid)
        time.sleep(0.05)
    assert len(tasks) == 2, f"the launcher did not start two tasks: {launcher.communicate()[0][-3000:]}"
    assert _alive(tasks) == tasks, "the tasks finished before the signal; the test would prove nothing"
    launcher.send_signal(sig)
    out, _ = launcher.communicate(timeout=60)
    deadline = time.time() + 30                        # PDEATHSIG'ed tasks need a moment after a SIGKILL
    while _alive(tasks) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(tasks), f"tasks {sorted(_alive(tasks))} outlived the launcher ({sig.name})\n{out[-3000:]}"
    if sig != signal.SIGKILL:
        assert launcher.returncode == 128 + sig, out[-3000:]
        assert "running preprocessing process(es); re-run the same command to resume" in out
