"""OpenUni official weights at tiny size: synthetic official-layout folders load with zero missing /
unexpected keys; export → load is bit-identical; bad folders fail naming the keys.

    OMP_NUM_THREADS=1 python -m pytest tests/unit/test_openuni_weights.py -q -x
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from unimrg.models.openuni import OpenUni, OpenUniConfig


def build(seed: int, **kw) -> OpenUni:
    torch.manual_seed(seed)
    return OpenUni(OpenUniConfig(size="tiny", **kw))


# ---- test helper: official-layout folders written from a model, following the official names ----------
def internvl_original_state(model: OpenUni) -> dict[str, torch.Tensor]:
    """Keys of OpenGVLab's remote-code InternVLChatModel (InternVL `internvl_chat/internvl/model/internvl_chat/
    modeling_internvl_chat.py`: vision_model / mlp1 / language_model; `modeling_intern_vit.py`: embeddings.
    {class_embedding, patch_embedding, position_embedding}, encoder.layers.N.{attn.qkv, attn.proj, mlp.fc1,
    mlp.fc2, norm1, norm2, ls1, ls2}), filled module by module (not through the adapter's key map)."""
    vit, proj = model.lmm.model.vision_tower, model.lmm.model.multi_modal_projector
    sd = {"vision_model.embeddings.class_embedding": vit.embeddings.cls_token,
          "vision_model.embeddings.patch_embedding.weight": vit.embeddings.patch_embeddings.projection.weight,
          "vision_model.embeddings.patch_embedding.bias": vit.embeddings.patch_embeddings.projection.bias,
          "vision_model.embeddings.position_embedding": vit.embeddings.position_embeddings}
    for i, layer in enumerate(vit.encoder.layer):
        a, pre = layer.attention, f"vision_model.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            sd[pre + f"attn.qkv.{kind}"] = torch.cat([getattr(a.q_proj, kind), getattr(a.k_proj, kind),
                                                      getattr(a.v_proj, kind)])
            sd[pre + f"attn.proj.{kind}"] = getattr(a.projection_layer, kind)
            sd[pre + f"mlp.fc1.{kind}"] = getattr(layer.mlp.fc1, kind)
            sd[pre + f"mlp.fc2.{kind}"] = getattr(layer.mlp.fc2, kind)
            sd[pre + f"norm1.{kind}"] = getattr(layer.layernorm_before, kind)
            sd[pre + f"norm2.{kind}"] = getattr(layer.layernorm_after, kind)
        sd[pre + "ls1"], sd[pre + "ls2"] = layer.lambda_1, layer.lambda_2
    for idx, mod in (("0", proj.layer_norm), ("1", proj.linear_1), ("3", proj.linear_2)):  # Sequential(LN, L, GELU, L)
        sd[f"mlp1.{idx}.weight"], sd[f"mlp1.{idx}.bias"] = mod.weight, mod.bias
    for k, v in model.lmm.model.language_model.state_dict().items():     # Qwen2ForCausalLM keys
        sd["language_model.model." + k] = v
    sd["language_model.lm_head.weight"] = model.lmm.lm_head.weight
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def write_official_folders(model: OpenUni, root: Path, release_keys=("meta_queries", "connector.", "projector.",
                                                                     "transformer.")) -> dict[str, Path]:
    """InternVL3-2B original folder (config.json in InternVLChatConfig shape + model.safetensors), the HF layout
    (transformers `save_pretrained`, which is how OpenGVLab/InternVL3-2B-hf was written), SANA / DC-AE diffusers
    folders (diffusers `save_pretrained`, as `scripts/convert_sana_to_diffusers.py` / `convert_dcae_to_diffusers.py`
    write them) and the OpenUni release file (wusize/OpenUni `scripts/deepspeed2torch.py`: torch.save of the
    `OpenUniInternVL3SANAHF` state dict; `lmm.` holds the original InternVL layout)."""
    arch = model.arch
    orig = root / "InternVL3-2B"
    orig.mkdir(parents=True)
    save_file(internvl_original_state(model), str(orig / "model.safetensors"))
    (orig / "config.json").write_text(json.dumps({
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "template": "internvl2_5",
        "downsample_ratio": 0.5, "select_layer": -1, "ps_version": "v2", "force_image_size": arch.vit_image_size,
        "vision_config": {"architectures": ["InternVisionModel"],
                          "hidden_size": arch.internvl.vision_config.hidden_size,
                          "num_hidden_layers": arch.internvl.vision_config.num_hidden_layers, "qkv_bias": True},
        "llm_config": {"architectures": ["Qwen2ForCausalLM"], "hidden_size": arch.internvl.text_config.hidden_size,
                       "vocab_size": arch.internvl.text_config.vocab_size, "tie_word_embeddings": False}}))
    (orig / "modeling_internvl_chat.py").write_text("# remote code placeholder (copied on export)\n")
    hf = root / "InternVL3-2B-hf"
    model.lmm.save_pretrained(hf)
    model.transformer.save_pretrained(root / "Sana_1600M_512px_diffusers" / "transformer")
    model.vae.save_pretrained(root / "dc-ae-f32c32-sana-1.1-diffusers")
    release = {k: v.detach().clone() for k, v in model.state_dict().items()
               if k.startswith(tuple(release_keys)) and not k.startswith("lmm.")}
    if any(k.startswith("lmm.") for k in release_keys):
        release.update({"lmm." + k: v for k, v in internvl_original_state(model).items()})
    torch.save(release, root / "openuni_l_512.pth")
    return {"orig": orig, "hf": hf, "sana": root / "Sana_1600M_512px_diffusers",
            "vae": root / "dc-ae-f32c32-sana-1.1-diffusers", "release": root / "openuni_l_512.pth"}


def assert_same(a: OpenUni | dict, b: OpenUni | dict, prefix: str = "") -> None:
    sa = a if isinstance(a, dict) else a.state_dict()
    sb = b if isinstance(b, dict) else b.state_dict()
    sa = {k: v for k, v in sa.items() if k.startswith(prefix)}
    sb = {k: v for k, v in sb.items() if k.startswith(prefix)}
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, different[:5]


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    source = build(seed=0)
    return source, write_official_folders(source, tmp_path_factory.mktemp("official"))


# ---- loading -------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["orig", "hf"])
def test_official_folders_load_exactly(official, layout):
    source, f = official
    model = build(seed=1, internvl_path=str(f[layout]), sana_path=str(f["sana"]), vae_path=str(f["vae"]))
    assert not all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())
    report = model.load_official(str(f["release"]))
    print(report)
    assert report.missing == [] and report.unexpected == []
    assert_same(model, source)


def test_release_checkpoint_with_lmm_alone_loads_everything_but_vae(tmp_path):
    source = build(seed=0)
    f = write_official_folders(source, tmp_path, release_keys=("lmm.", "meta_queries", "connector.", "projector.",
                                                               "transformer."))
    model = build(seed=2, allow_missing=["vae.*"])
    report = model.load_official(str(f["release"]))
    assert report.missing and all(k.startswith("vae.") for k in report.missing)
    assert_same(model, source, prefix="lmm.")
    assert_same(model, source, prefix="transformer.")


def test_missing_and_unexpected_keys_fail_by_name(official, tmp_path):
    source, f = official
    model = build(seed=1, internvl_path=str(f["orig"]), sana_path=str(f["sana"]))   # no VAE folder
    with pytest.raises(ValueError, match=r"missing.*vae\.encoder\.conv_in\.weight"):
        model.load_official(str(f["release"]))
    ckpt = torch.load(f["release"])
    ckpt["connector.layers.9.mlp.fc1.weight"] = torch.zeros(2, 2)
    ckpt["lmm.vision_model.encoder.layers.0.attn.surprise"] = torch.zeros(2)
    torch.save(ckpt, tmp_path / "extra.pth")
    model = build(seed=1, internvl_path=str(f["orig"]), sana_path=str(f["sana"]), vae_path=str(f["vae"]))
    with pytest.raises(ValueError) as err:
        model.load_official(str(tmp_path / "extra.pth"))
    assert "connector.layers.9.mlp.fc1.weight" in str(err.value)
    assert "vision_model.encoder.layers.0.attn.surprise" in str(err.value)
    allowed = build(seed=1, internvl_path=str(f["orig"]), sana_path=str(f["sana"]), vae_path=str(f["vae"]),
                    allow_unexpected=["connector.layers.9.*", "lmm.vision_model.*"])
    allowed.load_official(str(tmp_path / "extra.pth"))
    assert_same(allowed, source)


def test_wrong_architecture_is_refused(official, tmp_path):
    _, f = official
    bad = tmp_path / "sana1024" / "transformer"
    bad.mkdir(parents=True)
    cfg = json.loads((f["sana"] / "transformer" / "config.json").read_text())
    cfg["sample_size"] = 32                                     # a 1024 px SANA: same shapes, wrong model
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "diffusion_pytorch_model.safetensors").write_bytes(
        (f["sana"] / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="sample_size=32"):
        build(seed=1, sana_path=str(bad.parent)).load_official(None)
    sd = load_file(str(f["orig"] / "model.safetensors"))
    sd["mlp1.1.weight"] = torch.zeros(3, 3)
    wrong = tmp_path / "internvl_wrong"
    wrong.mkdir()
    save_file(sd, str(wrong / "model.safetensors"))
    (wrong / "config.json").write_text((f["orig"] / "config.json").read_text())
    with pytest.raises(ValueError, match="multi_modal_projector.linear_1.weight"):
        build(seed=1, internvl_path=str(wrong)).load_official(None)


# ---- export --------------------------------------------------------------------------------------
def test_export_is_the_release_layout_and_round_trips_bit_identically(official, tmp_path):
    source, f = official
    loaded = build(seed=1, internvl_path=str(f["orig"]), sana_path=str(f["sana"]), vae_path=str(f["vae"]))
    loaded.load_official(str(f["release"]))
    paths = loaded.export_official(tmp_path / "export")
    assert set(paths) == {"openuni", "internvl_hf", "internvl_original"}

    # (a) openuni.pth holds exactly the release file's keys (no lmm / vae copies), tensor for tensor
    exported, release = torch.load(paths["openuni"]), torch.load(f["release"])
    assert sorted(exported) == sorted(release)
    assert all(torch.equal(exported[k], release[k]) for k in release)
    # ...and loads as the official scripts load it: InternVL folder + DC-AE folder, then the file on top
    again = build(seed=2, internvl_path=str(paths["internvl_original"]), vae_path=str(f["vae"]))
    report = again.load_official(str(paths["openuni"]))
    assert report.missing == [] and report.unexpected == []
    assert_same(again, source)

    # (b) internvl_hf/: self-contained, loaded by transformers' Auto classes from the folder alone
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer
    hf, info = AutoModelForImageTextToText.from_pretrained(str(paths["internvl_hf"]), output_loading_info=True)
    assert type(hf).__name__ == "InternVLForConditionalGeneration"
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert_same(hf.state_dict(), source.lmm.state_dict())
    size = source.arch.vit_image_size
    proc = AutoImageProcessor.from_pretrained(str(paths["internvl_hf"]))
    assert (proc.size["height"], proc.size["width"]) == (size, size) and not proc.crop_to_patches
    pixels = proc(images=torch.randint(0, 256, (3, 30, 50), dtype=torch.uint8), return_tensors="pt").pixel_values
    assert pixels.shape == (1, 3, size, size)
    tok = AutoTokenizer.from_pretrained(str(paths["internvl_hf"]))
    assert tok.convert_tokens_to_ids("<IMG_CONTEXT>") == source.arch.internvl.image_token_id
    third = build(seed=3, internvl_path=str(paths["internvl_hf"]), vae_path=str(f["vae"]))
    third.load_official(str(paths["openuni"]))
    assert_same(third, source)

    # (c) original-layout folder next to the source's config/code files: tensors equal the source file's
    orig = paths["internvl_original"]
    assert (orig / "modeling_internvl_chat.py").is_file() and (orig / "config.json").is_file()
    assert_same(load_file(str(orig / "model.safetensors")), load_file(str(f["orig"] / "model.safetensors")))


def test_internvl_processor_files_for_a_tokenizer_with_the_internvl_tokens(tmp_path):
    """A tokenizer holding InternVL's image/video tokens (as InternVL3-2B-hf's does) also gets the
    InternVLProcessor files: the tokenizer's extra special tokens and processor_config.json."""
    from transformers import AutoTokenizer

    from unimrg.models.openuni.weights import write_internvl_processor
    from unimrg.models.tokenizer import build_byte_tokenizer
    build_byte_tokenizer(["<img>", "</img>", "<IMG_CONTEXT>", "<video>"]).save_pretrained(tmp_path)
    written = write_internvl_processor(tmp_path, 448, 256, (0.5,) * 3, (0.5,) * 3)
    assert written == ["preprocessor_config.json", "processor_config.json"]
    assert json.loads((tmp_path / "processor_config.json").read_text())["image_seq_length"] == 256
    tok = AutoTokenizer.from_pretrained(str(tmp_path))            # what InternVLProcessor.__init__ reads
    assert tok.context_image_token == "<IMG_CONTEXT>" and tok.video_token == "<video>"
    assert tok.start_image_token_id == tok.convert_tokens_to_ids("<img>")
    assert write_internvl_processor(tmp_path, 448, 256, (0.5,) * 3, (0.5,) * 3) == []   # the folder's own stay


def test_export_command_from_a_trained_state_dict(official, tmp_path):
    from unimrg.eval import export
    source, f = official
    torch.save(source.state_dict(), tmp_path / "consolidated.pt")   # e.g. a ZeRO checkpoint consolidated to fp32
    paths = export.main(["--model", "openuni", "--state-dict", str(tmp_path / "consolidated.pt"), "--out",
                         str(tmp_path / "out"), "model.size=tiny", f"model.internvl_path={f['hf']}"])
    assert set(paths) == {"openuni", "internvl_hf"}                   # HF source: no original-layout folder
    back = build(seed=5, internvl_path=str(paths["internvl_hf"]), vae_path=str(f["vae"]))
    back.load_official(str(paths["openuni"]))
    assert_same(back, source)


def test_tiny_l1024_keeps_sana15_qk_norms_through_load_and_sample(tmp_path):
    source = build(seed=0, variant="l1024")
    f = write_official_folders(source, tmp_path / "official")
    norms = [k for k in torch.load(f["release"]) if ".norm_q." in k or ".norm_k." in k]
    assert len(norms) == 4 * source.arch.sana["num_layers"]              # attn1 + attn2, q and k
    model = build(seed=1, variant="openuni_l_internvl3_2b_sana_1_6b_1024_hf", internvl_path=str(f["orig"]),
                  vae_path=str(f["vae"]))
    report = model.load_official(str(f["release"]))
    assert report.missing == [] and report.unexpected == []
    assert_same(model, source)
    images = torch.randint(0, 256, (1, 3, 40, 40), dtype=torch.uint8)
    assert model.sample(images, ["depth"], num_steps=1).shape[-1] == model.arch.gen_image_size
    with pytest.raises(ValueError, match="norm_q"):                       # an L-512 model has no place for them
        build(seed=1, internvl_path=str(f["orig"]), vae_path=str(f["vae"])).load_official(str(f["release"]))
