"""Show-o official weights (synthetic, official layout), export round trip, MAGVIT-v2, full-size counts.

    python -m pytest tests/unit/test_showo_official.py -q -s     # -s prints the full-size counts
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import CLIPConfig, CLIPModel

from unimrg.models.official_io import read_state_dict
from unimrg.models.showo import Showo, ShowoConfig
from unimrg.models.showo.arch import ENDOFTEXT, ShowoArch
from unimrg.models.tokenizer import build_byte_tokenizer


def tiny(seed: int = 0, **kw) -> Showo:
    torch.manual_seed(seed)
    return Showo(ShowoConfig(size="tiny", **kw))


# ---- synthetic official checkpoints (key names and shapes written out independently of the adapter) ----
def official_showo_state(a: ShowoArch) -> dict[str, torch.Tensor]:
    """Mirrors showlab/show-o-w-clip-vit `pytorch_model.bin`: the state dict of Show-o's `Showo`
    (`models/modeling_showo.py`): `showo` = its `models/phi.py` PhiForCausalLM (q/k LayerNorms forced on,
    biased untied lm_head), `mm_projector` = Linear(1024, 2048), GELU, Linear(2048, 2048)."""
    h, inter, v, c = a.phi.hidden_size, a.phi.intermediate_size, a.vocab_size, a.clip.hidden_size
    hd = h // a.phi.num_attention_heads
    shapes = {"showo.model.embed_tokens.weight": (v, h)}
    for i in range(a.phi.num_hidden_layers):
        p = f"showo.model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "dense"):
            shapes[p + f"self_attn.{proj}.weight"], shapes[p + f"self_attn.{proj}.bias"] = (h, h), (h,)
        for ln in ("q_layernorm", "k_layernorm"):
            shapes[p + f"self_attn.{ln}.weight"], shapes[p + f"self_attn.{ln}.bias"] = (hd,), (hd,)
        shapes[p + "mlp.fc1.weight"], shapes[p + "mlp.fc1.bias"] = (inter, h), (inter,)
        shapes[p + "mlp.fc2.weight"], shapes[p + "mlp.fc2.bias"] = (h, inter), (h,)
        shapes[p + "input_layernorm.weight"], shapes[p + "input_layernorm.bias"] = (h,), (h,)
    shapes |= {"showo.model.final_layernorm.weight": (h,), "showo.model.final_layernorm.bias": (h,),
               "showo.lm_head.weight": (v, h), "showo.lm_head.bias": (v,),
               "mm_projector.0.weight": (h, c), "mm_projector.0.bias": (h,),
               "mm_projector.2.weight": (h, h), "mm_projector.2.bias": (h,)}
    g = torch.Generator().manual_seed(11)
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def official_magvit_state(a: ShowoArch) -> dict[str, torch.Tensor]:
    """Mirrors showlab/magvitv2 `pytorch_model.bin`: the state dict of Show-o's `MAGVITv2`
    (`models/modeling_magvitv2.py`: VQGANEncoder / VQGANDecoder / LFQuantizer, blocks from
    `models/common_modules.py`)."""
    m, z = a.magvit, a.magvit.codebook_dim
    shapes: dict[str, tuple] = {}

    def conv(name, cout, cin, k):
        shapes[name + ".weight"], shapes[name + ".bias"] = (cout, cin, k, k), (cout,)

    def norm(name, ch):
        shapes[name + ".weight"], shapes[name + ".bias"] = (ch,), (ch,)

    def resnet(p, cin, cout):
        norm(p + ".norm1", cin), conv(p + ".conv1", cout, cin, 3), norm(p + ".norm2", cout)
        conv(p + ".conv2", cout, cout, 3)
        if cin != cout:
            conv(p + ".nin_shortcut", cout, cin, 1)

    def attn(p, ch):
        norm(p + ".norm", ch)
        for q in ("q", "k", "v", "proj_out"):
            conv(f"{p}.{q}", ch, ch, 1)

    conv("encoder.conv_in", m.ch, 3, 3)
    in_mult, res = (1, *m.enc_ch_mult), m.resolution
    for i, mult in enumerate(m.enc_ch_mult):
        cin, cout = m.ch * in_mult[i], m.ch * mult
        for j in range(m.enc_num_res_blocks[i]):
            resnet(f"encoder.down.{i}.block.{j}", cin, cout)
            cin = cout
            if res in m.attn_resolutions:
                attn(f"encoder.down.{i}.attn.{j}", cout)
        if i != len(m.enc_ch_mult) - 1:
            conv(f"encoder.down.{i}.downsample.conv", cout, cout, 3)
            res //= 2
    top = m.ch * m.enc_ch_mult[-1]
    resnet("encoder.mid.block_1", top, top), attn("encoder.mid.attn_1", top), resnet("encoder.mid.block_2", top, top)
    norm("encoder.norm_out", top), conv("encoder.conv_out", z, top, 3), conv("encoder.quant_conv", z, z, 1)

    n = len(m.dec_ch_mult)
    cin, res = m.ch * m.dec_ch_mult[-1], m.resolution // 2 ** (n - 1)
    conv("decoder.post_quant_conv", z, z, 1), conv("decoder.conv_in", cin, z, 3)
    resnet("decoder.mid.block_1", cin, cin), attn("decoder.mid.attn_1", cin), resnet("decoder.mid.block_2", cin, cin)
    for i in reversed(range(n)):
        cout = m.ch * m.dec_ch_mult[i]
        for j in range(m.dec_num_res_blocks[i]):
            resnet(f"decoder.up.{i}.block.{j}", cin, cout)
            cin = cout
            if res in m.attn_resolutions:
                attn(f"decoder.up.{i}.attn.{j}", cout)
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", cout, cout, 3)
            res *= 2
    norm("decoder.norm_out", cin), conv("decoder.conv_out", 3, cin, 3)
    g = torch.Generator().manual_seed(12)
    state = {k: torch.randn(s, generator=g) * 0.05 for k, s in shapes.items()}
    # LFQuantizer's persistent buffers: every code's ±1 bits (MSB first) and the bit weights.
    bits = torch.arange(z - 1, -1, -1)
    state["quantize.embedding"] = ((torch.arange(2 ** z)[:, None] >> bits) & 1).float() * 2 - 1
    state["quantize.power_vals"] = 2 ** bits
    return state


def official_clip_folder(a: ShowoArch, path: Path) -> dict[str, torch.Tensor]:
    """Mirrors openai/clip-vit-large-patch14-336: a whole transformers `CLIPModel` (text tower included)."""
    torch.manual_seed(13)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=99,
                max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    model = CLIPModel(CLIPConfig(vision_config=a.clip.to_dict(), text_config=text, projection_dim=16))
    model.save_pretrained(path)
    return model.state_dict()


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("official")
    arch = tiny().arch
    showo, magvit = official_showo_state(arch), official_magvit_state(arch)
    (root / "show-o-w-clip-vit").mkdir()
    torch.save(showo, root / "show-o-w-clip-vit" / "pytorch_model.bin")
    (root / "show-o-w-clip-vit" / "config.json").write_text(json.dumps(
        {"_class_name": "Showo", "w_clip_vit": True, "vocab_size": arch.vocab_size,
         "llm_vocab_size": arch.llm_vocab_size, "codebook_size": arch.codebook_size,
         "num_vq_tokens": arch.num_image_tokens}))
    (root / "magvitv2").mkdir()
    torch.save(magvit, root / "magvitv2" / "pytorch_model.bin")
    clip = official_clip_folder(arch, root / "clip-vit-large-patch14-336")
    return {"root": root, "showo": showo, "magvit": magvit, "clip": clip}


def load_all(official: dict, seed: int = 1) -> tuple[Showo, dict]:
    r = official["root"]
    model = tiny(seed, magvit_checkpoint=str(r / "magvitv2"), clip_checkpoint=str(r / "clip-vit-large-patch14-336"))
    return model, model.load_official(str(r / "show-o-w-clip-vit")).parts


def test_official_layout_loads_with_no_missing_or_unexpected_keys(official):
    model, reports = load_all(official)
    assert set(reports) == {"showo", "vq_model", "vision_tower"}
    for name, rep in reports.items():
        assert rep.unexpected == [] and rep.missing == [], (name, str(rep))
    assert all(k.startswith(("text_model.", "text_projection", "visual_projection", "logit_scale"))
               for k in reports["vision_tower"].ignored)        # the text tower is skipped by design
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in official["showo"].items())
    assert all(torch.equal(sd["vq_model." + k], v) for k, v in official["magvit"].items())
    vision = {k[len("vision_model."):]: v for k, v in official["clip"].items() if k.startswith("vision_model.")}
    assert vision and all(torch.equal(sd["vision_tower." + k], v) for k, v in vision.items())


def test_export_round_trip_is_bit_identical(official, tmp_path):
    model, _ = load_all(official)
    paths = model.export_official(tmp_path / "export")
    showo, magvit, clip = (read_state_dict(paths[k]) for k in ("showo", "vq_model", "vision_tower"))
    # The exported files are the official layout, tensor for tensor.
    assert showo.keys() == official["showo"].keys()
    assert all(torch.equal(showo[k], official["showo"][k]) for k in showo)
    assert magvit.keys() == official["magvit"].keys()
    assert all(torch.equal(magvit[k], official["magvit"][k]) for k in magvit)
    assert all(torch.equal(clip[k], official["clip"][k]) for k in clip) and len(clip) > 10
    # The folders load as Show-o's code loads them (transformers / diffusers classes, the folder alone).
    from diffusers.configuration_utils import ConfigMixin
    from transformers import AutoImageProcessor, CLIPVisionConfig, CLIPVisionModel
    tower, info = CLIPVisionModel.from_pretrained(str(paths["vision_tower"].parent), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert all(torch.equal(v, official["clip"]["vision_model." + k]) for k, v in tower.state_dict().items()
               if not k.endswith("position_ids"))
    assert CLIPVisionConfig.from_pretrained(str(paths["vision_tower"].parent)).image_size == model.arch.clip.image_size
    proc = AutoImageProcessor.from_pretrained(str(paths["vision_tower"].parent))
    side = model.arch.clip.image_size
    assert proc(images=torch.randint(0, 256, (3, 20, 40), dtype=torch.uint8), return_tensors="pt"
                ).pixel_values.shape == (1, 3, side, side)

    class ShowoModelConfig(ConfigMixin):       # what Show-o's ModelMixin reads (`models/modeling_utils.py`)
        config_name = "config.json"
    assert ShowoModelConfig.load_config(str(paths["vq_model"].parent))["_class_name"] == "MAGVITv2"
    assert ShowoModelConfig.load_config(str(paths["showo"].parent))["_class_name"] == "Showo"
    # ...and load back into a differently initialised model exactly.
    again = tiny(seed=9, magvit_checkpoint=str(paths["vq_model"].parent),
                 clip_checkpoint=str(paths["vision_tower"].parent))
    report = again.load_official(str(paths["showo"].parent))
    assert report.ok and set(report.parts) == {"showo", "vq_model", "vision_tower"}
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_missing_and_unexpected_keys_are_reported_by_name(official, tmp_path):
    state = dict(official["showo"])
    del state["showo.model.layers.1.mlp.fc2.bias"]
    state["showo.model.layers.9.mlp.fc2.bias"] = torch.zeros(3)
    torch.save(state, tmp_path / "pytorch_model.bin")
    report = tiny().load_official(str(tmp_path)).parts["showo"]
    assert report.missing == ["showo.model.layers.1.mlp.fc2.bias"]
    assert report.unexpected == ["showo.model.layers.9.mlp.fc2.bias"]
    assert "showo.model.layers.1.mlp.fc2.bias" in str(report)


def test_wrong_architecture_is_refused_with_the_fix(official, tmp_path):
    state = dict(official["showo"])
    state["mm_projector.0.weight"] = torch.zeros(5, 5)
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"mm_projector.0.weight: file \(5, 5\)"):
        tiny().load_official(str(tmp_path))
    other = tmp_path / "show-o-512x512"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"w_clip_vit": False, "num_vq_tokens": 1024}))
    torch.save(official["showo"], other / "pytorch_model.bin")
    with pytest.raises(ValueError, match="num_vq_tokens=1024.*show-o-w-clip-vit"):
        tiny().load_official(str(other))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no weights in"):
        tiny().load_official(str(tmp_path / "empty"))


def test_magvit_encode_decode_shapes_and_code_range():
    for k in (8192, 4096):   # released codebook, and the paper text's 4,096
        model = tiny(codebook_size=k)
        targets = torch.rand(3, 3, 56, 56)
        codes = model.encode_targets(targets)
        assert codes.shape == (3, model.arch.num_image_tokens) and codes.dtype == torch.long
        assert codes.min() >= 0 and codes.max() < k
        pixels = model.decode_codes(codes)
        side = model.arch.magvit.resolution
        assert pixels.shape == (3, 3, side, side) and 0 <= pixels.min() and pixels.max() <= 1
        assert model.arch.vocab_size == model.arch.llm_vocab_size + 10 + k + 1
    q = model.vq_model.quantize
    z = torch.randn(2, model.arch.magvit.codebook_dim, 4, 4)
    assert torch.equal(q.lookup(q.codes(z), 4), torch.where(z > 0, 1.0, -1.0))   # codes are the sign bits
    assert torch.equal(q.embedding[q.codes(z)[0]], q.lookup(q.codes(z), 4)[0].flatten(1).T)
    with pytest.raises(ValueError, match="power of two"):
        tiny(codebook_size=1000)


def test_tokenizer_from_a_local_folder(tmp_path):
    # A folder holding a text tokenizer without Show-o's tokens: they are added in Show-o's order.
    build_byte_tokenizer([ENDOFTEXT], eos_token=ENDOFTEXT).save_pretrained(tmp_path / "tok")
    model = tiny(tokenizer=str(tmp_path / "tok"))
    assert model.tokenizer.convert_tokens_to_ids("[PAD]") == model.pad_id == 257
    assert model.tokenizer.convert_tokens_to_ids("<|mmu|>") == model.mmu_id
    # At full size the text vocabulary is fixed (50,295): a foreign tokenizer is refused.
    with torch.device("meta"), pytest.raises(ValueError, match="Show-o expects 50295"):
        Showo(ShowoConfig(size="full", tokenizer=str(tmp_path / "tok")))


def test_full_size_meta_build_matches_the_release():
    with torch.device("meta"):
        model = Showo(ShowoConfig(size="full"))
    count = {name: sum(p.numel() for p in getattr(model, name).parameters()) / 1e6
             for name in ("showo", "mm_projector", "vq_model", "vision_tower")}
    counts = {"showo+mm_projector": count["showo"] + count["mm_projector"], "vq_model": count["vq_model"],
              "vision_tower": count["vision_tower"]}
    for name, millions in counts.items():
        published = model.arch.published_millions[name]
        print(f"Show-o full size: {name:20s} {millions:9.2f}M (reference {published}M)")
        assert abs(millions - published) / published < 0.01, name
    assert model.arch.vocab_size == 58498 and model.arch.num_image_tokens == 256
    assert model.arch.num_clip_tokens == 576 and model.arch.phi.qk_layernorm
    assert model.showo.lm_head.bias is not None
    assert model.showo.lm_head.weight is not model.showo.model.embed_tokens.weight   # untied
    with pytest.raises(ValueError, match="model.tokenizer"):
        model._encode("hi")
