"""LLaVA conversation JSON + image folders → the understanding stream and the image list for targets.

    python -m unimrg.targets.ingest --llava llava_v1_5_mix665k.json --llava llava_next.json \
        --image-root /data/llava/playground/data --out /data/unimrg [--workers 8]

Writes, under ``--out``:
    und/         Energon CrudeWebdataset: ``<key>.jpg|png|webp`` (the original bytes) + ``<key>.json``
                 (the checked LLaVA record, ``<image>`` first) — what unimrg.data.loaders reads for und
    und_text/    text-only records (``<key>.json`` only), kept apart because an UnderstandingBatch
                 needs an image; prepared too, for a future text-only stream
    images.jsonl the de-duplicated, readable images, one ``{"key", "path", "image"}`` per line, in
                 first-use order: the input of ``python -m unimrg.targets.job --images``
    ingest_report.jsonl  one line per problem, never fatal: missing / corrupt images (with the number
                 of records that used them) and malformed records, each with a reason
    ingest.json  counts

An image path in a record is looked up under each ``--image-root`` in order (LLaVA-665K's paths,
e.g. ``coco/train2017/000000033471.jpg``, are relative to LLaVA's ``playground/data``); the same
file used by several records is listed once.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from unimrg.data.llava import LlavaFormatError, LlavaRecord, parse_record
from unimrg.data.loaders import prepare_dataset
from unimrg.targets.shards import (AtomicTar, UnreadableImage, atomic_write_text, read_image,
                                   sample_key, write_jsonl)

UND_DIR, UND_TEXT_DIR = "und", "und_text"
IMAGES_LIST, INGEST_REPORT, INGEST_SUMMARY = "images.jsonl", "ingest_report.jsonl", "ingest.json"


@dataclass
class IngestConfig:
    """Inputs and shard sizes of one ingestion."""

    llava: list[str]                                   # LLaVA .json (list) or .jsonl files, in order
    image_roots: list[str]                             # folders the records' image paths are relative to
    out: str
    shard_size: int = 5000                             # und samples per tar
    workers: int = 8                                   # threads decoding images (I/O and PIL release the GIL)
    chunk: int = 1024                                  # records checked per parallel round


@dataclass
class _Image:
    key: str
    path: str
    image: str                       # the path as the record wrote it
    part: str | None = None          # "jpg" | "png" | "webp"; None when unreadable
    reason: str | None = None
    records: int = 0
    first_record: str = ""


@dataclass
class IngestSummary:
    records: int = 0
    image_records: int = 0           # written to und/
    text_only_records: int = 0       # written to und_text/
    dropped_records: int = 0         # image missing / unreadable, or malformed record
    bad_records: int = 0             # malformed (subset of dropped)
    unique_images: int = 0           # readable, listed in images.jsonl
    failed_images: int = 0
    und_shards: int = 0
    seconds: float = 0.0
    reasons: dict[str, int] = field(default_factory=dict)


def _load_raw(path: Path) -> list:
    """The raw JSON objects of a LLaVA file (records are checked one by one, so one bad record is
    reported instead of aborting a 665K-record ingestion)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        out = []
        for n, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    out.append(LlavaFormatError(f"{path}: line {n + 1} is not valid JSON ({e})"))
        return out
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise LlavaFormatError(f"{path}: not valid JSON ({e}); expected a list of LLaVA records "
                               f"(or a .jsonl file with one record per line)") from e
    if not isinstance(data, list):
        raise LlavaFormatError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def _resolve(rel: str, roots: list[Path]) -> Path:
    """First root holding ``rel`` (absolute paths are taken as is); the first root if none does."""
    p = Path(rel)
    if p.is_absolute():
        return p
    for root in roots:
        if (root / p).exists():
            return root / p
    return roots[0] / p


class _ShardedWriter:
    """Tars of ``shard_size`` samples, each committed atomically when full."""

    def __init__(self, folder: Path, shard_size: int):
        self.folder, self.shard_size = folder, shard_size
        self.names: list[str] = []
        self._tar: AtomicTar | None = None

    def add(self, key: str, parts: dict[str, bytes]) -> None:
        if self._tar is None:
            name = f"shard-{len(self.names):06d}.tar"
            self._tar = AtomicTar(self.folder / name)
            self.names.append(name)
        self._tar.add(key, parts)
        if self._tar.count >= self.shard_size:
            self._tar.commit()
            self._tar = None

    def close(self) -> list[str]:
        if self._tar is not None:
            self._tar.commit()
            self._tar = None
        return self.names


def ingest(cfg: IngestConfig) -> IngestSummary:
    """Run the ingestion described in the module docstring; returns the counts (also in ingest.json)."""
    t0 = time.perf_counter()
    out = Path(cfg.out)
    roots = [Path(r) for r in cfg.image_roots]
    if not roots:
        raise ValueError("ingest: no --image-root given; pass the folder(s) the records' image paths are "
                         "relative to (for LLaVA-665K: LLaVA's playground/data)")
    for r in roots:
        if not r.is_dir():
            raise FileNotFoundError(f"--image-root {r} is not a folder")
    for f in cfg.llava:
        if not Path(f).is_file():
            raise FileNotFoundError(f"--llava {f} does not exist; pass LLaVA conversation files (.json / .jsonl)")
    for d in (UND_DIR, UND_TEXT_DIR):
        if (out / d).exists():
            raise FileExistsError(f"{out / d} exists: ingestion writes a fresh understanding stream; remove it "
                                  f"or choose another --out")

    summary = IngestSummary()
    report: list[dict] = []
    images: dict[str, _Image] = {}                    # resolved path → entry, in first-use order
    und = _ShardedWriter(out / UND_DIR, cfg.shard_size)
    und_text = _ShardedWriter(out / UND_TEXT_DIR, cfg.shard_size)

    def check(entry: _Image) -> None:
        try:
            entry.part, _, _ = read_image(entry.path)
        except UnreadableImage as e:
            entry.reason = str(e)

    with ThreadPoolExecutor(max(1, cfg.workers)) as pool:
        index = 0
        for file in cfg.llava:
            raw = _load_raw(Path(file))
            for start in range(0, len(raw), cfg.chunk):
                batch: list[tuple[int, LlavaRecord | None, str]] = []
                for i, obj in enumerate(raw[start:start + cfg.chunk], start):
                    where = f"{file}: record {i}"
                    summary.records += 1
                    try:
                        if isinstance(obj, Exception):
                            raise obj
                        batch.append((index, parse_record(obj, source=file, index=i), where))
                    except LlavaFormatError as e:
                        summary.bad_records += 1
                        summary.dropped_records += 1
                        report.append({"stage": "ingest", "kind": "record", "source": where, "reason": f"malformed: {e}"})
                    index += 1
                # check each image once, in parallel, before writing this chunk's records in order
                new = []
                for _, rec, _ in batch:
                    if rec.has_image:
                        path = str(_resolve(rec.image, roots))
                        if path not in images:
                            images[path] = _Image(key=sample_key(rec.image), path=path, image=rec.image)
                            new.append(images[path])
                list(pool.map(check, new))
                for n, rec, where in batch:
                    key = f"r{n:09d}"
                    if not rec.has_image:
                        und_text.add(key, {"json": json.dumps(rec.to_json()).encode()})
                        summary.text_only_records += 1
                        continue
                    entry = images[str(_resolve(rec.image, roots))]
                    entry.records += 1
                    entry.first_record = entry.first_record or f"{where} (id={rec.id!r})"
                    if entry.reason is not None:
                        summary.dropped_records += 1
                        continue
                    try:  # re-read: the image passed the check, its bytes are not kept in memory
                        part, data, _ = read_image(entry.path)
                    except UnreadableImage as e:  # changed since the check
                        entry.reason, entry.part = str(e), None
                        summary.dropped_records += 1
                        continue
                    und.add(key, {part: data, "json": json.dumps(rec.to_json()).encode()})
                    summary.image_records += 1
    und_names, text_names = und.close(), und_text.close()

    listed = []
    for entry in images.values():
        if entry.reason is None:
            listed.append({"key": entry.key, "path": entry.path, "image": entry.image})
        else:
            kind = entry.reason.split(":", 1)[0]
            summary.reasons[kind] = summary.reasons.get(kind, 0) + 1
            report.append({"stage": "ingest", "kind": "image", "image": entry.image, "path": entry.path,
                           "reason": entry.reason, "records": entry.records, "first_record": entry.first_record})
    summary.reasons["malformed"] = summary.bad_records
    summary.unique_images, summary.failed_images = len(listed), len(images) - len(listed)
    summary.und_shards = len(und_names)
    write_jsonl(out / IMAGES_LIST, listed)
    write_jsonl(out / INGEST_REPORT, report)
    for folder, names in ((out / UND_DIR, und_names), (out / UND_TEXT_DIR, text_names)):
        if names:
            prepare_dataset(folder, names)
    summary.seconds = round(time.perf_counter() - t0, 3)
    atomic_write_text(out / INGEST_SUMMARY, json.dumps(summary.__dict__, indent=1))
    return summary


def main(argv: list[str] | None = None) -> IngestSummary:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llava", action="append", required=True, help="LLaVA .json/.jsonl file (repeatable)")
    ap.add_argument("--image-root", action="append", default=[], help="image folder (repeatable, searched in order)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--shard-size", type=int, default=IngestConfig.shard_size)
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    args = ap.parse_args(argv)
    s = ingest(IngestConfig(llava=args.llava, image_roots=args.image_root, out=args.out,
                            shard_size=args.shard_size, workers=args.workers))
    print(f"ingested {s.records} records: {s.image_records} with an image -> {args.out}/{UND_DIR} "
          f"({s.und_shards} shards), {s.text_only_records} text-only -> {args.out}/{UND_TEXT_DIR}, "
          f"{s.dropped_records} dropped; {s.unique_images} unique images -> {args.out}/{IMAGES_LIST}; "
          f"{s.failed_images} images failed {s.reasons} (see {args.out}/{INGEST_REPORT}) in {s.seconds:.1f} s")
    return s


if __name__ == "__main__":
    main()
