"""Step caching (``feature_caching`` Tea / Mag / FirstBlock) through the engine's ModelRunner.

* threshold 0 == no caching, bit for bit, on a tiny Wan DiT (every method, CFG on);
* a hand-made model whose output changes slowly: the steps Tea and Mag skip and the final latents equal a
  float64 re-implementation of the rule, the model and the Euler sampler written out here;
* 2 and 4 gloo ranks (SP 2, SP 4, cfg 2 x SP 2): the decisions and the latents equal the single-process run,
  although each rank's own tokens would decide differently (the test builds such inputs and checks that);
  the real Wan DiT under Ulysses with FirstBlock, and TI2V's per-token time embedding with Tea, too;
* the cached residual lives on the tokens' device; two experts keep their own caches; models without published
  constants need them (one error naming the key);
* through the engine (``torchrun``, cfg_p_size 2): the config reaches every worker and the run report lists
  computed vs skipped steps of both branches, as the one-process run does.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dist_utils import run_distributed
from ditfleet.engine.request import EncodedRequest
from ditfleet.engine.runner import ModelRunner, initial_noise
from ditfleet.errors import ConfigError
from ditfleet.models.step_cache import StepCacheSettings

COEFFS = (0.0, 0.0, 0.0, 1.0, 0.0)  # identity rescaling: accumulate the relative L1 itself
STEPS = 10
FB_THRESH = 0.185  # the tiny random Wan DiT's first-block residual changes by 0.16 - 0.27 per step


# ---- a hand-made model ---------------------------------------------------------------------------------------
class ToyStaged:
    """One forward of :class:`ToyDiT`, staged (tokens split over the SP group when the model has a mesh)."""

    def __init__(self, model, x, t, context):
        from ditfleet.parallel import shard_sequence

        self.model = model
        b, c = x.shape[:2]
        self.shape = x.shape
        tokens = x.float().reshape(b, c, -1).transpose(1, 2).contiguous()  # [B, S, C]
        s = tokens.shape[1]
        gain = model.gain(s)[None, :, None]  # per-token sensitivity of the modulated input to t
        tau = t.float().reshape(-1, 1, 1) / 1000.0
        mod = tokens * (1.0 + gain * tau)
        self.bias = context.float().mean(dim=(1, 2)).reshape(-1, 1, 1) * 0.1 + tau * 0.2
        self.mesh, self.shard = model.mesh, None
        if model.mesh is not None and model.mesh.sp_size > 1:
            tokens, self.shard = shard_sequence(tokens, model.mesh)
            mod, _ = shard_sequence(mod, model.mesh)
        self.tokens, self.mod = tokens, mod
        self.rows = None if self.shard is None else self.shard.local_valid
        self.num_blocks = len(model.weights)

    def tea_input(self, use_ret_steps):
        return self.mod, True  # per token: split over the SP group

    def run(self, start, stop, state):
        h = self.tokens if state is None else state
        for k in range(start, stop):
            h = h + 0.3 * torch.tanh(h @ self.model.weights[k] + self.bias)
        return h

    def stream(self, state):
        return state

    def finish(self, state):
        return self.finish_stream(state)

    def finish_stream(self, stream):
        from ditfleet.parallel import gather_sequence

        out = torch.tanh(stream @ self.model.head)
        if self.shard is not None:
            out = gather_sequence(out, self.mesh, self.shard)
        return out.transpose(1, 2).reshape(self.shape)


class ToyDiT:
    """tokens = x's positions; blocks ``h + 0.3 tanh(h W_k + bias(t, context))``; head ``tanh(h W_o)``.

    Its modulated input ``tokens * (1 + gain * t / 1000)`` changes fast on the first half of the tokens (gain 6)
    and slowly on the second (gain 0.02): under SP 2 the two ranks' own statistics differ by orders of magnitude.
    """

    def __init__(self, channels=4, layers=3, mesh=None, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.weights = [torch.randn(channels, channels, generator=g) * 0.4 for _ in range(layers)]
        self.head = torch.randn(channels, channels, generator=g) * 0.4
        self.mesh = mesh
        self.config = SimpleNamespace(dim=channels, num_layers=layers, model_type="t2v")
        self.device = torch.device("cpu")

    @staticmethod
    def gain(s):
        return torch.where(torch.arange(s) < s // 2, 6.0, 0.02)

    def set_step(self, i):
        return self

    def staged_forward(self, x, t, context, clip_fea=None, y=None):
        return ToyStaged(self, x, t, context)

    def __call__(self, x, t, context, clip_fea=None, y=None):
        s = self.staged_forward(x, t, context)
        return s.finish(s.run(0, s.num_blocks, None))


def toy_request(latent=(4, 1, 4, 4), cfg=True, steps=STEPS, seed=3):
    g = torch.Generator().manual_seed(7)
    ctx, ctx_null = torch.randn(1, 5, 6, generator=g), torch.randn(1, 5, 6, generator=g) * 0.5
    return EncodedRequest(context=ctx, context_null=ctx_null if cfg else None, clip_fea=None, y=None,
                          latent_shape=latent, seed=seed, steps=steps, shift=3.0, guide_scale=4.0, enable_cfg=cfg,
                          solver="euler")


# ---- the float64 re-implementation ---------------------------------------------------------------------------
def reference_run(model, enc, rule: str, settings: StepCacheSettings, ratios=None):
    """The toy model, the rule and the Euler sampler in float64, written from the rules' definitions."""
    from ditfleet.engine.sampler import make_sampler

    sampler = make_sampler("euler", enc.steps, enc.shift)
    sig = sampler.sigmas.double()
    W = [w.double() for w in model.weights]
    Wo = model.head.double()
    x = initial_noise(enc.latent_shape, enc.seed).double()
    branches = [(0, enc.context)] + ([(1, enc.context_null)] if enc.enable_cfg else [])
    state = {b: {"prev": None, "acc": 0.0, "res": None, "ratio": 1.0, "k": 0} for b, _ in branches}
    decisions = {b: [] for b, _ in branches}
    margins = []
    n = enc.steps
    for i, t in enumerate(sampler.timesteps):
        preds = {}
        for b, ctx in branches:
            st = state[b]
            tok = x.reshape(1, x.shape[1], -1).transpose(1, 2)
            tau = float(t) / 1000.0
            gain = ToyDiT.gain(tok.shape[1]).double()[None, :, None]
            mod = tok * (1.0 + gain * tau)
            bias = ctx.double().mean() * 0.1 + tau * 0.2
            compute = True
            if rule == "Tea":
                if i >= settings.tea_first() and i < n - settings.tea_last() and st["prev"] is not None:
                    rel = float((mod - st["prev"]).abs().sum() / st["prev"].abs().sum())
                    st["acc"] += float(np.polyval(settings.coefficients, rel))
                    margins.append(abs(st["acc"] - settings.teacache_thresh))
                    compute = not st["acc"] < settings.teacache_thresh
                if compute:
                    st["acc"] = 0.0
                st["prev"] = mod
            elif rule == "Mag":
                if i >= int(n * settings.magcache_retention_ratio):
                    st["ratio"] *= ratios[b][i]
                    st["k"] += 1
                    st["acc"] += abs(1 - st["ratio"])
                    margins.append(abs(st["acc"] - settings.magcache_thresh))
                    compute = not (st["acc"] < settings.magcache_thresh and st["k"] <= settings.magcache_K)
                    if compute:
                        st["acc"], st["k"], st["ratio"] = 0.0, 0, 1.0
            if compute:
                h = tok
                for w in W:
                    h = h + 0.3 * torch.tanh(h @ w + bias)
                st["res"] = h - tok
            else:
                h = tok + st["res"]
            decisions[b].append(compute)
            preds[b] = torch.tanh(h @ Wo).transpose(1, 2).reshape(x.shape)
        v = preds[1] + enc.guide_scale * (preds[0] - preds[1]) if enc.enable_cfg else preds[0]
        x = x + (sig[i + 1] - sig[i]) * v
    return x, decisions, (min(margins) if margins else math.inf)


def toy_settings(rule: str):
    if rule == "Tea":
        return StepCacheSettings(method="Tea", teacache_thresh=0.35, coefficients=COEFFS, first_steps=1, last_steps=1)
    return StepCacheSettings(method="Mag", magcache_thresh=0.15, magcache_K=3, magcache_retention_ratio=0.2,
                             magcache_ratios=toy_ratios())


def toy_ratios():
    cond = [1.0] + [0.99 - 0.01 * i for i in range(STEPS - 1)]
    return (tuple(cond), tuple(r - 0.005 for r in cond))


@pytest.mark.parametrize("rule", ["Tea", "Mag"])
def test_slow_model_skips_the_expected_steps_and_matches_float64(rule):
    model = ToyDiT()
    enc = toy_request()
    settings = toy_settings(rule)
    runner = ModelRunner(model).set_step_cache(settings)
    out = runner.denoise(enc)
    ref, decisions, margin = reference_run(model, enc, rule, settings, ratios=toy_ratios())
    assert margin > 1e-4, f"a decision sits within {margin:.1e} of the threshold: float32 vs float64 may disagree"
    got = runner.cache_decisions()
    assert got == {"cond": decisions[0], "uncond": decisions[1]}
    skipped = [i for i, c in enumerate(decisions[0]) if not c]
    assert 2 <= len(skipped) <= STEPS - 3, f"{rule} should skip some steps, not all: skipped {skipped}"
    assert torch.allclose(out.double(), ref, rtol=1e-4, atol=1e-5), (out.double() - ref).abs().max()
    rep = runner.cache_report()
    assert rep["feature_caching"] == rule and rep["branches"]["cond"]["skipped_steps"] == skipped
    assert rep["forwards_computed"] + rep["forwards_skipped"] == 2 * STEPS
    # the same run without caching differs (skipping changed the latents) but stays close
    plain = ModelRunner(model).denoise(enc)
    assert not torch.equal(plain, out)


def test_two_experts_keep_their_own_caches():
    """A two-expert model (Wan2.2 A14B's layout): the low-noise expert's first step is computed, never the high-noise
    expert's residual; one cache per (expert, branch)."""
    from ditfleet.models.spec import Denoisers

    enc = toy_request()
    settings = StepCacheSettings(method="Tea", teacache_thresh=5.0, coefficients=COEFFS, first_steps=1, last_steps=0)
    runner = ModelRunner(Denoisers([ToyDiT(seed=0), ToyDiT(seed=1)], ["high", "low"], boundary=0.5))
    switch = next(i for i, t in enumerate(runner.sampler(enc).timesteps) if runner.denoisers.index_for(t) == 1)
    assert 1 < switch < STEPS - 1
    held = {}
    for i, _, _ in runner.set_step_cache(settings).denoise_iter(enc):
        held[i] = set(runner._cache.branches)
    for branch, dec in runner.cache_decisions().items():
        assert dec[0] and dec[switch], (branch, dec)  # each expert starts computed
        assert dec.count(True) == 2, (branch, dec)  # a huge threshold: every other step skipped
    # one cache per (expert, branch); the high-noise expert's tensors are freed once the low-noise one runs, and
    # every cached tensor after the run (the report keeps the records)
    assert held[switch - 1] == {(0, 0), (0, 1)} and held[switch] == {(1, 0), (1, 1)}
    assert held[STEPS - 1] == set() and runner.cache_report()["forwards_computed"] == 4


# ---- the Wan DiT: threshold 0 == none, bit for bit --------------------------------------------------------------
def tiny_wan(model_type="t2v", seed=0):
    from ditfleet.models.wan import WanDiTConfig, build_dit

    cfg = WanDiTConfig(model_type=model_type, in_dim=16, dim=48, ffn_dim=64, num_heads=3, num_layers=3, text_dim=32,
                       text_len=16, freq_dim=32)
    return build_dit(cfg, device="cpu", dtype=torch.float32, seed=seed, std=0.1)


def wan_request(dit, latent=(16, 2, 4, 6), steps=6, cfg=True, solver="unipc"):
    g = torch.Generator().manual_seed(11)
    c = dit.config
    return EncodedRequest(context=torch.randn(1, 9, c.text_dim, generator=g),
                          context_null=torch.randn(1, 9, c.text_dim, generator=g) if cfg else None, clip_fea=None,
                          y=None, latent_shape=latent, seed=5, steps=steps, shift=5.0, guide_scale=5.0, enable_cfg=cfg,
                          solver=solver)


ZERO = {
    "Tea": StepCacheSettings(method="Tea", teacache_thresh=0.0, coefficients=(-1.0, 0.0, -0.5), first_steps=0,
                             last_steps=0),  # a negative polynomial: below any positive threshold, still never skips
    "Mag": StepCacheSettings(method="Mag", magcache_thresh=0.0, magcache_retention_ratio=0.0,
                             magcache_ratios=((1.0,) * 6, (1.0,) * 6)),
    "FirstBlock": StepCacheSettings(method="FirstBlock", residual_diff_threshold=0.0),
}


@pytest.mark.parametrize("cfg", [True, False])
def test_threshold_zero_is_no_caching_bit_for_bit(cfg):
    dit = tiny_wan()
    enc = wan_request(dit, cfg=cfg)
    ref = ModelRunner(dit).denoise(enc)
    for name, settings in ZERO.items():
        runner = ModelRunner(dit).set_step_cache(settings)
        out = runner.denoise(enc)
        assert torch.equal(out, ref), f"{name} at threshold 0 differs from no caching"
        rep = runner.cache_report()
        assert rep["forwards_skipped"] == 0 and rep["forwards_computed"] == enc.steps * (2 if cfg else 1)
    # the batch-of-2 CFG path is left for the two passes (separate caches) and still matches
    out = ModelRunner(dit, cfg_batch=True).set_step_cache(ZERO["FirstBlock"]).denoise(enc)
    assert torch.equal(out, ref)


def test_wan_first_block_skips_per_branch_and_keeps_the_residual_on_the_tokens_device():
    dit = tiny_wan()
    enc = wan_request(dit, steps=8, solver="euler")
    runner = ModelRunner(dit).set_step_cache(StepCacheSettings(method="FirstBlock", residual_diff_threshold=FB_THRESH))
    residuals = []
    for i, _, out in runner.denoise_iter(enc):
        if i == 6:  # the residuals as they are during the run (all are freed after the last step)
            residuals = [br.residual for br in runner._cache.branches.values()]
    assert len(residuals) == 2 and not runner._cache.branches
    dec = runner.cache_decisions()
    assert set(dec) == {"cond", "uncond"} and all(len(v) == 8 for v in dec.values())
    assert dec["cond"][0] and dec["uncond"][0] and not all(dec["cond"] + dec["uncond"]), dec
    ref = ModelRunner(dit).denoise(enc)
    assert not torch.equal(out, ref) and torch.isfinite(out).all()
    for res in residuals:
        assert res.device == dit.device and res.dtype == torch.float32
        assert res.shape == (1, 2 * 2 * 3, dit.config.dim)  # the tokens' own shape


def test_the_residual_follows_the_tokens_to_their_device():
    """The cache never moves a residual: it is formed from the tokens (meta tensors: no compute needed)."""
    from ditfleet.models.step_cache import StepCache, cached_forward

    class MetaStaged:
        num_blocks, rows = 2, None

        def __init__(self):
            self.tokens = torch.empty(1, 6, 4, device="meta")

        def tea_input(self, use_ret_steps):
            return torch.ones(1, 4), False

        def run(self, start, stop, state):
            return (self.tokens if state is None else state) * 2

        def stream(self, state):
            return state

        def finish(self, state):
            return state

        finish_stream = finish

    cache = StepCache(StepCacheSettings(method="Tea", teacache_thresh=1.0, coefficients=COEFFS), 4)
    cached_forward(MetaStaged(), cache, 0, 0, 0)
    assert cache.branch(0, 0).residual.device.type == "meta"


def ti2v_case(steps=8):
    """Wan2.2 TI2V-5B's DiT at per-token timesteps (first-frame tokens at t = 0): its time embedding is per token."""
    from ditfleet.models.wan import WanDiTConfig
    from ditfleet.models.wan.dit import default_attention
    from ditfleet.models.wan22.ti2v import Ti2vDiT, first_frame_condition

    cfg = WanDiTConfig(model_type="t2v", in_dim=48, out_dim=48, dim=48, ffn_dim=64, num_heads=3, num_layers=2,
                       text_dim=32, text_len=16, freq_dim=32)
    dit = Ti2vDiT(cfg).requires_grad_(False).eval()
    dit.init_random_(seed=0, std=0.1)
    dit.set_attention(default_attention(cfg, "cpu", torch.float32))
    g = torch.Generator().manual_seed(5)
    shape = (48, 3, 6, 10)  # tokens (3, 3, 5) = 45: pads over 2 and 4 ranks
    y = first_frame_condition(torch.randn(1, 48, 1, 6, 10, generator=g), shape)
    enc = EncodedRequest(context=torch.randn(1, 11, 32, generator=g), context_null=torch.randn(1, 11, 32, generator=g),
                         clip_fea=None, y=y, latent_shape=shape, seed=5, steps=steps, shift=5.0, guide_scale=5.0,
                         enable_cfg=True, solver="euler")
    # identity rescaling; the per-token e changes by 0.46 - 0.73 per step: skip, compute, skip, ... (margins >= 0.09)
    return dit, enc, StepCacheSettings(method="Tea", teacache_thresh=1.0, coefficients=COEFFS)


def test_per_token_timesteps_make_the_tea_statistic_per_token():
    dit, enc, settings = ti2v_case()
    ref = ModelRunner(dit).denoise(enc)
    zero = ModelRunner(dit).set_step_cache(StepCacheSettings(method="Tea", teacache_thresh=0.0, coefficients=COEFFS))
    assert torch.equal(zero.denoise(enc), ref)
    runner = ModelRunner(dit).set_step_cache(settings)
    runner.denoise(enc)
    want = [True, False, True, False, True, False, True, True]
    assert runner.cache_decisions() == {"cond": want, "uncond": want}
    from ditfleet.models.wan.cache_hooks import WanStagedForward

    fwd = WanStagedForward(dit, torch.randn(1, *enc.latent_shape), torch.tensor([500.0]), enc.context, None, enc.y)
    inp, per_token = fwd.tea_input(False)
    assert per_token and inp.shape == (1, 45, dit.config.dim)


def test_models_without_published_constants_need_them():
    dit = tiny_wan()
    with pytest.raises(ConfigError, match="^coefficients: Tea needs the TeaCache polynomial"):
        ModelRunner(dit).set_step_cache(StepCacheSettings(method="Tea"))
    with pytest.raises(ConfigError, match="^magcache_ratios: Mag needs calibrated magnitude ratios"):
        ModelRunner(dit).set_step_cache(StepCacheSettings(method="Mag"))
    with pytest.raises(ConfigError, match=r"^feature_caching: Tea: the denoiser \(object\) does not expose its blocks"):
        ModelRunner(object()).set_step_cache(StepCacheSettings(method="Tea", coefficients=COEFFS))


def test_missing_constants_are_refused_before_anything_loads(monkeypatch, capsys):
    """check-config and an engine's load refuse Tea / Mag without constants before reading a component."""
    from ditfleet.cli import main
    from ditfleet.config import load_config
    from ditfleet.engine import pipeline as pl
    from ditfleet.engine.encoders import TextEncoder
    from ditfleet.models.registry import FAMILIES, spec_for

    assert main(["check-config", "--set", "feature_caching=Tea", "--set", "device=cpu"]) == 2
    assert "coefficients: Tea needs the TeaCache polynomial" in capsys.readouterr().err

    def loaded(*a, **kw):
        raise AssertionError("a component was loaded before the feature_caching check")

    monkeypatch.setattr(TextEncoder, "load", loaded)
    for family in FAMILIES:
        monkeypatch.setattr(type(spec_for(family)), "load", loaded)
    cfg = load_config(data={"feature_caching": "Mag", "device": "cpu"})
    for load in (lambda: pl.Pipeline.from_config(cfg), lambda: pl.load_runner(cfg, device=torch.device("cpu"))):
        with pytest.raises(ConfigError, match="^magcache_ratios: Mag needs calibrated magnitude ratios"):
            load()


def test_published_constants_are_picked_by_size_task_and_resolution():
    from ditfleet.models.wan import WanDiTConfig
    from ditfleet.models.wan import cache_hooks as ch

    t2v = WanDiTConfig.t2v_1_3b()
    assert ch.published_coefficients(t2v, "wan2.1", 480, 832, False)[0] == 2.39676752e03
    assert ch.published_coefficients(t2v, None, 480, 832, True)[0] == -5.21862437e04
    i2v = SimpleNamespace(dim=5120, num_layers=40, model_type="i2v")
    assert ch.published_coefficients(i2v, "wan2.1", 480, 832, False)[0] == -3.02331670e02
    assert ch.published_coefficients(i2v, "wan2.1", 720, 1280, True)[0] == 8.10705460e03
    assert ch.published_coefficients(t2v, "wan2.2_moe", 480, 832, False) is None  # Wan2.1's, not Wan2.2's
    cond, uncond = ch.published_mag_ratios(t2v, "wan2.1", 480, 832)
    assert len(cond) == len(uncond) == 50 and cond[:3] == (1.0, 1.0124, 1.00166) and uncond[1] == 1.02213
    cond, uncond = ch.published_mag_ratios(i2v, "wan2.1", 480, 832)
    assert len(cond) == 40 and cond[-1] == 0.92617
    from ditfleet.models.step_cache import nearest_resample

    assert nearest_resample([1.0, 2.0, 3.0, 4.0, 5.0], 3) == [1.0, 3.0, 5.0]


def test_sp_sum_free_statistic_is_the_ratio_of_global_sums():
    """Without a group the statistic is sum|a - b| / sum|b| over the valid rows (padding rows ignored)."""
    from ditfleet.models.step_cache import StepCache

    cache = StepCache(StepCacheSettings(method="FirstBlock"), 3)
    a, b = torch.randn(1, 5, 4), torch.randn(1, 5, 4)
    a[:, 3:] = b[:, 3:] = 1e9  # padding rows
    want = float((a[:, :3] - b[:, :3]).abs().double().sum() / b[:, :3].abs().double().sum())
    assert cache.rel_l1(a, b, rows=3) == pytest.approx(want, rel=1e-12)


# ---- under 2 and 4 gloo ranks ---------------------------------------------------------------------------------
def _dist_world(rank: int, world: int):
    from ditfleet.engine import runner as runner_mod
    from ditfleet.parallel import init_parallel

    layouts = {2: {"sp2": dict(ulysses_size=2)}, 4: {"sp4": dict(ulysses_size=4), "cfg2xsp2": dict(ulysses_size=2, cfg_size=2)}}
    out = {}
    enc = toy_request(latent=(4, 1, 4, 4))
    for name, kw in layouts[world].items():
        mesh = init_parallel(**kw)
        for rule in ("Tea", "Mag"):
            settings = toy_settings(rule)
            runner = ModelRunner(ToyDiT(mesh=mesh), mesh=mesh).set_step_cache(settings)
            lat = runner.denoise(enc)
            out[name, rule] = (runner.cache_decisions(), lat.numpy().copy())  # no tensors through the queue
        # the same Tea run deciding on each rank's own tokens only (what an unreduced statistic would do)
        sp_sum = runner_mod.sp_sum
        runner_mod.sp_sum = lambda mesh: None
        try:
            runner = ModelRunner(ToyDiT(mesh=mesh), mesh=mesh).set_step_cache(toy_settings("Tea"))
            runner.denoise(enc)
            out[name, "local"] = runner._cache.decisions(0 if mesh.cfg_size == 1 else mesh.cfg_rank)
        finally:
            runner_mod.sp_sum = sp_sum
        # the real Wan DiT, FirstBlock (a per-token statistic reduced over the group)
        dit = tiny_wan()
        dit.set_parallel(mesh)
        runner = ModelRunner(dit, mesh=mesh).set_step_cache(StepCacheSettings(method="FirstBlock",
                                                                              residual_diff_threshold=FB_THRESH))
        lat = runner.denoise(wan_request(dit, latent=(16, 3, 6, 10), steps=8, solver="euler"))
        out[name, "wan"] = (runner.cache_decisions(), lat.numpy().copy())
        # TI2V: Tea on a per-token time embedding, reduced over the group
        dit, enc2, settings = ti2v_case()
        dit.set_parallel(mesh)
        runner = ModelRunner(dit, mesh=mesh).set_step_cache(settings)
        lat = runner.denoise(enc2)
        out[name, "ti2v"] = (runner.cache_decisions(), lat.numpy().copy())
    return out


def _single():
    enc = toy_request(latent=(4, 1, 4, 4))
    ref = {}
    for rule in ("Tea", "Mag"):
        runner = ModelRunner(ToyDiT()).set_step_cache(toy_settings(rule))
        lat = runner.denoise(enc)
        ref[rule] = (runner.cache_decisions(), lat)
    dit = tiny_wan()
    runner = ModelRunner(dit).set_step_cache(StepCacheSettings(method="FirstBlock", residual_diff_threshold=FB_THRESH))
    lat = runner.denoise(wan_request(dit, latent=(16, 3, 6, 10), steps=8, solver="euler"))
    ref["wan"] = (runner.cache_decisions(), lat)
    stats = [v for per in runner._cache.statistics.values() for v in per.values() if v is not None]
    assert min(abs(v - FB_THRESH) for v in stats) > 1e-3, "a FirstBlock decision sits at the threshold"
    dit, enc2, settings = ti2v_case()
    runner = ModelRunner(dit).set_step_cache(settings)
    lat = runner.denoise(enc2)
    ref["ti2v"] = (runner.cache_decisions(), lat)
    return ref


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_take_the_single_process_decisions(world):
    ref = _single()
    per_rank = run_distributed(_dist_world, world, timeout=400)
    for key in per_rank[0]:
        name, rule = key
        for rank, res in enumerate(per_rank):
            if rule == "local":
                continue
            dec, lat = res[key]
            lat = torch.from_numpy(lat)
            want_dec, want_lat = ref[rule]
            assert dec == want_dec, f"{world} ranks {name} {rule}: rank {rank} decided {dec}, one process {want_dec}"
            if rule in ("wan", "ti2v"):
                err = float((lat - want_lat).norm() / want_lat.norm())
                assert err <= 1e-5, f"{name} wan rank {rank}: rel L2 {err:.2e}"
            else:
                assert torch.allclose(lat, want_lat, rtol=1e-5, atol=1e-6), f"{name} {rule} rank {rank}"
        local = [res[name, "local"] for res in per_rank]
        # the ranks' own statistics would not agree: some pair of ranks of one branch decides differently
        groups = [list(range(world))] if name != "cfg2xsp2" else [[0, 1], [2, 3]]
        assert any(len({tuple(local[r]) for r in g}) > 1 for g in groups), f"{name}: local decisions agree {local}"
    wan_dec = ref["wan"][0]
    assert not all(wan_dec["cond"] + wan_dec["uncond"]), "the Wan FirstBlock run should skip some steps"


# ---- the engine: config -> workers -> run report --------------------------------------------------------------
def test_torchrun_cfg_parallel_reports_both_branches_as_one_process(tmp_path, tiny_cache):
    """``torchrun --nproc-per-node 2 -m ditfleet generate`` with cfg_p_size 2 and FirstBlock: each cfg rank
    caches its branch; the report (rank 0) lists both branches, as the one-process run does, same latents."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from ditfleet.defaults import TINY_DEFAULT
    from ditfleet.engine import Engine
    from ditfleet.engine.tiny import tiny_model_path

    tiny_model_path("t2v")
    keys = {"device": "cpu", "infer_steps": 8, "feature_caching": "FirstBlock", "residual_diff_threshold": 0.07}
    with Engine.start({**TINY_DEFAULT, **keys}) as eng:
        res = eng.generate(output=str(tmp_path / "local.npy"), quiet=True)
        stats = [v for per in eng.pipeline.runner._cache.statistics.values() for v in per.values() if v is not None]
    assert min(abs(v - 0.07) for v in stats) > 1e-3, "a decision sits at the threshold"
    want = res.report["step_cache"]
    assert want["forwards_skipped"] > 0 and set(want["branches"]) == {"cond", "uncond"}
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = tmp_path / "tr.npy"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "ditfleet",
           "generate", "-q", "-o", str(out), "--save-latents", str(tmp_path / "tr.pt"), "--set", "parallel.cfg_p_size=2",
           *[a for k, v in keys.items() for a in ("--set", f"{k}={json.dumps(v) if not isinstance(v, str) else v}")]]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    got = json.loads(out.with_suffix(".json").read_text())
    assert got["parallel"]["cfg_p_size"] == 2 and got["step_cache"] == want
    lat = torch.load(tmp_path / "tr.pt")
    err = float((lat.double() - res.latents.double()).norm() / res.latents.double().norm())
    assert err <= 1e-4, err
