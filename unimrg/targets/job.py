"""Depth / segmentation targets for a list of images, as a resumable job array; then Energon metadata.

    python -m unimrg.targets.job --images DIR/images.jsonl --out DIR --task-id I --num-tasks N \
        --depth-model /models/Depth-Anything-V2-Large-hf --sam-model /models/sam-vit-huge
    python -m unimrg.targets.job finalize --out DIR

The image list (``images.jsonl`` from ``unimrg.targets.ingest``, or a text file of paths) is cut into
shards of ``--shard-size`` consecutive images; task I of N takes shards I, I+N, I+2N, ... (under
SLURM, ``--task-id``/``--num-tasks`` default to the array index and size). A shard writes
``DIR/{pix,depth,seg}/shard-XXXXXX.tar`` under temporary names, renames them into place, and only
then its done marker ``DIR/progress/shard-XXXXXX.json`` (counts and failures). A re-run skips shards
with a marker and redoes the others from scratch, so killing a task at any moment loses at most the
shard it was on, and the final shards are byte-identical to an uninterrupted run.

An image that is missing or cannot be decoded, or whose targets fail (e.g. out of memory on a huge
image), is recorded with its reason in the marker and skipped; ``--max-consecutive-failures`` in a
row stop the task (something is systematically wrong). ``finalize`` checks every shard is done,
prepares the Energon ``CrudeWebdataset`` metadata of pix/depth/seg (and und, from the ingestion),
writes ``DIR/report.jsonl`` (ingestion + target failures, with reasons) and ``DIR/summary.json``.
``DIR`` is then a ``data.root`` for the trainer (unimrg.data.loaders reads ``DIR/<task>``).

Settings that change the targets (shard size, streams, SAM / depth parameters, the image list) are
fixed in ``DIR/progress/plan.json`` by the first task; a task with different settings refuses to run.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from unimrg.targets.depth import DepthConfig, DepthTargetMaker, encode_depth_png
from unimrg.targets.ingest import INGEST_REPORT, UND_DIR
from unimrg.targets.segmentation import SegmentationConfig, SegmentationTargetMaker, encode_seg_png
from unimrg.data.loaders import prepare_dataset
from unimrg.targets.shards import (AtomicTar, UnreadableImage, atomic_write_text, read_image,
                                   read_jsonl, sample_key, write_jsonl)
from unimrg.tasks import DEPTH, GENERATION_TASKS, SEG, UND

PROGRESS = "progress"
PLAN = "plan.json"
TARGET_PARTS = {DEPTH: "depth.png", SEG: "seg.png"}


@dataclass
class JobConfig:
    """One task of the preprocessing job array."""

    images: str                                   # images.jsonl ({"key", "path"} per line) or paths, one per line
    out: str
    task_id: int = 0
    num_tasks: int = 1
    shard_size: int = 500                         # images per shard (the unit of resumption)
    streams: tuple[str, ...] = GENERATION_TASKS   # which of pix / depth / seg to write
    depth_model: str | None = None                # local HF folder of Depth Anything V2
    sam_model: str | None = None                  # local HF folder of SAM
    device: str = "auto"                          # "auto": cuda if available
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)
    depth: DepthConfig = field(default_factory=DepthConfig)
    max_consecutive_failures: int = 50
    prefetch: int = 4                             # images decoded ahead by a reader thread


# ------------------------------------------------------------------------------------- the plan

def read_image_list(path: str | Path) -> list[dict[str, str]]:
    """``[{"key", "path"}, ...]`` from images.jsonl, or from a text file of image paths (key from the path)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--images {path} does not exist; create it with `python -m unimrg.targets.ingest` "
                                f"or write one image path per line")
    out, seen = [], set()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                row = json.loads(line)
                entry = {"key": str(row.get("key") or sample_key(row["path"])), "path": str(row["path"])}
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{path}: line {n + 1} is not a JSON object with a 'path' ({e})") from e
        else:
            entry = {"key": sample_key(line), "path": line}
        if entry["key"] in seen:
            raise ValueError(f"{path}: line {n + 1}: key {entry['key']!r} appears twice; keys must be unique "
                             f"(de-duplicate the list, e.g. with unimrg.targets.ingest)")
        seen.add(entry["key"])
        out.append(entry)
    return out


def _file_sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def make_plan(cfg: JobConfig, num_images: int) -> dict:
    return {
        "images": str(Path(cfg.images).resolve()),
        "images_sha1": _file_sha1(Path(cfg.images)),
        "num_images": num_images,
        "shard_size": cfg.shard_size,
        "num_shards": math.ceil(num_images / cfg.shard_size),
        "streams": list(cfg.streams),
        "segmentation": dataclasses.asdict(cfg.segmentation) if SEG in cfg.streams else None,
        "depth": dataclasses.asdict(cfg.depth) if DEPTH in cfg.streams else None,
        "depth_model": cfg.depth_model, "sam_model": cfg.sam_model,   # recorded, not compared
    }


# settings whose change would mix incompatible targets in one dataset
_PLAN_KEYS = ("images_sha1", "num_images", "shard_size", "streams", "segmentation", "depth")


def _json_roundtrip(x):
    return json.loads(json.dumps(x))


def fix_plan(out: Path, plan: dict) -> None:
    """Write the plan on first use; afterwards refuse a task whose settings differ (unless no shard
    has finished yet, e.g. after a first attempt that stopped on a wrong argument)."""
    path = out / PROGRESS / PLAN
    if path.is_file():
        old = json.loads(path.read_text())
        diff = [k for k in _PLAN_KEYS if old.get(k) != _json_roundtrip(plan[k])]
        if not diff:
            return
        if any((out / PROGRESS).glob("shard-*.json")):
            raise ValueError(
                f"{path} was written with different settings ({', '.join(f'{k}: {old.get(k)!r} now {plan[k]!r}' for k in diff)}). "
                f"Finished shards would not match new ones: re-run with the original settings, or use a new --out.")
        print(f"{path}: no shard finished yet, replacing the plan ({', '.join(diff)} changed)", flush=True)
    atomic_write_text(path, json.dumps(plan, indent=1))


def shard_name(index: int) -> str:
    return f"shard-{index:06d}"


def marker_path(out: Path, index: int) -> Path:
    return out / PROGRESS / f"{shard_name(index)}.json"


def shard_done(out: Path, index: int) -> bool:
    """A shard is finished when its marker exists and every tar it names is in place."""
    path = marker_path(out, index)
    if not path.is_file():
        return False
    marker = json.loads(path.read_text())
    return all((out / rel).is_file() and (out / rel).stat().st_size == size for rel, size in marker["tars"].items())


# ------------------------------------------------------------------------------------- one task

def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check_models(cfg: JobConfig) -> None:
    """Fail before any work (and before the plan is fixed) if a stream's model folder is not given."""
    need = {DEPTH: ("--depth-model", cfg.depth_model, "Depth Anything V2 weights (depth-anything/"
                    "Depth-Anything-V2-Large-hf)"),
            SEG: ("--sam-model", cfg.sam_model, "SAM weights (facebook/sam-vit-huge)")}
    for stream, (flag, path, what) in need.items():
        if stream not in cfg.streams:
            continue
        if not path:
            raise ValueError(f"the {stream} stream needs {flag} PATH: a local folder with the HF-format {what}; "
                             f"for a test, `python -m unimrg.targets.tiny DIR` writes tiny random ones")
        if not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"{flag} {path}: no config.json there; pass a local folder with the "
                                    f"HF-format {what}")


class TargetMakers:
    """The models a task needs, loaded once."""

    def __init__(self, cfg: JobConfig, device: torch.device):
        check_models(cfg)
        self.depth = self.seg = None
        if DEPTH in cfg.streams:
            self.depth = DepthTargetMaker.from_pretrained(cfg.depth_model, device=device, config=cfg.depth)
        if SEG in cfg.streams:
            self.seg = SegmentationTargetMaker.from_pretrained(cfg.sam_model, device=device, config=cfg.segmentation)

    def parts(self, image) -> dict[str, bytes]:
        """Target parts of one RGB image: {"depth.png": ..., "seg.png": ...} for the enabled streams."""
        out = {}
        if self.depth is not None:
            out[TARGET_PARTS[DEPTH]] = encode_depth_png(self.depth(image))
        if self.seg is not None:
            out[TARGET_PARTS[SEG]] = encode_seg_png(self.seg.boundary(image))
        return out


def _prefetched(entries: list[dict], depth: int) -> Iterator[tuple[dict, tuple | UnreadableImage]]:
    """Decode images in a reader thread, ``depth`` ahead of the models, in order."""
    def load(entry):
        try:
            return read_image(entry["path"])
        except UnreadableImage as e:
            return e

    with ThreadPoolExecutor(1) as pool:
        queue: collections.deque[tuple[dict, Future]] = collections.deque()
        it = iter(entries)
        for entry in it:
            queue.append((entry, pool.submit(load, entry)))
            if len(queue) > depth:
                break
        while queue:
            entry, fut = queue.popleft()
            nxt = next(it, None)
            if nxt is not None:
                queue.append((nxt, pool.submit(load, nxt)))
            yield entry, fut.result()


class TooManyFailures(RuntimeError):
    pass


def process_shard(index: int, entries: list[dict], makers: TargetMakers, cfg: JobConfig, progress) -> dict:
    """Write one shard's tars atomically, then its marker; returns the marker."""
    out = Path(cfg.out)
    name = shard_name(index)
    for stream in cfg.streams:                        # leftovers of a killed attempt
        for stale in (out / stream).glob(f"{name}.tar.tmp-*"):
            stale.unlink(missing_ok=True)
    t0 = time.perf_counter()
    writers = {s: AtomicTar(out / s / f"{name}.tar") for s in cfg.streams}
    failures, run = [], 0
    try:
        for entry, loaded in _prefetched(entries, cfg.prefetch):
            if isinstance(loaded, UnreadableImage):
                failures.append({"key": entry["key"], "path": entry["path"], "reason": str(loaded)})
                progress.update(1)
                continue
            part, data, rgb = loaded
            try:
                targets = makers.parts(rgb)
                run = 0
            except (RuntimeError, ValueError, MemoryError) as e:   # e.g. CUDA out of memory on a huge image
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()          # give the next image the memory back
                run += 1
                failures.append({"key": entry["key"], "path": entry["path"],
                                 "reason": f"targets: {type(e).__name__}: {str(e)[:300]}"})
                if run > cfg.max_consecutive_failures:
                    raise TooManyFailures(
                        f"{run} images in a row failed in the target models (last: {entry['path']}: "
                        f"{type(e).__name__}: {e}); stopping: check the models, device and memory") from e
                progress.update(1)
                continue
            for stream in cfg.streams:
                parts = {part: data}
                if stream in TARGET_PARTS:
                    parts[TARGET_PARTS[stream]] = targets[TARGET_PARTS[stream]]
                writers[stream].add(entry["key"], parts)
            progress.update(1)
            progress.set_postfix(failed=len(failures), refresh=False)
        ok = len(entries) - len(failures)
        tars = {}
        for stream, w in writers.items():
            if ok:
                w.commit()
                tars[f"{stream}/{name}.tar"] = w.path.stat().st_size
            else:
                w.abort()                             # energon cannot index an empty tar
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    marker = {"shard": index, "images": len(entries), "ok": ok, "failed": failures, "tars": tars,
              "seconds": round(time.perf_counter() - t0, 3), "host": os.uname().nodename}
    atomic_write_text(marker_path(out, index), json.dumps(marker, indent=1))
    return marker


def run_task(cfg: JobConfig) -> dict:
    """Process this task's unfinished shards; returns (and prints, and saves) the task summary."""
    from tqdm import tqdm

    if not 0 <= cfg.task_id < cfg.num_tasks:
        raise ValueError(f"--task-id {cfg.task_id} is outside 0..{cfg.num_tasks - 1} (--num-tasks {cfg.num_tasks})")
    bad = [s for s in cfg.streams if s not in GENERATION_TASKS]
    if bad or not cfg.streams:
        raise ValueError(f"--streams {bad or '(empty)'}: choose from {GENERATION_TASKS}")
    out = Path(cfg.out)
    entries = read_image_list(cfg.images)
    if not entries:
        raise ValueError(f"--images {cfg.images} lists no images")
    check_models(cfg)
    plan = make_plan(cfg, len(entries))
    fix_plan(out, plan)

    mine = list(range(cfg.task_id, plan["num_shards"], cfg.num_tasks))
    todo = [s for s in mine if not shard_done(out, s)]
    skipped = len(mine) - len(todo)
    shard_entries = {s: entries[s * cfg.shard_size:(s + 1) * cfg.shard_size] for s in todo}
    total = sum(len(v) for v in shard_entries.values())
    markers, t0 = [], time.perf_counter()
    if todo:
        device = pick_device(cfg.device)
        makers = TargetMakers(cfg, device)
        t0 = time.perf_counter()                      # throughput without the model loading
        tty = sys.stderr.isatty()
        with tqdm(total=total, unit="img", desc=f"task {cfg.task_id}/{cfg.num_tasks} ({len(todo)} shards)",
                  mininterval=0.5 if tty else 30, ascii=not tty, dynamic_ncols=tty) as progress:
            for s in todo:
                markers.append(process_shard(s, shard_entries[s], makers, cfg, progress))
    seconds = time.perf_counter() - t0
    failed = [f for m in markers for f in m["failed"]]
    reasons = collections.Counter(f["reason"].split(":", 1)[0] for f in failed)
    summary = {
        "task_id": cfg.task_id, "num_tasks": cfg.num_tasks, "shards": len(mine),
        "shards_done": len(markers), "shards_skipped": skipped,
        "images_ok": sum(m["ok"] for m in markers), "images_failed": len(failed),
        "failures_by_reason": dict(reasons), "failures": failed[:20],
        "seconds": round(seconds, 3),
        "images_per_s": round(total / seconds, 4) if markers and seconds > 0 else None,
    }
    atomic_write_text(out / PROGRESS / f"task-{cfg.task_id:05d}-of-{cfg.num_tasks:05d}.summary.json",
                      json.dumps(summary, indent=1))
    print(f"task {cfg.task_id}/{cfg.num_tasks}: {summary['shards_done']} shards done, {skipped} already done "
          f"(skipped), {summary['images_ok']} images ok, {summary['images_failed']} failed {dict(reasons)}"
          + (f", {summary['images_per_s']:.3f} img/s" if summary["images_per_s"] else ""), flush=True)
    for f in failed[:10]:
        print(f"  failed: {f['path']}: {f['reason']}", flush=True)
    return summary


# ------------------------------------------------------------------------------------- finalize

def finalize(out: str | Path) -> dict:
    """Check all shards are done, write the Energon metadata, ``report.jsonl`` and ``summary.json``."""
    out = Path(out)
    plan_path = out / PROGRESS / PLAN
    if not plan_path.is_file():
        raise FileNotFoundError(f"{plan_path} does not exist: run the job (python -m unimrg.targets.job --images "
                                f"... --out {out}) before finalize")
    plan = json.loads(plan_path.read_text())
    missing = [s for s in range(plan["num_shards"]) if not shard_done(out, s)]
    if missing:
        raise RuntimeError(f"{len(missing)} of {plan['num_shards']} shards are not finished (e.g. "
                           f"{', '.join(shard_name(s) for s in missing[:5])}); re-run the job array with the same "
                           f"arguments (finished shards are skipped), then finalize")
    markers = [json.loads(marker_path(out, s).read_text()) for s in range(plan["num_shards"])]
    for stream in plan["streams"]:
        names = [Path(rel).name for m in markers for rel in m["tars"] if rel.startswith(f"{stream}/")]
        if not names:
            raise RuntimeError(f"no image of the list produced a {stream} sample (see {out / PROGRESS}/*.json)")
        prepare_dataset(out / stream, names)
    und_ready = (out / UND_DIR / ".nv-meta" / "dataset.yaml").is_file()

    report = read_jsonl(out / INGEST_REPORT)
    for m in markers:
        for f in m["failed"]:
            report.append({"stage": "targets", "kind": "image", "key": f["key"], "path": f["path"],
                           "reason": f["reason"], "shard": shard_name(m["shard"])})
    write_jsonl(out / "report.jsonl", report)
    failed = [f for m in markers for f in m["failed"]]
    summary = {
        "root": str(out), "shards": plan["num_shards"], "images": plan["num_images"],
        "samples": sum(m["ok"] for m in markers), "failed": len(failed),
        "failures_by_reason": dict(collections.Counter(f["reason"].split(":", 1)[0] for f in failed)),
        "ingest_problems": sum(1 for r in report if r["stage"] == "ingest"),
        "streams": plan["streams"] + ([UND] if und_ready else []),
        "target_seconds": round(sum(m["seconds"] for m in markers), 3),
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    print(f"finalized {out}: {summary['samples']} samples in {summary['shards']} shards for "
          f"{', '.join(summary['streams'])}; {summary['failed']} images failed in the job, "
          f"{summary['ingest_problems']} problems at ingestion (reasons in {out / 'report.jsonl'})"
          + ("" if und_ready else f"; no prepared {out / UND_DIR}: run unimrg.targets.ingest for the und stream"),
          flush=True)
    return summary


# ------------------------------------------------------------------------------------- CLI

def _env_int(*names: str, default: int) -> int:
    for n in names:
        if os.environ.get(n):
            return int(os.environ[n])
    return default


def parse_args(argv: list[str]) -> JobConfig:
    d, seg = JobConfig(images="", out=""), SegmentationConfig()
    ap = argparse.ArgumentParser(prog="python -m unimrg.targets.job", description=__doc__.splitlines()[0])
    ap.add_argument("--images", required=True, help="images.jsonl from unimrg.targets.ingest, or a list of paths")
    ap.add_argument("--out", required=True, help="dataset root: pix/ depth/ seg/ progress/ are written here")
    array_min = _env_int("SLURM_ARRAY_TASK_MIN", default=0)
    ap.add_argument("--task-id", type=int, default=_env_int("SLURM_ARRAY_TASK_ID", default=array_min) - array_min,
                    help="this task's index (default: $SLURM_ARRAY_TASK_ID - $SLURM_ARRAY_TASK_MIN, else 0)")
    ap.add_argument("--num-tasks", type=int, default=_env_int("SLURM_ARRAY_TASK_COUNT", default=1),
                    help="tasks in the array (default: $SLURM_ARRAY_TASK_COUNT, else 1)")
    ap.add_argument("--shard-size", type=int, default=d.shard_size)
    ap.add_argument("--streams", default=",".join(d.streams), help="comma-separated subset of pix,depth,seg")
    ap.add_argument("--depth-model", help="local HF folder of Depth Anything V2 (e.g. Depth-Anything-V2-Large-hf)")
    ap.add_argument("--sam-model", help="local HF folder of SAM (e.g. sam-vit-huge)")
    ap.add_argument("--device", default=d.device)
    ap.add_argument("--max-consecutive-failures", type=int, default=d.max_consecutive_failures)
    g = ap.add_argument_group("SAM automatic mask generator (defaults: the paper's, Appendix B.3)")
    g.add_argument("--points-per-side", type=int, default=seg.points_per_side)
    g.add_argument("--points-per-batch", type=int, default=seg.points_per_batch)
    g.add_argument("--pred-iou-thresh", type=float, default=seg.pred_iou_thresh)
    g.add_argument("--stability-score-thresh", type=float, default=seg.stability_score_thresh)
    g.add_argument("--box-nms-thresh", type=float, default=seg.box_nms_thresh)
    a = ap.parse_args(argv)
    if a.shard_size < 1 or a.num_tasks < 1:
        ap.error("--shard-size and --num-tasks must be >= 1")
    return JobConfig(
        images=a.images, out=a.out, task_id=a.task_id, num_tasks=a.num_tasks, shard_size=a.shard_size,
        streams=tuple(s.strip() for s in a.streams.split(",") if s.strip()), depth_model=a.depth_model,
        sam_model=a.sam_model, device=a.device, max_consecutive_failures=a.max_consecutive_failures,
        segmentation=dataclasses.replace(seg, points_per_side=a.points_per_side, points_per_batch=a.points_per_batch,
                                         pred_iou_thresh=a.pred_iou_thresh,
                                         stability_score_thresh=a.stability_score_thresh,
                                         box_nms_thresh=a.box_nms_thresh))


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["finalize"]:
        ap = argparse.ArgumentParser(prog="python -m unimrg.targets.job finalize")
        ap.add_argument("--out", required=True)
        return finalize(ap.parse_args(argv[1:]).out)
    return run_task(parse_args(argv))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models come from local folders only
    main()
