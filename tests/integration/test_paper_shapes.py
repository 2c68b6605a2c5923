"""Paper-shape smoke runs: every paper recipe and the ``und`` Table 3 rows (the other rows: shapes and batch
plan checked against their paper recipe without a run), exactly as written except the model's
depth and width (``model.smoke=true``), runs one optimizer step on two CPU ranks under real DeepSpeed
(torchrun), on scenes generated at 512 px; the test checks each task's batch at the adapter boundary.

    python -m pytest -q tests/integration/test_paper_shapes.py

What differs from the recipe, and why (README "Paper-shape smoke runs"):
- ``model.smoke=true``: 1-2 layers per stack and narrow widths (a full-width layer of these models takes
  minutes per step on a CPU); resolutions, token counts, vocabularies and latent grids stay the release's.
- Stand-in tokenizers with the real special-token ids (no tokenizer can be downloaded here): byte-level,
  so texts are longer in tokens than with the real BPE, never shorter.
- Two CPU ranks instead of 8 GPUs: ``train.global_batch_size=0`` (derive); per-rank batches are the
  paper's. ``data.num_workers=1`` instead of 4 per task (2 cores).
- One optimizer step: ``train.stop_after=1``; OpenUni's paper recipe runs one step of each stage instead
  (``train.steps=2`` and stage lengths 1 + 1, its tasks and freezing as written).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_submit

pytestmark = pytest.mark.slow

SCENE_SIZE = 512   # the largest native side (SANA, Harmon); loaders resize to each model's sizes


def _byte_level_tokenizer(n_vocab: int, specials: dict[int, str]):
    """Byte-level tokenizer whose vocabulary has ``n_vocab`` entries (bytes, then never-produced fillers)
    and the given special tokens at the given ids, as in the real tokenizer files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    in_vocab = {i: t for i, t in specials.items() if i < n_vocab}
    for i in range(len(vocab), n_vocab):
        vocab[in_vocab.get(i, f"<filler_{i}>")] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    added = [i for i in sorted(specials) if i >= n_vocab]
    if added:   # added tokens take the next free ids: fill gaps with unused specials
        names = [specials.get(i, f"<|unused_{i}|>") for i in range(n_vocab, added[-1] + 1)]
        fast.add_special_tokens({"additional_special_tokens": names})
    for i, t in specials.items():
        assert fast.convert_tokens_to_ids(t) == i, (t, i)
    return fast


@pytest.fixture(scope="session")
def paper_assets(tmp_path_factory) -> dict[str, Path]:
    """Scenes at 512 px (four Energon datasets) and stand-in tokenizer folders, shared by all smoke runs."""
    from unimrg.data.scenes import write_scene_datasets
    from unimrg.models.harmon.arch import qwen25_15b_config
    root = tmp_path_factory.mktemp("paper_shapes")
    write_scene_datasets(root / "data", num_scenes=16, size=SCENE_SIZE, seed=0, shards=2)
    # InternVL3-2B / Qwen2.5 ids: <|endoftext|> 151643, <|im_start|> 151644, <|im_end|> 151645,
    # <img> 151665, </img> 151666, <IMG_CONTEXT> 151667.
    qwen = _byte_level_tokenizer(151643, {151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>",
                                          151665: "<img>", 151666: "</img>", 151667: "<IMG_CONTEXT>"})
    qwen.pad_token, qwen.eos_token = "<|endoftext|>", "<|im_end|>"
    qwen.save_pretrained(root / "qwen")
    qwen25_15b_config().save_pretrained(root / "qwen")     # Harmon reads its LLM config from llm_path
    # Phi-1.5: 50,295 tokens, <|endoftext|> 50256; Show-o adds [PAD] and its task tokens after them.
    phi = _byte_level_tokenizer(50295, {50256: "<|endoftext|>"})
    phi.add_special_tokens({"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"})
    phi.save_pretrained(root / "phi")
    return {"data": root / "data", "qwen": root / "qwen", "phi": root / "phi"}


# model -> (input image side, target side, per-task micro-batch)
SHAPES = {"openuni": (448, 512, 4), "showo": (336, 256, 2), "harmon": (512, 512, 16)}
ALL = ["und", "pix", "depth", "seg"]
RUNS = {   # recipe -> (enabled tasks, samples of each task per rank and optimizer step, from the recipe comments)
    "openuni_paper": (ALL, 4), "openuni_und": (["und"], 16), "openuni_und_pix": (["und", "pix"], 8),
    "openuni_und_pix_depth": (["und", "pix", "depth"], 4),
    "showo_paper": (ALL, 10),
    "harmon_paper": (ALL, 16), "harmon_und": (["und"], 64), "harmon_und_pix": (["und", "pix"], 32),
    "harmon_und_pix_depth": (["und", "pix", "depth"], 16),
}


# Not run at paper shapes (yet): Janus-Pro has no model.smoke variant (its VQ-16 at 384 px alone is minutes of
# CPU per step at the recipe's 16 per task); its paper recipe is resolved and planned by test_native_resolution,
# test_batching and test_engine, and its architecture is checked against the release by tests/unit/test_janus.py.
NOT_SMOKED = {"janus_paper"}


def test_every_paper_recipe_and_table3_row_is_covered(repo):
    from unimrg.config import read_recipe
    # every recipe at full size (the tiny ones, *_tiny and the README's demo, run in their own tests)
    recipes = {p.stem for p in (repo / "launch" / "recipes").glob("*.yaml")
               if read_recipe(p).get("model", {}).get("size") != "tiny"}
    assert recipes == set(RUNS) | NOT_SMOKED


def expected_shapes(model: str, tasks: list[str]) -> dict:
    image, target, micro = SHAPES[model]
    out = {}
    for t in tasks:
        out[t] = {"images": [micro, 3, image, image, "uint8"]}
        if t == "und":
            out[t]["conversations"] = micro
        else:
            out[t] |= {"targets": [micro, 3, target, target, "float32"], "prompts": micro}
    return out


# Table 3 rows between ``und`` and the full recipe: their model, resolutions and per-task micro-batches are the
# paper recipe's (checked below), so the paper recipe's run exercises their shapes; what is theirs alone is the
# batch arithmetic (more accumulation for fewer tasks), checked without a run. The ``und`` rows (the most
# accumulation) and every paper recipe do run. Saves ~4 CPU minutes of CI.
PLANNED = {"openuni_und_pix", "openuni_und_pix_depth", "harmon_und_pix", "harmon_und_pix_depth"}


@pytest.mark.parametrize("recipe", sorted(PLANNED))
def test_table3_row_has_its_paper_recipes_shapes_and_its_own_batch_plan(recipe):
    from unimrg.config import batch_arithmetic, load_config, recipe_path
    model, row = recipe.split("_", 1)
    tasks, per_step = RUNS[recipe]
    overrides = ["model.smoke=true", "model.init=random", "train.global_batch_size=0",
                 "train.batch_policy=fixed_per_gpu"]
    cfg = load_config(recipe_path(model, row), overrides)
    paper = load_config(recipe_path(model, "paper"), overrides)
    assert cfg.model == paper.model
    assert (cfg.train.micro_batch_per_task, cfg.data) == (paper.train.micro_batch_per_task, paper.data)
    plan = batch_arithmetic(cfg, 2)
    assert (plan.tasks, plan.per_task_per_step, plan.micro_per_task) == (tasks, per_step, SHAPES[model][2])


@pytest.mark.parametrize("recipe", sorted(set(RUNS) - PLANNED))
def test_one_step_at_paper_shapes(recipe, paper_assets, tmp_path):
    model, row = recipe.split("_", 1)
    tasks, per_step = RUNS[recipe]
    tokenizer = {"openuni": f"model.tokenizer={paper_assets['qwen']}", "showo": f"model.tokenizer={paper_assets['phi']}",
                 "harmon": f"model.llm_path={paper_assets['qwen']}"}[model]
    # Random weights on purpose (no release can be downloaded); the recipe's per-GPU batch on 2 ranks.
    overrides = ["model.smoke=true", "model.init=random", tokenizer, f"data.root={paper_assets['data']}",
                 "data.num_workers=1", "train.global_batch_size=0", "train.batch_policy=fixed_per_gpu", "eval.every=0"]
    two_stages = recipe == "openuni_paper"
    if two_stages:
        overrides += ["train.steps=2", "train.stages=[{steps: 1}, {steps: 1, tasks: [pix], freeze: [understanding]}]"]
    else:
        overrides += ["train.stop_after=1"]
    r = run_submit(["--model", model, "--recipe", row, "--cluster", "local", "--gpus-per-node", "0",
                    "--run-dir", str(tmp_path), *overrides], timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]

    micro = SHAPES[model][2]
    for rank in (0, 1):
        rows = [json.loads(x) for x in (tmp_path / "metrics" / f"rank{rank}.jsonl").read_text().splitlines()]
        assert [x["step"] for x in rows] == ([1, 2] if two_stages else [1])
        assert rows[0]["batch_shapes"] == expected_shapes(model, tasks)
        assert rows[0]["samples"] == {t: per_step for t in tasks}
        if two_stages:   # stage 2: pixel reconstruction only, 4 micro-steps of 4
            assert rows[1]["stage"] == 2 and rows[1]["batch_shapes"] == expected_shapes(model, ["pix"])
            assert rows[1]["samples"] == {"pix": micro * 4}
        for x in rows:
            assert all(v == v and abs(v) < 1e4 for v in x["losses"].values()), x["losses"]   # finite
    if two_stages:
        assert (tmp_path / "export" / "stage1" / "model.pt").is_file() and (tmp_path / "final" / "model.pt").is_file()
