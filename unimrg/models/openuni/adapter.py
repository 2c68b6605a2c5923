"""OpenUni (InternVL3 + 256 meta queries + connector + SANA + DC-AE) behind the UniMRG adapter protocol.

Structure and losses follow wusize/OpenUni `src/models/openuni/internvl3_sana_hf.py` (class
`OpenUniInternVL3SANAHF`, image2image path as used by RecA), with the understanding model in
transformers' own `InternVLForConditionalGeneration` layout instead of the vendored remote code.
Attribute names are the official top-level prefixes: `lmm`, `meta_queries`, `connector`, `projector`,
`transformer`, `vae`.

ZeRO-3: every weight is used through a submodule's forward (or, for `meta_queries`, inside this
module's forward), so DeepSpeed's hooks gather partitioned parameters; nothing here reads weight
values outside a forward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import InternVLForConditionalGeneration, PreTrainedTokenizerBase
from transformers.models.siglip.modeling_siglip import SiglipEncoder

from unimrg.data.batches import GenerationBatch, UnderstandingBatch
from unimrg.data.llava import dialogue_turns
from unimrg.data.transforms import STRETCH, Fit, ImageTransforms, resize_tensor
from unimrg.models.base import ModelConfig, Resolution, UMMAdapter
from unimrg.models.official_io import LoadReport
from unimrg.models.sequences import IGNORE_INDEX, cut_conversation, next_token_loss, pad_right
from unimrg.models.openuni.arch import (
    ENDOFTEXT, IM_END, IM_START, IMAGENET_MEAN, IMAGENET_STD, IMG_CONTEXT, IMG_END, IMG_START, INTERNVL_SYSTEM,
    NUM_TRAIN_TIMESTEPS, OpenUniArch, arch_for, smoke)

TINY_SPECIAL_TOKENS = (IM_START, IM_END, IMG_START, IMG_END, IMG_CONTEXT, ENDOFTEXT)


@dataclass
class OpenUniConfig(ModelConfig):
    """OpenUni (default OpenUni-L-512: InternVL3-2B + SANA-1600M-512px). Architecture numbers come from
    ``variant`` and ``size`` (see ``unimrg/models/openuni/arch.py``); these fields are what a run may choose."""

    name: str = "openuni"
    # Released variant: b512 (InternVL3-1B + SANA-0.6B-512px), l512, l1024 (InternVL3-2B + SANA1.5-1.6B-1024px),
    # or the official config names (openuni_b_internvl3_1b_sana_0_6b_512_hf, ...). Sets the native resolution.
    variant: str = "l512"
    # Full size: local folder with the InternVL3 tokenizer (1B and 2B share it; default: internvl_path).
    tokenizer: str | None = None
    # Official weights (local folders; `checkpoint` is the OpenUni release file, loaded last so it wins):
    internvl_path: str | None = None  # InternVL3-2B, original (vision_model/mlp1/language_model) or -hf layout
    sana_path: str | None = None      # Sana_1600M_512px_diffusers (pipeline folder or its transformer/)
    vae_path: str | None = None       # dc-ae-f32c32-sana-1.1-diffusers (or a pipeline folder with vae/)
    # None = InternVL3's default system prompt at full size, none at tiny size (keeps tiny sequences short).
    system_message: str | None = None
    max_length: int = 2048            # OpenUni's `max_length`: longer prompts keep their last tokens
    # OpenUni extracts the generation condition (InternViT + mlp1) under no_grad, so mlp1 learns only from
    # the understanding loss; True lets generation losses reach mlp1 as well.
    generation_grad_to_projector: bool = False
    # Flow shift of the training sigmas (u ~ U[0,1), σ = shift·u / (1 + (shift − 1)·u)). 1 is OpenUni's
    # fine-tuning (`diff_loss`), which the paper recipes keep; SANA's own pretraining used 3 (Sana configs,
    # `scheduler.flow_shift`). Larger values spend more samples at high noise, where only the condition can
    # tell where things are: the tiny recipes set it (launch/recipes/openuni_tiny.yaml says why).
    train_flow_shift: float = 1.0


def build_tokenizer(cfg: OpenUniConfig) -> PreTrainedTokenizerBase | None:
    """Byte tokenizer with the chat/image special tokens (tiny), or the local InternVL3 tokenizer (full)."""
    if cfg.size == "tiny":
        from unimrg.models.tokenizer import build_byte_tokenizer
        return build_byte_tokenizer(TINY_SPECIAL_TOKENS, pad_token=ENDOFTEXT, eos_token=IM_END)
    folder = cfg.tokenizer or cfg.internvl_path
    if folder is None:
        return None  # meta-device builds and weight conversion need no tokenizer; losses ask for it
    from transformers import AutoTokenizer
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"OpenUni tokenizer folder {folder!r} does not exist; set model.tokenizer (or "
                                "model.internvl_path) to the local InternVL3-2B folder")
    return AutoTokenizer.from_pretrained(folder)


class OpenUni(UMMAdapter):
    """UniMRG adapter for OpenUni. ``OpenUni(OpenUniConfig(size="tiny"))`` builds a random tiny model."""

    config_class = OpenUniConfig
    tokenizer_setting = "model.tokenizer=<local InternVL3-2B folder>"
    official_sources = {"internvl_path": ("lmm.",), "sana_path": ("transformer.",), "vae_path": ("vae.",),
                        "checkpoint": ("meta_queries", "connector.", "projector.", "transformer.", "lmm.")}

    def __init__(self, cfg: OpenUniConfig):
        super().__init__()
        self.cfg = cfg
        if not cfg.train_flow_shift > 0:
            raise ValueError(f"OpenUni: model.train_flow_shift must be > 0 (1 = OpenUni's training schedule), "
                             f"got {cfg.train_flow_shift!r}")
        self.tokenizer = build_tokenizer(cfg)
        tok = self.tokenizer
        if cfg.size == "tiny":
            arch = arch_for("tiny", vocab_size=len(tok), image_token_id=tok.convert_tokens_to_ids(IMG_CONTEXT),
                            variant=cfg.variant)
        else:
            arch = arch_for(cfg.size, variant=cfg.variant)
        if cfg.smoke:
            arch = smoke(arch)
        self.arch: OpenUniArch = arch
        if tok is not None:
            _check_tokenizer(tok, arch, cfg.tokenizer or cfg.internvl_path)
        self.system_message = (INTERNVL_SYSTEM if cfg.size == "full" else "") \
            if cfg.system_message is None else cfg.system_message

        # --- understanding model (InternViT + mlp1 + Qwen2.5 + lm_head), transformers layout -------------
        arch.internvl._attn_implementation = "sdpa"   # flash-attn is not available on CPU; sdpa everywhere
        self.lmm = InternVLForConditionalGeneration(arch.internvl)
        hidden = arch.internvl.text_config.hidden_size
        # --- generation bridge ----------------------------------------------------------------------
        # (num_queries, hidden), N(0, 1/hidden) as in OpenUni.
        self.meta_queries = nn.Parameter(torch.empty(arch.num_queries, hidden))
        nn.init.normal_(self.meta_queries, std=1 / math.sqrt(hidden))
        arch.connector._attn_implementation = "sdpa"
        # The official ConnectorEncoder has exactly SiglipEncoder's keys and maths (pre-LN, no final norm).
        self.connector = SiglipEncoder(arch.connector)
        _init_connector(self.connector)
        # proj_type "enc_proj": connector at LLM width, then Linear to SANA's caption channels.
        self.projector = nn.Linear(arch.connector.hidden_size, arch.sana["caption_channels"])
        # --- generator ------------------------------------------------------------------------------
        # diffusers is imported here, not at the top: submit.py imports every adapter on the login node for
        # its batch / sequence plan, and diffusers' import (~3 s, torch._dynamo) would be paid on each launch.
        from diffusers import AutoencoderDC, SanaTransformer2DModel
        self.transformer = SanaTransformer2DModel(**arch.sana)
        self.vae = AutoencoderDC(**arch.vae)
        self._schedule: tuple[torch.Tensor, torch.Tensor] | None = None  # built lazily (meta-safe)

    # ---- protocol ------------------------------------------------------------------------------
    @classmethod
    def native_resolution(cls, cfg: OpenUniConfig) -> Resolution:
        # Full: InternViT reads 448 px (wusize/OpenUni `src/models/openuni/internvl3_sana_hf.py`,
        # `vit_input_size=448`); the variant's SANA generates 512 or 1024 px (`configs/datasets/
        # internvl3_{1b_512,2b_512,2b_1024}/processors.py`, `image_size`). Tiny: the tiny arch's sizes.
        arch = arch_for(cfg.size, vocab_size=1, image_token_id=0, variant=cfg.variant)
        return Resolution(arch.vit_image_size, arch.gen_image_size)

    # Released preprocessing. Generation targets: the centred square of the shorter side, resized to 512
    # (bicubic) — wusize/OpenUni src/datasets/image2image/edit_datasets.py ReconstructDataset:
    # crop2square, then PIL resize; its crop offset is random (src/datasets/utils.py), we take the
    # centre so that image, depth and seg crops agree and a resumed run sees the same pixels. Condition:
    # that 512 picture resized to 448 bilinearly without antialias (src/models/openuni/
    # internvl3_sana_hf.py get_semantic_features: F.interpolate(..., mode='bilinear')). Understanding:
    # InternVL's own single-tile input — dynamic_preprocess with one tile resizes the whole image to
    # 448×448 (PIL bicubic); UniMRG feeds one tile (256 tokens), OpenUni's release trains no understanding.
    release_transforms = ImageTransforms(
        understanding=STRETCH, target=Fit("crop", offset="floor"), condition=None, condition_resize="bilinear",
        source="OpenUni: ReconstructDataset crop2square (centred) → 512; get_semantic_features bilinear → 448")

    @classmethod
    def sequence_plan(cls, cfg: OpenUniConfig, task: str) -> dict[str, int]:
        # The adapter brings any loader size to the encoders' own (InternViT, DC-AE): token counts are the arch's.
        from unimrg.models.openuni.arch import vae_downsample
        arch = arch_for(cfg.size, vocab_size=1, image_token_id=0, variant=cfg.variant)
        if task == "und":
            return {"image tokens": arch.image_seq_length, "sequence ≤": cfg.max_length}
        latent = (arch.gen_image_size // vae_downsample(arch.vae)) ** 2
        return {"condition image tokens": arch.image_seq_length, "queries": arch.num_queries,
                "LLM sequence ≤": cfg.max_length + arch.num_queries, "target latent tokens": latent}

    def frozen_module_names(self) -> list[str]:
        # UniMRG freezes the understanding encoder when it is not shared with generation (InternViT) and
        # the VAE; LLM, mlp1, queries, connector, projector and SANA train.
        return ["lmm.model.vision_tower", "vae"]

    def understanding_module_names(self) -> list[str]:
        """What the paper's second stage freezes ("understanding part"): the whole InternVL3 model."""
        return ["lmm"]

    def understanding_loss(self, batch: UnderstandingBatch) -> torch.Tensor:
        device, dtype = self._device_dtype()
        ids, labels, mask = self._conversation_ids(batch)
        # Text-only conversations (und_text) have no image tokens, so only the others' features are
        # placed. The vision path still runs on every image, placeholders included, and the unused
        # features join the loss with weight 0: every rank then runs the same modules and gives every
        # trainable parameter a gradient whatever its text/image mix, as ZeRO's collectives require.
        with_image = batch.image_mask().to(device)
        pixel_values = self._vit_pixels(batch.images, device, dtype)        # (B, 3, 448, 448) normalised
        cfg = self.lmm.config
        image = self.lmm.model.get_image_features(
            pixel_values=pixel_values, vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy)
        feats = image.pooler_output                                          # (B, image tokens, hidden)
        image.pooler_output = feats[with_image]
        hidden = self.lmm.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                mm_encoder_outputs={"image": image} if bool(with_image.any()) else None,
                                use_cache=False).last_hidden_state
        loss = next_token_loss(self.lmm.lm_head, hidden, labels)           # InternVL's loss, head on answers only
        if not bool(with_image.all()):
            loss = loss + feats[~with_image].sum() * 0.0
        return loss

    def generation_loss(self, batch: GenerationBatch) -> torch.Tensor:
        cond = self.condition(batch.images, batch.prompts, keys=batch.keys, task=batch.task)  # (B, Q, caption)
        latents = self.encode_targets(batch.targets)                         # (B, C, h, w), scaled
        return self._flow_matching_loss(latents, cond)

    # ---- generation pieces (shared with sampling) ------------------------------------------------
    def condition(self, images: torch.Tensor, prompts: list[str], keys: list[str] = (),
                  task: str = "generation") -> torch.Tensor:
        """SANA's ``encoder_hidden_states`` for each (image, prompt): InternVL features of the image in the
        IMG_CONTEXT slots of ``<img>…</img>\\n{prompt}`` (chat format), then the queries; the queries' last
        hidden states go through connector and projector. ``prompt == ""`` is the unconditional branch
        (the image features stay). Returns (B, num_queries, caption_channels)."""
        device, dtype = self._device_dtype()
        if len(prompts) != images.shape[0]:
            raise ValueError(f"OpenUni {task}: {images.shape[0]} images but {len(prompts)} prompts "
                             f"(keys {list(keys)[:3]}...); the objective must fill GenerationBatch.prompts "
                             "(\"\" for unconditional)")
        grad = self.cfg.generation_grad_to_projector and torch.is_grad_enabled()
        with torch.set_grad_enabled(grad):
            feats = self.lmm.model.get_image_features(                      # (B, N, hidden)
                pixel_values=self._vit_pixels(images, device, dtype, condition=True)).pooler_output
        ids, mask = self._generation_prompt_ids(prompts, n_image_tokens=feats.shape[1])
        ids, mask = ids.to(device), mask.to(device)
        embeds = self.lmm.get_input_embeddings()(ids)                       # (B, L, hidden)
        image_slots = (ids == self.arch.internvl.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(image_slots, feats.to(embeds.dtype))
        if embeds.shape[1] > self.cfg.max_length:                           # OpenUni keeps the last tokens
            embeds, mask = embeds[:, -self.cfg.max_length:], mask[:, -self.cfg.max_length:]
        b, q = embeds.shape[0], self.arch.num_queries
        queries = self.meta_queries.unsqueeze(0).expand(b, q, -1).to(embeds.dtype)   # (B, Q, hidden)
        embeds = torch.cat([embeds, queries], dim=1)
        mask = torch.cat([mask, mask.new_ones(b, q)], dim=1)
        # Right padding sits between prompt and queries; positions skip it (OpenUni prepare_forward_input).
        position_ids = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
        hidden = self.lmm.model.language_model(inputs_embeds=embeds, attention_mask=mask,
                                               position_ids=position_ids, use_cache=False).last_hidden_state
        hidden = hidden[:, -q:]                                             # (B, Q, hidden)
        return self.projector(self.connector(inputs_embeds=hidden).last_hidden_state)

    def encode_targets(self, targets: torch.Tensor) -> torch.Tensor:
        """Float [0, 1] (B, 3, H, W) → scaled DC-AE latents (B, C, S/f, S/f) at the generation size."""
        device, dtype = self._device_dtype()
        x = resize_tensor(targets.to(device=device, dtype=torch.float32), self.arch.gen_image_size)
        x = (x * 2 - 1).to(dtype)                                           # the VAE reads [-1, 1]
        with torch.no_grad():
            return self.vae.encode(x).latent * self.vae.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents → float images in [0, 1], (B, 3, S, S)."""
        with torch.no_grad():
            x = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        return ((x.float() + 1) / 2).clamp(0, 1)

    # ---- sampling --------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, images: torch.Tensor, prompts: list[str], *, negative_prompts: list[str] | None = None,
               cfg_scale: float = 4.5, num_steps: int = 20, seed: int = 0, scheduler: str = "dpm") -> torch.Tensor:
        """Generate from (image, prompt) pairs as OpenUni's inference does: SanaPipeline on precomputed
        condition embeddings, classifier-free guidance against ``negative_prompts`` (default "": the
        unconditional branch trained by prompt dropout; the image features stay in both branches).

        ``scheduler``: "dpm" (DPM-Solver++ with flow sigmas, shift 3 — OpenUni's test scheduler) or "euler"
        (flow-match Euler, shift 3). Same seed → same output. Returns float (B, 3, S, S) in [0, 1]."""
        from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, SanaPipeline

        from unimrg.models.openuni.arch import SAMPLING_FLOW_SHIFT
        device, dtype = self._device_dtype()
        with self.evaluating():
            b = images.shape[0]
            cond = self.condition(images, prompts)                           # (B, Q, caption)
            neg = self.condition(images, negative_prompts if negative_prompts is not None else [""] * b)
            if scheduler == "dpm":
                sched = DPMSolverMultistepScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS,
                                                    flow_shift=SAMPLING_FLOW_SHIFT, use_flow_sigmas=True,
                                                    prediction_type="flow_prediction")
            elif scheduler == "euler":
                sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS,
                                                        shift=SAMPLING_FLOW_SHIFT)
            else:
                raise ValueError(f"unknown scheduler {scheduler!r}; use 'dpm' or 'euler'")
            pipe = SanaPipeline(tokenizer=None, text_encoder=None, vae=self.vae, transformer=self.transformer,
                                scheduler=sched)
            pipe.set_progress_bar_config(disable=True)
            ones = torch.ones(b, cond.shape[1], dtype=torch.bool, device=device)
            size = self.arch.gen_image_size
            latents = pipe(prompt=None, negative_prompt=None, prompt_embeds=cond, prompt_attention_mask=ones,
                           negative_prompt_embeds=neg, negative_prompt_attention_mask=ones, height=size, width=size,
                           num_inference_steps=num_steps, guidance_scale=cfg_scale,
                           generator=torch.Generator(device=device).manual_seed(seed), output_type="latent",
                           use_resolution_binning=False, complex_human_instruction=None).images
            return self.decode_latents(latents.to(dtype))

    @torch.no_grad()
    def answer(self, images: torch.Tensor, questions: list[str], max_new_tokens: int = 32, *,
               early_stop: bool = True) -> list[str]:
        """Greedy answers in the understanding format (InternVL chat, ``<img>…</img>\\n{question}``)."""
        from unimrg.models.decoding import greedy_answers, left_align
        if len(questions) != images.shape[0]:
            raise ValueError(f"OpenUni.answer: {images.shape[0]} images but {len(questions)} questions")
        device, dtype = self._device_dtype()
        with self.evaluating():
            feats = self.lmm.model.get_image_features(                      # (B, N, hidden)
                pixel_values=self._vit_pixels(images, device, dtype)).pooler_output
            system = f"{IM_START}system\n{self.system_message}{IM_END}\n" if self.system_message else ""
            seqs = [self._encode(f"{system}{IM_START}user\n{self._image_tokens(feats.shape[1])}\n{q.strip()}"
                                 f"{IM_END}\n{IM_START}assistant\n") for q in questions]
            ids, mask = pad_right(seqs, self._pad_id())
            ids, mask = ids.to(device), mask.to(device)
            embed = self.lmm.get_input_embeddings()
            embeds = embed(ids)
            embeds = embeds.masked_scatter((ids == self.arch.internvl.image_token_id).unsqueeze(-1),
                                           feats.to(embeds.dtype))
            mask, embeds = left_align(mask, embeds)
            tok = self._tok()
            return greedy_answers(tok, self.lmm.model.language_model, self.lmm.lm_head, embed, embeds, mask,
                                  stop_ids=[tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(ENDOFTEXT)],
                                  max_new_tokens=max_new_tokens, early_stop=early_stop)

    # ---- official weights ------------------------------------------------------------------------
    def load_official(self, path: str | None = None, *, allow_missing: Sequence[str] = ()) -> LoadReport:
        """Load InternVL3-2B (``cfg.internvl_path``), SANA (``cfg.sana_path``), DC-AE (``cfg.vae_path``) and
        then the OpenUni checkpoint ``path`` (overrides what it contains). Fails naming every key no source
        provides or no parameter takes, unless ``cfg.allow_missing`` / ``cfg.allow_unexpected`` allow it."""
        from unimrg.models.official_io import load_checked
        from unimrg.models.openuni import weights as W
        cfg = self.cfg
        sources = []
        if cfg.internvl_path:
            sources.append(W.read_internvl(cfg.internvl_path))
        if cfg.sana_path:
            sources.append(W.read_diffusers(cfg.sana_path, "transformer", self.arch.sana, "transformer."))
        if cfg.vae_path:
            sources.append(W.read_diffusers(cfg.vae_path, "vae", self.arch.vae, "vae."))
        if path:
            sources.append(W.read_openuni_checkpoint(path))
        if not sources:
            raise ValueError("OpenUni.load_official: nothing to load; set model.checkpoint (OpenUni release file) "
                             "and/or model.internvl_path, model.sana_path, model.vae_path")
        state: dict[str, torch.Tensor] = {}
        origin: dict[str, str] = {}
        unexpected: list[tuple[str, str]] = []
        for src in sources:
            state.update(src.state)
            origin.update(dict.fromkeys(src.state, src.what))
            unexpected += [(k, src.what) for k in src.unexpected]
        report = load_checked(self, state, what="OpenUni official weights (" + "; ".join(s.what for s in sources) + ")")
        unexpected += [(k, origin[k]) for k in report.unexpected]
        report.unexpected = [f"{k} (from {w})" for k, w in unexpected]
        # OpenUni refuses incomplete loads at every size (its tests load tiny official folders strictly).
        return self.check_load(report, allow_missing, strict=True)

    def export_official(self, out_dir: str | Path) -> dict[str, Path]:
        """The release layout: (a) ``openuni.pth``, exactly the keys of the OpenUni release files (queries,
        connector, projector, SANA: ``weights.RELEASE_PREFIXES``), for ``--checkpoint`` of the official scripts;
        (b) ``internvl_hf/``, the trained InternVL3 as a self-contained transformers folder (config, weights,
        tokenizer, image processor); when ``cfg.internvl_path`` is an original-layout folder, also (c)
        ``internvl_original/``: that folder's config/code/tokenizer files with the trained weights, the folder
        OpenUni's configs load the LMM from (``internvl3_model_name_or_path``). The frozen DC-AE is not copied:
        it is the public dc-ae-f32c32-sana-1.1, unchanged (``model.vae_path`` loads it back)."""
        from unimrg.models.official_io import write_state_dict
        from unimrg.models.openuni import weights as W
        self._check_materialised("export_official")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = self.state_dict()
        paths = {"openuni": write_state_dict(W.openuni_checkpoint_state(state), out / "openuni.pth")}
        hf = out / "internvl_hf"
        self.lmm.save_pretrained(hf)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(hf)
        layout = W.internvl_layout(self.cfg.internvl_path) if self.cfg.internvl_path else None
        if layout == "transformers":
            W.copy_non_weight_files(self.cfg.internvl_path, hf, overwrite=False)  # processor / chat template
        W.write_internvl_processor(hf, self.arch.vit_image_size, self.arch.image_seq_length, IMAGENET_MEAN,
                                   IMAGENET_STD)
        paths["internvl_hf"] = hf
        if layout == "original":
            orig = out / "internvl_original"
            orig.mkdir(exist_ok=True)
            W.copy_non_weight_files(self.cfg.internvl_path, orig, overwrite=True)
            lmm = {k[len("lmm."):]: v for k, v in state.items() if k.startswith("lmm.")}
            write_state_dict(W.internvl_hf_to_original(lmm), orig / "model.safetensors")
            paths["internvl_original"] = orig
        return paths

    def export_sources(self, paths: dict[str, Path]) -> dict[str, str]:
        return {"internvl_path": str(paths["internvl_hf"]), "checkpoint": str(paths["openuni"])}

    def component_counts(self) -> dict[str, int]:
        """Parameters per component (works on the meta device). ``embed_tokens`` is part of ``language_model``."""
        m = self.lmm.model
        parts = {"vision_tower": m.vision_tower, "multi_modal_projector": m.multi_modal_projector,
                 "language_model": m.language_model, "embed_tokens": m.language_model.embed_tokens,
                 "lm_head": self.lmm.lm_head, "connector": self.connector, "projector": self.projector,
                 "transformer": self.transformer, "vae": self.vae}
        counts = {k: sum(p.numel() for p in v.parameters()) for k, v in parts.items()}
        counts["meta_queries"] = self.meta_queries.numel()
        return counts

    def _check_materialised(self, what: str) -> None:
        if any(hasattr(p, "ds_id") for p in self.parameters()):
            raise RuntimeError(f"OpenUni.{what}: parameters are partitioned by ZeRO-3; consolidate first (load the "
                               "checkpoint's fp32 state dict into a plain model) and call it there")

    # ---- internals -------------------------------------------------------------------------------
    def _device_dtype(self) -> tuple[torch.device, torch.dtype]:
        # Metadata only: under ZeRO-3 a partitioned parameter keeps its dtype and device.
        p = next(self.projector.parameters())
        return p.device, p.dtype

    def _train_schedule(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(timesteps, sigmas), each (1000,) float32 on CPU: FlowMatchEulerDiscreteScheduler with
        ``model.train_flow_shift`` (1 = OpenUni's)."""
        if self._schedule is None:
            from diffusers import FlowMatchEulerDiscreteScheduler
            with torch.device("cpu"):  # the model may have been built under a meta/cuda default device
                s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS,
                                                    shift=float(self.cfg.train_flow_shift))
                self._schedule = (s.timesteps.float().cpu(), s.sigmas[:NUM_TRAIN_TIMESTEPS].float().cpu())
        return self._schedule

    def _flow_matching_loss(self, latents: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Rectified flow as OpenUni's `diff_loss`: u ~ U[0,1) (weighting "none"), t = timesteps[u·1000]
        (shifted by ``model.train_flow_shift`` when it is not 1),
        z_t = (1−σ)·z + σ·ε, target ε − z, unweighted MSE."""
        timesteps, sigmas = self._train_schedule()
        b = latents.shape[0]
        idx = (torch.rand(b) * NUM_TRAIN_TIMESTEPS).long()                  # CPU RNG, as diffusers' sampler
        t = timesteps[idx].to(latents.device)
        sigma = sigmas[idx].to(device=latents.device, dtype=latents.dtype).view(b, 1, 1, 1)
        noise = torch.randn_like(latents)
        noisy = (1.0 - sigma) * latents + sigma * noise
        pred = self.transformer(hidden_states=noisy, encoder_hidden_states=cond, timestep=t,
                                return_dict=False)[0]
        target = noise - latents
        return ((pred.float() - target.float()) ** 2).reshape(b, -1).mean(dim=1).mean()

    def _vit_pixels(self, images: torch.Tensor, device: torch.device, dtype: torch.dtype,
                    condition: bool = False) -> torch.Tensor:
        """uint8 (B, 3, H, W) → ImageNet-normalised (B, 3, S, S) at InternViT's input size. Other sizes
        (the loaders deliver S) are resized as the release does: a generation condition bilinearly without
        antialias (OpenUni's get_semantic_features), an understanding image bicubic (InternVL's PIL resize)."""
        if images.dtype != torch.uint8:
            raise TypeError(f"OpenUni expects uint8 images (B, 3, H, W), got {images.dtype}")
        x = resize_tensor(images.to(device=device, dtype=torch.float32) / 255.0, self.arch.vit_image_size,
                          *(("bilinear", False) if condition else ("bicubic", True)))
        mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
        return ((x - mean) / std).to(dtype)

    def _image_tokens(self, n: int) -> str:
        return IMG_START + IMG_CONTEXT * n + IMG_END

    def _generation_prompt_ids(self, prompts: list[str], n_image_tokens: int
                               ) -> tuple[torch.Tensor, torch.Tensor]:
        """OpenUni image2image prompt (`src/datasets/image2image/edit_datasets.py` `_process_text`):
        INSTRUCTION.format(<img>IMG_CONTEXT×N</img>\\n{prompt}) + <img>; no system turn. Right-padded."""
        seqs = []
        for p in prompts:
            text = (f"{IM_START}user\n{self._image_tokens(n_image_tokens)}\n{p.strip()}{IM_END}\n"
                    f"{IM_START}assistant\n{IMG_START}")
            seqs.append(self._encode(text))
        return pad_right(seqs, self._pad_id())

    def _conversation_ids(self, batch: UnderstandingBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """InternVL chat format; labels on the assistant turns (answer + <|im_end|>\\n), IGNORE elsewhere.
        Returns input_ids, labels (B, L) long and attention mask (B, L) bool, right-padded."""
        n_img = self.arch.image_seq_length
        all_ids, all_labels = [], []
        with_image = batch.image_mask().tolist()
        for i, conv in enumerate(batch.conversations):
            key = batch.keys[i] if i < len(batch.keys) else f"#{i}"
            ids, labels = [], []
            has_image = with_image[i]

            def add(text: str, train: bool) -> None:
                t = self._encode(text)
                ids.extend(t)
                labels.extend(t if train else [IGNORE_INDEX] * len(t))

            if self.system_message:
                add(f"{IM_START}system\n{self.system_message}{IM_END}\n", False)
            placed = not has_image        # a text-only conversation gets no image tokens
            for role, value in dialogue_turns(conv, key):
                if role == "human":
                    if not placed:
                        # One image per sample: the first <image> becomes the image tokens (InternVL replaces
                        # once); a conversation without one gets it at the start, as LLaVA data expects.
                        if "<image>" not in value:
                            value = "<image>\n" + value
                        value = value.replace("<image>", self._image_tokens(n_img), 1)
                        placed = True
                    add(f"{IM_START}user\n{value}{IM_END}\n{IM_START}assistant\n", False)
                else:
                    add(f"{value}{IM_END}\n", True)
            ids, labels = cut_conversation(key, ids, labels, self.cfg.max_length,
                                           image_token_id=self.arch.internvl.image_token_id,
                                           image_tokens=n_img if has_image else 0)
            all_ids.append(ids)
            all_labels.append(labels)
        ids, mask = pad_right(all_ids, self._pad_id())
        labels, _ = pad_right(all_labels, IGNORE_INDEX)
        return ids, labels, mask

    def _pad_id(self) -> int:
        tok = self._tok()
        return tok.pad_token_id if tok.pad_token_id is not None else tok.convert_tokens_to_ids(ENDOFTEXT)


# ---- helpers -------------------------------------------------------------------------------------


def _init_connector(connector: nn.Module) -> None:
    """OpenUni's connector init (`src/models/connector/modeling_connector.py` `init_weights`): Xavier-uniform
    projections, zero attention biases, N(0, 1e-6) MLP biases, unit LayerNorms.

    Under DeepSpeed's ``zero.Init`` each submodule's weights are partitioned as soon as it is built (they
    carry ``ds_id``); those keep torch's default init, which is identical on every rank given the seed, and
    official weights replace them anyway."""
    for name, m in connector.named_modules():
        if any(hasattr(p, "ds_id") for p in m.parameters(recurse=False)):
            continue
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if name.endswith(("fc1", "fc2")):
                nn.init.normal_(m.bias, std=1e-6)
            else:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _check_tokenizer(tok: PreTrainedTokenizerBase, arch: OpenUniArch, where: str | None) -> None:
    unk = tok.unk_token_id
    for t in (IM_START, IM_END, IMG_START, IMG_END, IMG_CONTEXT):
        i = tok.convert_tokens_to_ids(t)
        if i is None or (unk is not None and i == unk):
            raise ValueError(f"tokenizer {where or '(built-in)'} lacks the special token {t!r}; use the "
                             "InternVL3-2B tokenizer folder")
    if tok.convert_tokens_to_ids(IMG_CONTEXT) != arch.internvl.image_token_id:
        raise ValueError(f"tokenizer {where}: {IMG_CONTEXT} has id {tok.convert_tokens_to_ids(IMG_CONTEXT)}, the "
                         f"model expects {arch.internvl.image_token_id}; use the InternVL3-2B tokenizer")
