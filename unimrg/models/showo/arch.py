"""Show-o (w/ CLIP-ViT) architecture at two sizes: "full" (the release) and "tiny" (tests, demo).

Facts from showlab/Show-o (cited per block). The release is `showlab/show-o-w-clip-vit`
(`configs/showo_demo_w_clip_vit.yaml`): Phi-1.5 with its vocabulary resized to 58,498 =
50,295 text tokens + 10 Show-o special tokens + 8,192 MAGVIT-v2 codes + 1 mask token, 256 image
tokens per 256-px image, and CLIP-ViT-L/14-336 penultimate patch features through `mm_projector`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import CLIPVisionConfig, PhiConfig

from unimrg.models.showo.magvit import MagvitArch

# Special tokens, in the order Show-o adds them to the text tokenizer (`training/prompting_utils.py`,
# UniversalPrompting: '[PAD]' first as pad token, then these nine); the codes follow them.
PAD = "[PAD]"
SOI, EOI, SOV, EOV, T2I, MMU, T2V, V2V, LVG = ("<|soi|>", "<|eoi|>", "<|sov|>", "<|eov|>", "<|t2i|>", "<|mmu|>",
                                               "<|t2v|>", "<|v2v|>", "<|lvg|>")
NEW_SPECIAL_TOKENS = (PAD, SOI, EOI, SOV, EOV, T2I, MMU, T2V, V2V, LVG)   # num_new_special_tokens = 10
ENDOFTEXT = "<|endoftext|>"   # Phi-1.5's bos = eos = <|endoftext|> (Show-o's <|sot|> and <|eot|>)

# Understanding prompt (`llava/llava_instruct_data.py`, conversation template "phi1.5"):
# <|mmu|> SYSTEM <|soi|> CLIP features <|eoi|> "USER: q ASSISTANT: a<|endoftext|>USER: ...".
SYSTEM_PROMPT = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")

# CLIP pixel statistics (openai/clip-vit-large-patch14-336 preprocessor_config.json).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ShowoArch:
    """Every architecture number of one size. Built by :func:`arch_for`; not a user config."""

    phi: PhiConfig
    clip: CLIPVisionConfig
    magvit: MagvitArch
    llm_vocab_size: int            # text tokens before Show-o's specials (Phi-1.5 tokenizer: 50,295)
    clip_select_layer: int = -2    # penultimate layer, patch tokens only (`models/clip_encoder.py`)
    published_millions: dict[str, float] = field(default_factory=dict)

    @property
    def codebook_size(self) -> int:
        return self.magvit.codebook_size

    @property
    def vocab_size(self) -> int:
        # text + specials + codes + [MASK] (the last id, `Showo.config.mask_token_id = vocab_size - 1`)
        return self.llm_vocab_size + len(NEW_SPECIAL_TOKENS) + self.codebook_size + 1

    @property
    def num_image_tokens(self) -> int:
        return self.magvit.tokens_per_side ** 2

    @property
    def num_clip_tokens(self) -> int:
        return (self.clip.image_size // self.clip.patch_size) ** 2


def _phi(vocab_size: int, **kw) -> PhiConfig:
    cfg = PhiConfig(vocab_size=vocab_size, tie_word_embeddings=False, use_cache=False,
                    # Show-o's own PhiForCausalLM (`models/phi.py`) sets config.qk_layernorm = True whatever
                    # the checkpoint's config says, so every layer has q/k LayerNorms over the head dim.
                    qk_layernorm=True, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, **kw)
    cfg._attn_implementation = "sdpa"   # 4-D additive masks work with sdpa and eager; sdpa is faster
    return cfg


def _full(codebook_size: int) -> ShowoArch:
    # microsoft/phi-1_5 config.json: 24 layers × 2048, 32 heads, MLP 8192, gelu_new, partial rotary 0.5,
    # rope θ 10000, LayerNorm eps 1e-5, 2048 positions.
    llm_vocab = 50295
    vocab = llm_vocab + len(NEW_SPECIAL_TOKENS) + codebook_size + 1
    phi = _phi(vocab, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
               hidden_act="gelu_new", max_position_embeddings=2048, layer_norm_eps=1e-5,
               rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    # openai/clip-vit-large-patch14-336 vision_config.
    clip = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                            projection_dim=768)
    clip._attn_implementation = "sdpa"
    # `models/modeling_magvitv2.py` defaults (MAGVITv2 takes no arguments: these are the release).
    magvit = MagvitArch(ch=128, enc_ch_mult=[1, 2, 2, 4, 4], enc_num_res_blocks=[4, 3, 4, 3, 4],
                        dec_ch_mult=[1, 1, 2, 2, 4], dec_num_res_blocks=[4, 4, 3, 4, 3], attn_resolutions=[5],
                        resolution=256, codebook_size=codebook_size)
    # Issue #5's reference sizes: Show-o LLM + mm_projector with the 58,498-token vocabulary, MAGVIT-v2;
    # CLIP-ViT-L/14-336's vision tower (ViT-L/14 ≈ 303.2M + 320 more positions × 1024).
    published = {"showo+mm_projector": 1454.5, "vq_model": 95.4, "vision_tower": 303.5}
    return ShowoArch(phi=phi, clip=clip, magvit=magvit, llm_vocab_size=llm_vocab, published_millions=published)


def _tiny(llm_vocab_size: int, codebook_size: int) -> ShowoArch:
    # Same structure (qk-LayerNorms, partial rotary, untied biased lm_head, quick-gelu CLIP, LFQ tokenizer
    # with two downsamplings) at a size that trains in milliseconds on a CPU. MAGVIT reads 32 px (8×8 codes):
    # at 16 px (4×4 codes) no LFQ tokenizer reaches the tiny base's 22 dB recon_psnr (unimrg/pretrain.py).
    vocab = llm_vocab_size + len(NEW_SPECIAL_TOKENS) + codebook_size + 1
    phi = _phi(vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               hidden_act="gelu_new", max_position_embeddings=1024, layer_norm_eps=1e-5,
               rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    clip = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=28, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                            projection_dim=16)
    clip._attn_implementation = "sdpa"
    magvit = MagvitArch(ch=32, enc_ch_mult=[1, 1, 2], enc_num_res_blocks=[1, 1, 1], dec_ch_mult=[1, 1, 2],
                        dec_num_res_blocks=[1, 1, 1], attn_resolutions=[8], resolution=32,
                        codebook_size=codebook_size)
    return ShowoArch(phi=phi, clip=clip, magvit=magvit, llm_vocab_size=llm_vocab_size)


def smoke(arch: ShowoArch) -> ShowoArch:
    """Paper-shape smoke runs (``model.smoke=true``, README "Paper-shape smoke runs"): the release's shapes
    -- CLIP 336 px / patch 14 (576 features, penultimate layer), MAGVIT-v2's five levels at 256 px (16×16
    codes, 8,192-code LFQ), the 58,498-token vocabulary -- with 1 layer per stack (2 for CLIP, whose
    penultimate layer is read) and narrow widths (MAGVIT keeps 32 channels: its GroupNorms have 32 groups)."""
    p, c, m = arch.phi, arch.clip, arch.magvit
    p.hidden_size, p.num_attention_heads, p.intermediate_size, p.num_hidden_layers = 64, 4, 128, 1
    p.num_key_value_heads = 4
    if getattr(p, "layer_types", None):
        p.layer_types = p.layer_types[:1]
    c.hidden_size, c.num_attention_heads, c.intermediate_size, c.num_hidden_layers = 32, 4, 64, 2
    m.ch = 32
    m.enc_num_res_blocks = [1] * len(m.enc_num_res_blocks)
    m.dec_num_res_blocks = [1] * len(m.dec_num_res_blocks)
    arch.published_millions = {}
    return arch


def arch_for(size: str, codebook_size: int, llm_vocab_size: int = 0) -> ShowoArch:
    """The architecture of ``size``; "tiny" needs the byte tokenizer's text vocabulary size."""
    if size == "full":
        return _full(codebook_size)
    if size == "tiny":
        return _tiny(llm_vocab_size, codebook_size)
    raise ValueError(f"Show-o: unknown model.size={size!r}; use 'tiny' or 'full'")
