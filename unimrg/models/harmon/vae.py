"""MAR's KL-16 VAE as a diffusers ``AutoencoderKL``, and the conversion of ``kl16.ckpt`` to that layout.

The official VAE (wusize/Harmon `src/models/mar/vae.py`, from LTH14/mar, itself LDM's KL autoencoder) is
`AutoencoderKL(embed_dim=16, ch_mult=(1, 1, 2, 2, 4))`: ch 128, 2 res blocks per level, encoder
attention at resolution 16 (the last of the 5 levels: `attn_resolutions=(16,)` counted from 256), decoder
without level attention, mid-blocks with attention, GroupNorm(32, eps 1e-6), asymmetric-pad stride-2
downsampling, nearest ×2 upsampling, quant/post-quant 1×1 convs, latents = posterior mode × 0.2325
(Harmon's `vae_scale`). That is diffusers' AutoencoderKL with an ``AttnDownEncoderBlock2D`` last level.
``kl16.ckpt`` stores ``{"model": state_dict}`` with LDM keys (`encoder.down.{i}.block.{j}`,
`encoder.down.4.attn.{j}`, `encoder.mid.attn_1`, `decoder.up.{i}`, `quant_conv`, ...).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from unimrg.models.official_io import LoadReport, load_checked, read_state_dict

if TYPE_CHECKING:                       # imported where a VAE is built (diffusers takes seconds to import)
    from diffusers import AutoencoderKL

VAE_SCALE = 0.2325      # Harmon configs `vae_scale`
VAE_STRIDE = 16


def kl16_kwargs(size: str) -> dict[str, Any]:
    """AutoencoderKL arguments: the released KL-16 ("full") or a tiny one with the same structure (five
    levels, stride 16, attention in the last encoder level, 16 latent channels)."""
    channels = (128, 128, 256, 256, 512) if size == "full" else (8, 8, 16, 16, 16)
    return dict(
        in_channels=3, out_channels=3, latent_channels=16,
        down_block_types=("DownEncoderBlock2D",) * 4 + ("AttnDownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",) * 5,
        block_out_channels=channels, layers_per_block=2 if size == "full" else 1,
        norm_num_groups=32 if size == "full" else 4, act_fn="silu", sample_size=256,
        scaling_factor=VAE_SCALE, mid_block_add_attention=True)


_VAE_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
_DOWN_ATTN = re.compile(r"^encoder\.down\.(\d+)\.attn\.(\d+)\.")


def kl16_to_diffusers(ldm: dict[str, torch.Tensor], vae_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """LDM-layout KL VAE state dict → diffusers AutoencoderKL keys.

    diffusers' own `convert_ldm_vae_checkpoint` (loaders/single_file_utils.py) covers everything but the
    encoder's per-level attention, which Stable Diffusion's VAE lacks; those keys are renamed with the same
    diffusers helper that converts the mid-block attention (1×1 conv q/k/v/proj_out → linear to_q/…/to_out.0).
    """
    from diffusers.loaders.single_file_utils import (
        convert_ldm_vae_checkpoint, update_vae_attentions_ldm_to_diffusers)

    level_attn = {k: v for k, v in ldm.items() if _DOWN_ATTN.match(k)}
    rest = {k: v for k, v in ldm.items() if k not in level_attn}
    out = convert_ldm_vae_checkpoint(rest, dict(vae_config))
    for key in level_attn:
        i, j = _DOWN_ATTN.match(key).groups()
        update_vae_attentions_ldm_to_diffusers(
            [key], out, level_attn,
            mapping={"old": f"down.{i}.attn.{j}", "new": f"down_blocks.{i}.attentions.{j}"})
    return {k: v for k, v in out.items() if v is not None}


def load_vae(vae: AutoencoderKL, path: str | Path, prefix: str = "") -> LoadReport:
    """Load the VAE from ``kl16.ckpt`` (LDM layout, converted) or a diffusers AutoencoderKL folder/file."""
    state = read_state_dict(path, what="Harmon VAE (vae_path)")
    ignored: list[str] = []
    if any(k.startswith(("encoder.down.", "decoder.up.")) for k in state):
        # LDM training checkpoints may also hold e.g. the discriminator (`loss.*`): not the VAE.
        ignored = sorted(k for k in state if not k.startswith(_VAE_PREFIXES))
        state = kl16_to_diffusers({k: v for k, v in state.items() if k.startswith(_VAE_PREFIXES)},
                                  dict(vae.config))
    report = load_checked(vae, state, what=f"Harmon VAE {path}", prefix=prefix)
    report.ignored.extend(ignored)
    return report
