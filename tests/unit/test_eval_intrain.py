"""In-training evaluation pieces without processes: the held-out set from each source, the rank split,
and rank 0's report (metrics, grid layout, PNGs) on outputs whose scores are known.

    python -m pytest -q tests/unit/test_eval_intrain.py
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from unimrg.config import RECIPES, ConfigError, load_config, validate
from unimrg.data.scenes import make_scene, write_scene_datasets
from unimrg.eval.intrain import EVAL_COLUMNS, HELD_OUT_INDEX, EvalConfig, Evaluator, _shard, build_eval_set


def test_every_rank_gets_the_same_number_of_items():
    for n in (1, 2, 5, 8):
        shards = [_shard(n, r, 2) for r in range(2)]
        assert len(shards[0]) == len(shards[1]) == -(-n // 2)
        assert set(shards[0]) | set(shards[1]) == set(range(n))
    assert _shard(5, 1, 2) == [1, 3, 3]


def test_scene_set_is_held_out_with_exact_targets():
    d = build_eval_set(EvalConfig(num_images=3), 32)
    assert d.keys == [f"scene{HELD_OUT_INDEX + i:07d}" for i in range(3)]
    assert d.images.shape == (3, 3, 32, 32) and d.images.dtype == torch.uint8
    sc = make_scene(0, HELD_OUT_INDEX + 1, 32)
    assert torch.equal(d.targets["depth_target"][1, 0], torch.from_numpy(sc.depth))
    assert torch.equal(d.targets["seg_target"][1, 0], torch.from_numpy(sc.boundary[..., 0] / 255).float())
    kinds = {q[1] for q in d.questions}
    assert {"closer", "count", "left_right"} <= kinds and kinds <= {"closer", "count", "left_right", "exists",
                                                                    "hallucination"}
    assert len(d.questions) == 12


def test_prepared_root_and_image_folder(tmp_path):
    write_scene_datasets(tmp_path / "root", 4, 32, seed=5, shards=2)
    d = build_eval_set(EvalConfig(num_images=3, source=str(tmp_path / "root")), 32)
    assert d.keys == ["scene0000000", "scene0000001", "scene0000002"]
    sc = make_scene(5, 2, 32)
    assert torch.allclose(d.targets["depth_target"][2, 0], torch.from_numpy(sc.depth), atol=1e-4)
    assert torch.equal(d.targets["seg_target"][2, 0], torch.from_numpy(sc.boundary[..., 0] / 255).float())
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((40, 50, 3), 60 * i, np.uint8)).save(folder / f"im{i}.png")
    d = build_eval_set(EvalConfig(num_images=2, source=str(folder)), 32)
    assert d.keys == ["im0", "im1"] and d.images.shape == (2, 3, 32, 32) and d.targets == {}
    assert len(d.questions) == 8                       # scene questions still come from held-out scenes
    with pytest.raises(ValueError, match="no images"):
        build_eval_set(EvalConfig(source=str(tmp_path / "root" / "und")), 32)


def test_report_scores_grid_and_pngs(tmp_path):
    ev = Evaluator(EvalConfig(num_images=2), ["und", "depth", "pix"], 32, 0, tmp_path, 0, 1)
    ev.data = d = build_eval_set(ev.cfg, 32)
    perfect = {i: {"depth": d.targets["depth_target"][i].expand(3, -1, -1), "pix": d.images[i].float() / 255}
               for i in range(2)}
    answers = {i: q[3] for i, q in enumerate(d.questions)}
    answers[0] = "wrong"
    s = ev.report(7, perfect, answers, seconds=1.5)
    assert s["eval/depth_similarity"] == pytest.approx(1.0) and s["eval/recon_psnr"] == 100.0
    # the exact maps scored against the other scene's: what a map that follows its own image loses
    swapped = 1 - (d.targets["depth_target"][0] - d.targets["depth_target"][1]).abs().mean()
    assert s["eval/depth_similarity/other_image"] == pytest.approx(float(swapped)) and float(swapped) < 0.999
    assert "eval/seg_boundary_f1" not in s                   # seg not trained in this stage
    assert s["eval/und_accuracy"] == pytest.approx(7 / 8)
    assert s[f"eval/und_accuracy/{d.questions[0][1]}"] == pytest.approx(0.5)
    folder = tmp_path / "eval" / "step_0000007"
    grid = np.asarray(Image.open(folder / "grid.png"))
    assert grid.shape == (2 * 32, len(EVAL_COLUMNS) * 32, 3)
    assert EVAL_COLUMNS.index("seg") == 4 and grid[:, 4 * 32:5 * 32].max() == 0     # untrained task: black
    assert np.array_equal(grid[:32, 32:64], grid[:32, 64:96])  # depth generated == depth target here
    assert (folder / "scene1000001_seg_target.png").is_file()
    assert json.loads((folder / "metrics.json").read_text())["answers"][0]["answer"] == "wrong"


def test_eval_fields_are_validated():
    validate(load_config(RECIPES / "openuni_tiny.yaml", ["eval.every=0", "eval.num_images=0"]), 2)
    with pytest.raises(ConfigError, match="eval.num_images"):
        validate(load_config(RECIPES / "openuni_tiny.yaml", ["eval.num_images=0"]), 2)
    with pytest.raises(ConfigError, match="eval.source"):
        validate(load_config(RECIPES / "openuni_tiny.yaml", ["eval.source=/no/such/folder"]), 2)


def test_due_every_n_steps_and_at_the_stage_end():
    ev = lambda every: Evaluator(EvalConfig(every=every), ["und"], 32, 0, None, 0, 1)   # noqa: E731
    assert [s for s in range(1, 26) if ev(10).due(s, 25)] == [10, 20, 25]
    assert not any(ev(0).due(s, 25) for s in range(1, 26))              # eval.every=0: off, stage end too


def test_a_short_answer_limit_is_named_once_with_the_limit_that_fits(tmp_path, capsys):
    """The in-training twin of the scenes suite's refusal: training goes on, but und_accuracy would score
    cut answers wrong without a word (8 byte tokens cannot hold "The red cube." and its end token)."""
    from unimrg.models import registry
    cfg = load_config(RECIPES / "openuni_tiny.yaml", ["model.base=none"])
    model = registry.adapter_class("openuni")(cfg.model)
    ev = Evaluator(EvalConfig(num_images=8, max_new_tokens=8), ["und"], 32, 0, tmp_path, 0, 1)
    ev.data = build_eval_set(ev.cfg, 32)
    cut = ev.warn_cut_answers(model)
    longest = max(len(model.tokenizer(q[3], add_special_tokens=False)["input_ids"]) + 1 for q in ev.data.questions)
    assert 0 < cut < len(ev.data.questions)
    out = capsys.readouterr().out
    assert f"eval.max_new_tokens=8 cuts {cut} of {len(ev.data.questions)}" in out
    assert f"eval.max_new_tokens={longest} leaves room" in out
    roomy = Evaluator(EvalConfig(num_images=8, max_new_tokens=longest), ["und"], 32, 0, tmp_path, 0, 1)
    roomy.data = ev.data
    assert roomy.warn_cut_answers(model) == 0 and capsys.readouterr().out == ""
