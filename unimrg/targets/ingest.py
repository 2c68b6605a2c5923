"""LLaVA conversation JSON + image folders → the understanding stream and the image list for targets.

    python -m unimrg.targets.ingest --llava llava_v1_5_mix665k.json --llava llava_next.json \
        --image-root /data/llava/playground/data --out /data/unimrg [--workers 8]

Writes, under ``--out``:
    und/         Energon CrudeWebdataset: ``<key>.jpg|png|webp`` (the original bytes) + ``<key>.json``
                 (the checked LLaVA record, ``<image>`` first) — what unimrg.data.loaders reads for und
    und_text/    text-only records (``<key>.json`` only); the und stream blends them in
                 (``data.und_text_ratio``), each adapter trains them without image tokens
    images.jsonl the de-duplicated, readable images, one ``{"key", "path", "image"}`` per line, in
                 first-use order: the input of ``python -m unimrg.targets.job --images``
    ingest_report.jsonl  one line per problem: missing / corrupt images (with the number of records
                 that used them) and malformed records, each with a reason
    ingest.json  counts
    ingest_progress/     one done marker per finished shard (what makes a re-run resume)

Validate first. Every ``--llava`` file is read and every record checked before anything is written:
a file that is not valid JSON (or JSONL) stops the ingestion with an error naming the file, line and
column, and nothing is written; a record that breaks the LLaVA format is reported and left out
(``--strict``: stops the ingestion too, naming the file and record).

Resumable, like the target job. Records are cut into shards of ``--shard-size`` (und: the image
records, und_text: the text-only ones, in input order); a shard is written under a temporary name,
renamed into place, then its marker ``ingest_progress/<stream>-shard-XXXXXX.json`` records a digest of
what went into it (records, keys, image paths with their sizes and mtimes). A re-run with the same
inputs keeps every shard whose marker matches, removes temporary leftovers (``*.tmp-PID``) of a
killed run and writes only the rest, so after fixing an input file (or an image) only the shards it
touches are redone. One ingestion at a time per ``--out``.

Images. A record's image path is normalised (``a/../a/x.jpg`` is ``a/x.jpg``) and looked up under each
``--image-root`` in order (LLaVA-665K's paths, e.g. ``coco/train2017/000000033471.jpg``, are relative
to LLaVA's ``playground/data``); records that name the same file (also through a symlink) share one
image entry and one key. Each image is decoded once (``_decode_image``); its other records take the
file's bytes again, checked against the decoded bytes' SHA-1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from unimrg.data.llava import LlavaFormatError, LlavaRecord, iter_llava_objects, parse_record
from unimrg.data.loaders import prepare_dataset
from unimrg.targets.shards import (AtomicTar, UnreadableImage, atomic_write_text, read_image,
                                   sample_key, write_jsonl)

UND_DIR, UND_TEXT_DIR = "und", "und_text"
IMAGES_LIST, INGEST_REPORT, INGEST_SUMMARY = "images.jsonl", "ingest_report.jsonl", "ingest.json"
INGEST_PROGRESS = "ingest_progress"
SHARD_FORMAT = 1          # part of every shard digest: a change of the layout redoes every shard


@dataclass
class IngestConfig:
    """Inputs and shard sizes of one ingestion."""

    llava: list[str]                                   # LLaVA .json (list) or .jsonl files, in order
    image_roots: list[str]                             # folders the records' image paths are relative to
    out: str
    shard_size: int = 5000                             # samples per tar (the unit of resumption)
    workers: int = 8                                   # threads decoding images (I/O and PIL release the GIL)
    strict: bool = False                               # a malformed record stops the ingestion


@dataclass
class _Record:
    key: str
    where: str                       # "FILE: record I (id=...)", for the report
    record: dict                     # the checked record as stored (normalised image path)
    image: str | None = None         # identity of its image file (see _Planner.image_of); None: text-only


@dataclass
class _Image:
    key: str
    path: str                        # the file read (first root holding it)
    image: str                       # normalised relative path, as the first record named it
    stat: tuple[int, int] | None     # (size, mtime_ns) at planning; None when missing
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
    shards_written: int = 0          # this run (und + und_text)
    shards_kept: int = 0             # finished by an earlier run, left as they were
    seconds: float = 0.0
    reasons: dict[str, int] = field(default_factory=dict)


# ------------------------------------------------------------------------------------- validate

def read_inputs(cfg: IngestConfig, report: list[dict]) -> Iterator[tuple[str, LlavaRecord | None]]:
    """``(where, record)`` for every record of every ``--llava`` file, checked; nothing is written here.
    A malformed record is reported (``None`` in its place, so keys stay positional) or, with
    ``strict``, raised."""
    for file in cfg.llava:
        for source, index, obj in iter_llava_objects(file):     # a syntax error raises, naming the line
            where = source if index is None else f"{source}: record {index}"
            try:
                yield where, parse_record(obj, source=source, index=index)
            except LlavaFormatError as e:
                if cfg.strict:
                    raise LlavaFormatError(f"{e} (--strict; without it the record is reported and left out)") from e
                report.append({"stage": "ingest", "kind": "record", "source": where, "reason": f"malformed: {e}"})
                yield where, None


class _Planner:
    """Resolves, normalises and de-duplicates image paths; collects the images in first-use order."""

    def __init__(self, roots: list[Path]):
        self.roots = roots
        self.images: dict[str, _Image] = {}          # identity (real path) → image, first-use order
        self._by_rel: dict[str, str] = {}            # normalised relative path → identity

    def image_of(self, rel: str) -> str:
        norm = os.path.normpath(rel)
        ident = self._by_rel.get(norm)
        if ident is None:
            path = Path(norm) if os.path.isabs(norm) else next(
                (r / norm for r in self.roots if (r / norm).exists()), self.roots[0] / norm)
            ident = os.path.realpath(path)            # the same file under two spellings or a symlink
            if ident not in self.images:
                try:
                    st = os.stat(path)
                    stat = (st.st_size, st.st_mtime_ns)
                except OSError:
                    stat = None
                self.images[ident] = _Image(key=sample_key(norm), path=str(path), image=norm, stat=stat)
            self._by_rel[norm] = ident
        return ident


def plan(cfg: IngestConfig, report: list[dict], summary: IngestSummary
         ) -> tuple[list[list[_Record]], list[list[_Record]], dict[str, _Image]]:
    """(und shards, und_text shards, images): every input read and checked, and what every shard will
    hold, before any image is read or anything written."""
    planner = _Planner([Path(r) for r in cfg.image_roots])
    und, text = [], []
    for n, (where, rec) in enumerate(read_inputs(cfg, report)):
        summary.records += 1
        if rec is None:
            summary.bad_records += 1
            continue
        where = f"{where} (id={rec.id!r})"
        stored = rec.to_json()
        if not rec.has_image:
            text.append(_Record(f"r{n:09d}", where, stored))
            continue
        ident = planner.image_of(rec.image)
        img = planner.images[ident]
        img.records += 1
        img.first_record = img.first_record or where
        stored["image"] = img.image
        und.append(_Record(f"r{n:09d}", where, stored, ident))
    cut = lambda xs: [xs[i:i + cfg.shard_size] for i in range(0, len(xs), cfg.shard_size)]
    return cut(und), cut(text), planner.images


def shard_digest(recs: list[_Record], images: dict[str, _Image]) -> str:
    h = hashlib.sha1(f"unimrg-ingest-shard {SHARD_FORMAT}\n".encode())
    for r in recs:
        img = images[r.image] if r.image else None
        h.update(json.dumps([r.key, r.record, img and [img.key, img.path, img.stat]], sort_keys=True).encode())
        h.update(b"\n")
    return h.hexdigest()


# ------------------------------------------------------------------------------------- write

def _decode_image(path: str) -> tuple[dict, bytes | None]:
    """The one place ingestion decodes an image: (outcome, bytes to store). The outcome is
    ``{"part", "sha1"}`` of the stored bytes, or ``{"reason"}`` (missing / corrupt / too large ...)."""
    try:
        part, data, _ = read_image(path)
    except UnreadableImage as e:
        return {"reason": str(e)}, None
    return {"part": part, "sha1": hashlib.sha1(data).hexdigest()}, data


def _raw(path: str) -> bytes | None:
    try:
        return Path(path).read_bytes()
    except OSError:
        return None


class _Writer:
    """Writes the planned shards that are not finished; keeps the outcome of every image it saw."""

    def __init__(self, cfg: IngestConfig, images: dict[str, _Image], und: list[list[_Record]], pool):
        self.out, self.images, self.pool = Path(cfg.out), images, pool
        self.outcomes: dict[str, dict] = {}
        self.cache: dict[str, bytes] = {}            # re-encoded bytes (GIF → PNG ...) of images used again
        self.uses_left: dict[str, int] = {}
        for shard in und:
            for r in shard:
                self.uses_left[r.image] = self.uses_left.get(r.image, 0) + 1

    def marker_path(self, stream: str, index: int) -> Path:
        return self.out / INGEST_PROGRESS / f"{stream}-shard-{index:06d}.json"

    def finished(self, stream: str, index: int, digest: str) -> dict | None:
        """The marker of a shard finished with this digest and still in place, else None."""
        path = self.marker_path(stream, index)
        try:
            marker = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        tar = marker.get("tar")
        if marker.get("digest") != digest or (tar and not (
                (self.out / tar).is_file() and (self.out / tar).stat().st_size == marker["size"])):
            return None
        return marker

    def _bytes_for(self, ident: str) -> bytes | None:
        """The bytes to store for an image whose outcome is known, without decoding it again when the
        file still holds the bytes it was decoded from."""
        outcome = self.outcomes[ident]
        if "reason" in outcome:
            return None
        if ident in self.cache:
            return self.cache[ident]
        raw = _raw(self.images[ident].path)
        if raw is not None and hashlib.sha1(raw).hexdigest() == outcome["sha1"]:
            return raw
        # re-encoded in an earlier run, or the file changed since it was checked: decode it now
        self.outcomes[ident], data = _decode_image(self.images[ident].path)
        return data

    def write(self, stream: str, index: int, recs: list[_Record], digest: str) -> dict:
        name = f"shard-{index:06d}.tar"
        folder = self.out / stream
        for stale in folder.glob(f"{name}.tmp-*"):   # a killed run's half-written shard
            stale.unlink(missing_ok=True)
        new = list(dict.fromkeys(r.image for r in recs if r.image and r.image not in self.outcomes))
        decoded = self.pool.map(lambda i: _decode_image(self.images[i].path), new)   # in order, ahead
        tar, written, dropped, seen = AtomicTar(folder / name), 0, 0, {}
        try:
            for r in recs:
                parts = {"json": json.dumps(r.record).encode()}
                if r.image:
                    if r.image not in self.outcomes:
                        self.outcomes[r.image], data = next(decoded)
                        if data is not None and self.uses_left[r.image] > 1:
                            raw = _raw(self.images[r.image].path)   # keep bytes that a re-read cannot give
                            if raw is None or hashlib.sha1(raw).hexdigest() != self.outcomes[r.image]["sha1"]:
                                self.cache[r.image] = data
                    else:
                        data = self._bytes_for(r.image)
                    self.uses_left[r.image] -= 1
                    if not self.uses_left[r.image]:
                        self.cache.pop(r.image, None)
                    seen[r.image] = self.outcomes[r.image]
                    if data is None:
                        dropped += 1
                        continue
                    parts[self.outcomes[r.image]["part"]] = data
                tar.add(r.key, parts)
                written += 1
            if written:
                tar.commit()
            else:
                tar.abort()                                # energon cannot index an empty tar
                (folder / name).unlink(missing_ok=True)
        except BaseException:
            decoded.close()                                # cancels the decodes not started yet
            tar.abort()
            raise
        marker = {"digest": digest, "tar": f"{stream}/{name}" if written else None,
                  "size": (folder / name).stat().st_size if written else 0,
                  "written": written, "dropped": dropped, "images": seen}
        atomic_write_text(self.marker_path(stream, index), json.dumps(marker))
        return marker


def _remove_unplanned(out: Path, stream: str, count: int) -> None:
    """Shards and markers of an earlier plan beyond this one's shard count, and temporary leftovers."""
    for p in (out / stream).glob("shard-*.tar*"):
        idx = p.name[len("shard-"):len("shard-") + 6]
        if ".tmp-" in p.name or (idx.isdigit() and int(idx) >= count):
            p.unlink(missing_ok=True)
    for p in (out / INGEST_PROGRESS).glob(f"{stream}-shard-*.json"):
        if int(p.stem.rsplit("-", 1)[1]) >= count:
            p.unlink(missing_ok=True)


def ingest(cfg: IngestConfig) -> IngestSummary:
    """Run the ingestion described in the module docstring; returns the counts (also in ingest.json)."""
    t0 = time.perf_counter()
    out = Path(cfg.out)
    roots = [Path(r) for r in cfg.image_roots]
    if not roots:
        raise ValueError("ingest: no --image-root given; pass the folder(s) the records' image paths are "
                         "relative to (for LLaVA-665K: LLaVA's playground/data)")
    if cfg.shard_size < 1:
        raise ValueError(f"--shard-size {cfg.shard_size} must be >= 1")
    for r in roots:
        if not r.is_dir():
            raise FileNotFoundError(f"--image-root {r} is not a folder")
    for f in cfg.llava:
        if not Path(f).is_file():
            raise FileNotFoundError(f"--llava {f} does not exist; pass LLaVA conversation files (.json / .jsonl)")
    for d in (UND_DIR, UND_TEXT_DIR):
        if (out / d).exists() and not (out / INGEST_PROGRESS).is_dir():
            raise FileExistsError(f"{out / d} exists but was not written by this ingestion (no {out / INGEST_PROGRESS}); "
                                  f"remove it or choose another --out")

    # 1. read and check every input; 2. plan every shard -- nothing is written before both succeed
    summary, report = IngestSummary(), []
    und, text, images = plan(cfg, report, summary)
    summary.text_only_records = sum(len(s) for s in text)

    # 3. write what is not finished yet
    (out / INGEST_PROGRESS).mkdir(parents=True, exist_ok=True)
    for stream, shards in ((UND_DIR, und), (UND_TEXT_DIR, text)):
        _remove_unplanned(out, stream, len(shards))
    markers: dict[str, list[dict]] = {UND_DIR: [], UND_TEXT_DIR: []}
    with ThreadPoolExecutor(max(1, cfg.workers)) as pool:
        writer = _Writer(cfg, images, und, pool)
        for stream, shards in ((UND_DIR, und), (UND_TEXT_DIR, text)):
            for index, recs in enumerate(shards):
                digest = shard_digest(recs, images)
                marker = writer.finished(stream, index, digest)
                if marker is not None:
                    summary.shards_kept += 1
                    for ident, outcome in marker["images"].items():
                        writer.outcomes.setdefault(ident, outcome)
                    for r in recs:
                        if r.image:
                            writer.uses_left[r.image] -= 1
                else:
                    marker = writer.write(stream, index, recs, digest)
                    summary.shards_written += 1
                markers[stream].append(marker)

    # 4. the image list, the report, the Energon metadata and the counts
    listed = []
    for ident, img in images.items():
        outcome = writer.outcomes.get(ident, {"reason": "unreadable: not checked"})
        if "reason" not in outcome:
            listed.append({"key": img.key, "path": img.path, "image": img.image})
            continue
        kind = outcome["reason"].split(":", 1)[0]
        summary.reasons[kind] = summary.reasons.get(kind, 0) + 1
        report.append({"stage": "ingest", "kind": "image", "image": img.image, "path": img.path,
                       "reason": outcome["reason"], "records": img.records, "first_record": img.first_record})
    summary.reasons["malformed"] = summary.bad_records
    summary.image_records = sum(m["written"] for m in markers[UND_DIR])
    summary.dropped_records = summary.bad_records + sum(m["dropped"] for m in markers[UND_DIR])
    summary.unique_images, summary.failed_images = len(listed), len(images) - len(listed)
    write_jsonl(out / IMAGES_LIST, listed)
    write_jsonl(out / INGEST_REPORT, report)
    for stream in (UND_DIR, UND_TEXT_DIR):
        names = [Path(m["tar"]).name for m in markers[stream] if m["tar"]]
        if stream == UND_DIR:
            summary.und_shards = len(names)
        # re-index when the tars differ from the last indexed set (a killed run may have replaced some)
        stamp = out / INGEST_PROGRESS / f"{stream}-prepared.json"
        indexed = json.dumps([m["digest"] for m in markers[stream] if m["tar"]])
        meta = out / stream / ".nv-meta" / "dataset.yaml"
        if names and not (meta.is_file() and stamp.is_file() and stamp.read_text() == indexed):
            stamp.unlink(missing_ok=True)
            prepare_dataset(out / stream, names)
            atomic_write_text(stamp, indexed)
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
    ap.add_argument("--strict", action="store_true", help="stop at a malformed record instead of reporting it")
    args = ap.parse_args(argv)
    try:
        s = ingest(IngestConfig(llava=args.llava, image_roots=args.image_root, out=args.out,
                                shard_size=args.shard_size, workers=args.workers, strict=args.strict))
    except (LlavaFormatError, FileNotFoundError, FileExistsError, ValueError) as e:
        ap.exit(2, f"{ap.prog}: error: {e}\nnothing was written for this input; fix it and re-run the same "
                   f"command (finished shards are kept)\n")
    print(f"ingested {s.records} records: {s.image_records} with an image -> {args.out}/{UND_DIR} "
          f"({s.und_shards} shards), {s.text_only_records} text-only -> {args.out}/{UND_TEXT_DIR}, "
          f"{s.dropped_records} dropped; {s.unique_images} unique images -> {args.out}/{IMAGES_LIST}; "
          f"{s.failed_images} images failed {s.reasons} (see {args.out}/{INGEST_REPORT}); "
          f"{s.shards_written} shards written, {s.shards_kept} kept from an earlier run, in {s.seconds:.1f} s")
    return s


if __name__ == "__main__":
    main()
