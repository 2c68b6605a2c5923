"""MAGVIT-v2 image tokenizer with lookup-free quantisation (LFQ), as Show-o uses it, in plain torch.

Structure and parameter names follow showlab/Show-o ``models/modeling_magvitv2.py`` and
``models/common_modules.py`` (a taming-transformers-style conv encoder / decoder), so the released
``showlab/magvitv2`` state dict (``encoder.*``, ``decoder.*``, ``quantize.embedding``,
``quantize.power_vals``) loads without renaming. Released: 128 base channels, encoder multipliers
(1, 2, 2, 4, 4) with (4, 3, 4, 3, 4) residual blocks, decoder multipliers (1, 1, 2, 2, 4) with
(4, 4, 3, 4, 3) blocks, 256-px input → 16 × 16 codes, 13 latent channels ⇒ 2**13 = 8,192 codes.
Pixels are in [-1, 1] on both ends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class MagvitArch:
    """Architecture of the tokenizer (the released values are ShowoConfig's defaults)."""

    ch: int
    enc_ch_mult: list[int]
    enc_num_res_blocks: list[int]
    dec_ch_mult: list[int]
    dec_num_res_blocks: list[int]
    attn_resolutions: list[int]   # released [5]: never hit, so the released model has no attention
    resolution: int               # input side in pixels
    codebook_size: int            # a power of two: LFQ has log2(codebook_size) binary latent channels

    @property
    def codebook_dim(self) -> int:
        dim = int(math.log2(self.codebook_size))
        if 2 ** dim != self.codebook_size:
            raise ValueError(f"codebook_size={self.codebook_size}: lookup-free quantisation needs a power "
                             "of two (released 8192 = 2**13; the Show-o paper's text says 4096 = 2**12)")
        return dim

    @property
    def tokens_per_side(self) -> int:
        return self.resolution // 2 ** (len(self.enc_ch_mult) - 1)


def _norm(channels: int) -> nn.GroupNorm:
    # Official: 32 groups, eps 1e-6 (common_modules.Normalize).
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm → swish → conv → norm → swish → conv, plus a 1×1 shortcut when channels change."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1×1-conv projections."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        h = self.norm(x)
        q, k, v = (m(h).flatten(2).transpose(1, 2) for m in (self.q, self.k, self.v))  # (B, HW, C)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, hh, ww))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Official pads right / bottom only (asymmetric), then a stride-2 conv.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``block`` / ``attn`` lists and an optional down- or upsample."""

    def __init__(self):
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()

    def blocks(self, h: torch.Tensor) -> torch.Tensor:
        """The level's residual blocks, each followed by its attention block where it has one."""
        for j, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[j](h)
        return h


class _Mid(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, a: MagvitArch):
        super().__init__()
        self.conv_in = nn.Conv2d(3, a.ch, 3, padding=1)
        res, block_in = a.resolution, a.ch
        self.down = nn.ModuleList()
        for i, mult in enumerate(a.enc_ch_mult):
            level, block_out = _Level(), a.ch * mult
            for _ in range(a.enc_num_res_blocks[i]):
                level.block.append(ResnetBlock(block_in, block_out))
                block_in = block_out
                if res in a.attn_resolutions:
                    level.attn.append(AttnBlock(block_in))
            if i != len(a.enc_ch_mult) - 1:
                level.downsample = Downsample(block_in)
                res //= 2
            self.down.append(level)
        self.mid = _Mid(block_in)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, a.codebook_dim, 3, padding=1)
        self.quant_conv = nn.Conv2d(a.codebook_dim, a.codebook_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level.blocks(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.conv_out(F.silu(self.norm_out(self.mid(h))))
        return self.quant_conv(h)


class Decoder(nn.Module):
    def __init__(self, a: MagvitArch):
        super().__init__()
        n = len(a.dec_ch_mult)
        block_in = a.ch * a.dec_ch_mult[-1]
        res = a.resolution // 2 ** (n - 1)
        self.post_quant_conv = nn.Conv2d(a.codebook_dim, a.codebook_dim, 1)
        self.conv_in = nn.Conv2d(a.codebook_dim, block_in, 3, padding=1)
        self.mid = _Mid(block_in)
        levels: list[_Level] = []
        for i in reversed(range(n)):   # built coarse → fine, stored fine → coarse (``up.0`` is full size)
            level, block_out = _Level(), a.ch * a.dec_ch_mult[i]
            for _ in range(a.dec_num_res_blocks[i]):
                level.block.append(ResnetBlock(block_in, block_out))
                block_in = block_out
                if res in a.attn_resolutions:
                    level.attn.append(AttnBlock(block_in))
            if i != 0:
                level.upsample = Upsample(block_in)
                res *= 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(self.post_quant_conv(z)))
        for level in reversed(self.up):
            h = level.blocks(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class LFQuantizer(nn.Module):
    """Lookup-free quantisation: each latent channel's sign is one bit of the code (MSB = channel 0)."""

    def __init__(self, codebook_dim: int):
        super().__init__()
        # Both tables are persistent buffers in the released checkpoint (quantize.embedding / power_vals).
        bits = torch.arange(codebook_dim - 1, -1, -1)
        binary = (torch.arange(2 ** codebook_dim)[:, None] >> bits) & 1
        self.register_buffer("embedding", binary.float() * 2 - 1)   # (K, D) in {-1, +1}
        self.register_buffer("power_vals", 2 ** bits)                 # (D,) int64

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) latents → (B, h·w) int64 codes."""
        bits = (z > 0).long()
        return (bits * self.power_vals.view(1, -1, 1, 1)).sum(1).flatten(1)

    def lookup(self, codes: torch.Tensor, side: int) -> torch.Tensor:
        """(B, h·w) codes → (B, D, h, w) quantised latents (via bits, not a table gather, so it works
        whatever dtype or partitioning the ``embedding`` buffer has)."""
        bits = (codes[..., None] // self.power_vals) % 2                    # (B, N, D)
        z = bits.to(torch.float32) * 2 - 1
        return z.view(codes.shape[0], side, side, -1).permute(0, 3, 1, 2).contiguous()


class MagvitV2(nn.Module):
    """encode: (B, 3, H, W) in [-1, 1] → (B, h·w) codes; decode: codes → (B, 3, H, W) ≈ [-1, 1]."""

    def __init__(self, arch: MagvitArch):
        super().__init__()
        self.arch = arch
        self.encoder = Encoder(arch)
        self.decoder = Decoder(arch)
        self.quantize = LFQuantizer(arch.codebook_dim)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.shape[-2:] != (self.arch.resolution, self.arch.resolution):
            raise ValueError(f"MAGVIT-v2 expects {self.arch.resolution}² inputs, got {tuple(pixels.shape)}")
        return self.quantize.codes(self.encoder(pixels))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        side = math.isqrt(codes.shape[-1])
        if side * side != codes.shape[-1]:
            raise ValueError(f"decode expects a square number of codes, got {codes.shape[-1]}")
        z = self.quantize.lookup(codes, side)
        return self.decoder(z.to(self.decoder.conv_in.weight.dtype))
