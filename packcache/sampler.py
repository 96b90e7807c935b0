"""Few-step flow-matching sampler with Self-Forcing's schedule.

x_sigma = (1 - sigma) x0 + sigma noise; the network predicts the velocity v = noise - x0, so x0 = x - sigma v.
The listed timesteps (1000, 750, 500, 250) are warped by the shift: sigma = shift s / (1 + (shift - 1) s), s = t/1000,
giving sigma = 1, 0.9375, 0.8333, 0.625 for shift 5. Between steps the x0 estimate is re-noised with fresh noise.
"""

from __future__ import annotations

import torch

from .presets import SamplerConfig


def warp_sigma(t: float, shift: float, num_train_timesteps: int = 1000) -> float:
    s = t / num_train_timesteps
    return shift * s / (1 + (shift - 1) * s)


class FlowSampler:
    def __init__(self, config: SamplerConfig):
        self.config = config
        self.sigmas = [warp_sigma(t, config.shift, config.num_train_timesteps) for t in config.timesteps]

    @property
    def steps(self) -> int:
        return len(self.sigmas)

    def timestep(self, sigma: float, batch: int, device) -> torch.Tensor:
        """The network's timestep input for a noise level (sigma * 1000)."""
        return torch.full((batch,), sigma * self.config.num_train_timesteps, device=device)

    @staticmethod
    def x0_from_velocity(x: torch.Tensor, v: torch.Tensor, sigma: float) -> torch.Tensor:
        return (x.float() - sigma * v.float()).to(x.dtype)

    @staticmethod
    def renoise(x0: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
        return ((1 - sigma) * x0.float() + sigma * noise.float()).to(x0.dtype)
