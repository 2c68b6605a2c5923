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

An image that is missing or cannot be decoded (reasons in unimrg.data.images), whose Depth Anything
input would pass ``--depth-max-tokens`` ("extreme aspect ratio"), or whose targets fail with any
exception (e.g. CUDA out of memory), is recorded with its reason in the marker and skipped;
``--max-consecutive-failures`` model failures in a row stop the task (something is systematically
wrong). ``--exclude FILE`` (keys or paths, one per line) skips images in the shards still to do, without
touching the plan or finished shards.

Poison images. Failures that kill the process (the kernel's OOM killer, a segfault) cannot be caught,
and a requeued task would die on the same image forever. So each shard in progress keeps an append-only
record ``DIR/progress/shard-XXXXXX.log.jsonl``: an ``{"attempt": ...}`` line per attempt, ``{"start":
KEY}`` before an image enters the models (``{"decode": KEY}`` / ``{"decoded": KEY}`` around the reader
thread's decoding), and ``{"end": REASON}`` when an attempt stops with a Python exception (SIGTERM,
e.g. SLURM's preemption or time limit, is turned into one). An attempt with no end line died; its
suspects are the image it had started and any it was decoding. A re-run of such a shard decodes in the
main thread (so a second death names exactly one image), and an image suspected in ``--poison-after``
(2) dead attempts is skipped with reason "poison" and named in the report. The record is deleted once
the shard's marker is written. ``finalize`` checks every shard is done,
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
import signal
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from unimrg.targets.depth import DepthConfig, DepthTargetMaker, ExtremeAspectRatio, encode_depth_png
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
    exclude: str | None = None                    # file of keys / paths to skip (not part of the plan)
    poison_after: int = 2                         # deaths of a task on one image that make it poison


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


def read_exclusions(path: str | Path) -> set[str]:
    """Keys or image paths, one per line (``#`` comments, blank lines and JSON objects with a "key" or
    "path" allowed, so a ``report.jsonl`` or an ``images.jsonl`` excerpt works as is)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--exclude {path} does not exist; write one image key or path per line")
    out = set()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"--exclude {path}: line {n + 1} is not valid JSON ({e})") from e
            out.update(str(row[k]) for k in ("key", "path") if row.get(k))
        else:
            out.add(line)
    return out | {os.path.abspath(x) for x in out if os.sep in x}   # a path given relative to the cwd


def _excluded(entry: dict, exclusions: set[str]) -> bool:
    # abspath, not resolve(): string operations only (no syscalls per image, no error on odd paths)
    return bool(exclusions) and (entry["key"] in exclusions or entry["path"] in exclusions
                                 or os.path.abspath(entry["path"]) in exclusions)


def _file_sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def make_plan(cfg: JobConfig, num_images: int) -> dict:
    depth = dataclasses.asdict(cfg.depth)
    # the token cap only decides which images are skipped, never what a target holds: recorded, not compared
    max_tokens = depth.pop("max_tokens")
    return {
        "images": str(Path(cfg.images).resolve()),
        "images_sha1": _file_sha1(Path(cfg.images)),
        "num_images": num_images,
        "shard_size": cfg.shard_size,
        "num_shards": math.ceil(num_images / cfg.shard_size),
        "streams": list(cfg.streams),
        "segmentation": dataclasses.asdict(cfg.segmentation) if SEG in cfg.streams else None,
        "depth": depth if DEPTH in cfg.streams else None,
        "depth_model": cfg.depth_model, "sam_model": cfg.sam_model,   # recorded, not compared
        "depth_max_tokens": max_tokens if DEPTH in cfg.streams else None, "exclude": cfg.exclude,
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


def log_path(out: Path, index: int) -> Path:
    return out / PROGRESS / f"{shard_name(index)}.log.jsonl"


class ShardLog:
    """The append-only progress record of one shard attempt (module docstring: "Poison images").

    One ``os.write`` per line on an O_APPEND descriptor: a line is in the file the moment it returns
    (a SIGKILL cannot lose it; only a crash of the whole node can), and the reader thread's and the
    main thread's lines never interleave."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.lock = threading.Lock()

    def write(self, **record) -> None:
        with self.lock:   # never into a closed (and possibly reused) descriptor
            if self.fd >= 0:
                os.write(self.fd, (json.dumps(record) + "\n").encode())

    def close(self) -> None:
        with self.lock:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


def crashed_attempts(path: Path) -> list[dict]:
    """The attempts of a shard's record that died without a Python-level end: for each, its header
    and ``suspects`` (the image in the models, images being decoded)."""
    if not path.is_file():
        return []
    attempts = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:   # a line cut by a node crash
            continue
        if "attempt" in rec:
            attempts.append({"header": rec, "current": None, "decoding": set(), "ended": False})
        elif attempts:
            a = attempts[-1]
            if "start" in rec:
                a["current"] = rec["start"]
            elif "decode" in rec:
                a["decoding"].add(rec["decode"])
            elif "decoded" in rec:
                a["decoding"].discard(rec["decoded"])
            elif "commit" in rec:
                a["current"] = None
            elif "end" in rec:
                a["ended"] = True
    return [{"header": a["header"], "suspects": sorted(({a["current"]} | a["decoding"]) - {None})}
            for a in attempts if not a["ended"]]


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


def _load(entry: dict) -> tuple | UnreadableImage:
    try:
        return read_image(entry["path"])
    except UnreadableImage as e:
        return e
    except Exception as e:   # whatever else reading raises is this image's problem too
        return UnreadableImage(f"unreadable: {entry['path']}: {type(e).__name__}: {e}")


def _in_order(entries: list[dict], log: ShardLog) -> Iterator[tuple[dict, tuple | UnreadableImage]]:
    """Decode in this thread, after the image's start line: a death names exactly one image."""
    for entry in entries:
        log.write(start=entry["key"])
        yield entry, _load(entry)


def _prefetched(entries: list[dict], depth: int, log: ShardLog) -> Iterator[tuple[dict, tuple | UnreadableImage]]:
    """Decode images in a reader thread, ``depth`` ahead of the models, in order."""
    def load(entry):
        log.write(decode=entry["key"])
        result = _load(entry)
        log.write(decoded=entry["key"])
        return result

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
            result = fut.result()
            log.write(start=entry["key"])
            yield entry, result


class TooManyFailures(RuntimeError):
    pass


def poison_images(out: Path, index: int, poison_after: int) -> tuple[dict[str, list[int]], int]:
    """{key: pids of the dead attempts that suspected it} for keys suspected ``poison_after`` times or
    more, and the number of dead attempts of the shard."""
    dead = crashed_attempts(log_path(out, index))
    pids: dict[str, list[int]] = collections.defaultdict(list)
    for a in dead:
        for key in a["suspects"]:
            pids[key].append(a["header"].get("pid"))
    return {k: v for k, v in pids.items() if len(v) >= poison_after}, len(dead)


def process_shard(index: int, entries: list[dict], makers: TargetMakers, cfg: JobConfig, progress,
                  exclusions: set[str] = frozenset()) -> dict:
    """Write one shard's tars atomically, then its marker; returns the marker."""
    out = Path(cfg.out)
    name = shard_name(index)
    for stream in cfg.streams:                        # leftovers of a killed attempt
        for stale in (out / stream).glob(f"{name}.tar.tmp-*"):
            stale.unlink(missing_ok=True)
    poison, dead = poison_images(out, index, cfg.poison_after)
    for key, pids in poison.items():
        print(f"{name}: image {key} is poison: the task died {len(pids)} times on it (pids {pids}); skipping it",
              flush=True)
    failures = [{"key": e["key"], "path": e["path"],
                 "reason": f"poison: the task died {len(poison[e['key']])} times while processing it "
                           f"(killed: out of memory, a crash or SIGKILL); skipped"}
                for e in entries if e["key"] in poison]
    failures += [{"key": e["key"], "path": e["path"], "reason": f"excluded: listed in --exclude {cfg.exclude}"}
                 for e in entries if e["key"] not in poison and _excluded(e, exclusions)]
    skip = {f["key"] for f in failures}
    todo = [e for e in entries if e["key"] not in skip]
    progress.update(len(entries) - len(todo))
    log = ShardLog(log_path(out, index))
    log.write(attempt=dead + 1, pid=os.getpid(), host=os.uname().nodename, time=round(time.time(), 3))
    t0 = time.perf_counter()
    writers = {s: AtomicTar(out / s / f"{name}.tar") for s in cfg.streams}
    run = 0
    # after a death, decode in this thread: the next death then names exactly one image
    images = _in_order(todo, log) if dead or cfg.prefetch < 1 else _prefetched(todo, cfg.prefetch, log)
    try:
        for entry, loaded in images:
            if isinstance(loaded, UnreadableImage):
                failures.append({"key": entry["key"], "path": entry["path"], "reason": str(loaded)})
                progress.update(1)
                continue
            part, data, rgb = loaded
            try:
                targets = makers.parts(rgb)
                run = 0
            except ExtremeAspectRatio as e:           # the image's problem, not the models'
                failures.append({"key": entry["key"], "path": entry["path"], "reason": str(e)})
                progress.update(1)
                continue
            except Exception as e:                    # any failure is this image's (CUDA OOM, a bad shape, ...)
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
        log.write(commit=True)
        ok = len(entries) - len(failures)
        tars = {}
        for stream, w in writers.items():
            if ok:
                w.commit()
                tars[f"{stream}/{name}.tar"] = w.path.stat().st_size
            else:
                w.abort()                             # energon cannot index an empty tar
    except BaseException as e:                        # a Python-level stop: not a death on an image
        for w in writers.values():
            w.abort()
        log.write(end=f"{type(e).__name__}: {str(e)[:200]}")
        raise
    finally:
        images.close()                                # joins the reader thread before the record closes
        log.close()
    marker = {"shard": index, "images": len(entries), "ok": ok, "failed": failures, "tars": tars,
              "seconds": round(time.perf_counter() - t0, 3), "host": os.uname().nodename}
    atomic_write_text(marker_path(out, index), json.dumps(marker, indent=1))
    log_path(out, index).unlink(missing_ok=True)     # the marker holds what it proved (poison, failures)
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
    exclusions = read_exclusions(cfg.exclude) if cfg.exclude else set()
    if exclusions:
        listed = [e for e in entries if _excluded(e, exclusions)]
        done_too = [e["key"] for s in mine if s not in shard_entries
                    for e in entries[s * cfg.shard_size:(s + 1) * cfg.shard_size] if _excluded(e, exclusions)]
        print(f"--exclude {cfg.exclude}: {len(listed)} of this list's images excluded"
              + (f"; {len(done_too)} of them are in this task's finished shards and stay there (delete "
                 f"those shards' {PROGRESS}/shard-*.json markers to redo them), e.g. {done_too[:3]}"
                 if done_too else ""), flush=True)
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
                markers.append(process_shard(s, shard_entries[s], makers, cfg, progress, exclusions))
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
    ap.add_argument("--exclude", help="file of image keys or paths (one per line) to skip; changes no finished "
                                      "shard and not the plan, so a re-run can drop images (e.g. poison ones)")
    ap.add_argument("--poison-after", type=int, default=d.poison_after,
                    help="an image on which the task died (killed, OOM, segfault) this many times is skipped")
    ap.add_argument("--depth-max-tokens", type=int, default=DepthConfig.max_tokens,
                    help="images whose Depth Anything input has more tokens are skipped (extreme aspect ratio)")
    g = ap.add_argument_group("SAM automatic mask generator (defaults: the paper's, Appendix B.3)")
    g.add_argument("--points-per-side", type=int, default=seg.points_per_side)
    g.add_argument("--points-per-batch", type=int, default=seg.points_per_batch)
    g.add_argument("--pred-iou-thresh", type=float, default=seg.pred_iou_thresh)
    g.add_argument("--stability-score-thresh", type=float, default=seg.stability_score_thresh)
    g.add_argument("--box-nms-thresh", type=float, default=seg.box_nms_thresh)
    a = ap.parse_args(argv)
    if a.shard_size < 1 or a.num_tasks < 1 or a.poison_after < 1 or a.depth_max_tokens < 1:
        ap.error("--shard-size, --num-tasks, --poison-after and --depth-max-tokens must be >= 1")
    return JobConfig(
        images=a.images, out=a.out, task_id=a.task_id, num_tasks=a.num_tasks, shard_size=a.shard_size,
        streams=tuple(s.strip() for s in a.streams.split(",") if s.strip()), depth_model=a.depth_model,
        sam_model=a.sam_model, device=a.device, max_consecutive_failures=a.max_consecutive_failures,
        exclude=a.exclude, poison_after=a.poison_after, depth=DepthConfig(max_tokens=a.depth_max_tokens),
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
    cfg = parse_args(argv)
    # SLURM's preemption / time limit sends SIGTERM first: stop as a Python exception, so the shard's
    # record says the attempt ended (and no image is suspected of killing it)
    if threading.current_thread() is not threading.main_thread():   # signals belong to the main thread
        return run_task(cfg)
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        return run_task(cfg)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _terminated(signum, frame):
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models come from local folders only
    main()
