"""Janus-Pro (SigLIP-L + DeepSeek-LLM + VQ-16) behind the UniMRG adapter protocol, on transformers' own
``JanusForConditionalGeneration``.

    python launch/submit.py --model janus --recipe tiny --cluster local --run-dir runs/janus_tiny

Facts from deepseek-ai/Janus (`janus/models/modeling_vlm.py`, `processing_vlm.py`, `generation_inference.py`)
and the release configs (deepseek-ai/Janus-Pro-1B and -7B `config.json`, as converted by transformers'
`convert_janus_weights_to_hf.py`; deepseek-community/Janus-Pro-1B). The adapter holds the HF model as
``janus``: state-dict keys are ``janus.`` + the keys of an HF Janus folder, so a folder loads and exports
one to one (a deepseek-ai release folder is renamed on load). Understanding reads SigLIP features through
``aligner`` and scores text with ``lm_head``; generation feeds VQ codes through ``generation_embeddings`` →
``generation_aligner`` and scores them with ``generation_head`` (next-token CE over the target's codes),
conditioned -- the UniMRG rule -- on the input image's SigLIP features and the prompt in the chat layout.
SigLIP and the VQ tokenizer are frozen.

ZeRO-3: every weight is used through a submodule's forward (the codebook too: it is read through the
``Embedding``'s forward), so DeepSpeed's hooks gather partitioned parameters.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import (JanusConfig, JanusForConditionalGeneration, JanusVisionConfig, JanusVQVAEConfig,
                          LlamaConfig, PreTrainedTokenizerBase)

from unimrg.data.batches import GenerationBatch, UnderstandingBatch
from unimrg.data.llava import dialogue_turns
from unimrg.data.transforms import Fit, ImageTransforms, resize_tensor
from unimrg.models.base import ModelConfig, Resolution, UMMAdapter
from unimrg.models.official_io import LoadReport, load_checked, read_state_dict
from unimrg.models.sequences import IGNORE_INDEX, cut_conversation, pad_right

# Janus-Pro tokenizer (deepseek-ai/Janus `processing_vlm.py` VLChatProcessor and the "deepseek" chat template:
# roles "<|User|>" / "<|Assistant|>", separators "\n\n" after a user turn and the EOS after an answer).
IMAGE, BOI, EOI = "<image_placeholder>", "<begin_of_image>", "<end_of_image>"
BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
USER, ASSISTANT = "<|User|>", "<|Assistant|>"
SYSTEM_PROMPT = ("You are a helpful language and vision assistant. You are able to understand the visual content "
                 "that the user provides, and assist the user with a variety of tasks using natural language.")
# Janus-Pro preprocessor_config.json: SigLIP statistics 0.5 / 0.5; non-square images are padded with grey 127.
MEAN, STD, BACKGROUND = 0.5, 0.5, 127
# Published sizes (parameters, from the bf16 release files: Janus-Pro-1B pytorch_model.bin 4.18 GB, Janus-Pro-7B
# two shards 9.99 + 4.85 GB; both include SigLIP's attention-pooling head, which the HF layout drops).
PUBLISHED_BILLIONS = {"1b": 2.09, "7b": 7.42}
# deepseek-ai/Janus-Pro-{1B,7B} config.json `language_config` / `aligner_config` (n_embed = LLM width).
LLM = {"1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16),
       "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=30, num_attention_heads=32)}


@dataclass
class JanusModelConfig(ModelConfig):
    """Janus-Pro. ``checkpoint``: a local HF Janus folder (deepseek-community/Janus-Pro-1B or -7B layout:
    config.json, model*.safetensors, tokenizer and processor files), or a file with its keys."""

    name: str = "janus"
    variant: str = "1b"                 # full size: "1b" (Janus-Pro-1B) | "7b" (Janus-Pro-7B)
    tokenizer: str | None = None        # full size: local tokenizer folder (default: the checkpoint folder)
    # None = Janus' VLChatProcessor system prompt at full size, none at tiny size (short tiny sequences).
    system_message: str | None = None
    max_length: int = 2048              # understanding tokens per conversation (longer ones are cut)
    max_prompt_len: int = 128           # generation prompt text tokens


def build_arch(cfg: JanusModelConfig, vocab_size: int = 102400, image_token_id: int = 100581) -> JanusConfig:
    """The HF config of ``cfg.size`` / ``cfg.variant``. Full: SigLIP-L/16 at 384 px (24 × 24 = 576 features),
    VQ-16 with 16,384 8-dim codes (576 codes per 384-px image), DeepSeek-LLM with an untied head (the
    release's LlamaForCausalLM). Tiny: the same structure with SigLIP at 32 px, VQ at 16 px, 16 tokens per
    image, 64 codes."""
    if cfg.size == "full":
        if cfg.variant not in LLM:
            raise ValueError(f"Janus: unknown model.variant={cfg.variant!r}; use one of {sorted(LLM)}")
        llm = LLM[cfg.variant]
        text = LlamaConfig(vocab_size=vocab_size, num_key_value_heads=llm["num_attention_heads"],
                           max_position_embeddings=16384, rms_norm_eps=1e-6, tie_word_embeddings=False,
                           bos_token_id=100000, eos_token_id=100001, pad_token_id=100002, **llm)
        vision = JanusVisionConfig(projection_dim=llm["hidden_size"], depth=2)   # SigLIP-L/16-384 (HF defaults)
        vq = JanusVQVAEConfig(embed_dim=8, num_embeddings=16384, projection_dim=llm["hidden_size"],
                              image_token_embed_dim=llm["hidden_size"])          # VQ-16 (HF defaults)
    elif cfg.size == "tiny":
        text = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                           rms_norm_eps=1e-6, tie_word_embeddings=False)
        vision = JanusVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, image_size=32,
                                   patch_size=8, mlp_ratio=2.0, projection_dim=32, depth=2, num_image_tokens=16)
        # GroupNorm(32) needs 32 channels; two downsamplings map 16 px onto SigLIP's 4 × 4 grid (the grids
        # must match: HF sets the VQ grid from SigLIP's). Few VQ modules keep ZeRO-3's per-module hooks cheap.
        vq = JanusVQVAEConfig(embed_dim=8, num_embeddings=64, latent_channels=32, base_channels=32,
                              channel_multiplier=[1, 1, 1], num_res_blocks=1, projection_dim=32,
                              image_token_embed_dim=32)
    else:
        raise ValueError(f"Janus: unknown model.size={cfg.size!r}; use 'tiny' or 'full'")
    if cfg.smoke:
        raise ValueError("Janus has no paper-shape smoke variant (model.smoke=true); use model.size=tiny")
    config = JanusConfig(text_config=text, vision_config=vision, vq_config=vq, image_token_id=image_token_id,
                         tie_word_embeddings=False)
    for c in (config, config.text_config, config.vision_config, config.vq_config):
        c._attn_implementation = "sdpa"
    return config


def _resolution(config: JanusConfig) -> int:
    """Generation side: the VQ grid equals SigLIP's patch grid (HF sets vq num_patches from it)."""
    return config.vq_config.num_patches * 2 ** (len(config.vq_config.channel_multiplier) - 1)


def build_tokenizer(cfg: JanusModelConfig) -> PreTrainedTokenizerBase | None:
    """Byte tokenizer with Janus' special tokens (tiny), or the local Janus-Pro tokenizer (full)."""
    if cfg.size == "tiny":
        from unimrg.models.tokenizer import build_byte_tokenizer
        tok = build_byte_tokenizer((BOS, EOS, PAD, IMAGE, BOI, EOI, USER, ASSISTANT), pad_token=PAD, eos_token=EOS)
        tok.bos_token = BOS
    else:
        folder = cfg.tokenizer or (cfg.checkpoint if cfg.checkpoint and Path(cfg.checkpoint).is_dir() else None)
        if folder is None:
            return None   # meta-device builds and weight conversion need no tokenizer; the losses ask for it
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"model.tokenizer={folder!r} is not a folder; point it at a local Janus-Pro "
                                    "folder (tokenizer.json, tokenizer_config.json)")
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(folder)
    if getattr(tok, "image_token", None) is None:   # what JanusProcessor reads (HF-converted folders have it)
        tok._set_model_specific_special_tokens(special_tokens={"image_token": IMAGE, "boi_token": BOI,
                                                               "eoi_token": EOI})
    return tok


class Janus(UMMAdapter):
    """UniMRG adapter for Janus-Pro. ``Janus(JanusModelConfig(size="tiny"))`` builds a random tiny model."""

    config_class = JanusModelConfig
    tokenizer_setting = "model.tokenizer=<local Janus-Pro folder> (or model.checkpoint=<that folder>)"
    official_sources = {"checkpoint": ("janus.",)}

    def __init__(self, cfg: JanusModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = build_tokenizer(cfg)
        tok = self.tokenizer
        if cfg.size == "tiny":
            self.config = build_arch(cfg, vocab_size=len(tok), image_token_id=tok.convert_tokens_to_ids(IMAGE))
            text = self.config.text_config   # the built-in tokenizer's ids (the generation config copies them)
            text.bos_token_id, text.eos_token_id, text.pad_token_id = tok.convert_tokens_to_ids([BOS, EOS, PAD])
        else:
            self.config = build_arch(cfg)
        if tok is not None:
            _check_tokenizer(tok, self.config, cfg.tokenizer or cfg.checkpoint)
        self.system_message = (SYSTEM_PROMPT if cfg.size == "full" else "") \
            if cfg.system_message is None else cfg.system_message
        self.janus = JanusForConditionalGeneration(self.config)

    # ---- protocol ------------------------------------------------------------------------------
    @classmethod
    def native_resolution(cls, cfg: JanusModelConfig) -> Resolution:
        # Full: SigLIP-L reads 384 px (Janus-Pro `preprocessor_config.json` image_size 384, vision_config
        # `siglip_large_patch16_384`) and VQ-16 generates 384 px (`generation_inference.py`: img_size 384,
        # 576 tokens). Tiny: 32 px in, 16 px out.
        config = build_arch(cfg)   # shapes only
        return Resolution(config.vision_config.image_size, _resolution(config))

    # Released preprocessing. SigLIP input (understanding, and the generation condition, which goes through the
    # same SigLIP): longer side to 384 (bicubic), centred grey-127 padding, shorter side at least 14 px --
    # deepseek-ai/Janus `janus/models/image_processing_vlm.py` (VLMImageProcessor: resize + expand2square with
    # background_color = mean · 255, min_size 14), transformers' JanusImageProcessor alike. VQ targets: Janus'
    # generation training code is not released; its VQ-16 is LlamaGen's, whose `center_crop_arr` resizes the
    # shorter side (bicubic) and crops the centre (offset (d) // 2).
    release_transforms = ImageTransforms(
        understanding=Fit("long_side_pad", fill=BACKGROUND, min_side=14),
        condition=Fit("long_side_pad", fill=BACKGROUND, min_side=14),
        target=Fit("short_side_crop", offset="floor"),
        source="Janus VLMImageProcessor resize + expand2square (grey 127); LlamaGen center_crop_arr for VQ targets")

    @classmethod
    def sequence_plan(cls, cfg: JanusModelConfig, task: str) -> dict[str, int]:
        config = build_arch(cfg)   # shapes only
        n = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
        if task == "und":
            return {"image tokens": n, "sequence ≤": cfg.max_length}
        # <bos><|User|>: <boi> SigLIP <eoi>\n prompt \n\n<|Assistant|>:<boi> codes
        return {"condition image tokens": n, "target tokens": config.vq_config.num_patches ** 2,
                "prompt tokens ≤": cfg.max_prompt_len,
                "sequence ≤": n + cfg.max_prompt_len + config.vq_config.num_patches ** 2 + 16}

    def frozen_module_names(self) -> list[str]:
        # UniMRG: the understanding encoder (SigLIP, not shared with generation) and the VQ tokenizer.
        return ["janus.model.vision_model", "janus.model.vqmodel"]

    def understanding_module_names(self) -> list[str]:
        """What only understanding uses: SigLIP, its aligner and the text head (the LLM is shared with
        generation, as in Show-o, so a stage that freezes 'understanding' keeps training it)."""
        return ["janus.model.vision_model", "janus.model.aligner", "janus.lm_head"]

    @property
    def num_image_tokens(self) -> int:
        v = self.config.vision_config
        return (v.image_size // v.patch_size) ** 2

    @property
    def num_codes(self) -> int:
        return self.config.vq_config.num_patches ** 2

    # ---- the losses -----------------------------------------------------------------------------
    def understanding_loss(self, batch: UnderstandingBatch) -> torch.Tensor:
        device, _ = self._device_dtype()
        with_image = batch.image_mask().to(device)
        # The vision path runs on every image (text-only placeholders too, joined with weight 0) so every
        # rank runs the same modules whatever its text/image mix, as ZeRO's collectives require.
        feats = self.image_features(batch.images)                           # (B, n, hidden)
        ids, labels, mask = self._conversation_ids(batch)
        ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
        embeds = self._embed_with_images(ids, feats[with_image])
        hidden = self.janus.model.language_model(inputs_embeds=embeds, attention_mask=mask.long(),
                                                 use_cache=False).last_hidden_state
        rows, cols = torch.nonzero(labels[:, 1:] != IGNORE_INDEX, as_tuple=True)
        logits = self.janus.lm_head(hidden[rows, cols])                     # (M, vocab)
        loss = F.cross_entropy(logits.float(), labels[rows, cols + 1])
        if not bool(with_image.all()):
            loss = loss + feats[~with_image].sum() * 0.0
        return loss

    def generation_loss(self, batch: GenerationBatch) -> torch.Tensor:
        """Next-token CE over the target's VQ codes (the release's t2i loss through ``generation_head``),
        after <bos><|User|>: <boi>[SigLIP of the input image]<eoi>\\n{prompt}\\n\\n<|Assistant|>:<boi>."""
        self._check(batch.images, batch.prompts, batch.task, batch.keys)
        if batch.targets.shape[0] != len(batch):
            raise ValueError(f"Janus {batch.task}: {len(batch)} images but {batch.targets.shape[0]} targets")
        codes = self.encode_targets(batch.targets)                          # (B, n_codes)
        embeds, mask = self._generation_prefix(batch.images, batch.prompts)  # (B, P, H), right-padded
        gen = self._code_embeds(codes[:, :-1]).to(embeds.dtype)             # (B, n_codes - 1, H)
        p = embeds.shape[1]
        embeds = torch.cat([embeds, gen], dim=1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], gen.shape[1])], dim=1)
        # Right padding sits between prompt and codes; positions skip it (every row's codes start at once).
        pos = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
        hidden = self.janus.model.language_model(inputs_embeds=embeds, attention_mask=mask.long(),
                                                 position_ids=pos, use_cache=False).last_hidden_state
        logits = self.janus.model.generation_head(hidden[:, p - 1:])        # (B, n_codes, K)
        return F.cross_entropy(logits.float().flatten(0, 1), codes.flatten())

    # ---- pieces shared by training and inference -------------------------------------------------
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) → SigLIP last-layer patch features through ``aligner``, (B, n, LLM hidden).
        SigLIP is frozen (no graph); the aligner trains."""
        device, dtype = self._device_dtype()
        pixels = self.transform_images(images).to(device=device, dtype=dtype)
        with torch.no_grad():
            feats = self.janus.model.vision_model(pixel_values=pixels).last_hidden_state
        return self.janus.model.aligner(feats.to(dtype))

    def transform_images(self, images: torch.Tensor) -> torch.Tensor:
        """Janus' VLMImageProcessor: resize the longer side to SigLIP's size (bicubic), pad the shorter one
        to a centred square with grey 127, normalise with mean 0.5 / std 0.5. uint8 → float (B, 3, S, S).
        Loader images arrive already fitted (``release_transforms``), so only the normalisation (and a resize
        when model.image_size is not SigLIP's) applies; this geometry serves inputs from elsewhere."""
        if images.dtype != torch.uint8:
            raise TypeError(f"Janus expects uint8 images (B, 3, H, W), got {images.dtype}")
        size = self.config.vision_config.image_size
        x = images.float() / 255.0
        h, w = x.shape[-2:]
        if (h, w) != (size, size):
            s = size / max(h, w)
            nh, nw = max(round(h * s), min(14, size)), max(round(w * s), min(14, size))   # min_size 14
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
            top, left = (size - nh) // 2, (size - nw) // 2
            x = F.pad(x, (left, size - nw - left, top, size - nh - top), value=BACKGROUND / 255.0)
        return (x - MEAN) / STD

    def encode_targets(self, targets: torch.Tensor) -> torch.Tensor:
        """Float [0, 1] (B, 3, H, W) → VQ-16 codes (B, n_codes). VQ-16 quantises with an L2-normalised
        codebook (LlamaGen `VectorQuantizer`, `codebook_l2_norm=True`; HF's decode normalises entries the
        same way): nearest code by cosine similarity. Frozen, no graph."""
        device, dtype = self._device_dtype()
        size = _resolution(self.config)
        x = resize_tensor(targets.to(device=device, dtype=torch.float32), size)
        vq = self.janus.model.vqmodel
        with torch.no_grad():
            z = vq.quant_conv(vq.encoder((x * 2 - 1).to(dtype)))             # (B, 8, g, g)
            z = F.normalize(z.permute(0, 2, 3, 1).flatten(1, 2).float(), dim=-1)   # (B, g·g, 8)
            k = self.config.vq_config.num_embeddings
            book = F.normalize(vq.quantize.embedding(torch.arange(k, device=device)).float(), dim=-1)
            return (z @ book.T).argmax(dim=-1)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, n_codes) → float images in [0, 1], (B, 3, R, R). HF's ``JanusVQVAE.decode`` maths
        (L2-normalised entries → post_quant_conv → decoder), without its read of ``embedding.weight.shape``
        (0 under ZeRO-3)."""
        vq, g = self.janus.model.vqmodel, self.config.vq_config.num_patches
        with torch.no_grad():
            entry = F.normalize(vq.quantize.embedding(codes), p=2, dim=-1)   # (B, g·g, embed_dim)
            entry = entry.view(codes.shape[0], g, g, -1).permute(0, 3, 1, 2).contiguous()
            x = vq.decoder(vq.post_quant_conv(entry))
        return ((x.float() + 1) / 2).clamp(0, 1)

    def _code_embeds(self, codes: torch.Tensor) -> torch.Tensor:
        return self.janus.model.generation_aligner(self.janus.model.generation_embeddings(codes))

    def _embed_with_images(self, ids: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        embeds = self.janus.get_input_embeddings()(ids)
        slots = (ids == self.config.image_token_id).unsqueeze(-1)
        return embeds.masked_scatter(slots, feats.to(embeds.dtype))

    def _generation_prefix(self, images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded condition embeddings (B, P, H) with the image features placed, and their mask."""
        device, _ = self._device_dtype()
        feats = self.image_features(images)
        tok = self._tok()
        seqs = []
        for prompt in prompts:
            text = self._encode(prompt.strip())[:self.cfg.max_prompt_len] if prompt.strip() else []
            seqs.append([tok.convert_tokens_to_ids(BOS)] + self._user_head() + self._image_block()
                        + self._encode("\n") + text + self._encode("\n\n")
                        + self._encode(f"{ASSISTANT}:") + [tok.convert_tokens_to_ids(BOI)])
        ids, mask = pad_right(seqs, self._pad_id())
        ids, mask = ids.to(device), mask.to(device)
        return self._embed_with_images(ids, feats), mask

    # ---- inference ------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, images: torch.Tensor, prompts: Sequence[str], *, seed: int = 0, cfg_weight: float = 5.0,
               temperature: float = 1.0) -> torch.Tensor:
        """Janus' CFG sampler (`generation_inference.py`): each code is drawn from
        softmax((uncond + w·(cond − uncond)) / T) of ``generation_head``, KV-cached, one code per step;
        the unconditional branch is the same image with an empty prompt (UniMRG's condition rule). Defaults:
        the release's w = 5, T = 1. Seeded by ``seed`` alone. Returns (B, 3, R, R) in [0, 1]."""
        from unimrg.models.decoding import left_align
        self._check(images, prompts, "sample")
        device, dtype = self._device_dtype()
        b = images.shape[0]
        gen = torch.Generator(device=device).manual_seed(seed)
        with self.evaluating():
            embeds, mask = self._generation_prefix(torch.cat([images, images]), [*prompts, *[""] * b])
            mask, embeds = left_align(mask, embeds)
            body, head = self.janus.model.language_model, self.janus.model.generation_head
            pos = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
            out = body(inputs_embeds=embeds, attention_mask=mask.long(), position_ids=pos, use_cache=True)
            next_pos = mask.long().sum(dim=1, keepdim=True)
            seen = mask.long()
            codes = torch.zeros(b, self.num_codes, dtype=torch.long, device=device)
            for i in range(self.num_codes):
                logits = head(out.last_hidden_state[:, -1]).float()
                cond, uncond = logits.chunk(2)
                probs = torch.softmax((uncond + cfg_weight * (cond - uncond)) / temperature, dim=-1)
                codes[:, i] = torch.multinomial(probs, 1, generator=gen)[:, 0]
                if i == self.num_codes - 1:
                    break
                seen = torch.cat([seen, seen.new_ones(2 * b, 1)], dim=1)
                step = self._code_embeds(torch.cat([codes[:, i], codes[:, i]])[:, None]).to(dtype)
                out = body(inputs_embeds=step, attention_mask=seen, position_ids=next_pos, cache=out.cache,
                           use_cache=True)
                next_pos = next_pos + 1
            return self.decode_codes(codes)

    @torch.no_grad()
    def answer(self, images: torch.Tensor, questions: Sequence[str], max_new_tokens: int = 32, *,
               early_stop: bool = True) -> list[str]:
        """Greedy answers in Janus' chat layout ([system\\n\\n]<|User|>: <boi>SigLIP<eoi>\\n{q}\\n\\n<|Assistant|>:)."""
        from unimrg.models.decoding import greedy_answers, left_align
        if len(questions) != images.shape[0]:
            raise ValueError(f"Janus answer: {images.shape[0]} images but {len(questions)} questions")
        device, _ = self._device_dtype()
        tok = self._tok()
        with self.evaluating():
            feats = self.image_features(images)
            seqs = [[tok.convert_tokens_to_ids(BOS)] + self._system_ids() + self._user_head() + self._image_block()
                    + self._encode(f"\n{q.strip()}\n\n{ASSISTANT}:") for q in questions]
            ids, mask = pad_right(seqs, self._pad_id())
            ids, mask = ids.to(device), mask.to(device)
            embeds = self._embed_with_images(ids, feats)
            mask, embeds = left_align(mask, embeds)
            return greedy_answers(tok, self.janus.model.language_model, self.janus.lm_head,
                                  self.janus.get_input_embeddings(), embeds, mask,
                                  stop_ids=[tok.convert_tokens_to_ids(EOS)], max_new_tokens=max_new_tokens,
                                  early_stop=early_stop)

    # ---- official weights -----------------------------------------------------------------------
    def load_official(self, path: str | None = None, *, allow_missing: Sequence[str] = ()) -> LoadReport:
        """An HF Janus folder (``save_pretrained`` / deepseek-community layout: ``model.*``, ``lm_head.*``), a
        deepseek-ai release folder (deepseek-ai/Janus-Pro-1B: ``vision_model.vision_tower.*``,
        ``gen_vision_model.*``, ``language_model.*``, converted on the fly by :func:`original_to_hf`), or a
        file with either's keys (``janus.``-prefixed adapter keys and ``module.`` wrappers are accepted).
        Refuses a folder whose config.json describes another architecture."""
        path = path or self.cfg.checkpoint
        if not path:
            raise ValueError("Janus.load_official: set model.checkpoint to a local HF Janus-Pro folder")
        self._check_hf_config(Path(path))
        state = read_state_dict(path, "Janus checkpoint (model.checkpoint)")
        if any(k.startswith(ORIGINAL_PREFIXES) for k in state):
            state = original_to_hf(state)     # a deepseek-ai release folder (MultiModalityCausalLM)

        def rename(k: str) -> str | None:
            if k.startswith(IGNORED_ORIGINAL):
                return None
            return k[len("janus."):] if k.startswith("janus.") else k
        report = load_checked(self.janus, state, f"Janus {path}", rename=rename, prefix="janus.")
        return self.check_load(report, allow_missing)

    def export_official(self, out_dir: str | Path) -> dict[str, Path]:
        """``out_dir/janus_hf/``: a folder ``JanusForConditionalGeneration.from_pretrained`` and
        ``JanusProcessor.from_pretrained`` load offline (config, weights, tokenizer, image processor)."""
        from transformers import JanusImageProcessor, JanusProcessor
        if any(hasattr(p, "ds_id") for p in self.parameters()):
            raise RuntimeError("Janus.export_official: parameters are partitioned by ZeRO-3; load the consolidated "
                               "state dict into a plain model first (python -m unimrg.eval.export)")
        out = Path(out_dir) / "janus_hf"
        if self.tokenizer is not None:
            # What HF's image generation reads (transformers' converter sets the same): CFG 5, T 1, the
            # <begin_of_image> and pad ids.
            gen, tok = self.janus.generation_config, self.tokenizer
            gen.guidance_scale, gen.temperature = 5.0, 1.0
            gen.pad_token_id = tok.convert_tokens_to_ids(PAD)
            gen.boi_token_id = tok.convert_tokens_to_ids(BOI)
            gen.generation_kwargs = {"boi_token_id": gen.boi_token_id}
            gen._from_model_config = False   # else from_pretrained rebuilds it from config.json, dropping these
        self.janus.save_pretrained(out)
        if self.tokenizer is not None:
            size = self.config.vision_config.image_size
            image_processor = JanusImageProcessor(size={"height": size, "width": size}, image_mean=[MEAN] * 3,
                                                  image_std=[STD] * 3)
            JanusProcessor(image_processor=image_processor, tokenizer=self.tokenizer,
                           num_image_tokens=self.num_image_tokens).save_pretrained(out)
        return {"janus": out}

    def _check_hf_config(self, path: Path) -> None:
        cfg_file = path / "config.json" if path.is_dir() else path.parent / "config.json"
        if not cfg_file.is_file():
            return
        theirs = json.loads(cfg_file.read_text())
        kind = theirs.get("model_type")
        if kind not in ("janus", "multi_modality"):
            raise ValueError(f"{cfg_file}: model_type={kind!r}, expected 'janus' (an HF Janus folder such as "
                             "deepseek-community/Janus-Pro-1B) or 'multi_modality' (deepseek-ai/Janus-Pro-1B)")
        ours = self.config.text_config
        section = "text_config" if kind == "janus" else "language_config"
        text = theirs.get(section, {})
        bad = [f"{section}.{k}={text[k]} (ours {getattr(ours, k)})"
               for k in ("hidden_size", "num_hidden_layers", "vocab_size") if k in text and text[k] != getattr(ours, k)]
        if bad:
            raise ValueError(f"{cfg_file}: this Janus checkpoint does not match the model: {', '.join(bad)}; "
                             "set model.size / model.variant (1b, 7b) to the checkpoint's")

    # ---- sequences ------------------------------------------------------------------------------
    def _user_head(self) -> list[int]:
        return self._encode(f"{USER}: ")

    def _image_block(self) -> list[int]:
        tok = self._tok()
        return ([tok.convert_tokens_to_ids(BOI)] + [self.config.image_token_id] * self.num_image_tokens
                + [tok.convert_tokens_to_ids(EOI)])

    def _system_ids(self) -> list[int]:
        return self._encode(f"{self.system_message}\n\n") if self.system_message else []

    def _conversation_ids(self, batch: UnderstandingBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The "deepseek" template: <bos>[system\\n\\n]<|User|>: q\\n\\n<|Assistant|>: a<eos><|User|>: ...;
        the image block replaces the first <image> (or leads the first question). Labels on each answer
        and its EOS. Right-padded ids, labels (B, L) and mask (B, L) bool."""
        tok = self._tok()
        eos = tok.convert_tokens_to_ids(EOS)
        all_ids, all_labels = [], []
        with_image = batch.image_mask().tolist()
        for i, conv in enumerate(batch.conversations):
            key = batch.keys[i] if i < len(batch.keys) else f"#{i}"
            ids = [tok.convert_tokens_to_ids(BOS)] + self._system_ids()
            labels = [IGNORE_INDEX] * len(ids)
            placed = not with_image[i]
            for role, value in dialogue_turns(conv, key):
                value = value.strip()                    # the template strips each message
                if role == "human":
                    t = self._user_head()
                    if not placed:
                        before, _, after = (value if "<image>" in value else "<image>\n" + value).partition("<image>")
                        t += self._encode(before) + self._image_block() + self._encode(after.replace("<image>", ""))
                        placed = True
                    else:
                        t += self._encode(value.replace("<image>", "").strip())  # one image per sample
                    t += self._encode(f"\n\n{ASSISTANT}:")
                    labels += [IGNORE_INDEX] * len(t)
                else:
                    t = self._encode(f" {value}") + [eos]
                    labels += t
                ids += t
            ids, labels = cut_conversation(key, ids, labels, self.cfg.max_length,
                                           image_token_id=self.config.image_token_id,
                                           image_tokens=self.num_image_tokens if with_image[i] else 0)
            all_ids.append(ids)
            all_labels.append(labels)
        ids, mask = pad_right(all_ids, self._pad_id())
        labels, _ = pad_right(all_labels, IGNORE_INDEX)
        return ids, labels, mask

    # ---- internals ------------------------------------------------------------------------------
    def _device_dtype(self) -> tuple[torch.device, torch.dtype]:
        # Metadata only: under ZeRO-3 a partitioned parameter keeps its dtype and device.
        p = self.janus.model.aligner.fc1.weight
        return p.device, p.dtype

    def _pad_id(self) -> int:
        return self._tok().convert_tokens_to_ids(PAD)

    def _check(self, images: torch.Tensor, prompts: Sequence[str], task: str, keys: Sequence[str] = ()) -> None:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"Janus {task}: {images.shape[0]} images but {len(prompts)} prompts (keys "
                             f"{list(keys)[:3]}...); the objective must fill GenerationBatch.prompts "
                             "(\"\" for unconditional)")


# ---- the deepseek-ai release layout (MultiModalityCausalLM: timm SigLIP, LlamaGen VQ-16, LlamaForCausalLM) ----
ORIGINAL_PREFIXES = ("vision_model.vision_tower.", "gen_vision_model.", "language_model.model.")
IGNORED_ORIGINAL = ("ignored:",)   # keys original_to_hf marks as having no HF place
# (original prefix, HF prefix), first match wins; module names inside follow below.
_ORIGINAL_TOP = (("vision_model.vision_tower.blocks.", "model.vision_model.encoder.layers."),
                 ("vision_model.vision_tower.patch_embed.proj.", "model.vision_model.embeddings.patch_embedding."),
                 ("vision_model.vision_tower.norm.", "model.vision_model.post_layernorm."),
                 ("aligner.layers.0.", "model.aligner.fc1."), ("aligner.layers.2.", "model.aligner.hidden_layers.0."),
                 ("gen_aligner.layers.0.", "model.generation_aligner.fc1."),
                 ("gen_aligner.layers.2.", "model.generation_aligner.hidden_layers.0."),
                 ("gen_head.output_mlp_projector.", "model.generation_head.proj_out."),
                 ("gen_head.vision_head.", "model.generation_head.vision_head."),
                 ("gen_embed.", "model.generation_embeddings."), ("gen_vision_model.", "model.vqmodel."),
                 ("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."))
# Renames inside SigLIP (timm) blocks and inside the VQ (LlamaGen) encoder / decoder.
_ORIGINAL_INNER = {"model.vision_model.": ((".attn.proj.", ".self_attn.projection_layer."),
                                           (".norm1.", ".layer_norm1."), (".norm2.", ".layer_norm2.")),
                   "model.vqmodel.": (("encoder.conv_blocks.", "encoder.down."),
                                      ("decoder.conv_blocks.", "decoder.up."), (".res.", ".block."),
                                      (".mid.0.", ".mid.block_1."), (".mid.1.", ".mid.attn_1."),
                                      (".mid.2.", ".mid.block_2."))}


def original_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A deepseek-ai Janus(-Pro) state dict (`janus/models/modeling_vlm.py` names) → HF Janus keys: SigLIP's
    fused qkv split into q/k/v, its (1, N, C) position table squeezed, LlamaGen's conv_blocks → down / up.
    SigLIP's attention-pooling head and the VQ's codebook_used statistic have no HF place (ignored)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if (k.startswith("vision_model.vision_tower.attn_pool.") or k.endswith("quantize.codebook_used")
                or k.endswith("rotary_emb.inv_freq")):                # recomputed buffers in older saves
            out[f"ignored:{k}"] = v
            continue
        if k == "vision_model.vision_tower.pos_embed":
            out["model.vision_model.embeddings.position_embedding.weight"] = v.squeeze(0)
            continue
        new = next((hf + k[len(o):] for o, hf in _ORIGINAL_TOP if k.startswith(o)), k)
        for prefix, pairs in _ORIGINAL_INNER.items():
            if new.startswith(prefix):
                for a, b in pairs:
                    new = new.replace(a, b)
        if new.startswith("model.vision_model.") and ".attn.qkv." in new:
            for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
                out[new.replace(".attn.qkv.", f".self_attn.{name}.")] = part
            continue
        out[new] = v
    return out


def _check_tokenizer(tok: PreTrainedTokenizerBase, config: JanusConfig, where: str | None) -> None:
    unk = tok.unk_token_id
    for t in (IMAGE, BOI, EOI, BOS, EOS, PAD):
        i = tok.convert_tokens_to_ids(t)
        if i is None or (unk is not None and i == unk):
            raise ValueError(f"tokenizer {where or '(built-in)'} lacks the special token {t!r}; use the Janus-Pro "
                             "tokenizer folder")
    if tok.convert_tokens_to_ids(IMAGE) != config.image_token_id:
        raise ValueError(f"tokenizer {where}: {IMAGE} has id {tok.convert_tokens_to_ids(IMAGE)}, the model expects "
                         f"{config.image_token_id}; use the Janus-Pro tokenizer")
    if len(tok) > config.text_config.vocab_size:
        raise ValueError(f"tokenizer {where}: {len(tok)} tokens but the model's vocabulary is "
                         f"{config.text_config.vocab_size}")
