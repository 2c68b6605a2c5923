"""MAR's per-token diffusion loss: an MLP with AdaLN (the "diffusion head") and a Gaussian diffusion
with a cosine schedule, ε-prediction and learned-range variance.

Facts from wusize/Harmon `src/models/mar/diffloss.py` (`DiffLoss`, `SimpleMLPAdaLN`, `ResBlock`,
`FinalLayer`, `TimestepEmbedder`) and `src/models/mar/diffusion/` (DiT's IDDPM port, as LTH14/mar):
- `create_diffusion(noise_schedule="cosine")`: 1000 steps, alpha_bar(t) = cos²((t + 0.008) / 1.008 · π/2),
  β capped at 0.999; model predicts ε and a variance interpolation v ∈ [-1, 1] (out channels 2·C);
  loss type MSE ⇒ loss = mean((ε − ε̂)²) + VLB term computed with ε̂ detached (the VLB term trains v only).
- Training draws t uniformly in [0, 1000); sampling respaces to `num_sampling_steps` ("100") with IDDPM's
  `space_timesteps` and calls the net with the original timestep index.
- Sampling scales the per-step noise by a temperature; classifier-free guidance mixes ε only.
Parameter names (`net.time_embed.mlp.{0,2}`, `net.cond_embed`, `net.input_proj`,
`net.res_blocks.{i}.{in_ln, mlp.{0,2}, adaLN_modulation.1}`, `net.final_layer.{linear, adaLN_modulation.1}`)
match the released `mar.diffloss.*` keys.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

NUM_TRAIN_TIMESTEPS = 1000


# ---- the network -----------------------------------------------------------------------------------
def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """Sinusoidal (cos, sin) features of the timestep (256 frequencies) → 2-layer SiLU MLP."""

    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:          # (N,) → (N, width)
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class ResBlock(nn.Module):
    """x + gate · MLP(modulate(LN(x), shift, scale)); shift/scale/gate from the condition."""

    def __init__(self, width: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(_modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    """The diffusion head: (noisy token (N, C), timestep (N,), condition (N, cond_dim)) → (N, 2C)."""

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int):
        super().__init__()
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.input_proj = nn.Linear(token_dim, width)
        self.res_blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.final_layer = FinalLayer(width, 2 * token_dim)
        self.grad_checkpointing = False
        # Official `initialize_weights`: Xavier linears with zero bias, N(0, 0.02) timestep MLP, and zeroed
        # AdaLN modulations and output layer (the head starts as the identity on the residual stream).
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        for block in self.res_blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for p in (self.final_layer.adaLN_modulation[-1].weight, self.final_layer.adaLN_modulation[-1].bias,
                  self.final_layer.linear.weight, self.final_layer.linear.bias):
            nn.init.zeros_(p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        dtype = self.input_proj.weight.dtype
        x = self.input_proj(x.to(dtype))
        y = self.time_embed(t) + self.cond_embed(c.to(dtype))
        for block in self.res_blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, y, use_reentrant=False)
            else:
                x = block(x, y)
        return self.final_layer(x, y)


# ---- the diffusion process (float64 numpy tables, like IDDPM; no tensors → meta-safe, no buffers) ----
def cosine_betas(steps: int = NUM_TRAIN_TIMESTEPS, max_beta: float = 0.999) -> np.ndarray:
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), max_beta) for i in range(steps)])


def spaced_timesteps(steps: int, count: int) -> list[int]:
    """IDDPM `space_timesteps(steps, [count])`: ``count`` evenly strided indices, rounded (Python round)."""
    if count > steps:
        raise ValueError(f"cannot take {count} sampling steps from {steps} diffusion steps")
    stride = 1 if count <= 1 else (steps - 1) / (count - 1)
    return sorted({round(i * stride) for i in range(count)})


class Schedule:
    """Coefficients of one (possibly respaced) process; ``timestep_map[i]`` is the net's timestep input."""

    def __init__(self, use_steps: list[int] | None = None):
        base_betas = cosine_betas()
        if use_steps is None:
            use_steps = list(range(len(base_betas)))
        base_ac = np.cumprod(1.0 - base_betas)
        betas, last = [], 1.0
        for i in use_steps:                     # respacing keeps alpha_bar at the retained steps
            betas.append(1 - base_ac[i] / last)
            last = base_ac[i]
        self.timestep_map = np.array(use_steps, dtype=np.int64)
        self.betas = np.array(betas, dtype=np.float64)
        self.num_timesteps = len(betas)
        ac = np.cumprod(1.0 - self.betas)
        ac_prev = np.append(1.0, ac[:-1])
        self.sqrt_ac, self.sqrt_1m_ac = np.sqrt(ac), np.sqrt(1.0 - ac)
        self.sqrt_recip_ac, self.sqrt_recipm1_ac = np.sqrt(1.0 / ac), np.sqrt(1.0 / ac - 1)
        post_var = self.betas * (1.0 - ac_prev) / (1.0 - ac)
        # log clipped: the posterior variance is 0 at t = 0, so reuse the t = 1 value there.
        self.post_logvar = np.log(np.append(post_var[1], post_var[1:])) if len(post_var) > 1 else np.zeros(1)
        self.log_betas = np.log(self.betas)
        self.coef_x0 = self.betas * np.sqrt(ac_prev) / (1.0 - ac)
        self.coef_xt = (1.0 - ac_prev) * np.sqrt(1.0 - self.betas) / (1.0 - ac)

    @staticmethod
    def take(table: np.ndarray, t: torch.Tensor) -> torch.Tensor:
        """table[t] as float32 (N, 1) on t's device."""
        return torch.from_numpy(table).to(device=t.device)[t].float()[:, None]

    def model_mean_logvar(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """p(x_{t-1} | x_t) from the head's (ε̂, v): mean via the x0 prediction, log variance interpolated
        between the clipped posterior variance (v = -1) and β_t (v = +1)."""
        eps, v = out.float().chunk(2, dim=1)
        frac = (v + 1) / 2
        logvar = frac * self.take(self.log_betas, t) + (1 - frac) * self.take(self.post_logvar, t)
        x0 = self.take(self.sqrt_recip_ac, t) * x_t - self.take(self.sqrt_recipm1_ac, t) * eps
        mean = self.take(self.coef_x0, t) * x0 + self.take(self.coef_xt, t) * x_t
        return mean, logvar


def _normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    # The tanh approximation IDDPM uses.
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _discretized_gaussian_nll(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """−log p(x) for x on a 2/255 grid in [-1, 1] (IDDPM's decoder term at t = 0), elementwise, nats."""
    centered, inv_std = x - mean, torch.exp(-log_scale)
    cdf_plus = _std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return -torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class DiffLoss(nn.Module):
    """Diffusion loss and sampler around :class:`SimpleMLPAdaLN` (key prefix ``diffloss.net``)."""

    def __init__(self, *, token_dim: int, cond_dim: int, width: int, depth: int, num_sampling_steps: str):
        super().__init__()
        self.token_dim = token_dim
        self.net = SimpleMLPAdaLN(token_dim, cond_dim, width, depth)
        self.num_sampling_steps = int(num_sampling_steps)
        self._train: Schedule | None = None
        self._gen: Schedule | None = None

    @property
    def train_schedule(self) -> Schedule:
        if self._train is None:
            self._train = Schedule()
        return self._train

    @property
    def gen_schedule(self) -> Schedule:
        if self._gen is None:
            self._gen = Schedule(spaced_timesteps(NUM_TRAIN_TIMESTEPS, self.num_sampling_steps))
        return self._gen

    def forward(self, target: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean loss over the tokens with ``mask`` = 1. target (N, C) clean latents, z (N, cond_dim)."""
        s = self.train_schedule
        x0 = target.float()
        t = torch.randint(0, s.num_timesteps, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        x_t = s.take(s.sqrt_ac, t) * x0 + s.take(s.sqrt_1m_ac, t) * noise
        out = self.net(x_t, t, z).float()                                           # (N, 2C)
        eps, v = out.chunk(2, dim=1)
        mse = ((noise - eps) ** 2).mean(dim=1)
        # VLB term with ε̂ detached: it trains the variance output only (IDDPM "hybrid" loss).
        mean, logvar = s.model_mean_logvar(torch.cat([eps.detach(), v], dim=1), x_t, t)
        true_mean = s.take(s.coef_x0, t) * x0 + s.take(s.coef_xt, t) * x_t
        kl = _normal_kl(true_mean, s.take(s.post_logvar, t), mean, logvar).mean(dim=1) / math.log(2.0)
        nll = _discretized_gaussian_nll(x0, mean, 0.5 * logvar).mean(dim=1) / math.log(2.0)
        loss = mse + torch.where(t == 0, nll, kl)                                   # (N,)
        if mask is None:
            return loss.mean()
        mask = mask.float()
        return (loss * mask).sum() / mask.sum().clamp(min=1.0)

    @torch.no_grad()
    def sample(self, z: torch.Tensor, z_uncond: torch.Tensor | None = None, temperature: float = 1.0,
               cfg: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw one latent per condition row of z (N, cond_dim) → (N, C). With ``z_uncond`` and cfg ≠ 1,
        ε = ε_u + cfg · (ε_c − ε_u) (the variance comes from the conditional branch)."""
        s = self.gen_schedule
        n = z.shape[0]
        guided = z_uncond is not None and cfg != 1.0
        x = torch.randn(n, self.token_dim, generator=generator, device=z.device, dtype=torch.float32)
        for i in reversed(range(s.num_timesteps)):
            t = torch.full((n,), i, device=z.device, dtype=torch.long)
            t_net = torch.from_numpy(s.timestep_map).to(z.device)[t]
            if guided:
                out = self.net(torch.cat([x, x]), torch.cat([t_net, t_net]), torch.cat([z, z_uncond])).float()
                cond, uncond = out.chunk(2, dim=0)
                eps = uncond[:, :self.token_dim] + cfg * (cond[:, :self.token_dim] - uncond[:, :self.token_dim])
                out = torch.cat([eps, cond[:, self.token_dim:]], dim=1)
            else:
                out = self.net(x, t_net, z).float()
            mean, logvar = s.model_mean_logvar(out, x, t)
            if i > 0:
                noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                x = mean + torch.exp(0.5 * logvar) * noise * temperature
            else:
                x = mean
        return x
