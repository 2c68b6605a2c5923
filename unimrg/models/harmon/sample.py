"""Harmon sampling: MAR iterative unmasking with the per-token diffusion head, classifier-free guidance
and temperature, seeded.

    images = model.sample(src_uint8, ["Generate the depth map of this image."], cfg=3.0, seed=0)

Follows wusize/Harmon `src/models/harmon.py` `Harmon.sample` (and RecA's `sample_recon` for the image-
conditioned prompt): the prompt (with the condition image's features) is run once into a KV cache; each
of ``num_iter`` steps encodes the already-known tokens with the MAR encoder, runs them through the LLM
after the cached prompt, decodes all positions with the MAR decoder, and samples the tokens that the
cosine schedule (MaskGIT: mask ratio cos(π/2 · (step+1)/num_iter), at least one token per step) unmasks
next, in a random per-sample order. The unconditional branch of CFG is the bare "Generate an image."
prompt (RecA `sample_recon`; ``uncond_with_image=True`` keeps the image in it). Harmon's scripts use
num_iter 64, cfg 3.0, constant schedule, temperature 1.0, 100 diffusion steps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from unimrg.models.harmon.adapter import Harmon


@torch.no_grad()
def sample(model: Harmon, images: torch.Tensor | None, prompts: Sequence[str], *, num_iter: int = 64,
           cfg: float = 3.0, cfg_schedule: str = "constant", temperature: float = 1.0, seed: int = 0,
           uncond_with_image: bool = False, image_size: int | None = None) -> torch.Tensor:
    """Generate one image per prompt → float (B, 3, S, S) in [0, 1], S = ``image_size`` or the model's.

    Args:
        images: uint8 (B, 3, H, W) condition images, or None for text-only prompts.
        prompts: one per sample; "" is the unconditional prompt.
        cfg: guidance scale (1.0 = no unconditional branch). cfg_schedule: "constant" | "linear" (Muse).
        seed: the same seed gives the same images (a private generator; global RNG state is untouched).
    """
    if num_iter < 1:
        raise ValueError(f"num_iter must be ≥ 1, got {num_iter}")
    if cfg_schedule not in ("constant", "linear"):
        raise ValueError(f"cfg_schedule must be 'constant' or 'linear', got {cfg_schedule!r}")
    b = len(prompts)
    if images is not None and images.shape[0] != b:
        raise ValueError(f"{images.shape[0]} images but {b} prompts")
    device, dtype = model._device_dtype()
    size = image_size or model.cfg.image_size
    if size % 16:
        raise ValueError(f"image_size {size} is not a multiple of 16 (the VAE stride)")
    grid = (size // 16, size // 16)
    n = grid[0] * grid[1]
    token_dim = model.mar.token_dim
    gen = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        feats = None
        if images is not None:
            src, src_grid = model.encode_latents(model._pixels(images, device, "images"))
            feats = model.visual_features(src, src_grid)[1]                   # (B, I, H)
        guided = cfg != 1.0
        prefix, prefix_mask, valid = model._prompt_prefix(feats, prompts)
        if guided:
            un_prefix, un_mask, un_valid = model._prompt_prefix(feats if uncond_with_image else None, [""] * b)
            prefix, prefix_mask = _cat_padded(prefix, prefix_mask, un_prefix, un_mask)
            valid = torch.cat([valid, un_valid])
        rows = prefix.shape[0]                                                 # B or 2B
        out = model.llm.model(inputs_embeds=prefix, attention_mask=prefix_mask,
                              position_ids=(prefix_mask.long().cumsum(1) - 1).clamp(min=0), use_cache=True)
        cache = out.cache

        tokens = torch.zeros(b, n, token_dim, device=device, dtype=torch.float32)
        mask = torch.ones(b, n, device=device)
        orders = torch.argsort(torch.rand(b, n, generator=gen, device=device), dim=1)
        buf = model.cfg.buffer_size
        for step in range(num_iter):
            tok_in, mask_in = (torch.cat([tokens, tokens]), torch.cat([mask, mask])) if guided else (tokens, mask)
            x_enc, z = model.visual_features(tok_in.to(dtype), grid, mask_in)  # (rows, buf + kept, ·)
            t = z.shape[1]
            attn = torch.cat([prefix_mask, prefix_mask.new_ones(rows, t)], dim=1)
            pos = valid[:, None] + torch.arange(t, device=device)[None]
            hidden = model.llm.model(inputs_embeds=z.to(prefix.dtype), attention_mask=attn, position_ids=pos,
                                     cache=cache, use_cache=True).last_hidden_state
            cache.crop(-t)                                                     # keep only the prompt
            hidden = torch.cat([hidden[:, t - buf:], hidden[:, :t - buf]], dim=1)
            cond = model.mar(x_enc + model.proj_out(hidden), mask_in, grid, part="decoder")  # (rows, N, W)

            masked = int(mask[0].sum().item())
            mask_len = math.floor(n * math.cos(math.pi / 2 * (step + 1) / num_iter))
            mask_len = max(1, min(masked - 1, mask_len))
            mask_next = torch.zeros_like(mask).scatter_(1, orders[:, :mask_len], 1.0)
            to_pred = mask.bool() if step == num_iter - 1 else mask.bool() ^ mask_next.bool()
            scale = cfg if cfg_schedule == "constant" else 1 + (cfg - 1) * (n - mask_len) / n
            z_uncond = cond[b:][to_pred] if guided else None
            new = model.mar.diffloss.sample(cond[:b][to_pred], z_uncond, temperature, scale, generator=gen)
            tokens[to_pred] = new
            mask = mask_next
        return model.decode_latents(tokens, grid)
    finally:
        model.train(was_training)


def _cat_padded(a: torch.Tensor, a_mask: torch.Tensor, b: torch.Tensor, b_mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack two right-padded batches of embeddings (B, L, H) of different lengths."""
    n = max(a.shape[1], b.shape[1])

    def pad(x: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        extra = n - x.shape[1]
        return (torch.cat([x, x.new_zeros(x.shape[0], extra, x.shape[2])], dim=1),
                torch.cat([m, m.new_zeros(m.shape[0], extra)], dim=1))

    (a, a_mask), (b, b_mask) = pad(a, a_mask), pad(b, b_mask)
    return torch.cat([a, b]), torch.cat([a_mask, b_mask])
