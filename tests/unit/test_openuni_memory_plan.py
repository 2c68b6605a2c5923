"""bench/memory_plan.py on OpenUni: DeepSpeed's estimators, trainable vs frozen split, ZeRO-3 < ZeRO-2.

    OMP_NUM_THREADS=1 python -m pytest tests/unit/test_openuni_memory_plan.py -q
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unimrg.models.openuni import OpenUni, OpenUniConfig

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # a subprocess importing DeepSpeed (~10-30 s on a busy CPU)
def test_memory_plan_numbers():
    out = subprocess.run([sys.executable, str(REPO / "bench" / "memory_plan.py"), "--models", "openuni",
                          "--gpus", "1", "8", "64"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    # rows: GPUs nodes | ZeRO-2 headroom | ZeRO-3 headroom
    rows = {int(g): (float(z2), float(z3)) for g, _, z2, z3 in
            re.findall(r"^\s+(\d+)\s+(\d+) \|\s+([\d.]+)\s+[-\d.]+ \|\s+([\d.]+)\s+[-\d.]+$", out.stdout, re.M)}
    assert set(rows) == {1, 8, 64}, out.stdout
    with torch.device("meta"):
        model = OpenUni(OpenUniConfig(size="full"))
    model.apply_freezing()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    # ZeRO-2 without offload (DeepSpeed's formula): bf16 weights replicated + 18 B/param partitioned states
    expected = (2 * trainable + 18 * trainable / 8 + 2 * frozen) / 1024 ** 3
    assert abs(rows[8][0] - expected) < 0.1
    assert rows[1][0] > rows[8][0] > rows[64][0] and rows[8][1] < rows[8][0]
    assert rows[8][0] < 80  # 3.6B post-training fits 8 × 80 GB with ZeRO-2 (activations need the rest)
