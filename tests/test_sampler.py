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


def test_step_list_sampler_matches_a_float64_reimplementation():
    """denoising_step_list (LightX2V's step-distill sampler) vs an independent float64 loop of its update rule:
    sigma_k = shift * s / (1 + (shift - 1) * s) at s = step_k / 1000; x0 = x - sigma_k v; x <- x0 + sigma_{k+1} v."""
    from ditfleet.engine.sampler import make_sampler

    shift, steps = 5.0, [1000, 750, 500, 250]
    sampler = make_sampler("unipc", len(steps), shift, step_list=steps)
    assert sampler.describe()["solver"] == "step_list" and len(sampler) == 4
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 2, 4, 4, generator=g)
    w = torch.randn(16, 16, generator=g, dtype=torch.float64) * 0.3

    def velocity(x, t):  # any smooth function of x and t
        return torch.einsum("ij,bj...->bi...", w.to(x.dtype), x) * (t / 1000.0) - 0.1 * x

    sig64 = [shift * (s / 1000) / (1 + (shift - 1) * (s / 1000)) for s in steps] + [0.0]
    x64 = x.double()
    ours = x.clone()
    for k in range(len(steps)):
        t = sampler.timesteps[k]
        assert abs(float(t) - sig64[k] * 1000) < 1e-3, (k, float(t), sig64[k] * 1000)
        ours = sampler.step(velocity(ours, float(t)), ours)
        v = velocity(x64, sig64[k] * 1000)
        x64 = (x64 - sig64[k] * v) + sig64[k + 1] * v
    assert float((ours.double() - x64).norm() / x64.norm()) < 1e-5
    with pytest.raises(ValueError, match="strictly decreasing"):
        make_sampler("unipc", 2, shift, step_list=[500, 750])


def test_step_list_config_and_run(tmp_path):
    from ditfleet.config import load_config
    from ditfleet.engine import Engine
    from ditfleet.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        load_config(None, ["denoising_step_list=[1000, 750, 500, 250]"])  # infer_steps 50 by default
    assert info.value.key == "infer_steps" and "set infer_steps to 4" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(None, ["denoising_step_list=[250, 500]", "infer_steps=2"])
    assert info.value.key == "denoising_step_list"
    cfg = load_config(None, ["device=cpu", "denoising_step_list=[1000, 750, 500, 250]", "infer_steps=4",
                             "enable_cfg=false", "target_video_length=5", "target_height=32", "target_width=32"])
    from ditfleet.engine.sampler import step_list_schedule

    with Engine.start(cfg, launcher="local") as eng:
        res = eng.generate(output=str(tmp_path / "d.npy"), decode=False, quiet=True)
    want = [round(float(t), 3) for t in step_list_schedule([1000, 750, 500, 250], cfg.sample_shift).timesteps]
    assert res.report["sampler"]["solver"] == "step_list" and res.report["sampler"]["steps"] == 4
    assert [round(t, 3) for t in res.report["sampler"]["timesteps"]] == want and want[0] == 1000.0
    assert res.report["request"]["step_list"] == (1000, 750, 500, 250)
