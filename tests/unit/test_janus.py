"""Janus-Pro specifics (the protocol checks every adapter shares are in test_adapter_protocol.py): release-size
parameter counts, the exported folder loaded by transformers itself, the released image preprocessing,
and understanding features placed where HF's own forward places them.

    python -m pytest -q -s tests/unit/test_janus.py
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.unit.test_adapter_protocol import build
from unimrg.models.janus import PUBLISHED_BILLIONS, Janus, JanusModelConfig


@pytest.mark.parametrize("variant", ["1b", "7b"])
def test_full_size_counts_match_the_release(variant):
    with torch.device("meta"):
        model = Janus(JanusModelConfig(size="full", variant=variant))
    total = sum(p.numel() for p in model.parameters())
    print(f"\nJanus-Pro-{variant.upper()}: {total / 1e9:.3f} B (release files: {PUBLISHED_BILLIONS[variant]} B)")
    assert abs(total / 1e9 - PUBLISHED_BILLIONS[variant]) / PUBLISHED_BILLIONS[variant] < 0.01
    assert model.native_resolution(model.cfg).image == 384 and model.num_image_tokens == model.num_codes == 576
    assert model.janus.lm_head.weight is not model.janus.get_input_embeddings().weight   # the release's untied head


def test_exported_folder_loads_in_transformers_and_matches(tmp_path):
    from transformers import JanusForConditionalGeneration, JanusProcessor
    model = build("janus", seed=1).eval()
    folder = model.export_official(tmp_path)["janus"]
    hf = JanusForConditionalGeneration.from_pretrained(folder, local_files_only=True).eval()
    ours, theirs = model.janus.state_dict(), hf.state_dict()
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    processor = JanusProcessor.from_pretrained(folder, local_files_only=True)

    # The released preprocessing on a non-square image: longer side → 32, centred grey (127) padding.
    img = torch.randint(0, 256, (3, 20, 40), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    ref = processor.image_processor(img, return_tensors="pt").pixel_values       # (1, 3, 32, 32), PIL bicubic
    got = model.transform_images(img[None])
    grey = (127 / 255 - 0.5) / 0.5
    assert torch.allclose(got[..., :8, :], torch.full_like(got[..., :8, :], grey))   # 16 rows of content, centred
    assert torch.allclose(ref[..., :8, :], got[..., :8, :]) and torch.allclose(ref[..., 24:, :], got[..., 24:, :])
    assert (ref - got).abs().mean() < 0.01 and (ref - got).abs().max() < 0.08      # torch vs PIL bicubic

    # HF's own forward (input_ids + pixel_values) gives the logits of the adapter's understanding path.
    tok = model.tokenizer
    question = model._encode("\nHow many cubes?\n\n<|Assistant|>:")
    ids = torch.tensor([[tok.bos_token_id] + model._user_head() + model._image_block() + question])
    square = torch.randint(0, 256, (1, 3, 32, 32), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    with torch.no_grad():
        ref_logits = hf(input_ids=ids, pixel_values=model.transform_images(square)).logits
        embeds = model._embed_with_images(ids, model.image_features(square))
        hidden = model.janus.model.language_model(inputs_embeds=embeds).last_hidden_state
        assert torch.allclose(model.janus.lm_head(hidden), ref_logits, atol=1e-5)

    # ... and HF's own image generation runs from the folder alone (its generation config: CFG, <boi>, pad).
    prompt = torch.tensor([[tok.bos_token_id] + model._encode("<|User|>: a cube\n\n<|Assistant|>:")
                           + [tok.convert_tokens_to_ids("<begin_of_image>")]])
    codes = hf.generate(prompt, attention_mask=torch.ones_like(prompt), generation_mode="image", do_sample=True)
    assert codes.shape == (1, model.num_codes) and int(codes.max()) < model.config.vq_config.num_embeddings
    assert hf.decode_image_tokens(codes).shape == (1, 16, 16, 3)


def test_a_folder_of_another_size_is_refused_by_name(tmp_path):
    model = build("janus", seed=1)
    folder = model.export_official(tmp_path)["janus"]
    cfg = json.loads((folder / "config.json").read_text())
    cfg["text_config"]["hidden_size"] = 2048
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="text_config.hidden_size=2048 .*model.variant"):
        model.load_official(str(folder))


def release_layout(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF Janus keys → the deepseek-ai release's (`MultiModalityCausalLM`: timm SigLIP with fused qkv and a
    (1, N, C) position table, LlamaGen VQ with conv_blocks / res / mid.N, LlamaForCausalLM), spelled from
    the release's module names."""
    top = [("model.vision_model.encoder.layers.", "vision_model.vision_tower.blocks."),
           ("model.vision_model.embeddings.patch_embedding.", "vision_model.vision_tower.patch_embed.proj."),
           ("model.vision_model.post_layernorm.", "vision_model.vision_tower.norm."),
           ("model.aligner.fc1.", "aligner.layers.0."), ("model.aligner.hidden_layers.0.", "aligner.layers.2."),
           ("model.generation_aligner.fc1.", "gen_aligner.layers.0."),
           ("model.generation_aligner.hidden_layers.0.", "gen_aligner.layers.2."),
           ("model.generation_head.proj_out.", "gen_head.output_mlp_projector."),
           ("model.generation_head.vision_head.", "gen_head.vision_head."),
           ("model.generation_embeddings.", "gen_embed."), ("model.vqmodel.", "gen_vision_model."),
           ("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head.")]
    out = {}
    for k, v in hf.items():
        if k == "model.vision_model.embeddings.position_embedding.weight":
            out["vision_model.vision_tower.pos_embed"] = v[None]
            continue
        if k.startswith("model.vision_model.") and (".self_attn.k_proj." in k or ".self_attn.v_proj." in k):
            continue                                   # fused with q_proj below
        new = next(o + k[len(h):] for h, o in top if k.startswith(h))
        if new.startswith("vision_model."):
            new = (new.replace(".self_attn.projection_layer.", ".attn.proj.").replace(".layer_norm1.", ".norm1.")
                   .replace(".layer_norm2.", ".norm2."))
            if ".self_attn.q_proj." in k:
                out[new.replace(".self_attn.q_proj.", ".attn.qkv.")] = torch.cat(
                    [hf[k.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")])
                continue
        if new.startswith("gen_vision_model."):
            new = (new.replace("encoder.down.", "encoder.conv_blocks.").replace("decoder.up.", "decoder.conv_blocks.")
                   .replace(".block.", ".res.").replace(".mid.block_1.", ".mid.0.").replace(".mid.attn_1.", ".mid.1.")
                   .replace(".mid.block_2.", ".mid.2."))
        out[new] = v
    return out


def test_the_deepseek_ai_release_layout_loads(tmp_path):
    a, b = build("janus", seed=1), build("janus", seed=2)
    state = release_layout(a.janus.state_dict())
    assert "gen_vision_model.encoder.conv_blocks.0.res.0.norm1.weight" in state
    assert "vision_model.vision_tower.blocks.0.attn.qkv.weight" in state and "language_model.lm_head.weight" in state
    state["vision_model.vision_tower.attn_pool.latent"] = torch.zeros(1, 1, 32)     # not in the HF model
    state["gen_vision_model.quantize.codebook_used"] = torch.zeros(64)
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "multi_modality", "language_config": {
        "hidden_size": 32, "num_hidden_layers": 2}}))
    report = b.load_official(str(tmp_path))
    assert not report.missing and not report.unexpected and len(report.ignored) == 2, str(report)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
