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


def test_ode_steps_follow_the_straight_path_of_a_perfect_model():
    """With the exact velocity, Euler steps land on (1 - s') x0 + s' noise at every level: no noise is drawn."""
    from dataclasses import replace
    torch.manual_seed(0)
    x0, noise = torch.randn(1, 16, 3, 4, 4), torch.randn(1, 16, 3, 4, 4)
    s = FlowSampler(replace(SamplerConfig(), shift=1.0, between_steps="ode"))
    x = FlowSampler.renoise(x0, noise, s.sigmas[0])

    def no_noise():
        raise AssertionError("the ODE path must not draw noise")

    for k in range(s.steps - 1):
        v = noise - x0
        x = s.next_x(x, v, FlowSampler.x0_from_velocity(x, v, s.sigmas[k]), k, no_noise)
        torch.testing.assert_close(x, FlowSampler.renoise(x0, noise, s.sigmas[k + 1]), rtol=1e-5, atol=1e-5)


def test_fresh_steps_renoise_the_estimate_with_new_noise():
    x0, fresh = torch.zeros(1, 2), torch.ones(1, 2)
    s = FlowSampler(SamplerConfig(shift=1.0))
    x = s.next_x(torch.full((1, 2), 5.0), torch.zeros(1, 2), x0, 0, lambda: fresh)
    torch.testing.assert_close(x, torch.full((1, 2), s.sigmas[1]))


def test_guidance_extrapolates_from_unconditional_to_conditional():
    from dataclasses import replace
    s = FlowSampler(replace(SamplerConfig(), guidance_scale=3.0))
    vc, vu = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 2.0])
    assert s.guided and not FlowSampler(SamplerConfig()).guided
    torch.testing.assert_close(s.guide(vc, vu), torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(s.guide(vc, None), vc)


def test_guidance_rescale_brings_back_the_conditional_spread():
    """phi = 1: the guided velocity keeps its direction but gets the conditional velocity's standard deviation, per
    sample; phi = 0.5 lands halfway; phi = 0 is plain guidance."""
    from dataclasses import replace
    g = torch.Generator().manual_seed(0)
    vc, vu = torch.randn(2, 4, 3, 5, generator=g), torch.randn(2, 4, 3, 5, generator=g)
    plain = FlowSampler(replace(SamplerConfig(), guidance_scale=5.0)).guide(vc, vu)
    full = FlowSampler(replace(SamplerConfig(), guidance_scale=5.0, guidance_rescale=1.0)).guide(vc, vu)
    half = FlowSampler(replace(SamplerConfig(), guidance_scale=5.0, guidance_rescale=0.5)).guide(vc, vu)
    for i in range(2):
        assert plain[i].std() > 1.5 * vc[i].std()
        torch.testing.assert_close(full[i].std(), vc[i].std())
        torch.testing.assert_close(full[i] / full[i].norm(), plain[i] / plain[i].norm())
    torch.testing.assert_close(half, (plain + full) / 2)
