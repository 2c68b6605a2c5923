"""LLaVA ingestion: de-duplicated image list, understanding shards, problems reported (not fatal),
inputs validated before anything is written, resumable shards, each image decoded once.

    OMP_NUM_THREADS=1 python -m pytest tests/unit/test_targets_ingest.py -q
"""

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from unimrg.targets.ingest import IngestConfig, ingest
from unimrg.targets.job import read_image_list
from unimrg.targets.shards import decode_image_bytes, sample_key


def turns(q, a="ok"):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


@pytest.fixture()
def llava(tmp_path):
    a, b = tmp_path / "rootA", tmp_path / "rootB"
    (a / "coco").mkdir(parents=True)
    (b / "gqa").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(a / "coco" / "1.jpg")
    Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(b / "gqa" / "2.png")
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(b / "gqa" / "3.gif")
    (a / "coco" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    recs = [
        {"id": "1", "image": "coco/1.jpg", "conversations": turns("What is it?\n<image>")},   # placeholder at the end
        {"id": "2", "image": "gqa/2.png", "conversations": turns("<image>\nColour?")},         # found in the 2nd root
        {"id": "3", "image": "coco/1.jpg", "conversations": turns("<image>\nAgain?", "yes")},  # same image again
        {"id": "4", "image": "coco/none.jpg", "conversations": turns("<image>\nQ")},           # missing
        {"id": "5", "image": "coco/bad.jpg", "conversations": turns("<image>\nQ")},            # corrupt
        {"id": "6", "conversations": turns("Tell me a joke.")},                                 # text-only
        {"id": "7", "image": "coco/1.jpg", "conversations": [{"from": "gpt", "value": "x"}]},  # malformed
        {"id": "8", "image": "gqa/3.gif", "conversations": turns("<image>\nQ")},                # re-encoded
    ]
    (tmp_path / "mix.json").write_text(json.dumps(recs[:5]))
    (tmp_path / "next.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[5:]))
    return tmp_path, [str(a), str(b)]


def members(tar_path):
    with tarfile.open(tar_path) as t:
        return {m.name: t.extractfile(m).read() for m in t.getmembers()}


def test_ingest_outputs_and_report(llava):
    tmp, roots = llava
    out = tmp / "out"
    s = ingest(IngestConfig(llava=[str(tmp / "mix.json"), str(tmp / "next.jsonl")], image_roots=roots,
                            out=str(out), shard_size=2, workers=2))
    assert (s.records, s.image_records, s.text_only_records, s.bad_records) == (8, 4, 1, 1)
    assert s.dropped_records == 3 and s.unique_images == 3 and s.failed_images == 2

    listed = read_image_list(out / "images.jsonl")                  # what the job reads
    assert [e["path"] for e in listed] == [f"{roots[0]}/coco/1.jpg", f"{roots[1]}/gqa/2.png", f"{roots[1]}/gqa/3.gif"]
    assert [e["key"] for e in listed] == [sample_key("coco/1.jpg"), sample_key("gqa/2.png"), sample_key("gqa/3.gif")]

    report = [json.loads(x) for x in (out / "ingest_report.jsonl").read_text().splitlines()]
    reasons = {r.get("image", r.get("source")): r["reason"] for r in report}
    assert reasons["coco/none.jpg"].startswith("missing:")
    assert reasons["coco/bad.jpg"].startswith("corrupt:")
    bad = [r for r in report if r["reason"].startswith("malformed:")]
    assert len(bad) == 1 and bad[0]["source"] == f"{tmp / 'next.jsonl'}: line 2"

    und = {}
    for shard in sorted((out / "und").glob("shard-*.tar")):
        und.update(members(shard))
    assert (out / "und" / ".nv-meta" / "dataset.yaml").is_file()
    assert "CrudeWebdataset" in (out / "und" / ".nv-meta" / "dataset.yaml").read_text()
    keys = sorted({n.split(".", 1)[0] for n in und})
    assert keys == ["r000000000", "r000000001", "r000000002", "r000000007"]
    rec0 = json.loads(und["r000000000.json"])
    assert rec0["conversations"][0]["value"] == "<image>\nWhat is it?" and rec0["image"] == "coco/1.jpg"
    assert und["r000000000.jpg"] == (tmp / "rootA" / "coco" / "1.jpg").read_bytes()   # original bytes
    assert und["r000000002.jpg"] == und["r000000000.jpg"]
    assert und["r000000001.png"] == (tmp / "rootB" / "gqa" / "2.png").read_bytes()
    gif_as_png = Image.open(io.BytesIO(und["r000000007.png"]))
    assert gif_as_png.format == "PNG" and gif_as_png.size == (8, 8)

    text = members(next((out / "und_text").glob("shard-*.tar")))
    assert list(text) == ["r000000005.json"] and "image" not in json.loads(text["r000000005.json"])


def test_ingest_reruns_keep_everything_and_foreign_data_is_refused(llava):
    tmp, roots = llava
    cfg = IngestConfig(llava=[str(tmp / "mix.json")], image_roots=roots, out=str(tmp / "out"), workers=1)
    first = ingest(cfg)
    again = ingest(cfg)
    assert (again.shards_written, again.shards_kept) == (0, first.shards_written)
    (tmp / "other" / "und").mkdir(parents=True)                      # e.g. generated scenes
    with pytest.raises(FileExistsError, match="not written by this ingestion"):
        ingest(IngestConfig(llava=[str(tmp / "mix.json")], image_roots=roots, out=str(tmp / "other")))
    with pytest.raises(FileNotFoundError, match="--image-root"):
        ingest(IngestConfig(llava=[str(tmp / "mix.json")], image_roots=[str(tmp / "nope")], out=str(tmp / "o2")))


def test_keys_are_webdataset_safe_and_distinct():
    a, b = sample_key("a/b.c/d.jpg"), sample_key("a_b/c_d.jpg")
    assert "." not in a and "/" not in a and a != b


def test_decode_reports_truncated_jpeg():
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="JPEG")
    with pytest.raises(ValueError, match="corrupt"):
        decode_image_bytes(buf.getvalue()[:200], "x.jpg")


def tree(root):
    """Every file under root (except the timing in ingest.json) → bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "ingest.json" and ".nv-meta" not in p.parts}


def stamps(root):
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def test_malformed_second_file_stops_before_writing_and_the_fixed_rerun_resumes(llava, monkeypatch):
    tmp, roots = llava
    mix, nxt = str(tmp / "mix.json"), tmp / "next.jsonl"
    Image.new("RGB", (5, 5), (1, 2, 3)).save(tmp / "rootB" / "gqa" / "4.png")
    good = nxt.read_text() + json.dumps({"id": "9", "image": "gqa/4.png", "conversations": turns("<image>\nQ")}) + "\n"
    nxt.write_text(good.replace('"id": "7"', '"id": "7",, broken'))   # line 2 of the second file
    cfg = lambda out, *files: IngestConfig(llava=list(files), image_roots=roots, out=str(out), shard_size=1, workers=2)

    with pytest.raises(ValueError, match=rf"{nxt}: line 2 is not valid JSON"):
        ingest(cfg(tmp / "fresh", mix, str(nxt)))
    assert not (tmp / "fresh").exists(), "the malformed second file let the first one be written"

    out = tmp / "out"
    ingest(cfg(out, mix))                                            # the first file alone
    before = stamps(out)
    with pytest.raises(ValueError, match=rf"{nxt}: line 2"):
        ingest(cfg(out, mix, str(nxt)))
    assert stamps(out) == before, "a failed validation touched the finished ingestion"

    nxt.write_text(good)                                             # fixed; then a run killed mid-way
    import unimrg.targets.ingest as ingest_mod
    real, calls = ingest_mod._decode_image, []

    def dies_on_second_new_image(path):
        calls.append(path)
        if len(calls) == 2:           # the second file's second image: its first shard is done
            raise KeyboardInterrupt   # Ctrl-C / a kill in the middle of the second file's shards
        return real(path)
    monkeypatch.setattr(ingest_mod, "_decode_image", dies_on_second_new_image)
    with pytest.raises(KeyboardInterrupt):
        ingest(cfg(out, mix, str(nxt)))
    monkeypatch.setattr(ingest_mod, "_decode_image", real)
    (out / "und" / "shard-000004.tar.tmp-999999").write_bytes(b"half a tar of a SIGKILLed run")
    kept = {p: st for p, st in stamps(out).items() if p.suffix == ".tar"}
    assert len(kept) == 3 + 1            # the first file's 3 readable images + the gif of the killed run

    s = ingest(cfg(out, mix, str(nxt)))
    assert s.shards_kept == 5 + 1 and s.shards_written == 2          # und: 5 of the first file + 1; 4.png + text
    for p, st in kept.items():
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == st, f"{p} was redone"
    assert not list(out.rglob("*.tmp-*"))
    ref = tmp / "reference"
    ingest(cfg(ref, mix, str(nxt)))                                  # uninterrupted, in one go
    assert tree(out) == tree(ref)


def test_each_image_decoded_once_and_paths_normalised(tmp_path, monkeypatch):
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    Image.new("RGB", (9, 7), (10, 200, 30)).save(root / "a" / "x.jpg")
    Image.new("P", (6, 6)).save(root / "a" / "y.gif")                # re-encoded as PNG
    spellings = ["a/x.jpg", "a/../a/x.jpg", "./a/x.jpg", "a//x.jpg", "a/y.gif", "a/./y.gif"]
    recs = [{"id": str(i), "image": p, "conversations": turns("<image>\nQ")} for i, p in enumerate(spellings)]
    (tmp_path / "r.json").write_text(json.dumps(recs))

    import unimrg.targets.ingest as ingest_mod
    real, calls = ingest_mod._decode_image, []
    monkeypatch.setattr(ingest_mod, "_decode_image", lambda path: calls.append(path) or real(path))
    cfg = IngestConfig(llava=[str(tmp_path / "r.json")], image_roots=[str(root)], out=str(tmp_path / "out"),
                       shard_size=2, workers=2)                      # uses of one image span shards
    s = ingest(cfg)
    assert sorted(calls) == sorted([str(root / "a" / "x.jpg"), str(root / "a" / "y.gif")])
    assert s.image_records == 6 and s.unique_images == 2
    listed = read_image_list(tmp_path / "out" / "images.jsonl")
    assert [e["key"] for e in listed] == [sample_key("a/x.jpg"), sample_key("a/y.gif")]
    und = {}
    for shard in sorted((tmp_path / "out" / "und").glob("shard-*.tar")):
        und.update(members(shard))
    jpgs = [v for k, v in und.items() if k.endswith(".jpg")]
    pngs = [v for k, v in und.items() if k.endswith(".png")]
    assert len(jpgs) == 4 and all(v == (root / "a" / "x.jpg").read_bytes() for v in jpgs)
    assert len(pngs) == 2 and pngs[0] == pngs[1] and Image.open(io.BytesIO(pngs[0])).format == "PNG"
    assert sorted({json.loads(v)["image"] for k, v in und.items() if k.endswith(".json")}) == ["a/x.jpg", "a/y.gif"]
    calls.clear()
    assert ingest(cfg).shards_written == 0 and calls == []           # a finished ingestion decodes nothing
