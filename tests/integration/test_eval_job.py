"""``python launch/submit.py --job eval`` end to end on the tiny configs: world size 2 writes the same bytes as
world size 1 (scenes for all three models; MMBench with bad rows and a run's final/model.pt for OpenUni), bad
rows are named and skipped, and a map suite makes its targets with the tiny Depth Anything V2.

    python -m pytest -q -m slow tests/integration/test_eval_job.py
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def submit(*argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, str(REPO / "launch" / "submit.py"), "--job", "eval", "--gpus-per-node", "0",
                          *argv], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def run_both(run_dir: Path, suite: str, *argv: str) -> dict:
    """The suite at world size 1 and 2; asserts identical outputs; returns the report."""
    for n in (1, 2):
        res = submit("--suite", suite, "--run-dir", str(run_dir), "--cpu-ranks-per-node", str(n), *argv,
                     "--out", str(run_dir / f"ws{n}"))
        assert "| metric | value |" in res.stdout and f"({n} rank(s)" in res.stdout
    for name in (f"{suite}.json", f"{suite}.answers.jsonl", f"{suite}.md"):
        assert (run_dir / "ws1" / name).read_bytes() == (run_dir / "ws2" / name).read_bytes(), name
    return json.loads((run_dir / "ws1" / f"{suite}.json").read_text())


@pytest.mark.parametrize("model", ["openuni", "harmon", "showo", "janus"])
def test_scenes_same_at_world_size_1_and_2(tmp_path, model):
    # 24 new tokens: room for the longest scene answer (a shorter limit is refused)
    report = run_both(tmp_path / "run", "scenes", "--model", model, "--recipe", "tiny", "--weights", "none",
                      "--", "--num-scenes", "2", "--max-new-tokens", "24")
    m = report["metrics"]
    assert report["items"] == report["scored"] == 2 + 8 and not report["skipped"]   # 2 maps + 4 questions each
    assert {"depth_similarity", "seg_boundary_f1", "recon_psnr", "und_accuracy", "und_accuracy/closer",
            "und_accuracy/count", "und_accuracy/exists", "und_accuracy/left_right",
            "depth_similarity/other_image", "seg_boundary_f1/other_image"} <= set(m)
    assert 0 <= m["depth_similarity"] <= 1 and m["recon_psnr"] > 0
    # each map against the other scene's target: a different number unless the two targets are equal
    assert 0 <= m["depth_similarity/other_image"] <= 1 and m["depth_similarity/other_image"] != m["depth_similarity"]


def mmbench_fixture(path: Path, broken_image: bool = True) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (30, 200, 40)).save(buf, format="PNG")
    img = base64.b64encode(buf.getvalue()).decode()
    fields = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"]
    rows = [{"index": i, "question": f"Question {i}?", "A": "red", "B": "green", "C": "blue", "answer": "B",
             "category": "color", "image": img} for i in range(1, 4)]
    rows.append({"index": 4, "question": "No options", "answer": "A", "category": "color", "image": img})
    rows.append({"index": 5, "question": "Broken image", "A": "x", "B": "y", "answer": "A", "category": "color",
                 "image": base64.b64encode(b"not a png").decode()})
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, delimiter="\t")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in fields})


def test_mmbench_from_a_run_folder_with_bad_rows(tmp_path):
    from unimrg.config import load_config, recipe_path, to_yaml
    from unimrg.models import registry
    run = tmp_path / "run"
    cfg = load_config(recipe_path("openuni", "tiny"), [f"run.dir={run}"], model="openuni")
    run.mkdir()
    (run / "config.yaml").write_text(to_yaml(cfg))   # as submit.py writes it for a training run
    torch.manual_seed(123)
    (run / "final").mkdir()
    torch.save(registry.build_model(cfg.model).state_dict(), run / "final" / "model.pt")
    bench = tmp_path / "MMBench_DEV_EN.tsv"
    mmbench_fixture(bench)
    report = run_both(run, "mmbench", "--benchmark", str(bench), "--", "--max-new-tokens", "3")
    assert report["weights"] == str(run / "final" / "model.pt")
    # 3 good questions × 3 shifts + 2 shifts of the broken-image row; rows 5 (no options) and 6 (image) skipped
    assert report["items"] == 9 + 2 + 1 and report["scored"] == 9
    wheres = sorted(s["where"] for s in report["skipped"])
    assert wheres[0] == f"{bench} row 5" and all(w == f"{bench} row 6" for w in wheres[1:]) and len(wheres) == 3
    assert set(report["metrics"]) == {"vanilla", "circular", "circular/color"}
    assert "skipped" in (run / "ws1" / "mmbench.md").read_text()


def test_depth_similarity_on_an_image_folder_with_the_tiny_depth_model(tmp_path):
    from unimrg.targets.tiny import save_tiny_models
    depth_dir, _ = save_tiny_models(tmp_path / "models")
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (40 + 8 * i, 32), (40 * i, 100, 200 - 40 * i)).save(images / f"{i}.png")
    (images / "3.jpg").write_bytes(b"truncated")
    submit("--suite", "depth_similarity", "--run-dir", str(tmp_path / "run"), "--model", "openuni", "--weights",
           "none", "--images", str(images), "--depth-model", str(depth_dir), "--cpu-ranks-per-node", "2",
           "--", "--batch-size", "2")
    report = json.loads((tmp_path / "run" / "eval" / "depth_similarity.json").read_text())
    assert report["items"] == 4 and report["scored"] == 3
    assert report["skipped"][0]["where"] == str(images / "3.jpg")
    assert 0 <= report["metrics"]["depth_similarity"] <= 1


def test_checkpoint_folder_and_final_export_give_the_same_numbers(tmp_path):
    """A ZeRO-2 checkpoint consolidated by the eval job equals the trainer's own final/model.pt export."""
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, str(REPO / "launch" / "submit.py"), "--model", "openuni", "--recipe", "tiny",
                          "--run-dir", str(run), "--gpus-per-node", "0", "train.steps=2", "eval.every=0"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ckpt = run / "checkpoints" / "step_0000002"
    reports = []
    for weights, out in ((str(ckpt), "ckpt"), ("auto", "final")):
        submit("--suite", "scenes", "--run-dir", str(run), "--weights", weights, "--out", str(run / out),
               "--", "--num-scenes", "1", "--max-new-tokens", "24")   # room for the longest scene answer
        reports.append(json.loads((run / out / "scenes.json").read_text()))
    assert reports[0]["weights"] == str(ckpt) and reports[1]["weights"] == str(run / "final" / "model.pt")
    assert reports[0]["metrics"] == reports[1]["metrics"]
