"""MAR encoder / decoder (Li et al., "Autoregressive Image Generation without Vector Quantization") as
Harmon uses it, in plain torch.

Structure and parameter names follow wusize/Harmon `src/models/mar/mar.py` (class `MAR`, `mar_huge`) and
timm's `vision_transformer.Block` that it instantiates, so the released `mar.*` keys load unchanged:
`z_proj`, `z_proj_ln`, `encoder_pos_embed_learned`, `encoder_blocks.{i}.{norm1, attn.qkv, attn.proj,
norm2, mlp.fc1, mlp.fc2}`, `encoder_norm`, `decoder_embed`, `mask_token`, `decoder_pos_embed_learned`,
`decoder_blocks.{i}...`, `decoder_norm`, `diffusion_pos_embed_learned`, `fake_latent`, `class_emb`,
`diffloss.net.*`. timm is not used (it would pull torchvision, see notes/offline.md).

ZeRO-3: :class:`MAR` owns parameters directly (position embeddings, `fake_latent`, `mask_token`), which
DeepSpeed gathers only inside ``MAR.forward``; callers therefore go through ``mar(..., part="encoder")``
and ``mar(..., part="decoder")``, never through helper methods that read those tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from unimrg.models.harmon.diffloss import DiffLoss


class Attention(nn.Module):
    """timm `Attention` without q/k norm: fused qkv (bias), scaled dot product, output projection."""

    def __init__(self, dim: int, heads: int, attn_drop: float, proj_drop: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"MAR width {dim} is not divisible by {heads} heads")
        self.heads, self.attn_drop = heads, attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:       # (B, N, D) → (B, N, D)
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, d)))


class Mlp(nn.Module):
    """timm `Mlp`: fc1 → exact GELU → dropout → fc2 → dropout (both dropouts use MAR's proj_dropout)."""

    def __init__(self, dim: int, hidden: int, drop: float):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.act, self.drop = nn.GELU(), nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm ViT block (timm `Block` with qkv_bias=True, LayerNorm eps 1e-6, no layer scale / drop path)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, attn_drop: float, proj_drop: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, attn_drop, proj_drop)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MAR(nn.Module):
    """MAR encoder/decoder over VAE latent tokens, with ``buffer_size`` leading buffer tokens and the
    per-token diffusion head ``diffloss``.

    Args:
        width, depth, heads: encoder and decoder share them (MAR-H: 1280, 20, 16).
        token_dim: VAE latent channels × patch_size² (KL-16: 16 × 1).
        grid: side of the learned position-embedding grid in tokens (img_size / vae_stride / patch_size;
            256 / 16 / 1 = 16 for the released checkpoint). Other grids interpolate it bilinearly, as
            Harmon's `get_encoder_pos_embed` does.
    """

    def __init__(self, *, width: int, depth: int, heads: int, mlp_ratio: float, token_dim: int, grid: int,
                 buffer_size: int, class_num: int, attn_drop: float, proj_drop: float,
                 diffloss_width: int, diffloss_depth: int, num_sampling_steps: str):
        super().__init__()
        self.width, self.token_dim, self.grid, self.buffer_size = width, token_dim, grid, buffer_size
        self.grad_checkpointing = False
        seq = grid * grid
        # Unused by Harmon (it conditions through the LLM), kept so the released `mar.class_emb.weight` has
        # a place; the adapter freezes it.
        self.class_emb = nn.Embedding(class_num, width)
        self.fake_latent = nn.Parameter(torch.zeros(1, width))     # content of every buffer token
        # --- encoder
        self.z_proj = nn.Linear(token_dim, width)
        self.z_proj_ln = nn.LayerNorm(width, eps=1e-6)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, buffer_size + seq, width))
        self.encoder_blocks = nn.ModuleList(
            Block(width, heads, mlp_ratio, attn_drop, proj_drop) for _ in range(depth))
        self.encoder_norm = nn.LayerNorm(width, eps=1e-6)
        # --- decoder
        self.decoder_embed = nn.Linear(width, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, buffer_size + seq, width))
        self.decoder_blocks = nn.ModuleList(
            Block(width, heads, mlp_ratio, attn_drop, proj_drop) for _ in range(depth))
        self.decoder_norm = nn.LayerNorm(width, eps=1e-6)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, seq, width))
        self._init_weights()
        # Built after the MAR init, as in the official constructor (the head has its own init).
        self.diffloss = DiffLoss(token_dim=token_dim, cond_dim=width, width=diffloss_width,
                                 depth=diffloss_depth, num_sampling_steps=num_sampling_steps)

    def _init_weights(self) -> None:
        # Official `initialize_weights`: N(0, 0.02) for embeddings/tokens, Xavier-uniform linears with zero
        # bias, unit LayerNorms.
        for p in (self.class_emb.weight, self.fake_latent, self.mask_token, self.encoder_pos_embed_learned,
                  self.decoder_pos_embed_learned, self.diffusion_pos_embed_learned):
            nn.init.normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ---- one entry point (see the module docstring on ZeRO-3) ---------------------------------------
    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, grid: tuple[int, int], *,
                part: str) -> torch.Tensor:
        """``part="encoder"``: latent tokens (B, m·n, token_dim) and mask (B, m·n) (1 = masked, dropped;
        None = nothing masked) → (B, buffer + kept, width). ``part="decoder"``: encoder output of that
        shape and the same mask → (B, m·n, width), the diffusion head's condition per token."""
        if part == "encoder":
            return self._encode(x, mask, grid)
        if part == "decoder":
            return self._decode(x, mask, grid)
        raise ValueError(f"MAR part must be 'encoder' or 'decoder', got {part!r}")

    def _pos(self, table: torch.Tensor, grid: tuple[int, int], buffered: bool) -> torch.Tensor:
        """The learned table at ``grid``: bilinear resize of the image part, buffer part unchanged."""
        if grid == (self.grid, self.grid):
            return table
        buf, img = table.split([self.buffer_size if buffered else 0, self.grid * self.grid], dim=1)
        img = img.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)          # (1, D, g, g)
        img = F.interpolate(img, size=grid, mode="bilinear").permute(0, 2, 3, 1).reshape(1, -1, table.shape[-1])
        return torch.cat([buf, img], dim=1)

    def _blocks(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        for block in blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def _encode(self, x: torch.Tensor, mask: torch.Tensor | None, grid: tuple[int, int]) -> torch.Tensor:
        b, n, _ = x.shape
        if n != grid[0] * grid[1]:
            raise ValueError(f"MAR encoder: {n} tokens do not form a {grid[0]}x{grid[1]} grid")
        x = self.z_proj(x.to(self.z_proj.weight.dtype))                             # (B, N, D)
        buffer = self.fake_latent.to(x.dtype).expand(b, self.buffer_size, -1)        # (B, buf, D)
        x = torch.cat([buffer, x], dim=1) + self._pos(self.encoder_pos_embed_learned, grid, True)
        x = self.z_proj_ln(x)
        if mask is not None:
            keep = torch.cat([mask.new_zeros(b, self.buffer_size), mask], dim=1) == 0   # (B, buf + N)
            kept = keep.sum(dim=1)
            if not bool((kept == kept[0]).all()):
                raise ValueError("MAR encoder: every sample must keep the same number of tokens")
            x = x[keep].reshape(b, -1, x.shape[-1])                                 # (B, buf + kept, D)
        return self.encoder_norm(self._blocks(self.encoder_blocks, x))

    def _decode(self, x: torch.Tensor, mask: torch.Tensor | None, grid: tuple[int, int]) -> torch.Tensor:
        b = x.shape[0]
        n = grid[0] * grid[1]
        x = self.decoder_embed(x)                                                   # (B, buf + kept, D)
        if mask is None:
            mask = x.new_zeros(b, n)
        keep = torch.cat([mask.new_zeros(b, self.buffer_size), mask], dim=1) == 0      # (B, buf + N)
        full = self.mask_token.to(x.dtype).expand(b, self.buffer_size + n, -1).clone()
        full[keep] = x.reshape(-1, x.shape[-1])                                     # scatter the kept tokens
        x = full + self._pos(self.decoder_pos_embed_learned, grid, True)
        x = self.decoder_norm(self._blocks(self.decoder_blocks, x))[:, self.buffer_size:]
        return x + self._pos(self.diffusion_pos_embed_learned, grid, False)         # (B, N, D)
