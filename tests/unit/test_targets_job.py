"""The preprocessing job's bookkeeping: image lists, shard assignment, the fixed plan.

    OMP_NUM_THREADS=1 python -m pytest tests/unit/test_targets_job.py -q
"""

import json

import pytest

from unimrg.targets.job import JobConfig, fix_plan, make_plan, parse_args, read_image_list, shard_done
from unimrg.targets.shards import sample_key


def test_image_list_jsonl_or_plain_paths(tmp_path):
    f = tmp_path / "list.txt"
    f.write_text('{"key": "k1", "path": "/x/1.jpg"}\n\n/x/2.jpg\n{"path": "/x/3.png"}\n')
    assert read_image_list(f) == [{"key": "k1", "path": "/x/1.jpg"}, {"key": sample_key("/x/2.jpg"), "path": "/x/2.jpg"},
                                  {"key": sample_key("/x/3.png"), "path": "/x/3.png"}]
    f.write_text("/x/2.jpg\n/x/2.jpg\n")
    with pytest.raises(ValueError, match="appears twice"):
        read_image_list(f)
    with pytest.raises(FileNotFoundError, match="unimrg.targets.ingest"):
        read_image_list(tmp_path / "none.jsonl")


def test_array_task_defaults_from_slurm(monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "5")
    cfg = parse_args(["--images", "l", "--out", "o", "--pred-iou-thresh", "0.5"])
    assert (cfg.task_id, cfg.num_tasks) == (3, 5)
    assert cfg.segmentation.pred_iou_thresh == 0.5 and cfg.segmentation.points_per_side == 32   # paper defaults kept
    assert cfg.segmentation.stability_score_thresh == 0.95 and cfg.segmentation.box_nms_thresh == 0.7


def test_plan_is_fixed_once_a_shard_is_done(tmp_path):
    images = tmp_path / "images.txt"
    images.write_text("\n".join(f"/img/{i}.jpg" for i in range(5)))
    out = tmp_path / "out"
    cfg = JobConfig(images=str(images), out=str(out), shard_size=2)
    plan = make_plan(cfg, 5)
    assert plan["num_shards"] == 3
    fix_plan(out, plan)
    other = make_plan(JobConfig(images=str(images), out=str(out), shard_size=3), 5)
    fix_plan(out, other)                                  # nothing finished yet: replaced
    assert json.loads((out / "progress" / "plan.json").read_text())["shard_size"] == 3
    (out / "pix").mkdir()
    (out / "pix" / "shard-000000.tar").write_bytes(b"x" * 10)
    (out / "progress" / "shard-000000.json").write_text(json.dumps({"tars": {"pix/shard-000000.tar": 10}}))
    assert shard_done(out, 0) and not shard_done(out, 1)
    with pytest.raises(ValueError, match="different settings.*shard_size"):
        fix_plan(out, plan)
    (out / "pix" / "shard-000000.tar").write_bytes(b"x" * 9)   # truncated tar: not done
    assert not shard_done(out, 0)
