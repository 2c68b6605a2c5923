"""Held-out quality of each model's tiny tokenizer at its recipe's budget (README "Tiny base models").

    python bench/tokenizer_psnr.py                      # openuni, harmon, showo
    python bench/tokenizer_psnr.py --models harmon

Runs only the tokenizer stage of the tiny base build (``unimrg/pretrain.py``: ``tokenizer_images`` of the
recipe's ``pretrain.scenes`` training scenes, ``pretrain.tokenizer_steps`` / batch / lr of ``<model>_tiny.yaml``)
and prints, on the recipe's ``pretrain.held_out`` held-out scenes: recon_psnr of the scene pictures (README bar:
≥ 22 dB), depth_similarity of the reconstructed depth maps and seg_boundary_f1 of the reconstructed boundary
drawings (what post-training's generated maps can reach through this frozen tokenizer), next to the constant
mean references, and the CPU seconds.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def measure(model_name: str) -> dict:
    from unimrg import pretrain as P
    from unimrg.config import load_config, recipe_path
    from unimrg.data.scenes import make_scene
    from unimrg.eval import metrics as M
    from unimrg.models import registry
    cfg = load_config(recipe_path(model_name, "tiny"), ["model.base=none"], model=model_name)
    p = cfg.pretrain
    torch.manual_seed(p.seed)
    adapter = registry.adapter_class(model_name)(cfg.model)
    tok = P.Tokenizer(adapter)
    size = max(cfg.data.scene_size, tok.size)
    train = [make_scene(p.seed, i, size) for i in range(p.scenes)]
    held = [make_scene(p.seed, P.HELD_OUT + i, size) for i in range(p.held_out)]
    t0 = time.process_time()
    info = P.train_tokenizer(adapter, p, P.tokenizer_images(train, tok.size, p.tokenizer_maps),
                             P._images(held, tok.size))
    cpu = time.process_time() - t0
    n = len(held)
    maps = P.tokenizer_images(held, tok.size)
    with torch.no_grad():
        rec = torch.cat([tok.roundtrip(maps[i:i + 16].float() / 255, train=False)[0] for i in range(0, len(maps), 16)])
    rec = ((rec.float() + 1) / 2).clamp(0, 1)
    depth = torch.from_numpy(np.stack([s.depth for s in held]))[:, None]
    seg = torch.from_numpy(np.stack([s.boundary for s in held])).permute(0, 3, 1, 2).float() / 255
    mean_depth = torch.from_numpy(np.stack([s.depth for s in train])).mean(0)[None, None].expand_as(depth)
    return {"model": model_name, "size": tok.size, "steps": p.tokenizer_steps,
            "recon_psnr": info["tokenizer_recon_psnr"],
            "depth_similarity": float(M.depth_similarity(rec[2 * n:3 * n], depth).mean()),
            "seg_boundary_f1": float(M.seg_boundary_f1(rec[3 * n:], seg).mean()),
            "mean_depth_map": float(M.depth_similarity(mean_depth, depth).mean()), "cpu_s": cpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["openuni", "harmon", "showo"])
    args = ap.parse_args()
    print("| model | tokenizer px | steps | scene recon_psnr | depth maps: depth_similarity (constant mean map) "
          "| boundary drawings: seg_boundary_f1 | CPU s |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        r = measure(name)
        print(f"| {r['model']} | {r['size']} | {r['steps']} | {r['recon_psnr']:.2f} dB | "
              f"{100 * r['depth_similarity']:.1f} % ({100 * r['mean_depth_map']:.1f} %) | "
              f"{100 * r['seg_boundary_f1']:.1f} % | {r['cpu_s']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
