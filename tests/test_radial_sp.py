"""Radial (block-sparse) attention composed with sequence parallelism, and in the Wan DiT (CPU, fp32).

* ``sequence_parallel_attention(block_mask=...)`` under Ulysses / ring / USP
  on 2 and 4 gloo ranks equals single-device float64 attention with the same token-level mask
  (rel L2 <= 1e-5, LSE too), for a radial mask of 7 frames x 37 tokens (259 tokens: padded on 2
  and 4 ranks; 5 heads: padded heads under Ulysses);
* the ring skips empty (query chunk, key chunk) steps (no kernel call) and K/V transfers no rank
  further along needs, counted on hand-made masks (one where a chunk must be forwarded through a
  rank that does not need it), without deadlock;
* the Wan DiT runs its self-attention radial: equal to the same model with a float64 masked
  reference kernel, to dense attention under an all-allowed mask, with dense blocks / steps
  switching as configured; and under SP equal to the single-process radial forward.

One spawn per world size (spawning is the slow part on a small CI machine).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import ClassVar
from unittest import mock

import pytest
import torch

from dist_utils import run_distributed
from ditfleet.attention import AttentionBackend, Capabilities
from ditfleet.attention.blockmask import BlockSparseMask
from ditfleet.attention.radial import RadialFlex, radial_block_mask
from ditfleet.attention.reference import reference_attention
from ditfleet.attention.sdpa import SdpaCpuFlash
from ditfleet.bench.common import rel_l2
from ditfleet.models.attention_policy import SelfAttentionPolicy

TOL = 1e-5
CPU = torch.device("cpu")
LAYOUTS = {2: {"ulysses2": (2, 1), "ring2": (1, 2)}, 4: {"ulysses4": (4, 1), "ring4": (1, 4), "usp2x2": (2, 2)}}
# Tiny DiT video: 9 latent frames of 3 x 5 tokens = 135 tokens (pads on 2 and 4 ranks), radial blocks of 4.
LATENT = (9, 6, 10)
SETTING = dict(decay_factor=0.2, block_size=4, dense_timesteps=0, dense_layers=0)


# ------------------------------------------------------------------ helpers
def setting(**kw):
    return SimpleNamespace(**{**SETTING, **kw})


def qkv(seed, b, s, h, d):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, s, h, d, generator=g) for _ in range(3))


def masked_reference(q, k, v, allowed, scale=None):
    """Float64 attention with a token mask ``allowed`` (``[S_q, S_k]`` or ``[B|1, H|1, S_q, S_k]``); keyless rows -> 0 / -inf."""
    return reference_attention(q, k, v, scale=scale, mask=allowed)


class MaskedReference(AttentionBackend):
    """A block-mask kernel computing float64 attention with the mask applied densely (the model-level yardstick)."""

    key = "masked_reference_test"
    description = "float64 dense attention with the token mask applied (test)"
    caps = Capabilities(lse=True, devices=frozenset({"cpu"}), dtypes=frozenset({torch.float32}), block_mask=True)

    def _forward(self, q, k, v, *, scale, return_lse, block_mask=None):
        allowed = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool) if block_mask is None else block_mask.to_dense()
        out, lse = masked_reference(q, k, v, allowed, scale)
        return out.to(q.dtype), (lse.float() if return_lse else None)


class CountingFlex(RadialFlex):
    """RadialFlex that records every kernel call (its window, or None for a dense call)."""

    key = "radial_flex_counting"
    calls: ClassVar[list] = []

    def _forward(self, q, k, v, *, scale, return_lse, block_mask=None):
        type(self).calls.append(block_mask)
        return super()._forward(q, k, v, scale=scale, return_lse=return_lse, block_mask=block_mask)


class CountingSdpa(SdpaCpuFlash):
    key = "sdpa_counting"
    calls: ClassVar[list] = []

    def _forward(self, q, k, v, *, scale, return_lse):
        type(self).calls.append(q.shape)
        return super()._forward(q, k, v, scale=scale, return_lse=return_lse)


def chunk_mask(size: int, chunk_tokens: int, total: int, pairs, bs: int = 5) -> BlockSparseMask:
    """A mask over ``total`` tokens where query chunk ``a`` attends key chunk ``c`` (chunks of ``chunk_tokens``)
    only for ``(a, c)`` in ``pairs`` (each by its first block, so sub-masks are partial), plus the diagonal."""
    n = -(-total // bs)
    blocks = torch.zeros(n, n, dtype=torch.bool)
    blocks[torch.arange(n), torch.arange(n)] = True  # every query keeps a key (inside its own chunk)
    per = chunk_tokens // bs
    for a, c in pairs:
        blocks[a * per : a * per + 1, c * per : c * per + 1] = True
    return BlockSparseMask.from_blocks(blocks, bs, total)


def sp_run(mesh, q, k, v, backend, mask, **kw):
    from ditfleet.parallel import gather_sequence, sequence_parallel_attention, shard_sequence

    (q_l, shard), (k_l, _), (v_l, _) = (shard_sequence(t, mesh) for t in (q, k, v))
    out, lse = sequence_parallel_attention(q_l, k_l, v_l, backend=backend, mesh=mesh, shard=shard, return_lse=True,
                                           block_mask=mask, **kw)
    return gather_sequence(out, mesh, shard), gather_sequence(lse, mesh, shard, dim=2)


def check(label, out, lse, ref, ref_lse):
    err, lse_err = rel_l2(out, ref), rel_l2(lse, ref_lse)
    assert err <= TOL and lse_err <= TOL, f"{label}: out rel L2 {err:.2e}, lse rel L2 {lse_err:.2e}"
    return err


class Counters:
    """Counts the ring's K/V sends (the NCCL transport's ``batch_isend_irecv`` isends) in this process."""

    def __enter__(self):
        import torch.distributed as dist

        from ditfleet.parallel import transport

        self.sends = 0
        batch = dist.batch_isend_irecv

        def counted(ops):
            self.sends += sum(op.op is dist.isend for op in ops)
            return batch(ops)

        self._patch = mock.patch.object(transport.dist, "batch_isend_irecv", counted)
        self._patch.start()
        CountingFlex.calls.clear()
        return self

    def __exit__(self, *exc):
        self._patch.stop()


# ------------------------------------------------------------------ distributed
def _attention_cases(rank, world, meshes) -> dict:
    from ditfleet.parallel import RingSchedule

    flex = CountingFlex(device=CPU, dtype=torch.float32)
    errs = {}
    # the radial mask, unaligned chunks, padded tail, padded heads
    m = radial_block_mask(7, 37, 0.2, 16)
    q, k, v = qkv(0, 2, 259, 5, 16)
    ref, ref_lse = masked_reference(q, k, v, m.to_dense())
    assert rel_l2(masked_reference(q, k, v, torch.ones(259, 259, dtype=torch.bool))[0], ref) > 1e-2  # mask matters
    for name, mesh in meshes.items():
        label = f"radial {name}"
        errs[label] = check(label, *sp_run(mesh, q, k, v, flex, m), ref, ref_lse)
    # a rectangular mask (queries and keys of different lengths, both padded), every row keeping a key
    g = torch.Generator().manual_seed(5)
    blocks = torch.rand(41, 20, generator=g) < 0.3
    blocks[:, 0] = True
    rect = BlockSparseMask.from_blocks(blocks, 5, 203, 99)
    q, (k, v) = qkv(2, 1, 203, 3, 8)[0], qkv(3, 1, 99, 3, 8)[1:]
    ref, ref_lse = masked_reference(q, k, v, rect.to_dense())
    for name, mesh in meshes.items():
        from ditfleet.parallel import gather_sequence, sequence_parallel_attention, shard_sequence

        (q_l, sh), (k_l, kv_sh), (v_l, _) = (shard_sequence(t, mesh) for t in (q, k, v))
        out, lse = sequence_parallel_attention(q_l, k_l, v_l, backend=flex, mesh=mesh, shard=sh, kv_shard=kv_sh,
                                               return_lse=True, block_mask=rect)
        out, lse = gather_sequence(out, mesh, sh), gather_sequence(lse, mesh, sh, dim=2)
        errs[f"rect {name}"] = check(f"rect {name}", out, lse, ref, ref_lse)
    # hand-made masks with empty steps: block diagonal (nothing travels), and one that needs forwarding
    diag_frames = torch.arange(40) * 5 // 50
    masks = {"block-diagonal": BlockSparseMask.from_blocks(diag_frames[:, None] == diag_frames[None, :], 5, 200)}
    if world == 4:  # chunks of 20: 0 -> rank 1 only; 1 -> nobody else; 2 -> rank 0 (through rank 3); 3 -> rank 1 (through 0)
        masks["forwarding"] = chunk_mask(4, 20, 78, [(1, 0), (0, 2), (1, 3)])
    counts = {}
    for mname, mask in masks.items():
        q, k, v = qkv(1, 1, mask.q_len, 3, 8)
        ref, ref_lse = masked_reference(q, k, v, mask.to_dense())
        for name, mesh in meshes.items():
            with Counters() as c:
                out, lse = sp_run(mesh, q, k, v, flex, mask)
            errs[f"{mname} {name}"] = check(f"{mname} {name}", out, lse, ref, ref_lse)
            counts[(mname, name, "run")] = (len(CountingFlex.calls), c.sends)
            if mesh.ring_size > 1 and mesh.ulysses_size == 1:
                chunk = -(-mask.q_len // mesh.ring_size)
                counts[(mname, name, "schedule")] = RingSchedule.from_mask(mask, chunk, chunk, mesh.ring_size).stats()
    # a block mask with a kernel that takes none, or of the wrong shape: refused on every rank before any communication
    from ditfleet.parallel import SeqShard, sequence_parallel_attention

    for mesh in meshes.values():
        shard = SeqShard.for_length(259, mesh)
        x = torch.zeros(1, shard.chunk, 2, 8)
        with pytest.raises(NotImplementedError, match="block-sparse"):
            sequence_parallel_attention(x, x, x, backend=SdpaCpuFlash(CPU, torch.float32), mesh=mesh, shard=shard,
                                        block_mask=m)
        with pytest.raises(ValueError, match="global sequences"):
            sequence_parallel_attention(x, x, x, backend=flex, mesh=mesh, shard=shard, block_mask=m.sub(0, 3, 0, 3))
    return {"errs": errs, "counts": counts}


def _model_cases(rank, world, meshes) -> dict:
    from ditfleet.models.wan import SELF_SITE, TEXT_SITE, build_dit

    cfg = tiny_config()
    flex = RadialFlex(device=CPU, dtype=torch.float32)
    sdpa = SdpaCpuFlash(CPU, torch.float32)
    model = build_dit(cfg, device="cpu", dtype=torch.float32, seed=0, std=0.1,
                      attention={SELF_SITE: flex, TEXT_SITE: sdpa})
    inp = inputs(cfg)
    errs = {}
    for label, rs, fallback, step in (("radial", setting(), None, None),
                                      ("dense block 0, fallback sdpa", setting(dense_layers=1, dense_timesteps=1), sdpa, 1),
                                      ("dense step", setting(dense_timesteps=1), None, 0)):
        model.set_policy(SelfAttentionPolicy(flex, radial=rs, dense_fallback=fallback))
        with torch.no_grad():
            model.set_parallel(None)
            ref = model(**inp, step=step)
            for name, mesh in meshes.items():
                model.set_parallel(mesh)
                out = model(**inp, step=step)
                err = rel_l2(out, ref)
                assert err <= TOL, f"model {label} {name}: rel L2 {err:.2e}"
                errs[f"model {label} {name}"] = err
    return errs


def _bench_sp(out: str) -> None:
    """``ditfleet bench radial --sp ring usp ulysses`` end to end on gloo, tiny shapes."""
    import argparse

    from ditfleet.bench import radial as bench
    from ditfleet.parallel import init_distributed

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--cases", "5x48", "--block-size", "16", "--heads", "4", "--head-dim", "16", "--dtype",
                              "fp32", "--warmup", "0", "--iters", "1", "--ref-rows", "32", "--sp", "ring", "usp",
                              "ulysses", "--out", out])
    assert bench.run_sp(args, [("5x48", 5, 48)], init_distributed()) == 0


def _world(rank, world, bench_out=None):
    from ditfleet.parallel import init_parallel

    torch.manual_seed(0)
    meshes = {name: init_parallel(ulysses_size=u, ring_size=r) for name, (u, r) in LAYOUTS[world].items()}
    res = _attention_cases(rank, world, meshes)
    res["errs"].update(_model_cases(rank, world, meshes))
    if bench_out:
        _bench_sp(bench_out)
    return res


@pytest.mark.parametrize("world", [2, 4])
def test_radial_sequence_parallel(world, tmp_path):
    bench_out = str(tmp_path / "radial_sp.json") if world == 4 else None
    per_rank = run_distributed(_world, world, bench_out, timeout=240)
    if bench_out:
        import json

        rep = json.loads(open(bench_out).read())
        (case,) = rep["results"]
        assert case["tokens"] == 240 and set(case["modes"]) == {"ring", "usp", "ulysses"}
        for mode, m in case["modes"].items():
            kr = m["kernels"]["radial_flex"]
            assert "error" not in kr and kr["rel_l2"] < 1e-4 and kr["speedup"] > 0, (mode, kr)
            assert ("schedule" in m) == (mode != "ulysses")
        assert case["modes"]["ring"]["schedule"]["ring_size"] == 4
    errs = per_rank[0]["errs"]
    print(f"\n{world} ranks, worst rel L2 {max(errs.values()):.1e} over {len(errs)} cases")
    counts = [r["counts"] for r in per_rank]
    total = {key: tuple(sum(c[key][i] for c in counts) for i in range(2)) for key in counts[0] if key[2] != "schedule"}
    r = world
    # Ulysses: one kernel call per rank, whole mask
    assert total[("block-diagonal", f"ulysses{r}", "run")][0] == r
    # ring, block-diagonal: every rank computes only its own chunk; no K/V travels at all
    assert total[("block-diagonal", f"ring{r}", "run")] == (r, 0)
    sched = counts[0][("block-diagonal", f"ring{r}", "schedule")]
    assert sched == {"ring_size": r, "steps": r, "steps_skipped": r * r - r, "sends": 0, "sends_skipped": r * (r - 1)}
    if world == 4:
        # diagonal 4 + (1,0) (0,2) (1,3): 7 kernel calls of 16; transfers: chunk 0 once (0->1), chunk 1 never,
        # chunk 2 twice (2->3->0, rank 3 forwards), chunk 3 twice (3->0->1): 5 of 12
        assert total[("forwarding", "ring4", "run")] == (7, 5)
        assert counts[0][("forwarding", "ring4", "schedule")] == {"ring_size": 4, "steps": 7, "steps_skipped": 9,
                                                                   "sends": 5, "sends_skipped": 7}
        # USP 2 x 2: super-chunks [0, 40) and [40, 78); only the first needs the second's keys ((0, 2), (1, 3)):
        # one transfer in each of the two rings (one per Ulysses rank)
        assert total[("forwarding", "usp2x2", "run")][1] == 2


# ------------------------------------------------------------------ single process: the model
def tiny_config():
    from ditfleet.models.wan import WanDiTConfig

    return WanDiTConfig(model_type="t2v", in_dim=16, dim=48, ffn_dim=64, num_heads=3, num_layers=2, text_dim=32,
                        text_len=16, freq_dim=32)


def inputs(cfg, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(2, 16, *LATENT, generator=g), "t": torch.tensor([999.0, 321.5]),
            "context": torch.randn(2, 11, cfg.text_dim, generator=g)}


@pytest.fixture(scope="module")
def dit():
    from ditfleet.models.wan import SELF_SITE, TEXT_SITE, build_dit

    sdpa = SdpaCpuFlash(CPU, torch.float32)
    model = build_dit(tiny_config(), device="cpu", dtype=torch.float32, seed=0, std=0.1,
                      attention={SELF_SITE: RadialFlex(device=CPU, dtype=torch.float32), TEXT_SITE: sdpa})
    return model, sdpa


def _with_self(model, backend, sdpa):
    from ditfleet.models.wan import SELF_SITE, TEXT_SITE

    return model.set_attention({SELF_SITE: backend, TEXT_SITE: sdpa})


def set_radial(model, rs, dense_fallback=None):
    """The engine's binding: a policy of the model's self-attention kernel with the radial setting ``rs``."""
    from ditfleet.models.wan import SELF_SITE

    return model.set_policy(SelfAttentionPolicy(model.backends[SELF_SITE], radial=rs, dense_fallback=dense_fallback))


@torch.no_grad()
def test_wan_radial_equals_masked_dense_attention(dit):
    model, sdpa = dit
    inp = inputs(model.config)
    set_radial(_with_self(model, RadialFlex(device=CPU, dtype=torch.float32), sdpa), setting())
    state = model.prepare(**inp)
    f, h, w = state.grid
    assert (f, h * w) == (9, 15) and all(m is radial_block_mask(9, 15, 0.2, 4) for m in state.self_masks)
    assert 0.5 < state.self_masks[0].density < 0.8
    radial = model(**inp)
    ref = set_radial(_with_self(model, MaskedReference(CPU, torch.float32), sdpa), setting())(**inp)
    dense = _with_self(model, sdpa, sdpa)(**inp)
    assert rel_l2(radial, ref) <= TOL, rel_l2(radial, ref)
    assert rel_l2(radial, dense) > 1e-3  # the mask changes the model's output
    # an all-allowed mask: radial == dense
    full = BlockSparseMask.from_blocks(torch.ones(34, 34, dtype=torch.bool), 4, 135)
    set_radial(_with_self(model, RadialFlex(device=CPU, dtype=torch.float32), sdpa), setting())
    with mock.patch("ditfleet.models.attention_policy.radial_mask_for", lambda *a, **kw: full):
        assert model.prepare(**inp).self_masks[0] is full
        assert rel_l2(model(**inp), dense) <= TOL


@torch.no_grad()
def test_wan_radial_dense_layers_and_steps(dit):
    model, sdpa = dit
    inp = inputs(model.config)
    flex, fallback = CountingFlex(device=CPU, dtype=torch.float32), CountingSdpa(CPU, torch.float32)
    _with_self(model, flex, sdpa)
    with pytest.raises(RuntimeError, match="no radial setting"):  # radial kernel, no setting: never silently dense
        model(**inp)
    set_radial(model, setting(dense_timesteps=2, dense_layers=1), dense_fallback=fallback)
    with pytest.raises(ValueError, match="set_step"):  # dense steps need the step index
        model(**inp)
    mask = radial_block_mask(9, 15, 0.2, 4)
    for step, want in ((0, (None, None)), (1, (None, None)), (2, (None, mask)), (49, (None, mask))):
        CountingFlex.calls.clear()
        CountingSdpa.calls.clear()
        model.set_step(step)
        assert model.prepare(**inp).self_masks == want
        model(**inp)
        radial_layers = sum(m is not None for m in want)
        assert len(CountingFlex.calls) == radial_layers and all(c is not None for c in CountingFlex.calls)
        assert len(CountingSdpa.calls) == 2 - radial_layers  # dense blocks run the fallback kernel
    assert model.prepare(**inp, step=0).self_masks == (None, None)  # forward's step overrides set_step
    # dense blocks without a fallback: the radial kernel without a mask (its own dense SDPA kernel)
    set_radial(model, setting(dense_layers=2))
    CountingFlex.calls.clear()
    out = model(**inp)
    assert CountingFlex.calls == [None, None]
    assert rel_l2(out, _with_self(model, sdpa, sdpa)(**inp)) <= TOL
    # a non-radial self-attention kernel ignores the setting (an engine may always pass it)
    set_radial(_with_self(model, sdpa, sdpa), setting())
    assert model.policy.kind == "dense" and model.prepare(**inp).self_masks == (None, None)
    model.set_step(None)


def test_sp_refuses_fallback_without_lse_under_ring():
    from ditfleet.errors import ConfigError
    from ditfleet.models.wan import SELF_SITE, TEXT_SITE, build_dit
    from ditfleet.parallel import ParallelMesh

    class NoLse(SdpaCpuFlash):
        key = "no_lse_radial_test"
        caps = Capabilities(lse=False, devices=frozenset({"cpu"}), dtypes=SdpaCpuFlash.caps.dtypes)

    sdpa = SdpaCpuFlash(CPU, torch.float32)
    model = build_dit(tiny_config(), device="cpu", dtype=torch.float32,
                      attention={SELF_SITE: RadialFlex(device=CPU, dtype=torch.float32), TEXT_SITE: sdpa})
    model.set_parallel(ParallelMesh(ring_size=2, world_size=2))
    with pytest.raises(ConfigError, match="LSE"):
        set_radial(model, setting(), dense_fallback=NoLse(CPU, torch.float32))
    set_radial(model.set_parallel(None), setting(), dense_fallback=NoLse(CPU, torch.float32))
    with pytest.raises(ConfigError, match="LSE"):
        model.set_parallel(ParallelMesh(ring_size=2, world_size=2))


def test_ring_schedule_rules():
    from ditfleet.parallel import RingSchedule

    dense = RingSchedule.dense([5, 5, 2, 0])  # the last chunk is all padding: never computed nor sent
    assert dense.stats() == {"ring_size": 4, "steps": 12, "steps_skipped": 4, "sends": 9, "sends_skipped": 3}
    m = chunk_mask(4, 20, 78, [(1, 0), (0, 2), (1, 3)])
    s = RingSchedule.from_mask(m, 20, 20, 4)
    assert s.needs == ((True, False, True, False), (True, True, False, True), (False, False, True, False),
                       (False, False, False, True))
    assert [s.sends(2, t) for t in range(3)] == [True, True, False]  # rank 3 forwards chunk 2 to rank 0
    for c in range(4):  # a chunk any rank computes on reached it through an unbroken chain of sends
        for a in range(4):
            t = (a - c) % 4
            if s.needs[a][c]:
                assert all(s.sends(c, u) for u in range(t))
