"""Self-Forcing's few-step schedule: timesteps 1000/750/500/250 warped by shift 5."""

import pytest
import torch

from packcache.presets import SamplerConfig
from packcache.sampler import FlowSampler


def test_warped_sigmas_match_self_forcing():
    s = FlowSampler(SamplerConfig())
    assert s.sigmas == pytest.approx([1.0, 0.9375, 0.833333, 0.625], abs=1e-6)
    assert s.timestep(0.625, 2, "cpu").tolist() == [625.0, 625.0]


def test_flow_identities_recover_x0():
    torch.manual_seed(0)
    x0, noise = torch.randn(2, 16, 3, 4, 4), torch.randn(2, 16, 3, 4, 4)
    sigma = 0.8333
    x = FlowSampler.renoise(x0, noise, sigma)
    v = noise - x0                                   # the velocity a perfect model predicts
    torch.testing.assert_close(FlowSampler.x0_from_velocity(x, v, sigma), x0, rtol=1e-5, atol=1e-5)
