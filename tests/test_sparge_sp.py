"""Sparge attention under sequence parallelism and in the Wan DiT (CPU, gloo ranks).

* ``sequence_parallel_attention`` with a bound Sparge layer (per-head thresholds, one dense head,
  top-k mode too) under Ulysses, ring and USP 2 x 2 (the NCCL / gloo transport), on 2 and 4 gloo ranks, S = 1001 (padded on every layout), H = 6 (padded
  heads under Ulysses 4): output and LSE equal the single-device Sparge kernel on the whole
  sequence, and the predicted masks are really sparse (they change the result);
* the Wan DiT binds one kernel per block: a state dict (SpargeAttn format) with block 1 only leaves
  block 0 dense; ``cdfthreshd = 1`` everywhere equals the DiT with plain torch SDPA; the sparse DiT
  under every SP layout equals its single-process forward;
* misuse: an unbound Sparge DiT refuses to run; a Sparge kernel without LSE under ring is a
  ConfigError at start-up.

Inputs are float64 so that statistics summed over ranks in another order cannot flip a block
selection that sits exactly at a threshold (fp32 would agree to ~1e-7 but could, in principle).
"""

from __future__ import annotations

import pytest
import torch

from dist_utils import run_distributed
from ditfleet.attention.sdpa import SdpaCpuFlash
from ditfleet.attention.sparge import SpargeFlex, SpargeParams, SpargeSpas
from ditfleet.bench.common import rel_l2

TOL = 1e-5
CPU = torch.device("cpu")
LAYOUTS = {2: {"ulysses2": (2, 1), "ring2": (1, 2)}, 4: {"ulysses4": (4, 1), "ring4": (1, 4), "usp2x2": (2, 2)}}
S, H, D = 1001, 6, 16
DT = torch.float64


def blocky(s, h, d, *, seed, block=64, strength=2.0):
    """Random rows plus a shared direction per span of tokens (block self-similarities spread out)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, s, h, d, generator=g, dtype=DT)
    n = -(-s // block)
    dirs = torch.randn(1, n, h, d, generator=g, dtype=DT)
    w = strength * torch.rand(1, n, h, 1, generator=g, dtype=DT)
    return x + (w * dirs).repeat_interleave(block, 1)[:, :s]


def layer_params():
    threshold = SpargeParams.thresholds(H, cdfthreshd=[0.3, 0.5, 0.7, 0.9, 0.6, 0.4],
                                        simthreshd1=[0.0, 0.05, 0.1, -0.1, 0.02, 0.0],
                                        is_sparse=[True, True, True, True, False, True])
    return {"threshold": threshold, "topk": SpargeParams.topk_mode(H, 0.3)}


def sp_run(mesh, q, k, v, backend, **kw):
    from ditfleet.parallel import gather_sequence, sequence_parallel_attention, shard_sequence

    (q_l, shard), (k_l, _), (v_l, _) = (shard_sequence(t, mesh) for t in (q, k, v))
    out, lse = sequence_parallel_attention(q_l, k_l, v_l, backend=backend, mesh=mesh, shard=shard, return_lse=True, **kw)
    return gather_sequence(out, mesh, shard), gather_sequence(lse, mesh, shard, dim=2)


# ------------------------------------------------------------------ the model
def tiny_config():
    from ditfleet.models.wan import WanDiTConfig

    return WanDiTConfig(model_type="t2v", in_dim=16, dim=48, ffn_dim=64, num_heads=3, num_layers=2, text_dim=32,
                        text_len=16, freq_dim=32)


def model_inputs(cfg):
    # 3 latent frames of 6 x 7 tokens = 126 tokens: padded on 4 ranks; Sparge blocks of 16 x 8 tokens below
    g = torch.Generator().manual_seed(1)
    return {"x": torch.randn(1, 16, 3, 12, 14, generator=g, dtype=DT), "t": torch.tensor([700.0]),
            "context": torch.randn(1, 11, cfg.text_dim, generator=g, dtype=DT)}


def small_block_params(h):
    """Sparge settings with 16 x 8 token blocks, so a 126-token video has an 8 x 16 block grid."""
    return SpargeParams.thresholds(h, cdfthreshd=[0.4, 0.6, 0.8], simthreshd1=[0.0, 0.1, -0.1], block_q=16, block_k=8)


def build(self_backend):
    from ditfleet.models.wan import SELF_SITE, TEXT_SITE, build_dit

    return build_dit(tiny_config(), device="cpu", dtype=DT, seed=0, std=0.1,
                     attention={SELF_SITE: self_backend, TEXT_SITE: SdpaCpuFlash(CPU, DT)})


def bind(model, layers=None, **kw):
    """The engine's binding: a Sparge policy of the model's self-attention kernel (``layers`` or ``sparge_state=``)."""
    from ditfleet.models.attention_policy import build_policy

    c = model.config
    return model.set_policy(build_policy(model.policy.kernel, num_layers=c.num_layers, num_heads=c.num_heads,
                                         sparge_layers=layers, **kw))


# ------------------------------------------------------------------ distributed
def _attention_cases(meshes) -> dict:
    q, k, v = blocky(S, H, D, seed=1), blocky(S, H, D, seed=2), blocky(S, H, D, seed=3, strength=0.0)
    dense, _ = SdpaCpuFlash(CPU, DT)(q, k, v)
    errs = {}
    for mode, params in layer_params().items():
        be = SpargeFlex(device=CPU, dtype=DT).for_layer(params)
        ref, ref_lse = be(q, k, v, return_lse=True)
        sparsity = 1 - be.predict(q, k).density
        assert 0.2 < sparsity < 0.9, (mode, sparsity)
        assert rel_l2(ref, dense) > 1e-2, mode  # the mask changes the result
        for name, mesh in meshes.items():
            label = f"{mode} {name}"
            out, lse = sp_run(mesh, q, k, v, be)
            err, lse_err = rel_l2(out, ref), rel_l2(lse, ref_lse)
            assert err <= TOL and lse_err <= TOL, f"{label}: out rel L2 {err:.2e}, lse {lse_err:.2e}"
            errs[label] = err
    return errs


def _misuse_cases(meshes) -> None:
    from ditfleet.errors import ConfigError
    from ditfleet.parallel import SeqShard, check_backend_for_mesh, sequence_parallel_attention

    spas = SpargeSpas(device=CPU, dtype=torch.bfloat16).for_layer(layer_params()["threshold"])
    flex = SpargeFlex(device=CPU, dtype=DT).for_layer(layer_params()["threshold"])
    for mesh in meshes.values():
        if mesh.ring_size > 1:
            with pytest.raises(ConfigError, match="LSE"):
                check_backend_for_mesh(spas, mesh)
        shard = SeqShard.for_length(S, mesh)
        x = torch.zeros(1, shard.chunk, H, D, dtype=DT)
        from ditfleet.attention.blockmask import BlockSparseMask

        mask = BlockSparseMask.from_blocks(torch.ones(1, 1, dtype=torch.bool), S, S)
        with pytest.raises(ValueError, match="predicts its own"):
            sequence_parallel_attention(x, x, x, backend=flex, mesh=mesh, shard=shard, block_mask=mask)


def _model_cases(meshes) -> dict:
    model = build(SpargeFlex(device=CPU, dtype=DT))
    bind(model, [small_block_params(3), small_block_params(3)])
    inp = model_inputs(model.config)
    errs = {}
    with torch.no_grad():
        model.set_parallel(None)
        ref = model(**inp)
        for name, mesh in meshes.items():
            model.set_parallel(mesh)
            err = rel_l2(model(**inp), ref)
            assert err <= TOL, f"model {name}: rel L2 {err:.2e}"
            errs[f"model {name}"] = err
    return errs


def _world(rank, world):
    from ditfleet.parallel import init_parallel

    torch.manual_seed(0)
    meshes = {name: init_parallel(ulysses_size=u, ring_size=r) for name, (u, r) in LAYOUTS[world].items()}
    errs = _attention_cases(meshes)
    _misuse_cases(meshes)
    errs.update(_model_cases(meshes))
    return errs


@pytest.mark.parametrize("world", [2, 4])
def test_sparge_sequence_parallel_equals_single_device(world):
    errs = run_distributed(_world, world, timeout=400)[0]
    print(f"\n{world} ranks, worst rel L2 {max(errs.values()):.1e} over {len(errs)} cases")
    assert len(errs) == (6 if world == 2 else 9)  # every (mode, layout) and the model per layout


# ------------------------------------------------------------------ single process: the DiT's binding
def test_dit_binds_each_block_and_threshold_one_equals_sdpa():
    from ditfleet.attention.sparge_ckpt import SpargeCheckpoint

    sdpa_model = build(SdpaCpuFlash(CPU, DT))
    model = build(SpargeFlex(device=CPU, dtype=DT))
    model.load_state_dict(sdpa_model.state_dict())
    inp = model_inputs(model.config)
    with pytest.raises(RuntimeError, match="per-layer settings"):
        model(**inp)  # not bound yet: refuses instead of running something else
    with torch.no_grad():
        want = sdpa_model(**inp)
        # cdfthreshd = 1 in every block: exactly dense
        dense = SpargeParams.thresholds(3, cdfthreshd=1.0, simthreshd1=0.0, block_q=16, block_k=8)
        bind(model, [dense, dense])
        assert rel_l2(model(**inp), want) <= 1e-12
        # real thresholds: a different result
        bind(model, [small_block_params(3), small_block_params(3)])
        sparse = model(**inp)
        assert rel_l2(sparse, want) > 1e-3
        # a state dict with block 1 only: block 0 dense, block 1 its own thresholds (exact key match)
        one = SpargeParams.thresholds(3, cdfthreshd=[0.2, 0.5, 0.9], simthreshd1=[0.0, 0.1, 0.2])
        state = SpargeCheckpoint(2, 3, {1: one}).state_dict()
        assert all(key.startswith("blocks.1.") for key in state)
        bind(model, sparge_state=state, source="test state")
        assert model.policy.layers[0].params is None
        assert torch.equal(model.policy.layers[1].params.cdfthreshd, one.cdfthreshd)
        assert model.policy.describe() == "sparge (sparge_flex): 1 of 2 blocks sparse (threshold mode), dense blocks [0]"
    with pytest.raises(ValueError, match="2 blocks"):
        bind(model, [dense])
    with pytest.raises(ValueError, match="4 heads"):
        bind(model, [dense, SpargeParams.thresholds(4, cdfthreshd=1.0, simthreshd1=0.0)])
