"""LLaVA ingestion: de-duplicated image list, understanding shards, problems reported (not fatal).

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
    (tmp_path / "next.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[5:]) + "{not json\n")
    return tmp_path, [str(a), str(b)]


def members(tar_path):
    with tarfile.open(tar_path) as t:
        return {m.name: t.extractfile(m).read() for m in t.getmembers()}


def test_ingest_outputs_and_report(llava):
    tmp, roots = llava
    out = tmp / "out"
    s = ingest(IngestConfig(llava=[str(tmp / "mix.json"), str(tmp / "next.jsonl")], image_roots=roots,
                            out=str(out), shard_size=2, workers=2))
    assert (s.records, s.image_records, s.text_only_records, s.bad_records) == (9, 4, 1, 2)
    assert s.dropped_records == 4 and s.unique_images == 3 and s.failed_images == 2

    listed = read_image_list(out / "images.jsonl")                  # what the job reads
    assert [e["path"] for e in listed] == [f"{roots[0]}/coco/1.jpg", f"{roots[1]}/gqa/2.png", f"{roots[1]}/gqa/3.gif"]
    assert [e["key"] for e in listed] == [sample_key("coco/1.jpg"), sample_key("gqa/2.png"), sample_key("gqa/3.gif")]

    report = [json.loads(x) for x in (out / "ingest_report.jsonl").read_text().splitlines()]
    reasons = {r.get("image", r.get("source")): r["reason"] for r in report}
    assert reasons["coco/none.jpg"].startswith("missing:")
    assert reasons["coco/bad.jpg"].startswith("corrupt:")
    assert sum(r["reason"].startswith("malformed:") for r in report) == 2   # bad turns + bad JSON line

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


def test_ingest_refuses_to_overwrite_and_bad_roots(llava):
    tmp, roots = llava
    cfg = IngestConfig(llava=[str(tmp / "mix.json")], image_roots=roots, out=str(tmp / "out"), workers=1)
    ingest(cfg)
    with pytest.raises(FileExistsError, match="und"):
        ingest(cfg)
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
