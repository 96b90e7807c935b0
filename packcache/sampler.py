"""Few-step flow-matching sampler with Self-Forcing's schedule.

x_sigma = (1 - sigma) x0 + sigma noise; the network predicts the velocity v = noise - x0, so x0 = x - sigma v.
The listed timesteps (1000, 750, 500, 250) are warped by the shift: sigma = shift s / (1 + (shift - 1) s), s = t/1000,
giving sigma = 1, 0.9375, 0.8333, 0.625 for shift 5. Between steps the x0 estimate is re-noised with fresh noise
(Self-Forcing), or, for models trained by plain flow matching, x follows the predicted velocity (Euler).
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

    def next_x(self, x: torch.Tensor, v: torch.Tensor, x0: torch.Tensor, k: int, noise) -> torch.Tensor:
        """The input of denoising step k+1 from step k's prediction; `noise` is called only when fresh noise is
        drawn, so the ODE path leaves the session's noise stream untouched."""
        nxt = self.sigmas[k + 1]
        if self.config.between_steps == "ode":
            return (x.float() + (nxt - self.sigmas[k]) * v.float()).to(x.dtype)
        return self.renoise(x0, noise(), nxt)

    def guide(self, v_cond: torch.Tensor, v_uncond: torch.Tensor | None) -> torch.Tensor:
        """Classifier-free guidance: v = v_u + g (v_c - v_u), then with rescale phi: phi v std(v_c)/std(v) +
        (1 - phi) v, the standard deviations per sample over all its elements."""
        if v_uncond is None:
            return v_cond
        g, phi = self.config.guidance_scale, self.config.guidance_rescale
        vc = v_cond.float()
        v = v_uncond.float() + g * (vc - v_uncond.float())
        if phi > 0:
            dims = tuple(range(1, v.ndim))
            ratio = vc.std(dim=dims, keepdim=True) / v.std(dim=dims, keepdim=True).clamp_min(1e-6)
            v = phi * v * ratio + (1 - phi) * v
        return v.to(v_cond.dtype)

    @property
    def guided(self) -> bool:
        return self.config.guidance_scale != 1.0

    @staticmethod
    def renoise(x0: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
        return ((1 - sigma) * x0.float() + sigma * noise.float()).to(x0.dtype)
