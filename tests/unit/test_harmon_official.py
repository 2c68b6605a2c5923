"""Official-layout weights for Harmon: a tiny synthetic `harmon_1.5b.pth` and a tiny synthetic MAR
`kl16.ckpt`, each written from key lists read off the official code (not from our modules), load with
zero missing / unexpected keys; the export round trip is bit-identical.

    python -m pytest tests/unit/test_harmon_official.py -q
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import Qwen2ForCausalLM

from unimrg.models.harmon import Harmon, HarmonConfig
from unimrg.models.harmon.adapter import to_official
from unimrg.models.official_io import read_state_dict

SIZE = 64


def tiny(**kw) -> Harmon:
    torch.manual_seed(0)
    cfg = dict(size="tiny", image_size=SIZE, mar_image_size=SIZE, buffer_size=4, num_sampling_steps="5")
    cfg.update(kw)
    return Harmon(HarmonConfig(**cfg))


def official_mar_shapes(width: int, depth: int, token_dim: int, grid: int, buf: int, classes: int,
                        dw: int, dd: int) -> dict[str, tuple[int, ...]]:
    """`mar.*` keys of wusize/Harmon src/models/mar/mar.py `MAR.__init__` with timm's vision_transformer
    `Block` (norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2), and src/models/mar/diffloss.py
    `DiffLoss.net` = `SimpleMLPAdaLN` (TimestepEmbedder freq 256, ResBlock, FinalLayer)."""
    seq, h = grid * grid, 4 * width
    s = {"mar.class_emb.weight": (classes, width), "mar.fake_latent": (1, width),
         "mar.z_proj.weight": (width, token_dim), "mar.z_proj.bias": (width,),
         "mar.z_proj_ln.weight": (width,), "mar.z_proj_ln.bias": (width,),
         "mar.encoder_pos_embed_learned": (1, seq + buf, width),
         "mar.encoder_norm.weight": (width,), "mar.encoder_norm.bias": (width,),
         "mar.decoder_embed.weight": (width, width), "mar.decoder_embed.bias": (width,),
         "mar.mask_token": (1, 1, width), "mar.decoder_pos_embed_learned": (1, seq + buf, width),
         "mar.decoder_norm.weight": (width,), "mar.decoder_norm.bias": (width,),
         "mar.diffusion_pos_embed_learned": (1, seq, width)}
    for part in ("encoder_blocks", "decoder_blocks"):
        for i in range(depth):
            p = f"mar.{part}.{i}."
            s.update({p + "norm1.weight": (width,), p + "norm1.bias": (width,),
                      p + "attn.qkv.weight": (3 * width, width), p + "attn.qkv.bias": (3 * width,),
                      p + "attn.proj.weight": (width, width), p + "attn.proj.bias": (width,),
                      p + "norm2.weight": (width,), p + "norm2.bias": (width,),
                      p + "mlp.fc1.weight": (h, width), p + "mlp.fc1.bias": (h,),
                      p + "mlp.fc2.weight": (width, h), p + "mlp.fc2.bias": (width,)})
    n = "mar.diffloss.net."
    s.update({n + "time_embed.mlp.0.weight": (dw, 256), n + "time_embed.mlp.0.bias": (dw,),
              n + "time_embed.mlp.2.weight": (dw, dw), n + "time_embed.mlp.2.bias": (dw,),
              n + "cond_embed.weight": (dw, width), n + "cond_embed.bias": (dw,),
              n + "input_proj.weight": (dw, token_dim), n + "input_proj.bias": (dw,),
              n + "final_layer.linear.weight": (2 * token_dim, dw), n + "final_layer.linear.bias": (2 * token_dim,),
              n + "final_layer.adaLN_modulation.1.weight": (2 * dw, dw),
              n + "final_layer.adaLN_modulation.1.bias": (2 * dw,)})
    for i in range(dd):
        p = f"{n}res_blocks.{i}."
        s.update({p + "in_ln.weight": (dw,), p + "in_ln.bias": (dw,), p + "mlp.0.weight": (dw, dw),
                  p + "mlp.0.bias": (dw,), p + "mlp.2.weight": (dw, dw), p + "mlp.2.bias": (dw,),
                  p + "adaLN_modulation.1.weight": (3 * dw, dw), p + "adaLN_modulation.1.bias": (3 * dw,)})
    return s


def official_proj_shapes(width: int, hidden: int) -> dict[str, tuple[int, ...]]:
    # wusize/Harmon src/models/harmon.py `build_mlp`: Linear, SiLU, Linear.
    return {"proj_in.0.weight": (hidden, width), "proj_in.0.bias": (hidden,),
            "proj_in.2.weight": (hidden, hidden), "proj_in.2.bias": (hidden,),
            "proj_out.0.weight": (hidden, hidden), "proj_out.0.bias": (hidden,),
            "proj_out.2.weight": (width, hidden), "proj_out.2.bias": (width,)}


def synthetic_harmon_pth(model: Harmon, seed: int = 7) -> dict[str, torch.Tensor]:
    """A harmon_1.5b.pth-layout state dict for the tiny architecture, random values."""
    a = model.arch
    shapes = official_mar_shapes(a.mar["width"], a.mar["depth"], 16, SIZE // 16, 4, a.mar["class_num"],
                                 a.mar["diffloss_width"], a.mar["diffloss_depth"])
    shapes.update(official_proj_shapes(a.mar["width"], a.llm.hidden_size))
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    # The LLM is transformers' Qwen2ForCausalLM (HarmonDev builds it with AutoModelForCausalLM).
    llm = Qwen2ForCausalLM(a.llm)
    for k, v in llm.state_dict().items():
        state["llm." + k] = torch.randn(v.shape, generator=g)
    state["llm.lm_head.weight"] = state["llm.model.embed_tokens.weight"]     # tied in Qwen2.5-1.5B
    return state


def test_official_checkpoint_loads_exactly_and_round_trips(tmp_path):
    model = tiny()
    state = synthetic_harmon_pth(model)
    torch.save(state, tmp_path / "harmon_1.5b.pth")
    report = model.load_official(str(tmp_path / "harmon_1.5b.pth")).parts["harmon"]
    assert report.missing == [] and report.unexpected == [], str(report)
    assert torch.equal(model.mar.encoder_blocks[1].attn.qkv.weight, state["mar.encoder_blocks.1.attn.qkv.weight"])
    assert torch.equal(model.llm.lm_head.weight, state["llm.model.embed_tokens.weight"])

    paths = model.export_official(tmp_path / "export")
    assert paths == {"harmon": tmp_path / "export" / "harmon_1.5b.pth"}
    back = read_state_dict(paths["harmon"])
    assert sorted(back) == sorted(state)
    assert all(torch.equal(back[k], state[k]) and back[k].dtype == state[k].dtype for k in state)
    # The trainer's consolidated state dict converts the same way.
    assert sorted(to_official(model.state_dict())) == sorted(state)


@pytest.mark.parametrize("drop", ["llm.lm_head.weight", "llm.model.embed_tokens.weight"])
def test_either_tied_key_is_enough(tmp_path, drop):
    model = tiny()
    state = synthetic_harmon_pth(model)
    kept = state["llm.model.embed_tokens.weight"]
    del state[drop]
    state["vae.encoder.conv_in.weight"] = torch.zeros(1)       # a VAE key in the file is skipped, not loaded
    torch.save(state, tmp_path / "h.pth")
    report = model.load_official(str(tmp_path / "h.pth")).parts["harmon"]
    assert report.missing == [] and report.unexpected == [] and report.ignored == ["vae.encoder.conv_in.weight"]
    assert torch.equal(model.llm.model.embed_tokens.weight, kept)


def test_unexpected_and_mismatched_keys_are_named(tmp_path):
    model = tiny()
    state = synthetic_harmon_pth(model)
    state["mar.not_a_param"] = torch.zeros(2)
    del state["proj_out.2.bias"]
    torch.save(state, tmp_path / "h.pth")
    report = model.load_official(str(tmp_path / "h.pth")).parts["harmon"]
    assert report.unexpected == ["mar.not_a_param"] and report.missing == ["proj_out.2.bias"]
    state = synthetic_harmon_pth(model)
    state["mar.encoder_pos_embed_learned"] = torch.zeros(1, 7, model.arch.mar["width"])
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="mar.encoder_pos_embed_learned"):
        model.load_official(str(tmp_path / "bad.pth"))


def ldm_kl_shapes(ch: int, ch_mult: tuple[int, ...], blocks: int, z: int) -> dict[str, tuple[int, ...]]:
    """LDM KL autoencoder keys as in wusize/Harmon src/models/mar/vae.py (`Encoder` with
    attn_resolutions=(16,) from resolution 256 → attention in the last level; `Decoder` without level
    attention; mid block_1/attn_1/block_2; quant_conv / post_quant_conv)."""
    s: dict[str, tuple[int, ...]] = {}

    def res(p, cin, cout):
        s.update({p + "norm1.weight": (cin,), p + "norm1.bias": (cin,), p + "conv1.weight": (cout, cin, 3, 3),
                  p + "conv1.bias": (cout,), p + "norm2.weight": (cout,), p + "norm2.bias": (cout,),
                  p + "conv2.weight": (cout, cout, 3, 3), p + "conv2.bias": (cout,)})
        if cin != cout:
            s.update({p + "nin_shortcut.weight": (cout, cin, 1, 1), p + "nin_shortcut.bias": (cout,)})

    def attn(p, c):
        s.update({p + "norm.weight": (c,), p + "norm.bias": (c,)})
        for k in ("q", "k", "v", "proj_out"):
            s.update({p + f"{k}.weight": (c, c, 1, 1), p + f"{k}.bias": (c,)})

    levels, in_mult = len(ch_mult), (1,) + ch_mult
    s.update({"encoder.conv_in.weight": (ch, 3, 3, 3), "encoder.conv_in.bias": (ch,)})
    res_at = 256
    for i in range(levels):
        cin, cout = ch * in_mult[i], ch * ch_mult[i]
        for j in range(blocks):
            res(f"encoder.down.{i}.block.{j}.", cin, cout)
            cin = cout
            if res_at == 16:
                attn(f"encoder.down.{i}.attn.{j}.", cout)
        if i != levels - 1:
            s.update({f"encoder.down.{i}.downsample.conv.weight": (cout, cout, 3, 3),
                      f"encoder.down.{i}.downsample.conv.bias": (cout,)})
            res_at //= 2
    c = ch * ch_mult[-1]
    for part in ("encoder", "decoder"):
        res(f"{part}.mid.block_1.", c, c)
        attn(f"{part}.mid.attn_1.", c)
        res(f"{part}.mid.block_2.", c, c)
    s.update({"encoder.norm_out.weight": (c,), "encoder.norm_out.bias": (c,),
              "encoder.conv_out.weight": (2 * z, c, 3, 3), "encoder.conv_out.bias": (2 * z,),
              "decoder.conv_in.weight": (c, z, 3, 3), "decoder.conv_in.bias": (c,)})
    cin = c
    for i in reversed(range(levels)):
        cout = ch * ch_mult[i]
        for j in range(blocks + 1):
            res(f"decoder.up.{i}.block.{j}.", cin, cout)
            cin = cout
        if i != 0:
            s.update({f"decoder.up.{i}.upsample.conv.weight": (cout, cout, 3, 3),
                      f"decoder.up.{i}.upsample.conv.bias": (cout,)})
    s.update({"decoder.norm_out.weight": (cin,), "decoder.norm_out.bias": (cin,),
              "decoder.conv_out.weight": (3, cin, 3, 3), "decoder.conv_out.bias": (3,),
              "quant_conv.weight": (2 * z, 2 * z, 1, 1), "quant_conv.bias": (2 * z,),
              "post_quant_conv.weight": (z, z, 1, 1), "post_quant_conv.bias": (z,)})
    return s


def test_kl16_checkpoint_converts_to_diffusers(tmp_path):
    # Tiny VAE = ch 8, ch_mult (1, 1, 2, 2, 2), 1 res block per level, z 16 (the real one: 128,
    # (1, 1, 2, 2, 4), 2, 16 — the same key pattern).
    g = torch.Generator().manual_seed(0)
    ldm = {k: torch.randn(s, generator=g) for k, s in ldm_kl_shapes(8, (1, 1, 2, 2, 2), 1, 16).items()}
    ldm["loss.discriminator.main.0.weight"] = torch.zeros(3)       # LDM training leftovers are skipped
    torch.save({"model": ldm}, tmp_path / "kl16.ckpt")
    model = tiny(vae_path=str(tmp_path / "kl16.ckpt"))
    torch.save(synthetic_harmon_pth(model), tmp_path / "h.pth")
    reports = model.load_official(str(tmp_path / "h.pth"))
    vae_report = reports.parts["vae"]
    assert vae_report.missing == [] and vae_report.unexpected == [], str(vae_report)
    assert vae_report.ignored == ["loss.discriminator.main.0.weight"]
    vae = model.vae
    # Spot checks of the renames, including the per-level encoder attention diffusers' helper lacks.
    assert torch.equal(vae.encoder.down_blocks[4].attentions[0].to_q.weight,
                       ldm["encoder.down.4.attn.0.q.weight"][:, :, 0, 0])
    assert torch.equal(vae.encoder.down_blocks[2].resnets[0].conv_shortcut.weight,
                       ldm["encoder.down.2.block.0.nin_shortcut.weight"])
    assert torch.equal(vae.decoder.up_blocks[0].resnets[1].conv1.weight, ldm["decoder.up.4.block.1.conv1.weight"])
    assert torch.equal(vae.decoder.mid_block.attentions[0].to_out[0].weight,
                       ldm["decoder.mid.attn_1.proj_out.weight"][:, :, 0, 0])
    assert torch.equal(vae.encoder.conv_norm_out.bias, ldm["encoder.norm_out.bias"])


def test_qwen_folder_gives_config_tokenizer_and_llm_weights(tmp_path):
    src = tiny()
    torch.manual_seed(5)
    llm = Qwen2ForCausalLM(src.arch.llm)
    llm.save_pretrained(tmp_path / "qwen")                  # model.safetensors (tied: embed key only)
    src.tokenizer.save_pretrained(tmp_path / "qwen")
    report = src.load_official(str(tmp_path / "qwen")).parts["llm"]
    assert report.missing == [] and report.unexpected == [], str(report)
    assert torch.equal(src.llm.lm_head.weight, llm.model.embed_tokens.weight)
    # Full size reads the LLM's config and tokenizer from the folder (meta device: no weights allocated).
    with torch.device("meta"):
        full = Harmon(HarmonConfig(size="full", llm_path=str(tmp_path / "qwen")))
    assert full.llm.config.hidden_size == src.arch.llm.hidden_size and len(full.tokenizer) == len(src.tokenizer)
    with pytest.raises(FileNotFoundError, match="llm_path"):
        Harmon(HarmonConfig(size="full", llm_path=str(tmp_path / "nowhere")))
