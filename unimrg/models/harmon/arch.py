"""Harmon's architecture at two sizes: "full" (the released Harmon-1.5B) and "tiny" (same structure, CPU
milliseconds). Numbers are facts from the official sources, cited per block; the run-level knobs
(resolution, buffer tokens, dropout, paths) live in ``HarmonConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import Qwen2Config

from unimrg.models.harmon.vae import kl16_kwargs

# Qwen chat markers (Harmon's `prompt_template`, configs/models/qwen2_5_1_5b_kl16_mar_h.py).
IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
TINY_SPECIAL_TOKENS = (IM_START, IM_END, ENDOFTEXT)

# Parameter counts of the official modules, millions (issue 4; "1.5B" is the LLM, tied lm_head counted once).
PUBLISHED_MILLIONS = {"llm": 1543.7, "mar": 942.4, "proj": 8.66, "vae": 66.5}


@dataclass
class HarmonArch:
    """Every architecture number of one size. Built by :func:`arch_for`; not a user config."""

    llm: Qwen2Config
    vae: dict[str, Any]
    mar: dict[str, Any]          # MAR(**mar) minus the run-level fields the adapter adds
    published_millions: dict[str, float] = field(default_factory=dict)


def qwen25_15b_config() -> Qwen2Config:
    """Qwen/Qwen2.5-1.5B-Instruct `config.json` (the LLM Harmon-1.5B starts from): GQA 12/2 heads with
    qkv bias, rope θ 1e6, tied embeddings (so `lm_head.weight` is `model.embed_tokens.weight`)."""
    return Qwen2Config(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=True,
        use_sliding_window=False, max_window_layers=21, hidden_act="silu", bos_token_id=151643,
        eos_token_id=151645)


def smoke(arch: HarmonArch) -> HarmonArch:
    """Paper-shape smoke runs (``model.smoke=true``, README "Paper-shape smoke runs"): the release's shapes
    -- the KL-16 VAE's five levels (stride 16, 16 latent channels), MAR's token grid and buffers (set by
    HarmonConfig), the 151,936-token vocabulary -- with one layer per stack and narrow widths."""
    llm = arch.llm
    # Two heads each: attention over 16 × 2,300 tokens (LLM) and 16 × 1,088 (MAR, with dropout: the
    # probabilities are materialised) dominates a CPU step; head counts do not change any shape.
    llm.hidden_size, llm.num_attention_heads, llm.num_key_value_heads, llm.intermediate_size = 64, 2, 2, 128
    llm.head_dim, llm.num_hidden_layers = 32, 1
    if getattr(llm, "layer_types", None):
        llm.layer_types = llm.layer_types[:1]
    arch.mar.update(width=32, depth=1, heads=2, diffloss_width=32, diffloss_depth=1)
    arch.vae = kl16_kwargs("tiny")    # same levels, stride and latent channels; 8-32 channels, 1 block each
    arch.published_millions = {}
    return arch


def arch_for(size: str, *, llm_path: str | None = None, vocab_size: int | None = None,
             num_sampling_steps: str = "100") -> HarmonArch:
    if size == "full":
        if llm_path:
            if not (Path(llm_path) / "config.json").is_file():
                raise FileNotFoundError(f"model.llm_path={llm_path!r} has no config.json; point it at the local "
                                        "Qwen2.5-1.5B-Instruct folder")
            llm = Qwen2Config.from_pretrained(llm_path)
        else:
            llm = qwen25_15b_config()
        # Harmon configs/models/qwen2_5_1_5b_kl16_mar_h.py: mar_huge (src/models/mar/mar.py: width 1280,
        # depth 20 encoder + 20 decoder, 16 heads, mlp 4), diffloss_d 12, diffloss_w 1536, class_num 1000.
        mar = dict(width=1280, depth=20, heads=16, mlp_ratio=4.0, class_num=1000,
                   diffloss_width=1536, diffloss_depth=12)
    elif size == "tiny":
        llm = Qwen2Config(
            vocab_size=vocab_size or 272, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
            tie_word_embeddings=True)
        mar = dict(width=32, depth=2, heads=4, mlp_ratio=4.0, class_num=10, diffloss_width=32, diffloss_depth=2)
    else:
        raise ValueError(f"model.size={size!r}: Harmon has sizes 'tiny' and 'full'")
    llm._attn_implementation = "sdpa"     # flash-attn is not available on CPU; sdpa everywhere
    mar["num_sampling_steps"] = num_sampling_steps
    return HarmonArch(llm=llm, vae=kl16_kwargs(size), mar=mar,
                      published_millions=PUBLISHED_MILLIONS if size == "full" else {})
