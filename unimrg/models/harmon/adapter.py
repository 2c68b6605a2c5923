"""Harmon (Qwen2.5 LLM + shared MAR encoder/decoder + per-token diffusion head + KL-16 VAE) behind the
UniMRG adapter protocol.

Structure and losses follow wusize/Harmon `src/models/harmon.py` / `harmon_dev.py` and UniMRG's own
Harmon code (Sugewud/UniMRG `Harmon/src/models/harmon_dev.py`: `image2text_loss`, `edit_loss`, which
the depth, mask and reconstruction tasks use). Attribute names are the official top-level prefixes
(`llm`, `mar`, `proj_in`, `proj_out`, `vae`), so `harmon_1.5b.pth` loads by identity.

- Visual features: VAE latents (posterior mode × 0.2325) → MAR encoder (buffer tokens = `fake_latent`)
  → `proj_in`; the buffer tokens are moved to the end of the image sequence for the LLM.
- Understanding: `<|im_start|>user\\n` + image features + `\\n{question}<|im_end|>\\n<|im_start|>assistant\\n`
  + answer (Qwen ChatML without a system turn, xtuner's `qwen_chat` template as Harmon trains it);
  next-token CE on the answers. The features' gradient is scaled by `grad_scale` (0.1), as
  `image2text_loss` does.
- Generation (pix / depth / seg, `edit_loss`): the input image's features (gradient × 0.1) and
  `\\n{prompt}` (or "Generate an image." for an empty, i.e. unconditional, prompt) fill the prompt; the
  target's MAR-encoder features over its *unmasked* latent tokens follow; the LLM's last hidden states
  over them → `proj_out`, added to the MAR encoder output (residual) → MAR decoder → diffusion loss on
  the masked tokens. Mask ratio ~ truncnorm((0.7 − 1)/0.25, 0, loc 1, scale 0.25), one per batch.

Freezing (``frozen_module_names``): the VAE, and MAR's `class_emb` (unused by Harmon, so frozen rather
than left as a trainable tensor that never receives a gradient). The MAR encoder is shared by
understanding and generation and trains (paper §3.1). Text parts: the released UniMRG / Harmon training
code (`HarmonDev(freeze_llm=False)`) trains the whole LLM including the tied embedding / lm_head; the
paper's "text encoder/decoder frozen" is available as ``freeze_text_embeddings=True`` (freezes the tied
`llm.model.embed_tokens` = `llm.lm_head`).

Resolution: the released MAR has learned position tables for a 16×16 grid (`img_size=256`, stride 16,
+64 buffers: `mar.encoder_pos_embed_learned` (1, 320, 1280)) → ``mar_image_size=256``. Harmon's scripts
run at 512 and UniMRG's code hard-codes 1,088 image tokens = (512/16)² + 64, interpolating the tables
bilinearly → ``image_size=512``. (The paper's text says 384; set ``image_size=384`` for that.)

ZeRO-3: every weight is used inside its owning module's forward (MAR goes through ``mar(..., part=...)``);
nothing reads parameter values outside a forward.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase, Qwen2ForCausalLM

from unimrg.data.batches import GenerationBatch, UnderstandingBatch
from unimrg.data.llava import dialogue_turns
from unimrg.data.transforms import STRETCH, Fit, ImageTransforms, resize_tensor
from unimrg.models.base import ModelConfig, Resolution, UMMAdapter
from unimrg.models.harmon.arch import ENDOFTEXT, IM_END, IM_START, TINY_SPECIAL_TOKENS, HarmonArch, arch_for, smoke
from unimrg.models.harmon.mar import MAR
from unimrg.models.harmon.vae import VAE_STRIDE, load_vae
from unimrg.models.official_io import LoadReport, load_checked, read_state_dict, write_state_dict
from unimrg.models.sequences import IGNORE_INDEX, next_token_loss, pad_right

log = logging.getLogger(__name__)

OFFICIAL_PREFIXES = ("llm.", "mar.", "proj_in.", "proj_out.")     # harmon_1.5b.pth (the VAE is separate)
TIED_KEYS = ("llm.model.embed_tokens.weight", "llm.lm_head.weight")


@dataclass
class HarmonConfig(ModelConfig):
    """Harmon-1.5B. Architecture numbers come from ``size`` (``unimrg/models/harmon/arch.py``); these
    fields are what a run may choose. Defaults follow the released checkpoint and code (module docstring)."""

    name: str = "harmon"
    image_size: int = 512            # side the model runs at (multiple of 16); 1,024 + 64 image tokens
    mar_image_size: int = 256        # side of MAR's learned position grid (÷16 = 16×16 in harmon_1.5b.pth)
    buffer_size: int = 64            # MAR buffer tokens (part of the position tables' shape)
    llm_path: str | None = None      # full size: local Qwen2.5-1.5B-Instruct folder (config + tokenizer)
    vae_path: str | None = None      # MAR's kl16.ckpt (LDM layout) or a diffusers AutoencoderKL folder
    vae_scale: float = 0.2325        # latents = posterior mode × vae_scale
    grad_scale: float = 0.1          # gradient factor on the image features that condition the LLM
    mask_ratio_min: float = 0.7      # MAR's truncated-normal mask ratio lower bound
    diffusion_batch_mul: int = 4     # each masked token is noised this many times per step
    attn_dropout: float = 0.1        # MAR blocks (official config)
    proj_dropout: float = 0.1
    num_sampling_steps: str = "100"  # diffusion steps per token at sampling time
    gradient_checkpointing: bool = True   # LLM, MAR blocks and diffusion head, as HarmonDev enables
    freeze_text_embeddings: bool = False  # True: freeze the tied embedding/lm_head (paper's wording)
    uncond_prompt: str = "Generate an image."   # the text of an empty (unconditional) prompt
    max_length: int = 1472           # text tokens of an understanding sample (UniMRG: 2048 − 576)
    max_prompt_length: int = 128     # text tokens of a generation prompt (UniMRG datasets)


def build_tokenizer(cfg: HarmonConfig) -> PreTrainedTokenizerBase | None:
    """Byte tokenizer with the ChatML markers (tiny), or the local Qwen2.5 tokenizer (full)."""
    if cfg.size == "tiny":
        from unimrg.models.tokenizer import build_byte_tokenizer
        return build_byte_tokenizer(TINY_SPECIAL_TOKENS, pad_token=ENDOFTEXT, eos_token=IM_END)
    if not cfg.llm_path:
        return None   # meta-device builds and weight conversion need no tokenizer; the losses ask for it
    from transformers import AutoTokenizer
    if not Path(cfg.llm_path).is_dir():
        raise FileNotFoundError(f"model.llm_path={cfg.llm_path!r} is not a folder; point it at the local "
                                "Qwen2.5-1.5B-Instruct folder (config.json, tokenizer files)")
    return AutoTokenizer.from_pretrained(cfg.llm_path)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward, gradient × scale backward (Harmon `_ScaleGradient`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    # Harmon `build_mlp`: Linear → SiLU → Linear (keys .0 and .2).
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.SiLU(), nn.Linear(d_hidden, d_out))


class Harmon(UMMAdapter):
    """UniMRG adapter for Harmon. ``Harmon(HarmonConfig(size="tiny", image_size=64, mar_image_size=64,
    buffer_size=4))`` builds a random tiny model."""

    config_class = HarmonConfig
    tokenizer_setting = "model.llm_path=<local Qwen2.5-1.5B-Instruct folder>"
    official_sources = {"checkpoint": OFFICIAL_PREFIXES, "vae_path": ("vae.",)}
    #: what export_official writes (the release file name)
    export_name = "harmon_1.5b.pth"

    def __init__(self, cfg: HarmonConfig):
        super().__init__()
        for field_name in ("image_size", "mar_image_size"):
            v = getattr(cfg, field_name)
            if v <= 0 or v % VAE_STRIDE:
                raise ValueError(f"model.{field_name}={v}: Harmon needs a positive multiple of {VAE_STRIDE} "
                                 "(the KL-16 VAE's stride)")
        self.cfg = cfg
        self.tokenizer = build_tokenizer(cfg)
        vocab = None
        if cfg.size == "tiny":
            vocab = -(-len(self.tokenizer) // 16) * 16
        arch = arch_for(cfg.size, llm_path=cfg.llm_path, vocab_size=vocab,
                        num_sampling_steps=cfg.num_sampling_steps)
        if cfg.smoke:
            arch = smoke(arch)
        self.arch: HarmonArch = arch
        self.llm = Qwen2ForCausalLM(arch.llm)
        hidden, width = arch.llm.hidden_size, arch.mar["width"]
        self.mar = MAR(**arch.mar, token_dim=arch.vae["latent_channels"],
                       grid=cfg.mar_image_size // VAE_STRIDE, buffer_size=cfg.buffer_size,
                       attn_drop=cfg.attn_dropout, proj_drop=cfg.proj_dropout)
        self.proj_in = _mlp(width, hidden, hidden)
        self.proj_out = _mlp(hidden, hidden, width)
        from diffusers import AutoencoderKL    # here, not at the top: see OpenUni.__init__ (launch time)
        self.vae = AutoencoderKL(**arch.vae)
        self.set_gradient_checkpointing(cfg.gradient_checkpointing)
        self._mask_dist = None   # scipy truncnorm, built on first use

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        if enabled:
            self.llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.llm.activation_checkpointing_disable()
        self.mar.grad_checkpointing = enabled
        self.mar.diffloss.net.grad_checkpointing = enabled

    # ---- protocol ------------------------------------------------------------------------------
    @classmethod
    def native_resolution(cls, cfg: HarmonConfig) -> Resolution:
        # Full: 512 px for both directions: the official scripts run `--image_size 512` (wusize/Harmon
        # README: scripts/image2text.py and text2image.py with harmon_1.5b.pth), and UniMRG's Harmon code
        # hard-codes (512/16)² + 64 image tokens. Tiny: 64 (the tiny recipe's).
        side = 512 if cfg.size == "full" else 64
        return Resolution(side, side)

    # Released preprocessing. Understanding: pad to a square with grey 127, then resize (bicubic) —
    # RecA's Harmon `MARProcessor` (HorizonWind2004/reconstruction-alignment,
    # Harmon/src/datasets/understanding/llava_datasets.py: expand2square (127, 127, 127), PIL resize to
    # 512), as wusize/Harmon's CaptionDataset (src/datasets/understanding/caption_datasets.py:
    # expand2square with the processor's mean 0.5 × 255). Generation (condition image and targets):
    # stretched to a square — RecA's Text2ImageDataset._process_image with crop_image=False, the
    # setting of UniMRG's Harmon config for the recon / depth / mask datasets (Sugewud/UniMRG
    # Harmon/configs/datasets/qwen2_5_1_5b/UniMRG.py); it resizes to the longer side's square, then
    # to 512, where we resize once.
    release_transforms = ImageTransforms(
        understanding=Fit("pad", fill=127), target=STRETCH, condition=STRETCH,
        source="RecA / UniMRG Harmon: MARProcessor pad 127; crop_image=False stretch")

    @classmethod
    def resolve_resolution(cls, cfg: HarmonConfig) -> Resolution:
        # One resolution for both directions: the model encodes images and targets at image_size.
        side = cfg.image_size or cls.native_resolution(cfg).image
        return Resolution(side, cfg.target_size or side)

    @classmethod
    def sequence_plan(cls, cfg: HarmonConfig, task: str) -> dict[str, int]:
        tokens = (cfg.image_size // VAE_STRIDE) ** 2 + cfg.buffer_size
        if task == "und":
            return {"image tokens": tokens, "text tokens ≤": cfg.max_length,
                    "sequence ≤": tokens + cfg.max_length}
        return {"condition image tokens": tokens, "target tokens": tokens, "prompt tokens ≤": cfg.max_prompt_length,
                "LLM sequence ≤ (+ chat markers)": 2 * tokens + cfg.max_prompt_length}

    def no_weight_decay(self, name: str, param: nn.Parameter) -> bool:
        # MAR's weight-decay rule (LTH14/mar util/misc.py `add_weight_decay`), which Harmon's optimizer
        # builder follows: no decay on 1-D parameters (norms), biases, or anything in the diffusion head.
        return param.ndim < 2 or name.endswith(".bias") or name.startswith("mar.diffloss.")

    def frozen_module_names(self) -> list[str]:
        names = ["vae", "mar.class_emb"]
        if self.cfg.freeze_text_embeddings:
            names.append("llm.model.embed_tokens")    # tied: freezes llm.lm_head too
        return names

    def understanding_loss(self, batch: UnderstandingBatch) -> torch.Tensor:
        device = self._device_dtype()[0]
        # Text-only conversations (und_text) get no image features. The encoder still runs on every
        # image, placeholders included, and the unused features join the loss with weight 0: every rank
        # runs the same modules and gives every trainable parameter a gradient, as ZeRO requires.
        with_image = batch.image_mask()
        tokens, grid = self.encode_latents(self._pixels(batch.images, device, "images"))
        _, feats = self.visual_features(tokens, grid)                          # (B, I, H)
        feats = _ScaleGrad.apply(feats, self.cfg.grad_scale)
        rest, labels, mask = self._conversation_ids(batch)                     # (B, R) each
        unused = None
        if bool(with_image.all()):
            embeds, attn, prefix_len = self._embed_with_image(feats, rest.to(device), mask.to(device))
            labels = torch.cat([labels.new_full((labels.shape[0], prefix_len), IGNORE_INDEX), labels], dim=1)
        else:
            keep = with_image.to(feats.device)
            unused = feats[~keep].sum() * 0.0
            embeds, attn, labels = self._embed_mixed(feats[keep], with_image, rest.to(device), mask.to(device),
                                                     labels)
        hidden = self.llm.model(inputs_embeds=embeds, attention_mask=attn, use_cache=False).last_hidden_state
        # Nothing supervised survived truncation: a zero that keeps the graph.
        if not bool((labels[:, 1:] != IGNORE_INDEX).any()):
            log.warning("Harmon understanding batch %s has no answer tokens within max_length=%d",
                        list(batch.keys)[:3], self.cfg.max_length)
            return hidden.sum() * 0.0 + (0.0 if unused is None else unused)
        loss = next_token_loss(self.llm.lm_head, hidden, labels)               # head only where scored
        return loss if unused is None else loss + unused

    def generation_loss(self, batch: GenerationBatch) -> torch.Tensor:
        device = self._device_dtype()[0]
        b = len(batch)
        if len(batch.prompts) != b:
            raise ValueError(f"Harmon {batch.task}: {b} images but {len(batch.prompts)} prompts (keys "
                             f"{list(batch.keys)[:3]}...); the objective must fill GenerationBatch.prompts "
                             "(\"\" for unconditional)")
        pixels = torch.cat([self._pixels(batch.images, device, "images"),
                            self._pixels(batch.targets, device, "targets")])
        tokens, grid = self.encode_latents(pixels)                             # (2B, N, C)
        src, tgt = tokens[:b], tokens[b:]
        _, cond = self.visual_features(src, grid)                              # full encoder, no masking
        cond = _ScaleGrad.apply(cond, self.cfg.grad_scale)
        mask = self._random_mask(b, tgt.shape[1], device)                      # (B, N) 1 = masked
        x_enc, z = self.visual_features(tgt, grid, mask)                       # (B, buf + kept, ·)
        prefix, prefix_mask, _ = self._prompt_prefix(cond, batch.prompts)      # (B, L, H), (B, L)
        hidden = self._llm_over(prefix, prefix_mask, z)                        # (B, buf + kept, H)
        x = x_enc + self.proj_out(hidden)                                      # residual, as Harmon
        cond_tokens = self.mar(x, mask, grid, part="decoder")                  # (B, N, W)
        picked = mask.bool()
        mul = self.cfg.diffusion_batch_mul
        # Only masked tokens count (official: all tokens, weighted by the mask — the same mean).
        return self.mar.diffloss(tgt[picked].repeat(mul, 1), cond_tokens[picked].repeat(mul, 1))

    # ---- pieces shared with sampling -------------------------------------------------------------
    def encode_latents(self, pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Float [-1, 1] (B, 3, H, W) → scaled latent tokens (B, m·n, 16) in row-major order, and (m, n)."""
        vae_dtype = next(self.vae.parameters()).dtype
        with torch.no_grad():
            z = self.vae.encode(pixels.to(vae_dtype)).latent_dist.mode() * self.cfg.vae_scale
        b, c, m, n = z.shape
        return z.flatten(2).transpose(1, 2), (m, n)

    def decode_latents(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Latent tokens (B, m·n, 16) → float images in [0, 1], (B, 3, 16m, 16n)."""
        vae_dtype = next(self.vae.parameters()).dtype
        z = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *grid) / self.cfg.vae_scale
        with torch.no_grad():
            x = self.vae.decode(z.to(vae_dtype)).sample
        return ((x.float() + 1) / 2).clamp(0, 1)

    def visual_features(self, tokens: torch.Tensor, grid: tuple[int, int], mask: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """MAR encoder output (B, buf + kept, W) and its `proj_in` projection with the buffer tokens moved
        last (B, kept + buf, H) — Harmon `extract_visual_feature`."""
        x_enc = self.mar(tokens, mask, grid, part="encoder")
        z = self.proj_in(x_enc)
        buf = self.cfg.buffer_size
        return x_enc, torch.cat([z[:, buf:], z[:, :buf]], dim=1)

    def _llm_over(self, prefix: torch.Tensor, prefix_mask: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """LLM over [prefix (right-padded), z]; returns the last hidden states over z with the buffer tokens
        moved back first (B, buf + kept, H). Positions skip the padding (Harmon `prepare_forward_input`)."""
        b, t = z.shape[:2]
        embeds = torch.cat([prefix, z.to(prefix.dtype)], dim=1)
        attn = torch.cat([prefix_mask, prefix_mask.new_ones(b, t)], dim=1)
        position_ids = (attn.long().cumsum(dim=1) - 1).clamp(min=0)
        hidden = self.llm.model(inputs_embeds=embeds, attention_mask=attn, position_ids=position_ids,
                                use_cache=False).last_hidden_state
        hidden = hidden[:, hidden.shape[1] - t:]                               # t may be 0 (all masked, no buffer)
        buf = self.cfg.buffer_size
        return torch.cat([hidden[:, t - buf:], hidden[:, :t - buf]], dim=1)

    def _prompt_prefix(self, feats: torch.Tensor | None, prompts: Sequence[str]
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Embeddings of `<|im_start|>user\\n` + image features + `\\n{prompt}<|im_end|>\\n<|im_start|>
        assistant\\n` (UniMRG/RecA `_process_text`: "\\n" + prompt, or the bare unconditional prompt), right-
        padded: (B, L, H) embeddings, (B, L) bool mask and (B,) valid lengths. ``feats`` None = no image."""
        seqs = [self._encode(t)[-self.cfg.max_prompt_length:] for t in self.prompt_texts(prompts)]
        rest, mask = pad_right(seqs, self._pad_id())
        device = self._device_dtype()[0]
        embeds, attn, _ = self._embed_with_image(feats, rest.to(device), mask.to(device), batch=len(prompts))
        return embeds, attn, attn.sum(dim=1)

    def prompt_texts(self, prompts: Sequence[str]) -> list[str]:
        """The text after the image of each generation prompt; "" → the unconditional prompt."""
        texts = [f"\n{p.strip()}" if p.strip() else self.cfg.uncond_prompt for p in prompts]
        return [f"{t}{IM_END}\n{IM_START}assistant\n" for t in texts]

    def _embed_with_image(self, feats: torch.Tensor | None, rest: torch.Tensor, rest_mask: torch.Tensor,
                          batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
        """[`<|im_start|>user\\n`] + feats + rest → embeddings (B, P + I + R, H), mask, and P + I."""
        b = rest.shape[0] if batch is None else batch
        head = torch.tensor(self._encode(f"{IM_START}user\n"), device=rest.device)
        ids = torch.cat([head.expand(b, -1), rest], dim=1)
        text = self.llm.model.embed_tokens(ids)                                  # one call: ZeRO-3 friendly
        parts = [text[:, :head.numel()]]
        if feats is not None:
            parts.append(feats.to(text.dtype))
        parts.append(text[:, head.numel():])
        n_img = 0 if feats is None else feats.shape[1]
        attn = torch.cat([rest_mask.new_ones(b, head.numel() + n_img), rest_mask], dim=1)
        return torch.cat(parts, dim=1), attn, head.numel() + n_img

    def _embed_mixed(self, feats: torch.Tensor, with_image: torch.Tensor, rest: torch.Tensor,
                     rest_mask: torch.Tensor, labels: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`_embed_with_image` for a batch where some samples are text-only: those get no feature block,
        their text moves up to follow `<|im_start|>user\n` directly and the freed tail becomes padding.
        ``feats`` (N, I, H) belong to the ``with_image`` rows in order (N may be 0). Returns embeddings, mask and
        labels, all (B, P + I + R)."""
        embeds, attn, prefix_len = self._embed_with_image(None, rest, rest_mask)    # (B, P + R, H)
        n_img = feats.shape[1]
        b, head = rest.shape[0], prefix_len
        labels = torch.cat([labels.new_full((b, head), IGNORE_INDEX), labels], dim=1)
        pad_e = embeds.new_zeros(b, n_img, embeds.shape[-1])
        pad_a, pad_l = attn.new_zeros(b, n_img), labels.new_full((b, n_img), IGNORE_INDEX)
        rows, j = [], 0
        for i, has in enumerate(with_image.tolist()):
            if has:
                rows.append((torch.cat([embeds[i, :head], feats[j].to(embeds.dtype), embeds[i, head:]]),
                             torch.cat([attn[i, :head], attn.new_ones(n_img), attn[i, head:]]),
                             torch.cat([labels[i, :head], pad_l[i], labels[i, head:]])))
                j += 1
            else:
                rows.append((torch.cat([embeds[i], pad_e[i]]), torch.cat([attn[i], pad_a[i]]),
                             torch.cat([labels[i], pad_l[i]])))
        return tuple(torch.stack(parts) for parts in zip(*rows))

    def _random_mask(self, b: int, n: int, device: torch.device) -> torch.Tensor:
        """MAR `random_masking`: one ratio per batch from the truncated normal, a random order per sample;
        drawn with torch's CPU generator (deterministic per torch seed, rank-local)."""
        if self._mask_dist is None:
            from scipy import stats
            self._mask_dist = stats.truncnorm((self.cfg.mask_ratio_min - 1.0) / 0.25, 0, loc=1.0, scale=0.25)
        ratio = float(self._mask_dist.ppf(torch.rand(()).item()))              # inverse-CDF sampling
        num_masked = min(n, int(math.ceil(n * ratio)))
        orders = torch.argsort(torch.rand(b, n), dim=1)
        mask = torch.zeros(b, n).scatter_(1, orders[:, :num_masked], 1.0)
        return mask.to(device)

    # ---- text ------------------------------------------------------------------------------------
    def _pad_id(self) -> int:
        tok = self._tok()
        return tok.pad_token_id if tok.pad_token_id is not None else tok.convert_tokens_to_ids(ENDOFTEXT)

    def _conversation_ids(self, batch: UnderstandingBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The text after the image: xtuner `qwen_chat` turns with SEP "\\n"; labels on `{answer}<|im_end|>`.
        The image sits right after the first `<|im_start|>user\\n` (LLaVA's `<image>\\n` moved to the
        front, as xtuner's `llava_map_fn`). Returns ids, labels (B, R) long and mask (B, R) bool."""
        budget = self.cfg.max_length - len(self._encode(f"{IM_START}user\n"))
        all_ids, all_labels = [], []
        sep = ["\n" if has else "" for has in batch.image_mask().tolist()]
        for i, conv in enumerate(batch.conversations):
            key = batch.keys[i] if i < len(batch.keys) else f"#{i}"
            ids: list[int] = []
            labels: list[int] = []

            def add(text: str, train: bool) -> None:
                t = self._encode(text)
                ids.extend(t)
                labels.extend(t if train else [IGNORE_INDEX] * len(t))

            for j, (role, value) in enumerate(dialogue_turns(conv, key)):
                if role == "human":
                    value = value.replace("<image>", "").strip()
                    if j == 0:   # after the image ("<image>\n" + text), or straight after the turn head
                        add(f"{sep[i]}{value}{IM_END}\n{IM_START}assistant\n", False)
                    else:
                        add(f"{IM_START}user\n{value}{IM_END}\n{IM_START}assistant\n", False)
                else:
                    add(f"{value}{IM_END}", True)
                    add("\n", False)
            all_ids.append(ids[:budget])
            all_labels.append(labels[:budget])
        ids, mask = pad_right(all_ids, self._pad_id())
        labels, _ = pad_right(all_labels, IGNORE_INDEX)
        return ids, labels, mask

    # ---- images ----------------------------------------------------------------------------------
    def _pixels(self, x: torch.Tensor, device: torch.device, what: str) -> torch.Tensor:
        """uint8 images or float [0, 1] targets (B, 3, H, W) → float32 [-1, 1] at ``image_size``."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"Harmon expects {what} of shape (B, 3, H, W), got {tuple(x.shape)}")
        if what == "images":
            if x.dtype != torch.uint8:
                raise TypeError(f"Harmon expects uint8 images (B, 3, H, W), got {x.dtype}")
            x = x.to(device=device, dtype=torch.float32) / 255.0
        else:
            x = x.to(device=device, dtype=torch.float32)
        s = self.cfg.image_size
        if x.shape[-2:] != (s, s):
            # Loaders normally deliver image_size already; this keeps other sizes usable (e.g. sampling).
            x = resize_tensor(x, s, "bicubic")
        return x * 2 - 1

    def _device_dtype(self) -> tuple[torch.device, torch.dtype]:
        # Metadata only: under ZeRO-3 a partitioned parameter keeps its dtype and device.
        p = self.proj_in[0].weight
        return p.device, p.dtype

    # ---- sampling --------------------------------------------------------------------------------
    def sample(self, images: torch.Tensor | None, prompts: Sequence[str], **kwargs) -> torch.Tensor:
        """Generate images (B, 3, S, S) float [0, 1]; see :func:`unimrg.models.harmon.sample.sample`."""
        from unimrg.models.harmon.sample import sample
        return sample(self, images, prompts, **kwargs)

    @torch.no_grad()
    def answer(self, images: torch.Tensor, questions: Sequence[str], max_new_tokens: int = 32, *,
               early_stop: bool = True) -> list[str]:
        """Greedy answers in the understanding format (`<|im_start|>user\\n` + image + `\\n{question}…`)."""
        from unimrg.models.decoding import greedy_answers, left_align
        if len(questions) != images.shape[0]:
            raise ValueError(f"Harmon.answer: {images.shape[0]} images but {len(questions)} questions")
        device = self._device_dtype()[0]
        with self.evaluating():
            tokens, grid = self.encode_latents(self._pixels(images, device, "images"))
            feats = self.visual_features(tokens, grid)[1]                       # (B, I, H)
            rest, rest_mask = pad_right([self._encode(f"\n{q.strip()}{IM_END}\n{IM_START}assistant\n")
                                    for q in questions], self._pad_id())
            embeds, attn, _ = self._embed_with_image(feats, rest.to(device), rest_mask.to(device))
            attn, embeds = left_align(attn.bool(), embeds)
            tok = self._tok()
            return greedy_answers(tok, self.llm.model, self.llm.lm_head, self.llm.model.embed_tokens, embeds, attn,
                                  stop_ids=[tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(ENDOFTEXT)],
                                  max_new_tokens=max_new_tokens, early_stop=early_stop)

    # ---- official weights ------------------------------------------------------------------------
    def load_official(self, path: str | None = None, *, allow_missing: Sequence[str] = ()) -> LoadReport:
        """Load ``harmon_1.5b.pth`` (keys `llm.`, `mar.`, `proj_in.`, `proj_out.`) from ``path``, then the VAE
        from ``cfg.vae_path`` (MAR's kl16.ckpt). A Qwen2.5 model folder as ``path`` loads the LLM only (a
        partial load: allow `mar.*`, `proj_in.*`, `proj_out.*` explicitly). At full size anything left
        unloaded is an error naming the keys and the field (e.g. ``model.vae_path``); shape mismatches raise."""
        parts: dict[str, LoadReport] = {}
        if path and _is_hf_llm_folder(path):
            state = _tie_aliases({"llm." + k: v for k, v in read_state_dict(path, what="Qwen2.5 folder").items()},
                                 path)
            parts["llm"] = load_checked(nn.ModuleDict({"llm": self.llm}), state, what=f"Harmon LLM {path}")
        elif path:
            state = read_state_dict(path, what="Harmon checkpoint (model.checkpoint)")
            state = _tie_aliases(state, path)
            sub = nn.ModuleDict({"llm": self.llm, "mar": self.mar, "proj_in": self.proj_in,
                                 "proj_out": self.proj_out})
            parts["harmon"] = load_checked(sub, state, what=f"Harmon {path}",
                                           rename=lambda k: None if k.startswith("vae.") else k)
        if self.cfg.vae_path:
            parts["vae"] = load_vae(self.vae, self.cfg.vae_path, prefix="vae.")
        report = LoadReport.merge(f"Harmon official weights ({', '.join(parts) or 'nothing'})", parts,
                                  self.state_dict())
        return self.check_load(report, allow_missing)

    def official_state_dict(self, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        return to_official(self.state_dict() if state_dict is None else state_dict)

    def export_official(self, out_dir: str | Path, dtype: torch.dtype | None = None,
                        state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, Path]:
        """Write ``OUT/harmon_1.5b.pth`` in the release layout (both tied keys, as torch's state_dict writes
        them; the frozen VAE is MAR's kl16.ckpt, unchanged, and not copied). ``state_dict`` defaults to this
        model's (e.g. pass the trainer's consolidated ``final/model.pt``)."""
        out = Path(out_dir)
        if out.suffix in (".pth", ".pt", ".bin", ".safetensors"):
            raise ValueError(f"Harmon.export_official({out}): give a folder; the file is written as "
                             f"{self.export_name} inside it")
        state = self.official_state_dict(state_dict)
        if dtype is not None:
            state = {k: v.to(dtype) for k, v in state.items()}
        return {"harmon": write_state_dict(state, out / self.export_name)}

    def export_sources(self, paths: dict[str, Path]) -> dict[str, str]:
        return {"checkpoint": str(paths["harmon"])}


def to_official(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adapter state dict (e.g. the trainer's consolidated RUN/final/model.pt) → harmon_1.5b.pth layout."""
    out = {k: v for k, v in state_dict.items() if k.startswith(OFFICIAL_PREFIXES)}
    if TIED_KEYS[0] in out and TIED_KEYS[1] not in out:
        out[TIED_KEYS[1]] = out[TIED_KEYS[0]]
    return out


def _is_hf_llm_folder(path: str | Path) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    import json
    return json.loads(cfg.read_text()).get("model_type") == "qwen2"


def _tie_aliases(state: dict[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    """Qwen2.5-1.5B ties lm_head to embed_tokens: a file may hold either key or both."""
    emb, head = (state.get(k) for k in TIED_KEYS)
    if emb is None and head is None:
        return state
    if emb is not None and head is not None:
        if emb.shape != head.shape or not torch.equal(emb, head):
            raise ValueError(f"{path}: {TIED_KEYS[0]} and {TIED_KEYS[1]} differ, but Harmon-1.5B ties them; "
                             "this checkpoint is not a tied Qwen2.5 (check model.size / model.llm_path)")
        return state
    state = dict(state)
    state[TIED_KEYS[1] if head is None else TIED_KEYS[0]] = emb if head is None else head
    return state


