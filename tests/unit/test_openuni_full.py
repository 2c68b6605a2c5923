"""Full-size OpenUni (B-512, L-512, L-1024) on the meta device: parameter counts per component against the
published sizes, and a shape-only release file per variant (built from the published configs, not from the
adapter) that loads with no missing or unexpected keys.

    OMP_NUM_THREADS=1 python -m pytest tests/unit/test_openuni_full.py -q -s     (-s shows the table)
"""

from __future__ import annotations

import json

import pytest
import torch

from unimrg.models.openuni import OpenUni, OpenUniConfig
from unimrg.models.openuni.arch import (
    PUBLISHED_MILLIONS_BY_VARIANT, VARIANTS, arch_for, canonical_variant, vae_downsample)

_BUILT: dict[str, OpenUni] = {}


def meta_model(variant: str) -> OpenUni:
    if variant not in _BUILT:     # one meta build per variant for the whole module (~0.5 s each)
        with torch.device("meta"):
            _BUILT[variant] = OpenUni(OpenUniConfig(size="full", variant=variant))
    return _BUILT[variant]


@pytest.fixture(scope="module")
def full() -> OpenUni:
    return meta_model("l512")


@pytest.mark.parametrize("variant", VARIANTS)
def test_counts_match_published_sizes(variant):
    full = meta_model(variant)
    counts = full.component_counts()
    print(f"\nOpenUni {variant}: {sum(p.numel() for p in full.parameters()) / 1e9:.3f} B parameters, native "
          f"{OpenUni.native_resolution(full.cfg)}")
    print("component                 params (M)")
    for name, n in counts.items():
        print(f"  {name:<22} {n / 1e6:10.2f}")
    print("published size            ours (M)  published (M)   diff   source")
    for label, (published, parts, source) in PUBLISHED_MILLIONS_BY_VARIANT[variant].items():
        ours = sum(-counts[p[1:]] if p.startswith("-") else counts[p] for p in parts) / 1e6
        diff = ours / published - 1
        print(f"  {label:<26} {ours:9.2f} {published:12.2f} {diff:+7.2%}   {source}")
        assert abs(diff) <= 0.03, (label, ours, published)


def test_bridge_counts_follow_the_official_config(full):
    # connector: 6 pre-LN layers of width 1536 / MLP 8960 (q,k,v,out + fc1,fc2 + two LayerNorms);
    # projector Linear(1536, 2304); 256 queries of width 1536 (OpenUni openuni_l_internvl3_2b_sana_1_6b_512_hf.py).
    d, f = 1536, 8960
    layer = 4 * (d * d + d) + (d * f + f) + (f * d + d) + 2 * (2 * d)
    counts = full.component_counts()
    assert counts["connector"] == 6 * layer
    assert counts["projector"] == d * 2304 + 2304
    assert counts["meta_queries"] == 256 * d


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("size", ["tiny", "full"])
def test_architecture_is_consistent(size, variant):
    arch = arch_for(size, vocab_size=300, image_token_id=260, variant=variant)
    text, vision = arch.internvl.text_config, arch.internvl.vision_config
    assert arch.connector.hidden_size == text.hidden_size                  # OpenUni proj_type "enc_proj"
    assert arch.sana["in_channels"] == arch.vae["latent_channels"]
    assert arch.gen_image_size // vae_downsample(arch.vae) == arch.sana["sample_size"]
    patches = (arch.vit_image_size // vision.patch_size[0]) ** 2
    assert patches * arch.internvl.downsample_ratio ** 2 == arch.image_seq_length == arch.internvl.image_seq_length
    assert not arch.internvl.tie_word_embeddings


def test_full_build_needs_no_tokenizer_until_a_loss(full):
    assert full.tokenizer is None
    with pytest.raises(ValueError, match="model.tokenizer"):
        full._tok()


# ---- each variant's release file, shape only, from the published configs ------------------------------
# transformer/config.json values of the SANA folders OpenUni's configs load (configs/models/<name>.py:
# Sana_600M_512px / Sana_1600M_512px / SANA1.5_1.6B_1024px `_diffusers`; values as diffusers'
# scripts/convert_sana_to_diffusers.py writes them for SanaMS_600M_P1_D28 / SanaMS(1.5)_1600M_P1_D20).
_SANA_COMMON = dict(in_channels=32, out_channels=32, attention_head_dim=32, caption_channels=2304, mlp_ratio=2.5,
                    attention_bias=False, patch_size=1, norm_elementwise_affine=False, norm_eps=1e-6)
PUBLISHED_SANA = {
    "b512": dict(_SANA_COMMON, num_attention_heads=36, num_layers=28, num_cross_attention_heads=16,
                 cross_attention_head_dim=72, cross_attention_dim=1152, sample_size=16),
    "l512": dict(_SANA_COMMON, num_attention_heads=70, num_layers=20, num_cross_attention_heads=20,
                 cross_attention_head_dim=112, cross_attention_dim=2240, sample_size=16),
    "l1024": dict(_SANA_COMMON, num_attention_heads=70, num_layers=20, num_cross_attention_heads=20,
                  cross_attention_head_dim=112, cross_attention_dim=2240, sample_size=32,
                  qk_norm="rms_norm_across_heads"),
}
# connector (hidden, intermediate, heads) x 6 layers, from configs/models/<name>.py; LLM width = hidden
PUBLISHED_CONNECTOR = {"b512": (896, 3072, 14), "l512": (1536, 8960, 24), "l1024": (1536, 8960, 24)}
# InternVL3-1B / -2B language models (Qwen2.5-0.5B / -1.5B config.json): hidden, layers, heads, intermediate
PUBLISHED_LLM = {"b512": (896, 24, 14, 4864), "l512": (1536, 28, 12, 8960), "l1024": (1536, 28, 12, 8960)}


def release_state(variant: str) -> dict[str, torch.Tensor]:
    """Meta tensors under the release file's keys (meta_queries, connector.*, projector.*, transformer.*): SANA
    from diffusers with the published config, the connector's keys written out (OpenUni ConnectorEncoder)."""
    from diffusers import SanaTransformer2DModel
    with torch.device("meta"):
        sana = SanaTransformer2DModel(**PUBLISHED_SANA[variant])
    state = {"transformer." + k: v for k, v in sana.state_dict().items()}
    d, f, _ = PUBLISHED_CONNECTOR[variant]
    shapes = {"layer_norm1": [(d,), (d,)], "layer_norm2": [(d,), (d,)], "mlp.fc1": [(f, d), (f,)],
              "mlp.fc2": [(d, f), (d,)], **{f"self_attn.{p}_proj": [(d, d), (d,)] for p in "qkvo"}}
    for i in range(6):
        for name, (w, b) in shapes.items():
            name = name.replace("o_proj", "out_proj")
            state[f"connector.layers.{i}.{name}.weight"] = torch.empty(w, device="meta")
            state[f"connector.layers.{i}.{name}.bias"] = torch.empty(b, device="meta")
    state["projector.weight"] = torch.empty(2304, d, device="meta")
    state["projector.bias"] = torch.empty(2304, device="meta")
    state["meta_queries"] = torch.empty(256, d, device="meta")
    return state


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")
@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variants_release_file_loads_with_no_missing_or_unexpected_keys(variant, tmp_path):
    from tests.unit.test_openuni_weights import internvl_original_state
    model = meta_model(variant)
    text = model.arch.internvl.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.intermediate_size) == \
        PUBLISHED_LLM[variant]
    torch.save(release_state(variant), tmp_path / "release.pth")            # meta tensors: a few kB
    orig = tmp_path / "InternVL3"                                            # original-layout folder, shape only
    orig.mkdir()
    torch.save(internvl_original_state(model), orig / "pytorch_model.bin")
    (orig / "config.json").write_text(json.dumps({"architectures": ["InternVLChatModel"], "llm_config": {}}))
    vae = tmp_path / "dc-ae"
    vae.mkdir()
    torch.save(model.vae.state_dict(), vae / "diffusion_pytorch_model.bin")
    (vae / "config.json").write_text(json.dumps(model.arch.vae))
    model.cfg.internvl_path, model.cfg.vae_path = str(orig), str(vae)
    try:
        report = model.load_official(str(tmp_path / "release.pth"))
    finally:
        model.cfg.internvl_path = model.cfg.vae_path = None
    assert report.missing == [] and report.unexpected == [], str(report)[:2000]
    n_norms = sum(".norm_q." in k or ".norm_k." in k for k in report.loaded)
    assert n_norms == (80 if variant == "l1024" else 0)                      # SANA 1.5: q/k norms in attn1 + attn2
    # Another variant's release file is refused by name (the L-1024 file's q/k norms; B-512's shapes).
    if variant != "l512":
        with pytest.raises(ValueError, match="norm_q|shape mismatch"):
            meta_model("l512").load_official(str(tmp_path / "release.pth"), allow_missing=["*"])


def test_variant_names():
    assert canonical_variant("openuni_b_internvl3_1b_sana_0_6b_512_hf") == "b512"
    assert canonical_variant("openuni_l_internvl3_2b_sana_1_6b_1024_hf_blip3o60k.pth") == "l1024"
    assert canonical_variant("OpenUni-L-512") == "l512"
    with pytest.raises(ValueError, match="b512, l512, l1024"):
        canonical_variant("l2048")
    assert OpenUni.native_resolution(OpenUniConfig(size="full", variant="l1024")).target == 1024
    assert OpenUni.native_resolution(OpenUniConfig(size="full", variant="b512")).target == 512


@pytest.mark.parametrize("variant, target, latent", [("b512", 512, 256), ("l1024", 1024, 1024)])
def test_dry_run_resolution_follows_the_variant(variant, target, latent):
    """What `submit.py --dry-run` prints (config.shape_report) for the paper recipe at model.variant=."""
    from unimrg.config import ConfigError, check_resolution, load_config, recipe_path, shape_report
    recipe = recipe_path("openuni", "paper")
    cfg = load_config(recipe, [f"model.variant={variant}"], model="openuni")
    assert (cfg.model.image_size, cfg.model.target_size) == (448, target)
    check_resolution(cfg.model)
    report = shape_report(cfg, ["pix"])
    assert f"generation targets {target} px (native 448 / {target})" in report
    assert f"target latent tokens {latent}" in report
    cfg = load_config(recipe, [f"model.variant={variant}", "model.target_size=768"], model="openuni")
    with pytest.raises(ConfigError, match=f"448 \\(input images\\) / {target}"):
        check_resolution(cfg.model)
