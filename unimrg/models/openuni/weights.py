"""OpenUni's official weights in and out: key maps between the released layouts and this adapter.

Layouts handled (all local; nothing is downloaded):
- InternVL3-2B, original remote-code layout (OpenGVLab `InternVLChatModel`: `vision_model.*`, `mlp1.*`,
  `language_model.model.*`, `language_model.lm_head.weight`), converted by the rules of transformers'
  `convert_internvl_weights_to_hf.py` (the wheel does not ship the script; rules in notes/openuni.md).
- InternVL3-2B, transformers layout (`OpenGVLab/InternVL3-2B-hf` or any `save_pretrained` folder), loaded
  with transformers' own `from_pretrained`, which also remaps the legacy key layout it writes.
- SANA and DC-AE diffusers folders (`transformer/`, `vae/` of a pipeline folder, or the component folder).
- The OpenUni release checkpoint (wusize/OpenUni `scripts/deepspeed2torch.py`: a torch-saved state dict of
  `OpenUniInternVL3SANAHF`); the official model loads it with `load_state_dict(strict=False)` on top of the
  InternVL3 / SANA / DC-AE folders its config names. It holds only what OpenUni trained (see
  :data:`RELEASE_PREFIXES`); files that also carry `lmm.` (original InternVL layout) load too.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from unimrg.models.official_io import read_state_dict

LMM = "lmm."
# Keys of the released `openuni_*_blip3o60k.pth` files: OpenUni's trainer (`scripts/train.py`) saves DeepSpeed
# checkpoints with `exclude_frozen_parameters=True`, and the models freeze `lmm` (`freeze_lmm=True` in every
# config) and `vae` (`requires_grad_(False)` in `internvl3_sana_hf.py`), while the fine-tuning configs
# (`configs/finetune/*_blip3o60k.py`) set `freeze_transformer=False`. What remains: queries, connector, projector
# and SANA (L-512: 1.83B parameters, 3.7 GB in bf16 -- the release file's size).
RELEASE_PREFIXES = ("meta_queries", "connector.", "projector.", "transformer.")

# ---- InternVL: original layout <-> transformers layout (keys relative to the InternVL model) ----------
# Vision renames, applied in order to the part after `vision_model.` (transformers
# `convert_internvl_weights_to_hf.py`, vision rules).
_VISION_RULES = (
    (r"^embeddings\.class_embedding$", "embeddings.cls_token"),
    (r"^embeddings\.patch_embedding\.", "embeddings.patch_embeddings.projection."),
    (r"^embeddings\.position_embedding$", "embeddings.position_embeddings"),
    (r"^encoder\.layers\.(\d+)\.attn\.proj\.", r"encoder.layer.\1.attention.projection_layer."),
    (r"^encoder\.layers\.(\d+)\.attn\.(q_norm|k_norm)\.", r"encoder.layer.\1.attention.\2."),
    (r"^encoder\.layers\.(\d+)\.ls(\d)$", r"encoder.layer.\1.lambda_\2"),
    (r"^encoder\.layers\.(\d+)\.norm1\.", r"encoder.layer.\1.layernorm_before."),
    (r"^encoder\.layers\.(\d+)\.norm2\.", r"encoder.layer.\1.layernorm_after."),
    (r"^encoder\.layers\.(\d+)\.mlp\.", r"encoder.layer.\1.mlp."),
)
# ... and back (export); the fused qkv is split / concatenated separately.
_VISION_RULES_INV = (
    (r"^embeddings\.cls_token$", "embeddings.class_embedding"),
    (r"^embeddings\.patch_embeddings\.projection\.", "embeddings.patch_embedding."),
    (r"^embeddings\.position_embeddings$", "embeddings.position_embedding"),
    (r"^encoder\.layer\.(\d+)\.attention\.projection_layer\.", r"encoder.layers.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.(q_norm|k_norm)\.", r"encoder.layers.\1.attn.\2."),
    (r"^encoder\.layer\.(\d+)\.lambda_(\d)$", r"encoder.layers.\1.ls\2"),
    (r"^encoder\.layer\.(\d+)\.layernorm_before\.", r"encoder.layers.\1.norm1."),
    (r"^encoder\.layer\.(\d+)\.layernorm_after\.", r"encoder.layers.\1.norm2."),
    (r"^encoder\.layer\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
)
_QKV = re.compile(r"^encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)$")
# mlp1 is Sequential(LayerNorm, Linear, GELU, Linear) in InternVLChatModel.
_MLP1 = {"0": "layer_norm", "1": "linear_1", "3": "linear_2"}
_MLP1_INV = {v: k for k, v in _MLP1.items()}

VISION_HF, PROJ_HF, LLM_HF = "model.vision_tower.", "model.multi_modal_projector.", "model.language_model."


def internvl_original_to_hf(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Original InternVLChatModel keys → `InternVLForConditionalGeneration` keys.

    Returns the converted tensors and the original keys no rule knows (reported as unexpected)."""
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, t in state.items():
        if key.startswith("vision_model."):
            rest = key[len("vision_model."):]
            m = _QKV.match(rest)
            if m:  # fused qkv rows are [q; k; v]
                layer, kind = m.groups()
                for name, part in zip(("q_proj", "k_proj", "v_proj"), t.chunk(3, dim=0)):
                    out[f"{VISION_HF}encoder.layer.{layer}.attention.{name}.{kind}"] = part.clone()
                continue
            for pat, rep in _VISION_RULES:
                new, n = re.subn(pat, rep, rest)
                if n:
                    out[VISION_HF + new] = t
                    break
            else:
                unknown.append(key)
        elif key.startswith("mlp1."):
            idx, _, param = key[len("mlp1."):].partition(".")
            if idx in _MLP1:
                out[f"{PROJ_HF}{_MLP1[idx]}.{param}"] = t
            else:
                unknown.append(key)
        elif key.startswith("language_model.model."):
            out[LLM_HF + key[len("language_model.model."):]] = t
        elif key == "language_model.lm_head.weight":
            out["lm_head.weight"] = t
        else:
            unknown.append(key)
    return out, unknown


def internvl_hf_to_original(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`internvl_original_to_hf` (exact: q/k/v are concatenated back)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        if key.startswith(VISION_HF):
            rest = key[len(VISION_HF):]
            m = re.match(r"^encoder\.layer\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)$", rest)
            if m:
                layer, which, kind = m.groups()
                qkv.setdefault((layer, kind), {})[which] = t
                continue
            for pat, rep in _VISION_RULES_INV:
                new, n = re.subn(pat, rep, rest)
                if n:
                    out["vision_model." + new] = t
                    break
            else:
                raise KeyError(f"no original-layout name for {key}")
        elif key.startswith(PROJ_HF):
            mod, _, param = key[len(PROJ_HF):].partition(".")
            out[f"mlp1.{_MLP1_INV[mod]}.{param}"] = t
        elif key.startswith(LLM_HF):
            out["language_model.model." + key[len(LLM_HF):]] = t
        elif key == "lm_head.weight":
            out["language_model.lm_head.weight"] = t
        else:
            raise KeyError(f"no original-layout name for {key}")
    for (layer, kind), parts in qkv.items():
        out[f"vision_model.encoder.layers.{layer}.attn.qkv.{kind}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def internvl_layout(folder: str | Path) -> str:
    """"original" (InternVLChatModel remote code) or "transformers", from the folder's config.json."""
    cfg_file = Path(folder) / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"InternVL folder {folder}: no config.json (point model.internvl_path at the local "
                                "InternVL3-2B or InternVL3-2B-hf folder)")
    cfg = json.loads(cfg_file.read_text())
    if "llm_config" in cfg or "InternVLChatModel" in cfg.get("architectures", []):
        return "original"
    if cfg.get("model_type") == "internvl":
        return "transformers"
    raise ValueError(f"{cfg_file}: neither an original InternVL (architectures InternVLChatModel, llm_config) nor "
                     "a transformers InternVL config (model_type 'internvl'); got "
                     f"model_type={cfg.get('model_type')!r}")


class Source:
    """Tensors in this adapter's naming plus what the source itself knew to be missing/unexpected."""

    def __init__(self, what: str, state: dict[str, torch.Tensor], missing: Iterable[str] = (),
                 unexpected: Iterable[str] = ()):
        self.what, self.state = what, state
        self.missing, self.unexpected = list(missing), list(unexpected)


def read_internvl(folder: str | Path) -> Source:
    """InternVL3 weights from either layout, as ``lmm.*`` keys of this adapter."""
    layout = internvl_layout(folder)
    what = f"InternVL ({layout} layout) {folder}"
    if layout == "original":
        hf, unknown = internvl_original_to_hf(read_state_dict(folder, what))
        return Source(what, {LMM + k: v for k, v in hf.items()}, unexpected=[f"{k} (original name)" for k in unknown])
    from transformers import InternVLForConditionalGeneration
    model, info = InternVLForConditionalGeneration.from_pretrained(str(folder), output_loading_info=True)
    missing = sorted(info.get("missing_keys", ()))
    if info.get("mismatched_keys"):
        raise ValueError(f"{what}: shape mismatches {sorted(info['mismatched_keys'])[:10]}; does model.variant match "
                         "it (b512: InternVL3-1B; l512 / l1024: InternVL3-2B)?")
    state = {LMM + k: v for k, v in model.state_dict().items() if k not in missing}
    return Source(what, state, missing=[LMM + k for k in missing], unexpected=sorted(info.get("unexpected_keys", ())))


def read_diffusers(folder: str | Path, subfolder: str, expected: Mapping[str, Any], prefix: str) -> Source:
    """A diffusers model folder (or a pipeline folder holding ``subfolder``), checked against ``expected``
    config values (e.g. SANA's sample_size: a 1024 px checkpoint has the same shapes as the 512 px one)."""
    p = Path(folder)
    if (p / subfolder / "config.json").is_file():
        p = p / subfolder
    what = f"{subfolder} {p}"
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{what}: no config.json; point at the diffusers folder (or its parent pipeline "
                                f"folder holding {subfolder}/)")
    cfg = json.loads(cfg_file.read_text())
    wrong = [f"{k}={cfg[k]!r} (expected {_plain(v)!r})" for k, v in expected.items()
             if k in cfg and _plain(cfg[k]) != _plain(v)]
    if wrong:
        raise ValueError(f"{cfg_file}: not the architecture of this OpenUni variant: " + ", ".join(wrong)
                         + "; set model.variant to the release it belongs to (b512: Sana_600M_512px, l512: "
                         "Sana_1600M_512px, l1024: SANA1.5_1.6B_1024px)")
    state = read_state_dict(p, what)
    return Source(what, {prefix + k: v for k, v in state.items()})


def _plain(v: Any) -> Any:
    """JSON-comparable form (tuples → lists, recursively)."""
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def read_openuni_checkpoint(path: str | Path) -> Source:
    """The OpenUni release checkpoint (or this adapter's own export) as adapter keys."""
    what = f"OpenUni checkpoint {path}"
    state = read_state_dict(path, what, unwrap=("state_dict", "module", "model"))
    lmm = {k[len(LMM):]: v for k, v in state.items() if k.startswith(LMM)}
    rest = {k: v for k, v in state.items() if not k.startswith(LMM)}
    unexpected: list[str] = []
    if any(k.startswith(("vision_model.", "mlp1.", "language_model.")) for k in lmm):
        hf, unknown = internvl_original_to_hf(lmm)
        unexpected = [f"{LMM}{k} (original name)" for k in unknown]
    else:
        hf = lmm
    rest.update({LMM + k: v for k, v in hf.items()})
    return Source(what, rest, unexpected=unexpected)


def openuni_checkpoint_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adapter state dict → exactly the keys of the OpenUni release file (:data:`RELEASE_PREFIXES`); the LMM
    goes to InternVL folders beside it, the frozen DC-AE stays the public dc-ae-f32c32-sana-1.1."""
    return {k: v for k, v in state.items() if k == "meta_queries" or k.startswith(RELEASE_PREFIXES[1:])}


# The InternVL special tokens transformers' InternVLProcessor reads from the tokenizer (the
# `extra_special_tokens` of OpenGVLab/InternVL3-2B-hf `tokenizer_config.json`).
_PROCESSOR_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>",
                     "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}


def write_internvl_processor(folder: str | Path, image_size: int, image_seq_length: int, mean: Iterable[float],
                             std: Iterable[float]) -> list[str]:
    """Make a transformers InternVL folder self-contained: ``preprocessor_config.json`` (GotOcr2 image processor:
    one ``image_size`` tile, ImageNet statistics, bicubic -- what the adapter feeds InternViT) unless the folder
    has one, and, when its tokenizer holds InternVL's image/video tokens, their ``extra_special_tokens`` entries
    and ``processor_config.json`` (InternVLProcessor, ``image_seq_length``). Returns the files written."""
    from transformers.models.got_ocr2 import GotOcr2ImageProcessorPil
    folder, written = Path(folder), []
    if not (folder / "preprocessor_config.json").is_file():
        GotOcr2ImageProcessorPil(size={"height": image_size, "width": image_size}, crop_to_patches=False,
                                 image_mean=list(mean), image_std=list(std), resample=3).save_pretrained(folder)
        written.append("preprocessor_config.json")
    tok_cfg_file = folder / "tokenizer_config.json"
    if not tok_cfg_file.is_file() or (folder / "processor_config.json").is_file():
        return written
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(folder))
    unk = tok.unk_token_id
    ids = {t: tok.convert_tokens_to_ids(t) for t in _PROCESSOR_TOKENS.values()}
    if any(i is None or i == unk for i in ids.values()):
        return written   # e.g. the tiny byte tokenizer (no <video>): no processor without its tokens
    tok_cfg = json.loads(tok_cfg_file.read_text())
    extra = tok_cfg.get("extra_special_tokens") or {}
    if isinstance(extra, list):   # transformers 5 writes the plain special-token list here; keep it beside
        tok_cfg.setdefault("additional_special_tokens", extra)
        extra = {}
    tok_cfg["extra_special_tokens"] = {**_PROCESSOR_TOKENS, **extra}
    tok_cfg_file.write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")
    (folder / "processor_config.json").write_text(json.dumps(
        {"image_seq_length": image_seq_length, "processor_class": "InternVLProcessor"}, indent=2) + "\n")
    return written + ["processor_config.json"]


# Files of an InternVL folder that are not weights (configs, tokenizer, remote code, processor).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")


def copy_non_weight_files(src: str | Path, dst: str | Path, overwrite: bool) -> list[str]:
    """Copy config / tokenizer / processor / code files (not weights or weight indexes) of ``src``."""
    copied = []
    for f in sorted(Path(src).iterdir()):
        if not overwrite and (Path(dst) / f.name).exists():
            continue
        if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES) and not f.name.endswith(".index.json"):
            shutil.copy2(f, Path(dst) / f.name)
            copied.append(f.name)
    return copied
