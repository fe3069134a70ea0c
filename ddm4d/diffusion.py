"""Forward noising process of DDPM (Ho et al. 2020) with the DDM paper's linear schedule.

Computed in float64 and stored as float32 buffers, so alpha_t is accurate over u = 2000 steps.
"""
from __future__ import annotations

import torch
from torch import nn


def linear_beta_schedule(timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """beta_t linear from beta_start to beta_end (DDM: 1e-6 .. 1e-2 over u = 2000)."""
    return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)


class NoiseSchedule(nn.Module):
    """alpha_t = prod_{s<=t} (1 - beta_s);  x_t = sqrt(alpha_t) T + sqrt(1 - alpha_t) eps  (DDM eq. 1)."""

    def __init__(self, timesteps: int, beta_start: float, beta_end: float):
        super().__init__()
        betas = linear_beta_schedule(timesteps, beta_start, beta_end)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.timesteps = timesteps
        self.register_buffer("betas", betas.float(), persistent=False)
        self.register_buffer("alphas_cumprod", alphas_cumprod.float(), persistent=False)
        self.register_buffer("sqrt_alphas_cumprod", alphas_cumprod.sqrt().float(), persistent=False)
        self.register_buffer("sqrt_one_minus_alphas_cumprod", (1.0 - alphas_cumprod).sqrt().float(), persistent=False)

    def sample_timesteps(self, batch: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        """t uniform in [0, u)."""
        return torch.randint(0, self.timesteps, (batch,), device=device, generator=generator)

    def q_sample(self, target: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Noisy target x_t for integer steps t of shape (batch,)."""
        shape = (-1,) + (1,) * (target.dim() - 1)
        a = self.sqrt_alphas_cumprod[t].view(shape).to(target.dtype)
        b = self.sqrt_one_minus_alphas_cumprod[t].view(shape).to(target.dtype)
        return a * target + b * noise
