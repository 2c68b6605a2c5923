"""Tiny random-weight Depth Anything V2 and SAM folders, for tests, the benchmark and the demo.

    python -m unimrg.targets.tiny OUT_DIR      # writes OUT_DIR/depth-anything-tiny, OUT_DIR/sam-tiny

They are the real transformers classes (``DepthAnythingForDepthEstimation``, ``SamModel``) with small
hidden sizes, saved in HF format so the job loads them exactly like the official folders
(``--depth-model`` / ``--sam-model``). Random weights: SAM's scores hover around 0, so the default
thresholds keep no mask; tests relax them (a 4×4 grid, thresholds 0).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def tiny_depth_config():
    """DepthAnythingConfig with a 4-layer, 32-wide DINOv2 backbone (same architecture as V2-Large)."""
    from transformers import DepthAnythingConfig, Dinov2Config

    backbone = Dinov2Config(image_size=518, patch_size=14, hidden_size=32, num_hidden_layers=4,
                            num_attention_heads=2, mlp_ratio=2, out_indices=[1, 2, 3, 4],
                            reshape_hidden_states=False)
    return DepthAnythingConfig(backbone_config=backbone, patch_size=14, reassemble_hidden_size=32,
                               neck_hidden_sizes=[16, 16, 32, 32], fusion_hidden_size=16, head_hidden_size=8,
                               depth_estimation_type="relative")


def tiny_sam_config():
    """SamConfig with a 2-layer, 32-wide ViT (1024² input, 64² embedding grid as in SAM-H)."""
    from transformers import SamConfig, SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig

    vision = SamVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, global_attn_indexes=[1],
                             output_channels=32, image_size=1024, patch_size=16, window_size=14,
                             num_pos_feats=16, mlp_dim=64)
    prompt = SamPromptEncoderConfig(hidden_size=32, image_size=1024, patch_size=16)
    decoder = SamMaskDecoderConfig(hidden_size=32, mlp_dim=64, num_hidden_layers=2, num_attention_heads=2,
                                   iou_head_hidden_dim=32)
    return SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)


def build_tiny_depth(seed: int = 0):
    from transformers import DepthAnythingForDepthEstimation

    torch.manual_seed(seed)
    return DepthAnythingForDepthEstimation(tiny_depth_config()).eval()


def build_tiny_sam(seed: int = 0):
    from transformers import SamModel

    torch.manual_seed(seed)
    return SamModel(tiny_sam_config()).eval()


def save_tiny_models(out: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Write both tiny models as HF folders; returns (depth_dir, sam_dir). Idempotent."""
    from unimrg.targets.segmentation import sam_image_processor

    out = Path(out)
    depth_dir, sam_dir = out / "depth-anything-tiny", out / "sam-tiny"
    if not (depth_dir / "config.json").is_file():
        build_tiny_depth(seed).save_pretrained(depth_dir)
    if not (sam_dir / "config.json").is_file():
        build_tiny_sam(seed).save_pretrained(sam_dir)
        sam_image_processor().save_pretrained(sam_dir)
    return depth_dir, sam_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for p in save_tiny_models(args.out, args.seed):
        print(p)


if __name__ == "__main__":
    main()
