"""The self-attention policy (models/attention_policy.py): which kernel and mask each (layer, step) runs, for dense,
radial and Sparge, and a tiny Wan DiT driven by it equal to the same blocks run by hand with the rule written out."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ditfleet.attention.radial import RadialFlex, radial_block_mask
from ditfleet.attention.sdpa import SdpaCpuFlash
from ditfleet.attention.sparge import SpargeFlex, SpargeParams
from ditfleet.attention.sparge_ckpt import SpargeCheckpoint
from ditfleet.bench.common import rel_l2
from ditfleet.models.attention_policy import SelfAttentionPolicy, build_policy

CPU = torch.device("cpu")
DT = torch.float32
GRID = (5, 3, 5)  # 5 latent frames of 15 tokens


def setting(**kw):
    return SimpleNamespace(**{"decay_factor": 0.2, "block_size": 4, "dense_timesteps": 0, "dense_layers": 0, **kw})


def tiny_config(layers=3):
    from ditfleet.models.wan import WanDiTConfig

    return WanDiTConfig(model_type="t2v", in_dim=16, dim=48, ffn_dim=64, num_heads=3, num_layers=layers, text_dim=32,
                        text_len=16, freq_dim=32)


def build(self_backend, seed=0):
    from ditfleet.models.wan import SELF_SITE, TEXT_SITE, build_dit

    return build_dit(tiny_config(), device="cpu", dtype=DT, seed=seed, std=0.1,
                     attention={SELF_SITE: self_backend, TEXT_SITE: SdpaCpuFlash(CPU, DT)})


def inputs(cfg, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(1, 16, 5, 6, 10, generator=g), "t": torch.tensor([500.0]),
            "context": torch.randn(1, 11, cfg.text_dim, generator=g)}


def thresholds(seed):
    g = torch.Generator().manual_seed(seed)
    return SpargeParams.thresholds(3, cdfthreshd=(torch.rand(3, generator=g) * 0.6 + 0.2).tolist(),
                                   simthreshd1=[0.0, 0.1, -0.1], block_q=16, block_k=8)


# ------------------------------------------------------------------ which kernel / mask per (layer, step)
def test_dense_policy_runs_its_kernel_everywhere_and_ignores_a_radial_setting():
    sdpa = SdpaCpuFlash(CPU, DT)
    policy = build_policy(sdpa, num_layers=4, num_heads=3, radial=setting(dense_timesteps=2), sparge_topk=0.5)
    assert policy.kind == "dense" and policy.kernels() == (sdpa,)
    for layer in range(4):
        for step in (None, 0, 7):
            c = policy.choose(layer, step, GRID)
            assert c.kernel is sdpa and c.mask is None


def test_radial_policy_dense_timesteps_and_dense_layers():
    flex, sdpa = RadialFlex(device=CPU, dtype=DT), SdpaCpuFlash(CPU, DT)
    policy = build_policy(flex, num_layers=4, num_heads=3, radial=setting(dense_timesteps=2, dense_layers=1),
                          dense_fallback=sdpa)
    assert policy.kind == "radial" and policy.kernels() == (flex, sdpa)
    mask = radial_block_mask(5, 15, 0.2, 4)
    for step in range(4):
        for layer in range(4):
            c = policy.choose(layer, step, GRID)
            if step < 2 or layer < 1:
                assert c.kernel is sdpa and c.mask is None, (layer, step)
            else:
                assert c.kernel is flex and c.mask is mask, (layer, step)
    assert [c.mask for c in policy.plan(GRID, 3, 4)] == [None, mask, mask, mask]
    # without a fallback the dense layers run the radial kernel unmasked (its own dense kernel)
    plain = SelfAttentionPolicy(flex, radial=setting(dense_layers=2))
    assert [(c.kernel, c.mask) for c in plain.plan(GRID, None, 3)] == [(flex, None), (flex, None), (flex, mask)]
    with pytest.raises(ValueError, match="set_step"):  # dense steps need the step index
        policy.choose(3, None, GRID)
    with pytest.raises(RuntimeError, match="no radial setting"):  # never silently dense
        SelfAttentionPolicy(flex).choose(0, 0, GRID)
    with pytest.raises(TypeError, match="dense_layers"):
        SelfAttentionPolicy(flex, radial=SimpleNamespace(decay_factor=0.2, block_size=4, dense_timesteps=0))
    # a dense fallback only belongs to a radial kernel
    assert SelfAttentionPolicy(sdpa, dense_fallback=flex).kernels() == (sdpa,)


def test_sparge_policy_from_checkpoint_layers_block0_absent_is_dense(caplog):
    sparge = SpargeFlex(device=CPU, dtype=DT)
    one, two = thresholds(1), thresholds(2)
    state = SpargeCheckpoint(3, 3, {1: one, 2: two}).state_dict()
    assert not any(k.startswith("blocks.0.") for k in state)
    policy = build_policy(sparge, num_layers=3, num_heads=3, sparge_state=state, source="test state")
    assert "no thresholds for 1 of 3 blocks, which run dense: 0" in caplog.text  # one warning lists them
    assert policy.kind == "sparge" and len(policy.kernels()) == 3
    for step in (None, 0, 5):
        chosen = [policy.choose(i, step, GRID) for i in range(3)]
        assert all(c.mask is None for c in chosen)  # Sparge predicts its own mask
        assert chosen[0].kernel.params is None  # absent from the checkpoint: dense
        assert torch.equal(chosen[1].kernel.params.cdfthreshd, one.cdfthreshd)
        assert torch.equal(chosen[2].kernel.params.cdfthreshd, two.cdfthreshd)
    assert policy.describe() == "sparge (sparge_flex): 2 of 3 blocks sparse (threshold mode), dense blocks [0]"
    topk = build_policy(sparge, num_layers=3, num_heads=3, sparge_topk=0.25)
    assert {c.kernel.params.mode for c in topk.plan(GRID, 0, 3)} == {"topk"}
    unbound = build_policy(sparge, num_layers=3, num_heads=3)
    with pytest.raises(RuntimeError, match="per-layer settings"):
        unbound.choose(0, 0, GRID)
    with pytest.raises(RuntimeError, match="per layer"):
        unbound.check(num_layers=3, dtype=DT)
    with pytest.raises(ValueError, match="3 blocks"):
        build_policy(sparge, num_layers=3, num_heads=3, sparge_layers=[one])
    with pytest.raises(ValueError, match="3 heads, the DiT has 4"):
        build_policy(sparge, num_layers=1, num_heads=4, sparge_layers=[one])


# ------------------------------------------------------------------ the DiT only asks the policy
def by_hand(model, inp, chosen):
    """The DiT's forward with block ``i`` attending through ``chosen[i] = (kernel, mask)`` (no policy involved)."""
    from ditfleet.models.wan import IMAGE_SITE, TEXT_SITE
    from ditfleet.models.wan.dit import _Attend

    state = model.prepare(**inp, step=0)
    text, image = model.backends[TEXT_SITE], model.backends.get(IMAGE_SITE)
    h, carry = state.tokens, None
    for block, (kernel, mask) in zip(model.blocks, chosen):
        attend = _Attend(lambda q, k, v, kernel=kernel, mask=mask: kernel(q, k, v, block_mask=mask)[0], text, image)
        h, carry = block(h, carry, state.e0, state.ctx, state.ctx_img, state.rope, attend)
    return model.finish(h, state, carry)


@torch.no_grad()
def test_dit_radial_output_is_the_rule_by_construction():
    flex, sdpa = RadialFlex(device=CPU, dtype=DT), SdpaCpuFlash(CPU, DT)
    model = build(flex)
    dense = build(sdpa)  # same weights (seed), every block dense: what by_hand's prepare runs on
    c = model.config
    inp = inputs(c)
    model.set_policy(build_policy(flex, num_layers=c.num_layers, num_heads=c.num_heads,
                                  radial=setting(dense_timesteps=1, dense_layers=1), dense_fallback=sdpa))
    mask = radial_block_mask(5, 15, 0.2, 4)
    for step in (0, 1, 3):
        rule = [(sdpa, None) if step < 1 or i < 1 else (flex, mask) for i in range(c.num_layers)]
        want = by_hand(dense, inp, rule)
        model.set_step(step)
        got = model(**inp)
        assert rel_l2(got, want) <= 1e-6, (step, rel_l2(got, want))
        assert model.prepare(**inp).self_masks == tuple(m for _, m in rule)
    assert rel_l2(model(**inp), dense(**inp)) > 1e-4  # radial blocks change the output
    model.set_step(None)


@torch.no_grad()
def test_dit_sparge_output_is_each_layers_kernel_by_construction():
    sparge, sdpa = SpargeFlex(device=CPU, dtype=DT), SdpaCpuFlash(CPU, DT)
    model, dense = build(sparge), build(sdpa)
    c = model.config
    inp = inputs(c)
    params = [None, thresholds(1), thresholds(2)]
    model.set_policy(build_policy(sparge, num_layers=c.num_layers, num_heads=c.num_heads, sparge_layers=params))
    want = by_hand(dense, inp, [(sparge.for_layer(p), None) for p in params])
    assert rel_l2(model(**inp), want) <= 1e-6
    assert rel_l2(want, dense(**inp)) > 1e-4  # the sparse layers change the output


@torch.no_grad()
def test_two_experts_each_get_their_own_policy():
    """Wan2.2 A14B: the engine binds every expert (bind_sparge per DiT); each DiT keeps its own thresholds."""
    from ditfleet.engine.sparge_weights import bind_sparge

    high, low = build(SpargeFlex(device=CPU, dtype=DT), seed=0), build(SpargeFlex(device=CPU, dtype=DT), seed=3)
    cfg = SimpleNamespace(sparge_ckpt=None, sparge_attn_setting=SimpleNamespace(topk=0.5))
    s_high = SpargeCheckpoint(3, 3, {0: thresholds(1), 1: thresholds(1), 2: thresholds(1)}).state_dict()
    s_low = SpargeCheckpoint(3, 3, {0: thresholds(2), 1: thresholds(2), 2: thresholds(2)}).state_dict()
    assert bind_sparge(high, cfg, s_high).startswith("sparge (sparge_flex): 3 of 3")
    bind_sparge(low, cfg, s_low)
    assert high.policy is not low.policy
    assert torch.equal(high.policy.layers[2].params.cdfthreshd, thresholds(1).cdfthreshd)
    assert torch.equal(low.policy.layers[2].params.cdfthreshd, thresholds(2).cdfthreshd)
    inp = inputs(high.config)
    before = high(**inp)
    bind_sparge(low, cfg, None)  # rebinding one expert (top-k) leaves the other alone
    assert low.policy.layers[0].params.mode == "topk" and torch.equal(high(**inp), before)
    dense = build(SdpaCpuFlash(CPU, DT))
    assert bind_sparge(dense, cfg, s_high) is None and dense.policy.kind == "dense"


def test_attention_package_imports_no_model():
    """Dependencies point engine -> models -> parallel -> attention: attention/ names no model module."""
    root = Path(__file__).resolve().parents[1] / "ditfleet" / "attention"
    imports = re.compile(r"^\s*(?:from|import)\s+(?:\.\.models|ditfleet\.models|\.\.engine|ditfleet\.engine)", re.M)
    offenders = [p.name for p in root.glob("*.py") if imports.search(p.read_text())]
    assert offenders == []
    assert "self_attn_1_type" not in (root / "registry.py").read_text()
    assert "VAE_STRIDE" not in (root / "radial.py").read_text()
