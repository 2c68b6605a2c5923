"""Show-o (Phi-1.5 + CLIP-ViT + MAGVIT-v2) behind the UniMRG adapter protocol.

Structure, prompt layouts and losses follow showlab/Show-o (`models/modeling_showo.py`,
`training/train_w_clip_vit.py`, `training/prompting_utils.py`, `models/sampling.py`). Attribute names are
the official ones, so state-dict keys match the released files one to one: `showo` (Phi causal LM,
`showo.*`) and `mm_projector` (`mm_projector.*`) from the Show-o folder, `vq_model` from the MAGVIT-v2
checkpoint (`encoder.*`, `decoder.*`, `quantize.*`), `vision_tower` from the CLIP folder (`vision_model.*`).

Every task of a micro-step goes through the LLM in ONE forward pass (:meth:`Showo.forward` packs the
understanding and generation sequences into one padded batch). RecA's Show-o trainer runs two forwards per
backward and is single-GPU only; one forward per backward is what lets ZeRO-2/3 run it data-parallel.

ZeRO-3: every weight is used through a submodule's forward, so DeepSpeed's hooks gather partitioned
parameters; nothing reads weight values outside a forward (only their dtype / device).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionModel, PhiForCausalLM, PreTrainedTokenizerBase

from unimrg.data.batches import GenerationBatch, TaskBatch, UnderstandingBatch
from unimrg.data.llava import dialogue_turns
from unimrg.data.transforms import Fit, ImageTransforms, resize_tensor
from unimrg.models.base import ModelConfig, Resolution, UMMAdapter
from unimrg.models.official_io import LoadReport, load_checked, read_state_dict, write_state_dict
from unimrg.models.sequences import IGNORE_INDEX, cut_conversation
from unimrg.models.showo.arch import (
    CLIP_MEAN, CLIP_STD, ENDOFTEXT, EOI, MMU, NEW_SPECIAL_TOKENS, PAD, SOI, SYSTEM_PROMPT, T2I, ShowoArch, arch_for, smoke)
from unimrg.models.showo.magvit import MagvitV2


@dataclass
class ShowoConfig(ModelConfig):
    """Show-o w/ CLIP-ViT (256 px). Architecture numbers come from ``size`` (``unimrg/models/showo/arch.py``);
    these fields are what a run may choose. ``checkpoint`` is the Show-o folder (`showlab/show-o-w-clip-vit`:
    ``pytorch_model.bin`` with ``showo.*`` and ``mm_projector.*``)."""

    name: str = "showo"
    # MAGVIT-v2 codes. The released tokenizer (`showlab/magvitv2`, LFQ with 13 bits) has 8,192; the Show-o
    # paper's text (and UniMRG §4.4, quoting it) says 4,096. A power of two.
    codebook_size: int = 8192
    tokenizer: str | None = None          # full size: local microsoft/phi-1_5 tokenizer folder
    magvit_checkpoint: str | None = None  # local showlab/magvitv2 folder or file (loaded by load_official)
    clip_checkpoint: str | None = None    # local openai/clip-vit-large-patch14-336 folder
    # None = Show-o's LLaVA system prompt at full size, none at tiny size (keeps tiny sequences short).
    system_message: str | None = None
    # Show-o's LLaVA tuning keeps 576 − (576 − 256) = 256 conversation tokens (`train_w_clip_vit.py`).
    max_text_len: int = 256
    max_prompt_len: int = 128             # generation prompt tokens (t2i `max_seq_length` 128)
    min_masking_rate: float = 0.0         # floor of the cosine mask ratio (Show-o `training.min_masking_rate`)
    gradient_checkpointing: bool = False  # Show-o's configs turn it on; at 2 per task it is not needed


def build_tokenizer(cfg: ShowoConfig) -> PreTrainedTokenizerBase | None:
    """Byte tokenizer with Show-o's special tokens (tiny), or the local Phi-1.5 tokenizer with them added
    the way Show-o's ``UniversalPrompting`` adds them ('[PAD]' as pad token, then the nine task tokens)."""
    if cfg.tokenizer is None:
        if cfg.size == "tiny":
            from unimrg.models.tokenizer import build_byte_tokenizer
            return build_byte_tokenizer((ENDOFTEXT, *NEW_SPECIAL_TOKENS), pad_token=PAD, eos_token=ENDOFTEXT)
        return None  # meta-device builds and weight conversion need no tokenizer; the losses ask for it
    from transformers import AutoTokenizer
    if not Path(cfg.tokenizer).is_dir():
        raise FileNotFoundError(f"model.tokenizer={cfg.tokenizer!r} is not a folder; point it at a local "
                                "microsoft/phi-1_5 folder (tokenizer_config.json, vocab.json, merges.txt)")
    tok = AutoTokenizer.from_pretrained(cfg.tokenizer)
    if PAD not in tok.get_vocab():
        tok.add_special_tokens({"pad_token": PAD})
        tok.add_tokens(list(NEW_SPECIAL_TOKENS[1:]))
    tok.pad_token = PAD
    return tok


@dataclass
class _Seq:
    """One packed sequence before padding."""

    task: str
    ids: list[int] = field(default_factory=list)        # CLIP slots hold the pad id (features replace them)
    clip_start: int = -1                                # first CLIP slot; -1: none (a text-only conversation)
    block: tuple[int, int] = (0, 0)                     # [start, end) of the bidirectional image-token block
    preds: list[int] = field(default_factory=list)      # positions whose logits are scored
    targets: list[int] = field(default_factory=list)    # the token each of them must predict


class Showo(UMMAdapter):
    """UniMRG adapter for Show-o. ``Showo(ShowoConfig(size="tiny"))`` builds a random tiny model."""

    config_class = ShowoConfig
    tokenizer_setting = "model.tokenizer=<local microsoft/phi-1_5 folder>"
    official_sources = {"checkpoint": ("showo.", "mm_projector."), "magvit_checkpoint": ("vq_model.",),
                        "clip_checkpoint": ("vision_tower.",)}

    def __init__(self, cfg: ShowoConfig):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = build_tokenizer(cfg)
        llm_vocab = len(self.tokenizer) - len(NEW_SPECIAL_TOKENS) if cfg.size == "tiny" else 0
        self.arch: ShowoArch = arch_for(cfg.size, cfg.codebook_size, llm_vocab)
        if cfg.smoke:
            self.arch = smoke(self.arch)
        if self.tokenizer is not None:
            _check_tokenizer(self.tokenizer, self.arch, cfg.tokenizer)
        self.system_message = (SYSTEM_PROMPT if cfg.size == "full" else "") \
            if cfg.system_message is None else cfg.system_message
        a = self.arch
        # Vocabulary layout: [text | [PAD] <|soi|> <|eoi|> <|sov|> <|eov|> <|t2i|> <|mmu|> <|t2v|> <|v2v|> <|lvg|> |
        # codes | [MASK]] (Show-o: image tokens are `code + len(tokenizer)`, mask_token_id = vocab_size − 1).
        special = {t: a.llm_vocab_size + j for j, t in enumerate(NEW_SPECIAL_TOKENS)}
        self.pad_id, self.soi_id, self.eoi_id = special[PAD], special[SOI], special[EOI]
        self.t2i_id, self.mmu_id = special[T2I], special[MMU]
        self.image_offset = a.llm_vocab_size + len(NEW_SPECIAL_TOKENS)
        self.mask_id = a.vocab_size - 1

        # Build order is fixed: the same torch seed gives the same initial weights.
        self.showo = PhiForCausalLM(a.phi)
        self.mm_projector = nn.Sequential(nn.Linear(a.clip.hidden_size, a.phi.hidden_size), nn.GELU(),
                                          nn.Linear(a.phi.hidden_size, a.phi.hidden_size))
        self.vision_tower = CLIPVisionModel(a.clip)
        self.vq_model = MagvitV2(a.magvit)
        if cfg.gradient_checkpointing:
            self.showo.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # ---- protocol ------------------------------------------------------------------------------
    @classmethod
    def native_resolution(cls, cfg: ShowoConfig) -> Resolution:
        # Full: CLIP-ViT-L/14-336 reads 336 px (openai/clip-vit-large-patch14-336); show-o-w-clip-vit's
        # MAGVIT-v2 codes 256-px images into 256 tokens (showlab/Show-o `configs/showo_demo_w_clip_vit.yaml`
        # and `showo_instruction_tuning_2_w_clip_vit.yaml`: `resolution: 256`, `num_vq_tokens: 256`; the
        # 512-px configs belong to the show-o-512x512 checkpoints). Tiny: the tiny arch's sizes.
        arch = arch_for(cfg.size, cfg.codebook_size, 1)
        return Resolution(arch.clip.image_size, arch.magvit.resolution)

    # Released preprocessing. CLIP input (understanding, and the generation condition, which goes through
    # the same CLIP-ViT): shorter side to 336 (bicubic), centre crop 336 with transformers' floor offset
    # — CLIPImageProcessor of openai/clip-vit-large-patch14-336 (shortest_edge 336, crop_size 336), used
    # by showlab/Show-o llava/llava_instruct_data.py. MAGVIT targets: training/utils.py image_transform —
    # torchvision Resize(256, BICUBIC) on the shorter side + CenterCrop(256) (offset round(d / 2)).
    release_transforms = ImageTransforms(
        understanding=Fit("short_side_crop", offset="floor"), condition=Fit("short_side_crop", offset="floor"),
        target=Fit("short_side_crop", offset="round"),
        source="Show-o: CLIPImageProcessor shortest_edge + center crop; image_transform Resize + CenterCrop")

    @classmethod
    def sequence_plan(cls, cfg: ShowoConfig, task: str) -> dict[str, int]:
        # The adapter brings any loader size to CLIP's and MAGVIT's own: token counts are the arch's.
        arch = arch_for(cfg.size, cfg.codebook_size, 1)
        clip = arch.num_clip_tokens
        if task == "und":   # <|mmu|> system <|soi|> CLIP <|eoi|> text
            return {"image tokens": clip, "text tokens ≤": cfg.max_text_len,
                    "sequence ≤ (+ system prompt)": clip + cfg.max_text_len + 3}
        # <|t2i|> <|soi|> CLIP <|eoi|> <bos> prompt <eos> <|soi|> codes <|eoi|>
        return {"condition image tokens": clip, "target tokens": arch.num_image_tokens,
                "prompt tokens ≤": cfg.max_prompt_len,
                "sequence ≤": clip + cfg.max_prompt_len + arch.num_image_tokens + 7}

    def frozen_module_names(self) -> list[str]:
        # UniMRG: the understanding encoder (CLIP-ViT, not shared with generation) and the VQ tokenizer.
        return ["vision_tower", "vq_model"]

    def understanding_loss(self, batch: UnderstandingBatch) -> torch.Tensor:
        return self.forward([batch])[batch.task]

    def generation_loss(self, batch: GenerationBatch) -> torch.Tensor:
        return self.forward([batch])[batch.task]

    def forward(self, batches: Sequence[TaskBatch]) -> dict[str, torch.Tensor]:
        """All batches of a micro-step in one LLM pass; returns one loss per task.

        Understanding: next-token CE on the answer tokens. Generation: the target's MAGVIT-v2 codes are
        masked with ratio cos(π/2·t), t ~ U(0, 1), and CE is taken on the masked positions and the closing
        <|eoi|> over the whole vocabulary (Show-o `mask_or_random_replace_tokens` + `Showo.forward`'s `loss_t2i`).
        """
        tasks = [b.task for b in batches]
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"Show-o forward got two batches of one task: {tasks}")
        device, _ = self._device_dtype()
        gen = [b for b in batches if isinstance(b, GenerationBatch)]
        for b in gen:
            self._check_prompts(b)
        # Every sample is conditioned on its image's CLIP features: one vision pass for all tasks.
        # Text-only conversations (und_text) get none; their placeholders still go through the pass
        # and join the loss with weight 0, so every rank runs the same modules and every trainable
        # parameter gets a gradient whatever the text/image mix (ZeRO's collectives need both).
        with_image = torch.cat([b.image_mask() if isinstance(b, UnderstandingBatch) else
                                torch.ones(len(b), dtype=torch.bool) for b in batches]).to(device)
        all_feats = self.image_features(torch.cat([b.images for b in batches]))  # (N, n_clip, hidden)
        feats = all_feats[with_image]
        codes = masks = None
        if gen:
            codes = self.encode_targets(torch.cat([b.targets for b in gen]))    # (G, n_img) int64
            masks = self._sample_masks(codes.shape[0], device).cpu()            # (G, n_img) bool
            codes = codes.cpu()
        seqs: list[_Seq] = []
        g = 0
        for b in batches:
            if isinstance(b, UnderstandingBatch):
                seqs += self._understanding_seqs(b)
            else:
                for prompt in b.prompts:
                    seqs.append(self._generation_seq(b.task, prompt, codes[g], masks[g]))
                    g += 1
        hidden = self._run_llm(*self._pack(seqs), feats)                         # (N, L, hidden)
        rows = torch.cat([torch.full((len(s.preds),), i) for i, s in enumerate(seqs)]).to(device)
        cols = torch.cat([torch.tensor(s.preds, dtype=torch.long) for s in seqs]).to(device)
        targets = torch.cat([torch.tensor(s.targets, dtype=torch.long) for s in seqs]).to(device)
        logits = self.showo.lm_head(hidden[rows, cols])                          # (M, vocab)
        ce = F.cross_entropy(logits.float(), targets, reduction="none")         # (M,)
        owner = [t for s in seqs for t in [s.task] * len(s.preds)]
        losses = {t: ce[torch.tensor([o == t for o in owner], device=device)].mean() for t in tasks}
        if not bool(with_image.all()):
            und = next(b.task for b in batches if isinstance(b, UnderstandingBatch))
            losses[und] = losses[und] + all_feats[~with_image].sum() * 0.0
        return losses

    # ---- pieces shared by training and sampling ----------------------------------------------------
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) → CLIP-ViT penultimate-layer patch features through ``mm_projector``,
        (B, n_clip, llm hidden). The vision tower is frozen (no graph); ``mm_projector`` trains."""
        device, dtype = self._device_dtype()
        if images.dtype != torch.uint8:
            raise TypeError(f"Show-o expects uint8 images (B, 3, H, W), got {images.dtype}")
        x = resize_tensor(images.to(device=device, dtype=torch.float32) / 255.0, self.arch.clip.image_size)
        mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)
        with torch.no_grad():
            out = self.vision_tower(pixel_values=((x - mean) / std).to(dtype), output_hidden_states=True)
            feats = out.hidden_states[self.arch.clip_select_layer][:, 1:]       # drop CLS
        return self.mm_projector(feats.to(dtype))

    def encode_targets(self, targets: torch.Tensor) -> torch.Tensor:
        """Float [0, 1] (B, 3, H, W) → MAGVIT-v2 codes (B, n_img) in [0, codebook_size)."""
        device, dtype = self._device_dtype()
        x = resize_tensor(targets.to(device=device, dtype=torch.float32), self.arch.magvit.resolution)
        return self.vq_model.encode((x * 2 - 1).to(dtype))                      # MAGVIT reads [-1, 1]

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, n_img) → float images in [0, 1], (B, 3, R, R) at MAGVIT's resolution."""
        return ((self.vq_model.decode(codes).float() + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def generate_codes(self, images: torch.Tensor, prompts: list[str], steps: int = 30,
                       guidance_scale: float = 5.0, temperature: float = 1.0, seed: int = 0) -> torch.Tensor:
        """MaskGIT decoding as Show-o's ``t2i_generate``: start fully masked; each step samples every masked
        token, keeps the most confident ones and re-masks ⌊n·cos(π/2·(s+1)/steps)⌋ of them (at least one,
        never all). CFG mixes logits as (1 + w)·cond − w·uncond, the uncond branch being the same image
        with an empty prompt. Seeded by ``seed`` alone. Defaults: RecA's CLIP-variant reconstruction demo
        (guidance 5, 30 steps). Returns (B, n_img) codes."""
        device, _ = self._device_dtype()
        b, n, k = images.shape[0], self.arch.num_image_tokens, self.arch.codebook_size
        if len(prompts) != b:
            raise ValueError(f"generate: {b} images but {len(prompts)} prompts")
        gen = torch.Generator(device=device).manual_seed(seed)
        feats = self.image_features(images)
        use_cfg = guidance_scale > 0
        if use_cfg:
            feats, prompts = torch.cat([feats, feats]), list(prompts) + [""] * b
        all_masked, none = torch.full((n,), self.mask_id), torch.zeros(n, dtype=torch.bool)
        seqs = [self._generation_seq("sample", p, all_masked, none) for p in prompts]
        ids, clip, valid, block = self._pack(seqs)
        code_cols = torch.stack([torch.arange(s.block[0] + 1, s.block[1] - 1) for s in seqs]).to(device)  # (R, n)
        current = torch.full((b, n), self.mask_id, dtype=torch.long, device=device)  # MASK or code index
        sampled = current
        for step in range(steps):
            code_ids = torch.where(current == self.mask_id, current, current + self.image_offset)
            ids = ids.scatter(1, code_cols, torch.cat([code_ids] * (2 if use_cfg else 1)))
            hidden = self._run_llm(ids, clip, valid, block, feats)
            logits = self.showo.lm_head(hidden.gather(1, code_cols[..., None].expand(-1, -1, hidden.shape[-1])))
            logits = logits[..., self.image_offset:self.image_offset + k].float()   # codes only, no [MASK]
            if use_cfg:
                cond, uncond = logits.chunk(2)
                logits = (1 + guidance_scale) * cond - guidance_scale * uncond
            probs = logits.softmax(-1)                                              # (B, n, K)
            sampled = torch.multinomial(probs.view(-1, k), 1, generator=gen).view(b, n)
            unknown = current == self.mask_id
            sampled = torch.where(unknown, sampled, current)
            ratio = (step + 1) / steps
            mask_len = math.floor(n * math.cos(math.pi / 2 * ratio))
            mask_len = torch.clamp(unknown.sum(-1, keepdim=True) - 1, max=mask_len).clamp(min=1)   # (B, 1)
            confidence = probs.gather(-1, sampled[..., None])[..., 0]
            confidence = torch.where(unknown, confidence, torch.finfo(confidence.dtype).max)
            # Show-o decays the choice temperature cumulatively (`temperature = temperature * (1 - ratio)` in
            # its loop); kept for parity with the released sampler.
            temperature = temperature * (1.0 - ratio)
            gumbel = -_log(-_log(torch.rand(confidence.shape, generator=gen, device=device)))
            confidence = _log(confidence) + temperature * gumbel
            cut = confidence.sort(-1).values.gather(1, mask_len)
            current = torch.where(confidence < cut, self.mask_id, sampled)
        return sampled

    @torch.no_grad()
    def sample(self, images: torch.Tensor, prompts: Sequence[str], *, seed: int = 0, **opts) -> torch.Tensor:
        """Generate (B, 3, R, R) float images in [0, 1] for (image, prompt) pairs; ``opts``: ``steps``,
        ``guidance_scale``, ``temperature`` (see :meth:`generate_codes`)."""
        return self.decode_codes(self.generate_codes(images, list(prompts), seed=seed, **opts))

    generate = sample   # the name Show-o's own code uses

    @torch.no_grad()
    def answer(self, images: torch.Tensor, questions: list[str], max_new_tokens: int = 32, *,
               early_stop: bool = True) -> list[str]:
        """Greedy answers in the understanding layout (<|mmu|> SYSTEM <|soi|> CLIP <|eoi|> "USER: q
        ASSISTANT:"), with Show-o's attention mask over the prompt (CLIP positions visible to all)."""
        from unimrg.models.decoding import greedy_answers, left_align
        if len(questions) != images.shape[0]:
            raise ValueError(f"Show-o answer: {images.shape[0]} images but {len(questions)} questions")
        device, _ = self._device_dtype()
        with self.evaluating():
            feats = self.image_features(images)                                  # (B, n_clip, hidden)
            head = [self.mmu_id] + (self._encode(self.system_message) if self.system_message else []) + [self.soi_id]
            nc = self.arch.num_clip_tokens
            seqs = [head + [self.pad_id] * nc + [self.eoi_id] + self._encode(f"USER: {q.strip()} ASSISTANT:")
                    for q in questions]
            length = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), length), self.pad_id, dtype=torch.long)
            valid = torch.zeros(len(seqs), length, dtype=torch.bool)
            clip = torch.zeros(len(seqs), length, dtype=torch.bool)
            for i, s in enumerate(seqs):
                ids[i, :len(s)] = torch.tensor(s)
                valid[i, :len(s)] = True
                clip[i, len(head):len(head) + nc] = True
            valid, ids, clip = left_align(valid.to(device), ids.to(device), clip.to(device))
            embed = self.showo.get_input_embeddings()
            embeds = embed(ids)
            embeds = embeds.masked_scatter(clip[..., None], feats.to(embeds.dtype))
            mask4d = attention_mask(valid, torch.zeros_like(ids), clip, embeds.dtype)
            return greedy_answers(self._tok(), self.showo.model, self.showo.lm_head, embed, embeds, valid,
                                  stop_ids=[self._eos_id()], max_new_tokens=max_new_tokens,
                                  early_stop=early_stop, prefix_mask_4d=mask4d)

    # ---- official weights ----------------------------------------------------------------------------
    def load_official(self, path: str | None = None, *, allow_missing: Sequence[str] = ()) -> LoadReport:
        """Show-o folder (or its ``pytorch_model.bin``) at ``path``; MAGVIT-v2 and CLIP-ViT from
        ``cfg.magvit_checkpoint`` / ``cfg.clip_checkpoint``. One report (``.parts``: per component). At
        full size a component left unloaded (e.g. no ``model.magvit_checkpoint``) is an error naming the
        field, not a random frozen tokenizer."""
        parts: dict[str, LoadReport] = {}
        if path:
            parts["showo"] = self.load_official_showo(path)
        if self.cfg.magvit_checkpoint:
            parts["vq_model"] = self.load_official_magvit(self.cfg.magvit_checkpoint)
        if self.cfg.clip_checkpoint:
            parts["vision_tower"] = self.load_official_clip(self.cfg.clip_checkpoint)
        report = LoadReport.merge(f"Show-o official weights ({', '.join(parts) or 'nothing'})", parts,
                                  self.state_dict())
        return self.check_load(report, allow_missing)

    def load_official_showo(self, path: str) -> LoadReport:
        self._check_showo_config(Path(path))
        state = read_state_dict(path, "Show-o checkpoint (model.checkpoint)")
        # A view holding the two parts the Show-o file owns (same modules, no copies): keys showo.*, mm_projector.*
        part = nn.ModuleDict({"showo": self.showo, "mm_projector": self.mm_projector})
        return load_checked(part, state, f"Show-o {path}")

    def load_official_magvit(self, path: str) -> LoadReport:
        state = read_state_dict(path, "MAGVIT-v2 checkpoint (model.magvit_checkpoint)")
        return load_checked(self.vq_model, state, f"MAGVIT-v2 {path}", prefix="vq_model.")

    def load_official_clip(self, path: str) -> LoadReport:
        """An HF CLIP folder (``CLIPModel`` layout, ``vision_model.*``) or a vision-only one; the text tower,
        projections and legacy ``position_ids`` buffers are ignored."""
        state = read_state_dict(path, "CLIP-ViT checkpoint (model.clip_checkpoint)")

        def rename(k: str) -> str | None:
            if k.endswith("position_ids") or not k.startswith("vision_model."):
                return None
            return k[len("vision_model."):]
        return load_checked(self.vision_tower, state, f"CLIP-ViT {path}", rename=rename, prefix="vision_tower.")

    def export_sources(self, paths: dict[str, Path]) -> dict[str, str]:
        return {"checkpoint": str(paths["showo"].parent), "magvit_checkpoint": str(paths["vq_model"].parent),
                "clip_checkpoint": str(paths["vision_tower"].parent)}

    def export_official(self, out_dir: str | Path, state_dict: dict[str, torch.Tensor] | None = None
                        ) -> dict[str, Path]:
        """Write the released layouts, each folder loadable the way Show-o's code loads it (offline):
        ``showo/`` (``pytorch_model.bin`` + ``config.json``: ``Showo.from_pretrained``), ``magvitv2/``
        (``pytorch_model.bin`` + ``config.json``: ``MAGVITv2.from_pretrained``) and ``clip-vit/`` (vision tower
        only: ``model.safetensors``, ``config.json`` and ``preprocessor_config.json`` for Show-o's
        ``CLIPVisionModel`` / ``CLIPVisionConfig`` / ``CLIPImageProcessor.from_pretrained``, `models/clip_encoder.py`).
        ``state_dict`` defaults to this model's (pass the trainer's consolidated ``final/model.pt``)."""
        sd = self.state_dict() if state_dict is None else state_dict
        out = Path(out_dir)
        showo = {k: v for k, v in sd.items() if k.startswith(("showo.", "mm_projector."))}
        magvit = {k[len("vq_model."):]: v for k, v in sd.items() if k.startswith("vq_model.")}
        clip = {"vision_model." + k[len("vision_tower."):]: v for k, v in sd.items() if k.startswith("vision_tower.")}
        paths = {"showo": write_state_dict(showo, out / "showo" / "pytorch_model.bin"),
                 "vq_model": write_state_dict(magvit, out / "magvitv2" / "pytorch_model.bin"),
                 "vision_tower": write_state_dict(clip, out / "clip-vit" / "model.safetensors")}
        (out / "showo" / "config.json").write_text(json.dumps(self._official_config(), indent=2) + "\n")
        # MAGVITv2 registers no config arguments (Show-o `models/modeling_magvitv2.py`): the class name is all.
        (out / "magvitv2" / "config.json").write_text(json.dumps({"_class_name": "MAGVITv2"}, indent=2) + "\n")
        self.vision_tower.config.save_pretrained(out / "clip-vit")
        _clip_image_processor(self.arch.clip.image_size).save_pretrained(out / "clip-vit")
        return paths

    def _official_config(self) -> dict:
        # The keys of Showo's registered config (`models/modeling_showo.py` __init__ arguments).
        a = self.arch
        return {"_class_name": "Showo", "w_clip_vit": True, "vocab_size": a.vocab_size,
                "llm_vocab_size": a.llm_vocab_size, "llm_model_path": "microsoft/phi-1_5",
                "codebook_size": a.codebook_size, "num_vq_tokens": a.num_image_tokens, "load_from_showo": False,
                "mask_token_id": self.mask_id}

    def _check_showo_config(self, path: Path) -> None:
        """Refuse a Show-o folder whose config.json describes another variant (e.g. show-o-512x512)."""
        cfg_file = path / "config.json" if path.is_dir() else path.parent / "config.json"
        if not cfg_file.is_file():
            return
        official = json.loads(cfg_file.read_text())
        ours = self._official_config()
        bad = [f"{k}={official[k]} (ours {ours[k]})" for k in ("vocab_size", "codebook_size", "num_vq_tokens")
               if k in official and official[k] != ours[k]]
        if official.get("w_clip_vit") is False:
            bad.append("w_clip_vit=false (this adapter is the CLIP-ViT variant: showlab/show-o-w-clip-vit)")
        if bad:
            raise ValueError(f"{cfg_file}: this Show-o checkpoint does not match the model: {', '.join(bad)}; "
                             "use show-o-w-clip-vit with model.size=full and a matching model.codebook_size")

    # ---- sequences ---------------------------------------------------------------------------------
    def _understanding_seqs(self, batch: UnderstandingBatch) -> list[_Seq]:
        """<|mmu|> SYSTEM <|soi|> [CLIP × n] <|eoi|> then the phi1.5 template "USER: q ASSISTANT: a<|endoftext|>"
        per round (Show-o `llava_instruct_data.py`); labels on each answer and its <|endoftext|>."""
        eos = self._eos_id()
        seqs = []
        with_image = batch.image_mask().tolist()
        for i, conv in enumerate(batch.conversations):
            key = batch.keys[i] if i < len(batch.keys) else f"#{i}"
            text, labels = [], []
            for role, value in dialogue_turns(conv, key):
                value = value.replace("<image>", "").strip()
                if role == "human":
                    ids = self._encode(f"USER: {value} ASSISTANT:")
                    labels += [IGNORE_INDEX] * len(ids)
                else:
                    ids = self._encode(f" {value}") + [eos]
                    labels += ids
                text += ids
            text, labels = cut_conversation(key, text, labels, self.cfg.max_text_len, field="max_text_len")
            s = _Seq(batch.task)
            s.ids = [self.mmu_id] + (self._encode(self.system_message) if self.system_message else [])
            if with_image[i]:            # a text-only conversation: no <|soi|> CLIP <|eoi|> block
                s.ids += [self.soi_id]
                s.clip_start = len(s.ids)
                s.ids += [self.pad_id] * self.arch.num_clip_tokens + [self.eoi_id]
            start = len(s.ids)
            s.ids += text
            s.preds = [start + j - 1 for j, t in enumerate(labels) if t != IGNORE_INDEX]
            s.targets = [t for t in labels if t != IGNORE_INDEX]
            seqs.append(s)
        return seqs

    def _generation_seq(self, task: str, prompt: str, codes: torch.Tensor, mask: torch.Tensor) -> _Seq:
        """<|t2i|> <|soi|> [CLIP × n] <|eoi|> <|endoftext|> prompt <|endoftext|> <|soi|> codes <|eoi|>.

        The condition block is Show-o's understanding layout; the text and image part is its t2i layout
        (`UniversalPrompting.t2i_prompt`), where an empty prompt is <bos><eos> (its unconditional form:
        the image condition stays). ``codes`` (n_img,) are code indices or ``mask_id``; ``mask`` marks
        the masked (scored) codes; <|eoi|> is scored too."""
        bos = eos = self._eos_id()
        text = self._encode(prompt.strip())[:self.cfg.max_prompt_len] if prompt.strip() else []
        s = _Seq(task)
        s.ids = [self.t2i_id, self.soi_id]
        s.clip_start = len(s.ids)
        s.ids += [self.pad_id] * self.arch.num_clip_tokens + [self.eoi_id, bos, *text, eos]
        start = len(s.ids)
        code_ids = torch.where(codes == self.mask_id, codes, codes + self.image_offset)
        s.ids += [self.soi_id] + torch.where(mask, self.mask_id, code_ids).tolist() + [self.eoi_id]
        s.block = (start, len(s.ids))          # <|soi|> … <|eoi|> inclusive, as Show-o's image segment
        # Scored as Show-o's `loss_t2i`: its labels (`t2i_prompt`) are the sequence with unmasked codes set
        # to -100, and `Showo.forward` takes the CE from the first image token on (`max_seq_length + 1:`), so
        # the masked codes and the closing <|eoi|> are scored (<|soi|> and the text fall before the slice).
        s.preds = (start + 1 + torch.nonzero(mask)[:, 0]).tolist() + [len(s.ids) - 1]
        s.targets = code_ids[mask].tolist() + [self.eoi_id]
        return s

    def _pack(self, seqs: list[_Seq]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-pad: ids (N, L), CLIP slots (N, L) bool, real tokens (N, L) bool, block id (N, L) long."""
        device, _ = self._device_dtype()
        n, length, nc = len(seqs), max(len(s.ids) for s in seqs), self.arch.num_clip_tokens
        ids = torch.full((n, length), self.pad_id, dtype=torch.long)
        clip = torch.zeros(n, length, dtype=torch.bool)
        valid = torch.zeros(n, length, dtype=torch.bool)
        block = torch.zeros(n, length, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s.ids)] = torch.tensor(s.ids)
            if s.clip_start >= 0:
                clip[i, s.clip_start:s.clip_start + nc] = True
            valid[i, :len(s.ids)] = True
            block[i, s.block[0]:s.block[1]] = 1
        return ids.to(device), clip.to(device), valid.to(device), block.to(device)

    def _run_llm(self, ids: torch.Tensor, clip: torch.Tensor, valid: torch.Tensor, block: torch.Tensor,
                 feats: torch.Tensor) -> torch.Tensor:
        """Embed (CLIP features in their slots), build Show-o's mask, run the Phi body: (N, L, hidden)."""
        embeds = self.showo.get_input_embeddings()(ids)                       # (N, L, hidden)
        embeds = embeds.masked_scatter(clip[..., None], feats.to(embeds.dtype))
        mask = attention_mask(valid, block, clip, embeds.dtype)                # (N, 1, L, L)
        return self.showo.model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state

    def _sample_masks(self, n: int, device: torch.device) -> torch.Tensor:
        """(n, n_img) bool: cosine schedule, ⌈round(n_img·cos(π/2·t))⌉ ≥ 1 random positions per image."""
        length = self.arch.num_image_tokens
        ratio = torch.cos(torch.rand(n, device=device) * math.pi / 2).clamp(min=self.cfg.min_masking_rate)
        count = (length * ratio).round().clamp(min=1)
        order = torch.rand(n, length, device=device).argsort(dim=-1)
        return order < count[:, None]

    # ---- internals -----------------------------------------------------------------------------------
    def _device_dtype(self) -> tuple[torch.device, torch.dtype]:
        # Metadata only: under ZeRO-3 a partitioned parameter keeps its dtype and device.
        p = next(self.mm_projector.parameters())
        return p.device, p.dtype

    def _check_prompts(self, b: GenerationBatch) -> None:
        if len(b.prompts) != len(b):
            raise ValueError(f"Show-o {b.task}: {len(b)} images but {len(b.prompts)} prompts (keys "
                             f"{list(b.keys)[:3]}...); the objective must fill GenerationBatch.prompts "
                             "(\"\" for unconditional)")
        if b.targets.shape[0] != len(b):
            raise ValueError(f"Show-o {b.task}: {len(b)} images but {b.targets.shape[0]} targets")

    def _eos_id(self) -> int:
        return self._tok().convert_tokens_to_ids(ENDOFTEXT)


def attention_mask(valid: torch.Tensor, block: torch.Tensor, clip: torch.Tensor, dtype: torch.dtype
                   ) -> torch.Tensor:
    """Show-o's attention pattern as a 4-D additive mask (N, 1, L, L): causal over text; full attention
    inside an image-token block (<|soi|>…<|eoi|>, `create_attention_mask_predict_next`); CLIP feature
    positions visible to every position (`create_attention_mask_for_mmu_vit`); padding never attended
    (a padding row sees itself only, so no row is empty)."""
    n, length = valid.shape
    causal = torch.ones(length, length, dtype=torch.bool, device=valid.device).tril()
    same_block = (block[:, :, None] == block[:, None, :]) & (block[:, :, None] > 0)
    allowed = (causal[None] | same_block | clip[:, None, :]) & valid[:, None, :]
    allowed |= torch.eye(length, dtype=torch.bool, device=valid.device)[None]
    out = torch.zeros(n, 1, length, length, dtype=dtype, device=valid.device)
    return out.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


def _log(t: torch.Tensor) -> torch.Tensor:
    return t.clamp(min=1e-20).log()


def _check_tokenizer(tok: PreTrainedTokenizerBase, arch: ShowoArch, where: str | None) -> None:
    """Show-o's ids are positional: '[PAD]' must sit right after the text vocabulary, then the nine task
    tokens, so that codes start at ``llm_vocab_size + 10`` as in the released embedding table."""
    for j, t in enumerate(NEW_SPECIAL_TOKENS):
        got = tok.convert_tokens_to_ids(t)
        if got != arch.llm_vocab_size + j:
            raise ValueError(f"tokenizer {where or '(built-in)'}: {t!r} has id {got}, Show-o expects "
                             f"{arch.llm_vocab_size + j}; use the microsoft/phi-1_5 tokenizer (50,295 tokens) "
                             "without other added tokens")
    if tok.convert_tokens_to_ids(ENDOFTEXT) in (None, tok.unk_token_id):
        raise ValueError(f"tokenizer {where or '(built-in)'} lacks {ENDOFTEXT!r} (Phi-1.5's bos/eos)")


def _clip_image_processor(size: int):
    """openai/clip-vit-large-patch14-336's preprocessor_config.json at ``size``: bicubic resize of the shorter
    side, centre crop, rescale, OpenAI CLIP mean/std."""
    from transformers import CLIPImageProcessor
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                              do_center_crop=True, do_resize=True, do_rescale=True, do_normalize=True,
                              resample=3, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
