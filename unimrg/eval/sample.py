"""python -m unimrg.eval.sample --model openuni --image IMG [--image IMG ...] --out grid.png
       [--state-dict FILE] [--seed 0] [--opt num_steps=20 --opt cfg_scale=4.5 --opt scheduler=dpm]
       [model.size=full model.checkpoint=... model.internvl_path=... ...]

Generate depth, segmentation and reconstruction for each input image with any registered model that has
a ``sample(images, prompts, seed=..., **opts)`` method, and write a grid: one row per image,
columns input | depth | segmentation | reconstruction. Same seed → same grid.

Weights: ``model.*`` overrides build the model as training does (``model.checkpoint`` → ``load_official``);
``--state-dict`` then loads a state dict in the adapter's own layout (e.g. a consolidated training
checkpoint). Without either the model is randomly initialised (smoke tests only).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from unimrg.data.images import read_rgb
from unimrg.tasks import DEPTH, PIX, SEG

COLUMNS = ("input", DEPTH, SEG, PIX)


def default_prompts() -> dict[str, str]:
    """The first prompt of each task's training list (unimrg/objective.py)."""
    from unimrg.objective import DEPTH_PROMPTS, PIX_PROMPTS, SEG_PROMPTS
    return {DEPTH: DEPTH_PROMPTS[0], SEG: SEG_PROMPTS[0], PIX: PIX_PROMPTS[0]}


def load_images(paths: Sequence[str | Path], size: int) -> torch.Tensor:
    """RGB files → uint8 (B, 3, size, size), as the loaders feed the models."""
    out = []
    for p in paths:
        try:
            # the loaders' decoder: 16-bit, CMYK, alpha and EXIF orientation as in training
            img = read_rgb(p)[1].resize((size, size), Image.BICUBIC)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read input image {p}: {e}") from None
        out.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))
    return torch.stack(out)


def build_model(name: str, overrides: Sequence[str], state_dict: str | None, device: str, dtype: torch.dtype):
    from omegaconf import OmegaConf

    from unimrg.models import registry
    cls = registry.config_class(name)
    cfg = OmegaConf.merge(OmegaConf.structured(cls(name=name)),
                          OmegaConf.from_dotlist([o[len("model."):] for o in overrides]))
    cfg = OmegaConf.to_object(cfg)
    model = registry.build_model(cfg)
    if state_dict:
        from unimrg.models.official_io import read_state_dict
        missing, unexpected = model.load_state_dict(read_state_dict(state_dict, "--state-dict"), strict=False)
        if missing or unexpected:
            raise ValueError(f"--state-dict {state_dict} does not match {name}: missing {missing[:10]}, "
                             f"unexpected {unexpected[:10]}")
    if not hasattr(model, "sample"):
        raise ValueError(f"model {name!r} has no sample() method yet; nothing to generate")
    return model.to(device=device, dtype=dtype).eval(), cfg


def generate(model, images: torch.Tensor, prompts: dict[str, str], seed: int,
             tasks: Sequence[str] = (DEPTH, SEG, PIX), **opts) -> dict[str, torch.Tensor]:
    """Per task: float (B, 3, S, S) in [0, 1]."""
    b = images.shape[0]
    return {task: model.sample(images, [prompts[task]] * b, seed=seed, **opts).float().cpu() for task in tasks}


def grid(images: torch.Tensor, outputs: dict[str, torch.Tensor], columns: Sequence[str] = COLUMNS) -> Image.Image:
    """Rows = images; ``columns``: "input", then keys of ``outputs`` (float (B, 1 or 3, S, S) in [0, 1]; a
    key missing from ``outputs`` is a black column). Every cell at the largest output size."""
    size = max([o.shape[-1] for o in outputs.values()] or [images.shape[-1]])
    cells = [torch.nn.functional.interpolate(images.float() / 255, size=(size, size), mode="bilinear",
                                             antialias=True, align_corners=False)]
    for c in columns[1:]:
        o = outputs[c].float().expand(-1, 3, -1, -1) if c in outputs else torch.zeros(images.shape[0], 3, size, size)
        cells.append(torch.nn.functional.interpolate(o, size=(size, size), mode="nearest"))
    rows = torch.cat([torch.cat([c[i] for c in cells], dim=2) for i in range(images.shape[0])], dim=1)  # (3, H, W)
    return Image.fromarray((rows.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())


def parse_opt(items: Sequence[str]) -> dict:
    opts = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--opt {item!r}: expected key=value")
        try:
            opts[key] = json.loads(value)
        except json.JSONDecodeError:
            opts[key] = value
    return opts


def main(argv: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--image", action="append", required=True, help="input image file (repeat for more rows)")
    ap.add_argument("--out", required=True, help="grid image to write (.png)")
    ap.add_argument("--state-dict", help="adapter-layout weights loaded after building")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--opt", action="append", default=[], help="sampler option key=value (model-specific)")
    for task in (DEPTH, SEG, PIX):
        ap.add_argument(f"--{task}-prompt", help=f"prompt for {task} (default: first training prompt)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bf16" if torch.cuda.is_available() else "fp32", choices=("bf16", "fp32"))
    ap.add_argument("overrides", nargs="*", help="model.key=value")
    args = ap.parse_args(argv)
    bad = [o for o in args.overrides if not o.startswith("model.") or "=" not in o]
    if bad:
        ap.error(f"overrides must look like model.key=value: {bad}")

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model, cfg = build_model(args.model, args.overrides, args.state_dict, args.device, dtype)
    prompts = default_prompts()
    for task in (DEPTH, SEG, PIX):
        if getattr(args, f"{task}_prompt") is not None:
            prompts[task] = getattr(args, f"{task}_prompt")
    images = load_images(args.image, cfg.image_size)
    outputs = generate(model, images, prompts, args.seed, **parse_opt(args.opt))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid(images, outputs).save(out)
    print(f"wrote {out}: {len(args.image)} rows × {' | '.join(COLUMNS)}")
    return outputs


if __name__ == "__main__":
    main()
