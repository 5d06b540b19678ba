"""Flow-matching samplers vs the official Wan2.1 schedule and Diffusers' schedulers (CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ditfleet.engine.sampler import EulerSampler, UniPCSampler, flow_sigmas, make_sampler, make_schedule


def official_timesteps(steps: int, shift: float) -> list[int]:
    """The official FlowUniPCMultistepScheduler(shift=1).set_timesteps(steps, shift=shift), written out independently."""
    alphas = np.linspace(1, 1 / 1000, 1000)[::-1].copy()
    train = torch.from_numpy(1.0 - alphas).to(torch.float32)
    sigma_max, sigma_min = train[0].item(), train[-1].item()
    sigmas = np.linspace(sigma_max, sigma_min, steps + 1).copy()[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return torch.from_numpy(sigmas * 1000).to(torch.int64).tolist()


def test_official_schedule_50_steps_shift_5():
    ts = make_schedule(50, 5.0).timesteps
    assert ts.dtype == torch.int64 and len(ts) == 50
    assert ts[:5].tolist() == [999, 995, 991, 987, 982]
    assert ts[-3:].tolist() == [241, 172, 92]
    assert ts.tolist() == official_timesteps(50, 5.0)
    assert bool((ts[1:] < ts[:-1]).all())


@pytest.mark.parametrize("steps,shift", [(1, 5.0), (4, 5.0), (40, 3.0), (50, 1.0), (30, 8.0)])
def test_schedule_matches_official_formula(steps, shift):
    s = make_schedule(steps, shift)
    assert s.timesteps.tolist() == official_timesteps(steps, shift)
    assert s.sigmas.dtype == torch.float32 and s.sigmas.shape == (steps + 1,) and float(s.sigmas[-1]) == 0.0


def _run_pair(ref, ours, shape=(2, 16, 3, 6, 5), seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    y = x.clone()
    worst = 0.0
    for t in ref.timesteps:
        v = torch.randn(shape, generator=gen)
        x = ref.step(v, t, x, return_dict=False)[0]
        y = ours.step(v, y)
        worst = max(worst, float((x - y).abs().max() / x.abs().max()))
    return worst


@pytest.mark.parametrize("schedule", ["wan", "diffusers"])
@pytest.mark.parametrize("steps", [1, 2, 3, 7, 25])
@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
def test_unipc_matches_diffusers_step_outputs(schedule, steps, shift):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)
    if schedule == "wan":
        ref.set_timesteps(sigmas=flow_sigmas(steps, 1.0, "wan"))  # unshifted official grid; Diffusers shifts it
    else:
        ref.set_timesteps(steps)
    ref.set_begin_index(0)
    ours = make_sampler("unipc", steps, shift, schedule=schedule)
    assert isinstance(ours, UniPCSampler)
    assert torch.equal(ref.timesteps, ours.timesteps)
    assert torch.equal(ref.sigmas, ours.sigmas)
    assert _run_pair(ref, ours) <= 1e-6


def test_unipc_order_3_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                            solver_order=3)
    ref.set_timesteps(9)
    ref.set_begin_index(0)
    ours = UniPCSampler(make_schedule(9, 3.0, schedule="diffusers"), order=3)
    assert _run_pair(ref, ours) <= 1e-6


@pytest.mark.parametrize("steps", [1, 4, 20])
def test_euler_matches_diffusers_flow_match_euler(steps):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=5.0)
    ref.set_timesteps(sigmas=flow_sigmas(steps, 1.0, "wan"))
    ours = make_sampler("euler", steps, 5.0)
    assert isinstance(ours, EulerSampler) and ours.timesteps.dtype == torch.float32
    torch.testing.assert_close(ours.timesteps, ref.timesteps, rtol=1e-6, atol=1e-3)
    assert _run_pair(ref, ours) <= 1e-5


def test_unipc_recovers_a_straight_flow_exactly():
    """For a linear flow x_t = (1 - s) x0 + s n the exact velocity is n - x0: every solver must land on x0."""
    gen = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(1, 4, 2, 3, 3, generator=gen), torch.randn(1, 4, 2, 3, 3, generator=gen)
    for solver in ("unipc", "euler"):
        s = make_sampler(solver, 8, 5.0)
        s0 = float(s.sigmas[0])
        x = (1 - s0) * x0 + s0 * noise
        for _ in s.timesteps:
            x = s.step(noise - x0, x)
        torch.testing.assert_close(x, x0, rtol=1e-5, atol=1e-5)


def test_sampler_is_stateful_and_refuses_extra_steps():
    s = make_sampler("unipc", 2, 5.0)
    x = torch.zeros(1, 2, 1, 1, 1)
    s.step(x, x)
    s.step(x, x)
    with pytest.raises(RuntimeError):
        s.step(x, x)
    with pytest.raises(ValueError):
        make_sampler("heun", 4, 5.0)
