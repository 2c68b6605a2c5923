"""``python bench/gpu_suite.py --smoke``: the prepared GPU run, at tiny sizes on CPU, end to end.

    OMP_NUM_THREADS=1 python -m pytest tests/integration/test_gpu_suite.py -q
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_gpu_suite_smoke_writes_every_model_and_target(repo, tmp_path):
    proc = subprocess.run([sys.executable, str(repo / "bench" / "gpu_suite.py"), "--smoke", "--out", str(tmp_path)],
                          cwd=repo, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_suite_smoke.json").read_text())
    from unimrg.models import registry
    ok = {(r["model"], r["zero_stage"]) for r in result["runs"] if r["status"] == "ok"}
    assert {m for m, _ in ok} == set(registry.names())
    assert all((m, 2) in ok for m in registry.names())           # the recipes' ZeRO-2 at world size 1
    for r in result["runs"]:
        assert r["flops_per_step"] > 0 and r["step_s"] > 0 and r["samples_per_s"] > 0
        assert r["samples_per_step"] == r["micro_per_task"] * r["grad_accum"] * (4 if r["schedule"] == "joint" else 1)
    assert result["targets"]["depth"]["ratio"] > 0 and result["targets"]["sam"]["ratio"] > 0
    md = (tmp_path / "gpu_suite_smoke.md").read_text()
    assert "| harmon | 2 |" in md and "SAM" in md


def test_stand_in_tokenizers_put_special_tokens_at_the_released_ids():
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
    from bench.gpu_suite import released_special_ids, stand_in_tokenizer
    for model, want in (("openuni", {"<IMG_CONTEXT>": 151667}), ("showo", {"[PAD]": 50295}),
                        ("janus", {"<image_placeholder>": 100581})):
        tok = stand_in_tokenizer(model)
        assert {t: tok.convert_tokens_to_ids(t) for t in want} == want
        assert all(tok.convert_tokens_to_ids(t) == i for t, i in released_special_ids(model).items())
        assert tok("hi", add_special_tokens=False).input_ids == tok.convert_tokens_to_ids(["h", "i"])
    # the adapters' own checks of a full-size tokenizer accept them
    from unimrg.models.openuni.adapter import _check_tokenizer as check_openuni
    from unimrg.models.openuni.arch import arch_for as openuni_arch
    from unimrg.models.showo.adapter import ShowoConfig
    from unimrg.models.showo.adapter import _check_tokenizer as check_showo
    from unimrg.models.showo.arch import arch_for as showo_arch
    check_openuni(stand_in_tokenizer("openuni"), openuni_arch("full"), "stand-in")
    check_showo(stand_in_tokenizer("showo"), showo_arch("full", ShowoConfig(size="full").codebook_size, 0), "stand-in")
    from unimrg.models.janus import JanusModelConfig, build_arch
    from unimrg.models.janus import _check_tokenizer as check_janus
    check_janus(stand_in_tokenizer("janus"), build_arch(JanusModelConfig(size="full")), "stand-in")
