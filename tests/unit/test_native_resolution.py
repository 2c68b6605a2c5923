"""Each model's native resolution by default: recipes resolve the released checkpoint's sizes, --dry-run
prints them with the token counts per task, and a full-size run at other sizes is refused unless asked for.

    python -m pytest -q tests/unit/test_native_resolution.py
"""

import pytest

from tests.conftest import run_submit
from unimrg.config import ConfigError, load_config, recipe_path, validate

# (model, input images, generation targets): InternViT 448 / SANA 512; CLIP-ViT-L/14-336 / MAGVIT-v2 256;
# Harmon 512 for both; Janus-Pro SigLIP-L / VQ-16 384 (the adapters cite the official configs).
NATIVE = [("openuni", 448, 512), ("showo", 336, 256), ("harmon", 512, 512), ("janus", 384, 384)]


@pytest.mark.parametrize("model,image,target", NATIVE)
def test_paper_recipes_resolve_native_resolution(model, image, target):
    cfg = load_config(recipe_path(model, "paper"))
    assert (cfg.model.image_size, cfg.model.target_size) == (image, target)
    validate(cfg, dp_size=8)


@pytest.mark.parametrize("row", ["openuni_und_pix", "harmon_und_pix_depth"])
def test_table3_rows_inherit_native_resolution(row):
    model = row.split("_")[0]
    cfg = load_config(recipe_path(model, row.split("_", 1)[1]))
    want = dict((m, (i, t)) for m, i, t in NATIVE)[model]
    assert (cfg.model.image_size, cfg.model.target_size) == want


@pytest.mark.parametrize("model,size", [("openuni", 56), ("showo", 32), ("harmon", 64), ("janus", 32)])
def test_tiny_recipes_keep_their_own_sizes(model, size):
    cfg = load_config(recipe_path(model, "tiny"), ["run.dir=/tmp/x"])
    assert cfg.model.image_size == size
    validate(cfg, dp_size=2)   # tiny models are not held to a checkpoint's resolution


@pytest.mark.parametrize("model", ["openuni", "showo", "harmon", "janus"])
def test_full_size_at_other_resolution_needs_the_override(model):
    cfg = load_config(recipe_path(model, "paper"), ["model.image_size=56", "model.target_size=56"])
    with pytest.raises(ConfigError, match=r"model.image_size=56.*model.non_native_resolution=true"):
        validate(cfg, dp_size=8)
    cfg = load_config(recipe_path(model, "paper"),
                      ["model.image_size=56", "model.target_size=56", "model.non_native_resolution=true"])
    validate(cfg, dp_size=8)
    assert (cfg.model.image_size, cfg.model.target_size) == (56, 56)


def test_dry_run_prints_resolution_tokens_and_sequences(scene_root):
    r = run_submit(["--model", "openuni", "--recipe", "paper", "--nodes", "1", "--gpus-per-node", "8",
                    "--dry-run", f"data.root={scene_root}", "model.init=random"], timeout=120)
    assert r.returncode == 0, r.stderr
    assert "input images 448 px, generation targets 512 px (native 448 / 512)" in r.stdout
    assert "und   images (4, 3, 448, 448); image tokens 256, sequence ≤ 2048" in r.stdout
    for task in ("pix", "depth", "seg"):
        assert (f"{task:5s} images (4, 3, 448, 448), targets (4, 3, 512, 512); condition image tokens 256, "
                "queries 256, LLM sequence ≤ 2304, target latent tokens 256") in r.stdout

    r = run_submit(["--model", "showo", "--recipe", "paper", "--nodes", "1", "--gpus-per-node", "8",
                    "--dry-run", f"data.root={scene_root}", "model.init=random", "model.image_size=56"], timeout=120)
    assert r.returncode == 2 and "model.non_native_resolution=true" in r.stderr


def test_smoke_architectures_keep_the_release_shapes():
    """model.smoke narrows depth and width only: every number that sets a resolution, a token count, a
    vocabulary or a latent grid is the release's (the paper-shape smoke runs rely on it)."""
    from unimrg.models.harmon import arch as H
    from unimrg.models.openuni import arch as O
    from unimrg.models.showo import arch as S

    full, sm = O.arch_for("full"), O.smoke(O.arch_for("full"))
    for a in (full, sm):
        a.shapes = (a.vit_image_size, a.gen_image_size, a.image_seq_length, a.num_queries,
                    a.internvl.vision_config.image_size, a.internvl.vision_config.patch_size,
                    a.internvl.downsample_ratio, a.internvl.text_config.vocab_size, a.internvl.image_token_id,
                    a.sana["in_channels"], a.sana["sample_size"], a.sana["patch_size"], a.vae["latent_channels"],
                    O.vae_downsample(a.vae))
    assert sm.shapes == full.shapes and sm.internvl.text_config.num_hidden_layers == 1

    full, sm = S.arch_for("full", 8192), S.smoke(S.arch_for("full", 8192))
    for a in (full, sm):
        a.shapes = (a.num_clip_tokens, a.num_image_tokens, a.vocab_size, a.clip.image_size, a.magvit.resolution,
                    a.magvit.codebook_dim, a.phi.vocab_size, a.phi.max_position_embeddings)
    assert sm.shapes == full.shapes and sm.phi.num_hidden_layers == 1

    full, sm = H.arch_for("full"), H.smoke(H.arch_for("full"))
    for a in (full, sm):
        a.shapes = (a.llm.vocab_size, a.vae["latent_channels"], len(a.vae["block_out_channels"]), a.mar["class_num"])
    assert sm.shapes == full.shapes and sm.mar["depth"] == 1 and sm.llm.num_hidden_layers == 1


def test_smoke_is_for_the_full_architecture():
    cfg = load_config(recipe_path("openuni", "tiny"), ["run.dir=/tmp/x", "model.smoke=true"])
    with pytest.raises(ConfigError, match="model.smoke=true"):
        validate(cfg, dp_size=2)
