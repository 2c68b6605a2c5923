"""Harmon, Show-o and Janus-Pro through the same pipeline as OpenUni: submit.py → torchrun (2 CPU ranks) →
DeepSpeed ZeRO-2 / ZeRO-3 → tiny adapter → Energon loaders over generated scenes.

    python -m pytest -q tests/integration/test_train_models.py
"""

from __future__ import annotations

import statistics

import pytest
import torch

from tests.integration.test_train_openuni import EVAL_TAGS, initial_weights, metrics, tb_tags, train

pytestmark = pytest.mark.slow

# Modules the paper trains although they are encoders (Harmon's MAR encoder is shared by both directions).
MUST_CHANGE = {"harmon": "mar.encoder_blocks.", "showo": "mm_projector.", "janus": "janus.model.aligner."}


@pytest.mark.parametrize("model", ["harmon", "showo", "janus"])
@pytest.mark.parametrize("zero", [2, 3])
def test_four_tasks_under_zero(tmp_path, model, zero):
    ds = [] if zero == 2 else ["train.zero_stage=3", "train.ds_config=ds_configs/zero3_tiny.json"]
    data = tmp_path / "data"
    res = train(tmp_path, data, *ds, model=model)   # the tiny recipe generates its scenes
    assert "is deprecated" not in res.stderr, res.stderr[-2000:]   # no warning per collective flooding the log
    rows = metrics(tmp_path, 0)
    assert [r["step"] for r in rows] == list(range(1, 21))
    # Harmon: 4 per task, round-robin over 4 micro-steps; Show-o and Janus: 2 per task, joint, 1 micro-step.
    per_task = {"harmon": 4, "showo": 2, "janus": 2}[model]
    for rank in (0, 1):
        assert all(r["samples"] == {t: per_task for t in ("und", "pix", "depth", "seg")}
                   for r in metrics(tmp_path, rank))
    for task in ("und", "pix", "depth", "seg"):
        # Medians of the two halves: Harmon's diffusion loss (MAR, learned σ) adds a decoder NLL for
        # t = 0 draws that multiplies single steps' losses, so a 5-step mean measures the draws.
        first = statistics.median(r["global_losses"][task] for r in rows[:10])
        last = statistics.median(r["global_losses"][task] for r in rows[10:])
        assert last < first, f"{model} ZeRO-{zero} {task}: median loss of steps 11-20 {last:.4f} ≥ steps 1-10 {first:.4f}"
    assert {"loss/und", "loss/pix", "loss/depth", "loss/seg", "loss/total"} <= tb_tags(tmp_path)
    assert EVAL_TAGS <= tb_tags(tmp_path)          # in-training evaluation ran (ZeRO-3: on all ranks)
    assert (tmp_path / "eval" / "step_0000020" / "grid.png").is_file()

    final = torch.load(tmp_path / "final" / "model.pt")
    init, frozen = initial_weights(tmp_path)
    assert frozen
    for name in frozen:
        assert torch.equal(final[name], init[name]), f"frozen {name} changed"
    changed = [n for n in init if n.startswith(MUST_CHANGE[model]) and not torch.equal(final[n], init[n])]
    assert changed, f"no parameter under {MUST_CHANGE[model]} changed"
