"""OpenUni's architecture at two sizes, "full" and "tiny", for each released variant (``model.variant``):

=========  ==========================================  ============  =====================  =====  ==========
variant    official config (wusize/OpenUni            InternVL3     SANA transformer       px     connector
           ``configs/models/<name>.py``)                                                         (width×6)
=========  ==========================================  ============  =====================  =====  ==========
``b512``   openuni_b_internvl3_1b_sana_0_6b_512_hf     1B (Qwen0.5)  Sana_600M_512px        512    896
``l512``   openuni_l_internvl3_2b_sana_1_6b_512_hf     2B (Qwen1.5)  Sana_1600M_512px       512    1536
``l1024``  openuni_l_internvl3_2b_sana_1_6b_1024_hf    2B (Qwen1.5)  SANA1.5_1.6B_1024px    1024   1536
=========  ==========================================  ============  =====================  =====  ==========

All three: 256 meta queries, DC-AE dc-ae-f32c32-sana-1.1, InternViT-300M at 448 px (256 image tokens),
projector Linear(LLM width, 2304). ``l512`` (OpenUni-L-512, 3.6B trainable) is the paper's model and the
default. The official config names (and "OpenUni-B-512" etc.) are accepted as ``model.variant`` too.

Full-size values are facts read from the official sources (cited per block); the tiny configs keep every
structural feature (InternViT with pixel shuffle, GQA Qwen2, pre-LN connector, SANA linear attention, the
L-1024 SANA's q/k RMS norms, DC-AE with an EfficientViT stage) at a size that trains in milliseconds on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import InternVLConfig, InternVLVisionConfig, Qwen2Config, SiglipVisionConfig

# InternVL3 special tokens (OpenGVLab InternVL `internvl_chat/internvl/train/constants.py`;
# ids in the InternVL3-2B tokenizer: <img> 151665, </img> 151666, <IMG_CONTEXT> 151667).
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
# InternVL3's default system prompt (conversation template "internvl2_5" in OpenGVLab/InternVL
# `internvl_chat/internvl/conversation.py`); VLMEvalKit's InternVL3 path evaluates with it too.
INTERNVL_SYSTEM = ("你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位"
                   "联合开发的多模态大语言模型。")

# Training scheduler: OpenUni loads SANA's scheduler config into FlowMatchEulerDiscreteScheduler; the
# config's `flow_shift` is not FlowMatchEuler's `shift`, so shift stays 1.0 (notes/openuni.md).
NUM_TRAIN_TIMESTEPS = 1000
# Sampling scheduler of SANA 512 px (diffusers `scripts/convert_sana_to_diffusers.py`: flow_shift 3.0
# below 4K, DPM-Solver++ with flow sigmas).
SAMPLING_FLOW_SHIFT = 3.0
# ImageNet statistics used by InternViT (OpenUni `src/models/openuni/internvl3_sana_hf.py`).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class OpenUniArch:
    """Every architecture number of one size. Built by :func:`arch_for`; not a user config."""

    internvl: InternVLConfig
    connector: SiglipVisionConfig
    sana: dict[str, Any]
    vae: dict[str, Any]
    num_queries: int
    vit_image_size: int       # InternViT input side (448 full)
    gen_image_size: int       # generated image side (512 full: SANA-1600M-512px)
    image_seq_length: int     # IMG_CONTEXT tokens per image (256 full)


# ---- variants -------------------------------------------------------------------------------------
VARIANTS = ("b512", "l512", "l1024")
DEFAULT_VARIANT = "l512"
# The official config / release names (wusize/OpenUni README "Model Zoo" and `configs/models/`), and the
# names the README gives the models; all map to the short names above.
RELEASE_NAMES = {
    "openuni_b_internvl3_1b_sana_0_6b_512_hf": "b512",
    "openuni_l_internvl3_2b_sana_1_6b_512_hf": "l512",
    "openuni_l_internvl3_2b_sana_1_6b_1024_hf": "l1024",
    "openuni-b-512": "b512", "openuni-l-512": "l512", "openuni-l-1024": "l1024",
}


def canonical_variant(variant: str) -> str:
    """``b512`` / ``l512`` / ``l1024`` from a short, README or release name (checkpoint suffixes such as
    ``_blip3o60k`` / ``_text2image23m`` and ``.pth`` allowed)."""
    v = str(variant).strip().lower()
    v = v[:-4] if v.endswith(".pth") else v
    for suffix in ("_blip3o60k", "_text2image23m"):
        v = v[:-len(suffix)] if v.endswith(suffix) else v
    v = RELEASE_NAMES.get(v, v)
    if v not in VARIANTS:
        raise ValueError(f"OpenUni: unknown model.variant={variant!r}; use one of {', '.join(VARIANTS)} "
                         f"(or the official names {', '.join(n for n in RELEASE_NAMES if n.startswith('openuni_'))})")
    return v


# Published sizes (millions) the full build is checked against, with where each number is published.
# Groups are sums of `OpenUni.component_counts()` entries.
_INTERNVIT = {"InternViT-300M": (300.0, ("vision_tower",), "model name OpenGVLab/InternViT-300M-448px-V2_5")}
_QWEN_1_5B = {
    "Qwen2.5-1.5B": (1540.0, ("language_model",), "Qwen2.5-1.5B model card: 1.54B parameters"),
    "Qwen2.5-1.5B non-embedding": (1310.0, ("language_model", "-embed_tokens"),
                                   "Qwen2.5-1.5B model card: 1.31B non-embedding parameters"),
    "InternVL3-2B": (2090.0, ("vision_tower", "multi_modal_projector", "language_model", "lm_head"),
                     "OpenGVLab/InternVL3-2B model page: 2.09B parameters (untied lm_head)"),
}
PUBLISHED_MILLIONS_BY_VARIANT: dict[str, dict[str, tuple[float, tuple[str, ...], str]]] = {
    "b512": {
        **_INTERNVIT,
        "Qwen2.5-0.5B": (490.0, ("language_model",), "Qwen2.5-0.5B model card: 0.49B parameters"),
        "Qwen2.5-0.5B non-embedding": (360.0, ("language_model", "-embed_tokens"),
                                       "Qwen2.5-0.5B model card: 0.36B non-embedding parameters"),
        "SANA-600M": (600.0, ("transformer",), "model name Efficient-Large-Model/Sana_600M_512px"),
    },
    "l512": {
        **_INTERNVIT, **_QWEN_1_5B,
        "SANA-1600M": (1600.0, ("transformer",), "model name Efficient-Large-Model/Sana_1600M_512px"),
        "OpenUni-3.6B": (3600.0, ("language_model", "lm_head", "connector", "transformer"),
                         "UniMRG paper, Appendix B.1 (OpenUni-3.6B: LLM + connector + SANA)"),
    },
    "l1024": {
        **_INTERNVIT, **_QWEN_1_5B,
        "SANA1.5-1.6B": (1600.0, ("transformer",), "model name Efficient-Large-Model/SANA1.5_1.6B_1024px"),
    },
}
PUBLISHED_MILLIONS = PUBLISHED_MILLIONS_BY_VARIANT[DEFAULT_VARIANT]


def _internvl3(llm: str) -> InternVLConfig:
    """InternVL3-1B / -2B: InternViT-300M-448px-V2_5 + Qwen2.5-0.5B / -1.5B (OpenGVLab/InternVL3-{1B,2B}
    config.json): qkv bias, no qk-norm, LayerNorm, layer scale 0.1, pixel-shuffle 0.5, untied lm_head. The 1B
    unties Qwen2.5-0.5B's lm_head as well: InternVL's 0.5B-LLM checkpoints set llm_config tie_word_embeddings
    false (OpenGVLab/InternVL2-Pretrain-Models, InternVL2-1B config.json), and the published "0.9B" only adds
    up untied (938M here; tied it would be 802M)."""
    vision = InternVLVisionConfig(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
        image_size=448, patch_size=14, attention_bias=True, use_qk_norm=False, norm_type="layer_norm",
        layer_norm_eps=1e-6, layer_scale_init_value=0.1, hidden_act="gelu")
    # Qwen2.5-0.5B / -1.5B config.json (Qwen/Qwen2.5-*): widths, depths, GQA with 2 KV heads, rope 1e6.
    sizes = {"0.5B": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14),
             "1.5B": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12)}
    text = Qwen2Config(
        vocab_size=151674, num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_theta=1000000.0, tie_word_embeddings=False, hidden_act="silu", **sizes[llm])
    return InternVLConfig(
        vision_config=vision, text_config=text, image_token_id=151667, image_seq_length=256,
        downsample_ratio=0.5, projector_hidden_act="gelu", tie_word_embeddings=False)


def _sana(model: str, image_size: int) -> dict[str, Any]:
    """diffusers `scripts/convert_sana_to_diffusers.py`: SanaMS_600M_P1_D28 (36×32 heads, 28 layers, cross
    16×72) or SanaMS(1.5)_1600M_P1_D20 (70×32, 20 layers, cross 20×112); sample size image // 32, no
    positional interpolation at 512/1024; SANA 1.5 adds q/k RMS norms across heads in both attentions."""
    widths = {"600M": dict(num_attention_heads=36, num_layers=28, num_cross_attention_heads=16,
                           cross_attention_head_dim=72, cross_attention_dim=1152),
              "1600M": dict(num_attention_heads=70, num_layers=20, num_cross_attention_heads=20,
                            cross_attention_head_dim=112, cross_attention_dim=2240)}
    base = "1600M" if model == "1.5_1600M" else model
    return dict(in_channels=32, out_channels=32, attention_head_dim=32, caption_channels=2304, mlp_ratio=2.5,
                dropout=0.0, attention_bias=False, sample_size=image_size // 32, patch_size=1,
                norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=None,
                qk_norm="rms_norm_across_heads" if model.startswith("1.5") else None, **widths[base])


def _full(variant: str) -> OpenUniArch:
    internvl = _internvl3("0.5B" if variant == "b512" else "1.5B")
    # Connector: OpenUni `configs/models/<variant config>.py` (6 layers; B: 896 / 3072 / 14 heads, L: 1536 /
    # 8960 / 24 heads, the LLM's width: proj_type "enc_proj") + defaults of
    # `src/models/connector/configuration_connector.py` (gelu_pytorch_tanh, eps 1e-6).
    width = dict(hidden_size=896, intermediate_size=3072, num_attention_heads=14) if variant == "b512" else \
        dict(hidden_size=1536, intermediate_size=8960, num_attention_heads=24)
    connector = SiglipVisionConfig(num_hidden_layers=6, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                                   attention_dropout=0.0, **width)
    # SANA per OpenUni's config: Sana_600M_512px / Sana_1600M_512px / SANA1.5_1.6B_1024px (`_diffusers`).
    gen = 1024 if variant == "l1024" else 512
    sana = _sana({"b512": "600M", "l512": "1600M", "l1024": "1.5_1600M"}[variant], gen)
    # dc-ae-f32c32-sana-1.1 for all three (OpenUni configs; diffusers `scripts/convert_dcae_to_diffusers.py`).
    vae = dict(in_channels=3, latent_channels=32, attention_head_dim=32,
               encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
               decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
               encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
               decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
               encoder_layers_per_block=(2, 2, 2, 3, 3, 3), decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
               encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
               decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
               upsample_block_type="interpolate", downsample_block_type="conv",
               decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407)
    # num_queries=256 in all three configs; InternViT reads 448 px (`vit_input_size=448`); the generated
    # side is the config's `image_size` (configs/datasets/internvl3_{1b_512,2b_512,2b_1024}/processors.py).
    return OpenUniArch(internvl=internvl, connector=connector, sana=sana, vae=vae, num_queries=256,
                       vit_image_size=448, gen_image_size=gen, image_seq_length=256)


def _tiny(vocab_size: int, image_token_id: int, variant: str = DEFAULT_VARIANT) -> OpenUniArch:
    # notes/openuni.md "Tiny configs that run"; vocab sized to the byte tokenizer.
    # Patch 7 (8×8 patches → 16 image tokens after the pixel shuffle) and 16 queries: with 14 px patches the
    # generator's condition held 4 image tokens, too coarse to place objects in a depth map.
    vision = InternVLVisionConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=56,
        patch_size=7, attention_bias=True, use_qk_norm=False, norm_type="layer_norm", layer_norm_eps=1e-6,
        layer_scale_init_value=0.1)
    text = Qwen2Config(
        vocab_size=vocab_size, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6, tie_word_embeddings=False)
    internvl = InternVLConfig(
        vision_config=vision, text_config=text, image_token_id=image_token_id, image_seq_length=16,
        downsample_ratio=0.5, projector_hidden_act="gelu", tie_word_embeddings=False)
    connector = SiglipVisionConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, attention_dropout=0.0)
    # SANA 64 wide × 4 blocks, with sincos position embeddings (interpolation_scale=1; the releases have none):
    # the release's NoPE gets positions from Mix-FFN's zero-padded 3×3 convs, which at 4 blocks on an 8×8
    # latent barely tell one cell from another, and a 16-wide SANA learned only the mean depth map
    # (docs/tiny_demo.md: what was measured).
    sana = dict(in_channels=8, out_channels=8, num_attention_heads=4, attention_head_dim=16, num_layers=4,
                num_cross_attention_heads=4, cross_attention_head_dim=16, cross_attention_dim=64,
                caption_channels=24, mlp_ratio=2.5, dropout=0.0, attention_bias=False, sample_size=8,
                patch_size=1, norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=1,
                qk_norm="rms_norm_across_heads" if variant == "l1024" else None)   # the variant's structure
    vae = dict(in_channels=3, latent_channels=8, attention_head_dim=8,
               encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
               decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
               encoder_block_out_channels=(8, 16, 16), decoder_block_out_channels=(8, 16, 16),
               encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
               encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
               upsample_block_type="interpolate", downsample_block_type="conv",
               decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407)
    return OpenUniArch(internvl=internvl, connector=connector, sana=sana, vae=vae, num_queries=16,
                       vit_image_size=56, gen_image_size=32, image_seq_length=16)


def smoke(arch: OpenUniArch) -> OpenUniArch:
    """Paper-shape smoke runs (``model.smoke=true``, README "Paper-shape smoke runs"): the full
    architecture's shapes -- InternViT 448 px / patch 14 / pixel shuffle (256 image tokens), the
    151,674-token vocabulary and its special ids, 256 queries, SANA's 16×16×32 latents from DC-AE's six
    stages (f32) -- with one layer per stack and narrow widths, so one step at the paper's batch fits a CPU."""
    v, t = arch.internvl.vision_config, arch.internvl.text_config
    v.hidden_size, v.num_attention_heads, v.intermediate_size, v.num_hidden_layers = 32, 4, 64, 1
    t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.intermediate_size = 64, 4, 2, 128
    t.head_dim, t.num_hidden_layers = 16, 1
    if getattr(t, "layer_types", None):
        t.layer_types = t.layer_types[:1]
    c = arch.connector
    c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_hidden_layers = 64, 128, 4, 1
    arch.sana.update(num_attention_heads=2, attention_head_dim=8, num_layers=1, num_cross_attention_heads=2,
                     cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=24)
    n = len(arch.vae["encoder_block_out_channels"])
    # The last stage keeps ≥ 32 channels: DC-AE's output shortcut groups them by the 32 latent channels.
    arch.vae.update(attention_head_dim=8, encoder_block_out_channels=(8, 8, 16, 16, 32, 32),
                    decoder_block_out_channels=(8, 8, 16, 16, 32, 32), encoder_layers_per_block=(1,) * n,
                    decoder_layers_per_block=(1,) * n)
    return arch


def arch_for(size: str, vocab_size: int = 0, image_token_id: int = 0, variant: str = DEFAULT_VARIANT
             ) -> OpenUniArch:
    """The architecture of ``variant`` at ``size`` ("tiny" needs the byte tokenizer's vocabulary size and image
    token; a tiny variant keeps only its structural features, e.g. L-1024's q/k norms)."""
    variant = canonical_variant(variant)
    if size == "full":
        return _full(variant)
    if size == "tiny":
        return _tiny(vocab_size, image_token_id, variant)
    raise ValueError(f"OpenUni: unknown model.size={size!r}; use 'tiny' or 'full'")


def vae_downsample(vae: dict[str, Any]) -> int:
    """Spatial factor of DC-AE: one 2x stage per block after the first (f32 full, f4 tiny)."""
    return 2 ** (len(vae["encoder_block_out_channels"]) - 1)
