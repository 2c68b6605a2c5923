"""Harmon sampling (MAR unmasking + diffusion head, CFG, temperature) and the diffusion maths it uses.

    python -m pytest tests/unit/test_harmon_sample.py -q
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from unimrg.models.harmon import Harmon, HarmonConfig
from unimrg.models.harmon.diffloss import DiffLoss, Schedule, cosine_betas, spaced_timesteps

SIZE = 64


@pytest.fixture(scope="module")
def model() -> Harmon:
    torch.manual_seed(0)
    m = Harmon(HarmonConfig(size="tiny", image_size=SIZE, mar_image_size=SIZE, buffer_size=4,
                            num_sampling_steps="5"))
    # Give the zero-initialised head outputs something to do, so samples depend on the condition.
    with torch.no_grad():
        for p in m.mar.diffloss.net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.train()


def images(b: int = 2) -> torch.Tensor:
    return torch.randint(0, 256, (b, 3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def test_sample_shapes_range_and_seed(model):
    x = images()
    a = model.sample(x, ["Depth map.", ""], num_iter=3, cfg=3.0, seed=5)
    b = model.sample(x, ["Depth map.", ""], num_iter=3, cfg=3.0, seed=5)
    c = model.sample(x, ["Depth map.", ""], num_iter=3, cfg=3.0, seed=6)
    assert a.shape == (2, 3, SIZE, SIZE) and a.dtype == torch.float32
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert model.training                                     # the mode is restored


def test_sample_options(model):
    x = images(1)
    no_cfg = model.sample(x, ["Seg."], num_iter=2, cfg=1.0, seed=0, image_size=32)
    assert no_cfg.shape == (1, 3, 32, 32)                     # another size: position tables interpolate
    text_only = model.sample(None, ["A cat."], num_iter=2, cfg=2.0, cfg_schedule="linear", seed=0)
    assert text_only.shape == (1, 3, SIZE, SIZE)
    hot = model.sample(x, ["Seg."], num_iter=2, cfg=2.0, temperature=2.0, seed=0, uncond_with_image=True)
    cold = model.sample(x, ["Seg."], num_iter=2, cfg=2.0, temperature=0.1, seed=0, uncond_with_image=True)
    assert not torch.equal(hot, cold)
    with pytest.raises(ValueError, match="cfg_schedule"):
        model.sample(x, ["Seg."], num_iter=2, cfg_schedule="cosine")


def test_cached_prompt_matches_training_forward(model):
    """Sampling runs the prompt once into a KV cache; the step tokens must see exactly what the training
    path (`_llm_over`) computes in one pass — positions and masks included, with padded prompts."""
    model.eval()
    try:
        with torch.no_grad():
            src, grid = model.encode_latents(model._pixels(images(), torch.device("cpu"), "images"))
            feats = model.visual_features(src, grid)[1]
            prefix, mask, valid = model._prompt_prefix(feats, ["A much longer prompt here.", ""])
            tokens = torch.randn(2, grid[0] * grid[1], 16)
            keep = torch.zeros(2, grid[0] * grid[1])
            keep[:, :9] = 1
            _, z = model.visual_features(tokens, grid, keep)
            one_pass = model._llm_over(prefix, mask, z)
            out = model.llm.model(inputs_embeds=prefix, attention_mask=mask,
                                  position_ids=(mask.long().cumsum(1) - 1).clamp(min=0), use_cache=True)
            t = z.shape[1]
            attn = torch.cat([mask, mask.new_ones(2, t)], dim=1)
            pos = valid[:, None] + torch.arange(t)[None]
            h = model.llm.model(inputs_embeds=z, attention_mask=attn, position_ids=pos, cache=out.cache,
                                use_cache=True).last_hidden_state
            h = torch.cat([h[:, t - 4:], h[:, :t - 4]], dim=1)
        torch.testing.assert_close(h, one_pass, rtol=1e-4, atol=1e-5)
    finally:
        model.train()


def test_schedules_follow_iddpm():
    betas = cosine_betas()
    assert betas.shape == (1000,) and betas.max() == pytest.approx(0.999) and betas.min() > 0
    steps = spaced_timesteps(1000, 100)
    assert len(steps) == 100 and steps[0] == 0 and steps[-1] == 999
    base, spaced = Schedule(), Schedule(steps)
    # Respacing keeps alpha_bar at the retained steps.
    np.testing.assert_allclose(spaced.sqrt_ac, base.sqrt_ac[steps], rtol=1e-9)
    np.testing.assert_allclose(base.sqrt_ac ** 2 + base.sqrt_1m_ac ** 2, 1.0, rtol=1e-12)


class Oracle(torch.nn.Module):
    """Knows x0 (passed as the condition) and returns the exact ε of x_t under the base schedule, v = 0."""

    def __init__(self, exact: bool = True):
        super().__init__()
        self.exact, self.base = exact, Schedule()

    def forward(self, x_t, t, c):
        eps = (x_t - Schedule.take(self.base.sqrt_ac, t) * c) / Schedule.take(self.base.sqrt_1m_ac, t)
        return torch.cat([eps if self.exact else torch.zeros_like(eps), torch.zeros_like(eps)], dim=1)


def test_diffusion_loss_targets_the_noise():
    head = DiffLoss(token_dim=4, cond_dim=4, width=16, depth=2, num_sampling_steps="10")
    x0 = torch.rand(2048, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    losses = {}
    for exact in (True, False):
        head.net = Oracle(exact)
        torch.manual_seed(1)
        losses[exact] = float(head(x0, x0))
    # The exact-ε head has (almost) no loss left: MSE 0 and the exact posterior mean in the VLB term (only
    # its variance, v = 0, is off). Predicting ε = 0 costs E[ε²] = 1 plus a mean error in the VLB term.
    assert losses[True] < 0.01 and losses[False] > 1.0, losses
    mask = torch.zeros(2048)
    mask[:10] = 1
    torch.manual_seed(1)
    assert float(head(x0, x0, mask)) != pytest.approx(losses[True], abs=1e-6)   # masked mean differs


def test_sampler_recovers_x0_with_an_exact_denoiser():
    """With the exact ε, every step's x0-prediction is x0, so the respaced chain ends at x0 (checks the
    timestep map, respaced coefficients and CFG mixing)."""
    head = DiffLoss(token_dim=4, cond_dim=4, width=16, depth=2, num_sampling_steps="25")
    head.net = Oracle()
    x0 = torch.rand(6, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = head.sample(x0, x0, temperature=1.0, cfg=3.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x0, rtol=1e-4, atol=1e-4)
    out = head.sample(x0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x0, rtol=1e-4, atol=1e-4)
