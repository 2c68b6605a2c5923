"""OpenUni sampling at tiny size (SanaPipeline, DPM-Solver / flow-match Euler, CFG) and the grid command.

    OMP_NUM_THREADS=1 python -m pytest tests/unit/test_openuni_sample.py -q -x
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from unimrg.eval import sample as sample_cli
from unimrg.models.openuni import OpenUni, OpenUniConfig

SIZE = 56


@pytest.fixture(scope="module")
def model() -> OpenUni:
    torch.manual_seed(0)
    m = OpenUni(OpenUniConfig(size="tiny", image_size=SIZE))
    m.apply_freezing()
    return m.train()


def images(b: int = 2) -> torch.Tensor:
    return torch.randint(0, 256, (b, 3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("scheduler", ["dpm", "euler"])
def test_seeded_and_deterministic(model, scheduler):
    x, prompts = images(), ["Generate the depth map of this image.", "Segment everything in this image."]
    a = model.sample(x, prompts, num_steps=3, seed=7, scheduler=scheduler)
    b = model.sample(x, prompts, num_steps=3, seed=7, scheduler=scheduler)
    c = model.sample(x, prompts, num_steps=3, seed=8, scheduler=scheduler)
    s = model.arch.gen_image_size
    assert a.shape == (2, 3, s, s) and a.dtype == torch.float32
    assert 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert model.training  # sampling restores the training mode


def test_guidance_and_condition_matter(model):
    x = images()
    p = ["Generate the depth map of this image."] * 2
    base = model.sample(x, p, num_steps=2, seed=1, cfg_scale=4.5)
    assert not torch.equal(base, model.sample(x, p, num_steps=2, seed=1, cfg_scale=1.0))
    assert not torch.equal(base, model.sample(x.flip(0), p, num_steps=2, seed=1, cfg_scale=4.5))


def test_grid_command(model, tmp_path):
    paths = []
    for i in range(2):
        arr = np.random.default_rng(i).integers(0, 256, (70, 90, 3), dtype=np.uint8)
        paths.append(tmp_path / f"in{i}.png")
        Image.fromarray(arr).save(paths[-1])
    weights = tmp_path / "model.pt"
    torch.save(model.state_dict(), weights)
    argv = ["--model", "openuni", "--image", str(paths[0]), "--image", str(paths[1]), "--out",
            str(tmp_path / "grid.png"), "--state-dict", str(weights), "--seed", "3", "--device", "cpu",
            "--dtype", "fp32", "--opt", "num_steps=2", "--opt", "scheduler=euler", f"model.image_size={SIZE}"]
    outs = sample_cli.main(argv)
    s = model.arch.gen_image_size
    assert set(outs) == {"depth", "seg", "pix"} and all(o.shape == (2, 3, s, s) for o in outs.values())
    assert Image.open(tmp_path / "grid.png").size == (4 * s, 2 * s)      # input | depth | seg | recon
    # the command used the given weights: same as sampling the model directly
    x = sample_cli.load_images(paths, SIZE)
    direct = model.sample(x, [sample_cli.default_prompts()["depth"]] * 2, num_steps=2, seed=3, scheduler="euler")
    assert torch.equal(outs["depth"], direct)
    again = sample_cli.main([str(tmp_path / "grid2.png") if a.endswith("grid.png") else a for a in argv])
    assert all(torch.equal(outs[k], again[k]) for k in outs)
