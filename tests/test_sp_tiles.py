"""Sparse attention under ring and USP at tile-aligned windows (issue 17, item 3), on CPU.

* The shard: ``align`` rounds the chunk up to a multiple of the tile (padding still at the global end
  only); :func:`tile_align` asks the kernels (``seq_tile``) and the mesh (ring only; ``T / gcd(T, U)``
  under USP, so super-chunks are multiples of ``T``; 1 for dense kernels and Ulysses); the DiT's
  ``SeqParallel`` takes it from its self-attention kernels at start-up.
* The numbers behind the issue, counted on the host: the radial mask of 720p x 81 (75,600 tokens)
  over 4 ranks (ring 4, USP 2 x 2): unaligned chunks of 18,900 split the 84,320 single-device FA4
  tiles into 101,756 tiles of which 34,298 partial (flex + an extra LSE merge per step); chunks of
  18,944 give exactly the single-device tiles, all full. Sparge (128 x 64 blocks): unaligned ring
  windows are off the mask's grid, so FA4 refuses 15 of 16 steps (flex runs them); aligned: none.
* Distributed (gloo, 2 and 4 ranks, S = 1001, H = 6): radial (``radial_flex``) and Sparge
  (``sparge_flex``) under ring and USP, with aligned and unaligned chunks, equal single-device
  attention (and a float64 reference); counting wrappers record every kernel call and read the tile
  lists the kernel ran: at aligned windows every tile is a full tile of the global tile grid, each
  computed once, and they are exactly the single-device ones (the kernel calls equal the ring
  schedule's steps); unaligned windows run partial tiles and more tiles in all. The FA4 paths'
  plans of the same windows (radial: no partial tile, so no flex call and no extra merge; Sparge:
  on the grid, so FA4 takes the step) are checked on the recorded windows.
"""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch

from dist_utils import run_distributed
from ditfleet.attention.fa4_sparse import window_tile_lists
from ditfleet.attention.radial import RadialFA4, RadialFlex, radial_block_mask
from ditfleet.attention.radial import flex_block_mask as radial_flex_mask
from ditfleet.attention.reference import reference_attention
from ditfleet.attention.sdpa import SdpaCpuFlash
from ditfleet.attention.sparge import SpargeFlex, SpargeParams, block_sparse_math
from ditfleet.attention.sparge import flex_block_mask as sparge_flex_mask
from ditfleet.bench.common import rel_l2
from ditfleet.parallel.mesh import ParallelMesh
from ditfleet.parallel.ring_schedule import sp_schedule, sp_tiles
from ditfleet.parallel.shard import SeqShard, tile_align

CPU = torch.device("cpu")
TOL = 1e-5
S, H, D = 1001, 6, 16
LAYOUTS = {2: {"ring2": (1, 2)}, 4: {"ring4": (1, 4), "usp2x2": (2, 2)}}
RADIAL_TILE = (64, 64)  # radial blocks of 64 tokens: a 16 x 16 grid at S = 1001
SPARGE_BLOCK = (32, 16)  # a 32 x 63 grid per head


# ------------------------------------------------------------------ counting kernels
def _global_tiles(bm, window, tile, head0: int) -> dict:
    """What one kernel call ran, read from the flex BlockMask it used: its full tiles in global tile coordinates
    ``(b, h, u, w)`` (when the window is on the global tiles), and its counts of full and partial tiles."""
    bq, bk = tile
    full = torch.zeros(*bm.full_kv_indices.shape[:-1], bm.full_kv_indices.shape[-1] + 1, dtype=torch.bool)
    cnt, idx = bm.full_kv_num_blocks.long(), bm.full_kv_indices.long()
    slot = torch.arange(idx.shape[-1])[None, None, None, :] < cnt[..., None]
    full.scatter_(-1, torch.where(slot, idx, idx.shape[-1]), True)
    on = window.on_tiles(bq, bk)
    tiles = set()
    if on:
        u0, w0 = window.q_start // bq, window.k_start // bk
        tiles = {(b, h + head0, u + u0, w + w0) for b, h, u, w in full[..., :-1].nonzero().tolist()}
    return {"on_tiles": on, "full": int(cnt.sum()), "partial": int(bm.kv_num_blocks.sum()), "tiles": tiles}


class CountingRadial(RadialFlex):
    """RadialFlex on 64 x 64 tiles that records, per kernel call, the tiles it ran and what FA4 would run."""

    key = "radial_flex_tiles_test"
    tile = RADIAL_TILE
    calls: ClassVar[list] = []

    def _forward(self, q, k, v, *, scale, return_lse, block_mask=None):
        res = super()._forward(q, k, v, scale=scale, return_lse=return_lse, block_mask=block_mask)
        if block_mask is not None:
            rec = _global_tiles(radial_flex_mask(block_mask, q.device, self.tile), block_mask, self.tile, 0)
            # the FA4 kernel's plan of the same window (tiles equal to the mask's blocks)
            rec["fa4_partial"] = RadialFA4(device=CPU, dtype=torch.bfloat16)._plan(block_mask, *self.tile, CPU)["has_partial"]
            type(self).calls.append(rec)
        return res


class CountingSparge(SpargeFlex):
    """SpargeFlex that records, per kernel call, the tiles flex ran and whether FA4 would take the window."""

    key = "sparge_flex_tiles_test"
    calls: ClassVar[list] = []
    head0: ClassVar[int] = 0

    def _forward(self, q, k, v, *, scale, return_lse, block_mask=None):
        res = super()._forward(q, k, v, scale=scale, return_lse=return_lse, block_mask=block_mask)
        if block_mask is not None:
            rec = _global_tiles(sparge_flex_mask(block_mask, q.device), block_mask, block_mask.block_shape, type(self).head0)
            rec["fa4_on_grid"] = window_tile_lists(block_mask, CPU) is not None
            type(self).calls.append(rec)
        return res


# ------------------------------------------------------------------ single process: shards and alignment
def test_aligned_shard_and_tile_align():
    ring4 = ParallelMesh(ring_size=4, world_size=4)
    usp = ParallelMesh(ulysses_size=2, ring_size=2, world_size=4)
    uly = ParallelMesh(ulysses_size=4, world_size=4)
    plain = SeqShard.for_length(S, ring4)
    assert (plain.chunk, plain.pad, plain.align) == (251, 3, 1)  # dense kernels: today's chunks
    sh = SeqShard.for_length(S, ring4, align=128)
    assert (sh.chunk, sh.padded_len, sh.pad, sh.align) == (256, 1024, 23, 128)
    assert [sh.chunk_valid(c) for c in range(4)] == [256, 256, 256, 233]
    assert [sh.chunk_valid(c, 2) for c in range(2)] == [512, 489]
    with pytest.raises(ValueError, match="multiple of align"):
        SeqShard(S, 4, 0, 250, 128)
    with pytest.raises(ValueError, match="alignment"):
        SeqShard.for_length(S, ring4, align=0)

    flex = RadialFlex(device=CPU, dtype=torch.float32)
    sdpa = SdpaCpuFlash(CPU, torch.float32)
    sparge = SpargeFlex(device=CPU, dtype=torch.float64)
    bound = sparge.for_layer(SpargeParams.topk_mode(H, 0.5, block_q=SPARGE_BLOCK[0], block_k=SPARGE_BLOCK[1]))
    assert flex.seq_tile == (128, 128) and sdpa.seq_tile is None and sparge.seq_tile == (128, 64)
    assert bound.seq_tile == SPARGE_BLOCK and sparge.for_layer(None).seq_tile is None
    assert RadialFA4(device=CPU, dtype=torch.bfloat16).seq_tile == (128, 128)  # no GPU: FA4's sm90 tile
    assert tile_align(ring4, [flex, sdpa, None]) == 128
    assert tile_align(usp, [flex]) == 64  # super-chunks of 2 chunks: multiples of 128
    assert tile_align(uly, [flex]) == 1 and tile_align(None, [flex]) == 1  # windows start at 0: no padding added
    assert tile_align(ring4, [sdpa]) == 1
    assert tile_align(ring4, [bound, CountingRadial(device=CPU, dtype=torch.float32)]) == 64

    # every rank's chunk starts on the tiles; padding only in the last chunk (gather drops it)
    assert [SeqShard(S, 4, r, 256, 128).local_valid for r in range(4)] == [256, 256, 256, 233]
    from ditfleet.parallel.shard import gather_sequence, shard_sequence

    x = torch.randn(1, S, 2)
    local, shard = shard_sequence(x, ring4, dim=1, align=128)  # rank 0 of a mesh without processes
    assert shard == sh and torch.equal(local, x[:, :256])
    one = ParallelMesh()
    local, shard = shard_sequence(x, one, align=128)
    assert local.shape[1] == 1024 and torch.equal(gather_sequence(local, one, shard), x)


def test_dit_aligns_its_split_to_the_self_attention_kernel():
    from ditfleet.models.attention_policy import build_policy
    from ditfleet.models.wan import SELF_SITE, TEXT_SITE, WanDiTConfig, build_dit

    cfg = WanDiTConfig(model_type="t2v", in_dim=16, dim=48, ffn_dim=64, num_heads=3, num_layers=2, text_dim=32,
                       text_len=16, freq_dim=32)
    sdpa = SdpaCpuFlash(CPU, torch.float32)
    model = build_dit(cfg, device="cpu", dtype=torch.float32, seed=0, std=0.1,
                      attention={SELF_SITE: RadialFlex(device=CPU, dtype=torch.float32), TEXT_SITE: sdpa})
    assert model.sp.align == 1  # no mesh
    model.set_parallel(ParallelMesh(ring_size=4, world_size=4))
    assert model.sp.align == 128
    model.set_parallel(ParallelMesh(ulysses_size=2, ring_size=2, world_size=4))
    assert model.sp.align == 64
    model.set_parallel(ParallelMesh(ulysses_size=4, world_size=4))
    assert model.sp.align == 1
    model.set_parallel(ParallelMesh(ring_size=4, world_size=4))
    model.set_attention({SELF_SITE: sdpa, TEXT_SITE: sdpa})  # a dense kernel: unaligned chunks again
    assert model.sp.align == 1
    sparge_model = build_dit(cfg, device="cpu", dtype=torch.float32, seed=0, std=0.1,
                             attention={SELF_SITE: SpargeFlex(device=CPU, dtype=torch.float32), TEXT_SITE: sdpa})
    sparge_model.set_parallel(ParallelMesh(ring_size=2, world_size=2))
    assert sparge_model.sp.align == 128  # unbound: SpargeAttn's 128 x 64 blocks
    p = SpargeParams.topk_mode(3, 0.5, block_q=16, block_k=8)
    sparge_model.set_policy(build_policy(sparge_model.policy.kernel, num_layers=2, num_heads=3, sparge_layers=[p, None]))
    assert sparge_model.sp.align == 16  # the bound layers' blocks decide (the dense layer has none)
    sparge_model.set_parallel(ParallelMesh(ring_size=4, world_size=4))  # a new mesh keeps the bound layers' tile
    assert sparge_model.sp.align == 16


# ------------------------------------------------------------------ single process: the shape
def test_tile_counts_720p_x81_four_ranks():
    """75,600 tokens over 4 ranks: the tiles FA4's block-sparse path gets, per layout, before and after alignment."""
    mask = radial_block_mask(21, 3600, 0.2, 128)
    s = 75_600
    full, partial = mask.kernel_blocks(128, 128, real_rows=True)
    single = int(full.sum())
    assert single == 84_320 and not partial.any()
    kern = RadialFlex(device=CPU, dtype=torch.bfloat16)
    lines = []
    for name, (u, r) in {"ring4": (1, 4), "usp2x2": (2, 2)}.items():
        mesh = ParallelMesh(ulysses_size=u, ring_size=r, world_size=4)
        before = sp_tiles(mask, SeqShard.for_length(s, mesh), None, u, r, (128, 128))
        shard = SeqShard.for_length(s, mesh, align=tile_align(mesh, [kern]))
        after = sp_tiles(mask, shard, None, u, r, (128, 128))
        assert shard.chunk == 18_944 and shard.pad == 176
        assert not before["aligned"] and before["partial"] > 0 and before["full"] + before["partial"] > single
        assert after["aligned"] and after["partial"] == 0 and after["full"] == single
        # every step's tiles are global tiles, each computed once: the union is the single-device tile set
        cq = u * shard.chunk // 128
        seen = torch.zeros_like(full, dtype=torch.int64)
        for a in range(r):
            for c in range(r):
                n = shard.chunk_valid(c, u)
                f, p = mask.sub(a * u * shard.chunk, u * shard.chunk, c * u * shard.chunk, n).kernel_blocks(
                    128, 128, real_rows=True)
                assert not p.any()
                rows = min(f.shape[0], full.shape[0] - a * cq)
                assert not f[rows:].any()
                seen[a * cq : a * cq + rows, c * cq : c * cq + f.shape[1]] += f[:rows].long()
        assert torch.equal(seen, full.long())
        lines.append(f"{name}: unaligned chunk 18900 {before['full']} full + {before['partial']} partial = "
                     f"{before['full'] + before['partial']} tiles; aligned chunk {shard.chunk} {after['full']} full + 0 partial")
    # Sparge blocks (128 x 64) at the same size: a random per-head block map with the sink column
    g = torch.Generator().manual_seed(0)
    blocks = torch.rand(1, 2, 591, 1182, generator=g) < 0.4
    blocks[..., 0] = True
    smask = type(mask).from_blocks(blocks, (128, 64), s)
    sfull, _ = smask.kernel_blocks(128, 64, real_rows=True)
    sparge = SpargeFlex(device=CPU, dtype=torch.bfloat16).for_layer(SpargeParams.topk_mode(2, 0.4))
    for name, (u, r) in {"ring4": (1, 4), "usp2x2": (2, 2)}.items():
        mesh = ParallelMesh(ulysses_size=u, ring_size=r, world_size=4)
        res = {}
        for label, align in (("unaligned", 1), ("aligned", tile_align(mesh, [sparge]))):
            shard = SeqShard.for_length(s, mesh, align=align)
            cs = u * shard.chunk
            on_grid = [window_tile_lists(smask.sub(a * cs, cs, c * cs, shard.chunk_valid(c, u)), CPU) is not None
                       for a in range(r) for c in range(r)]
            res[label] = (sp_tiles(smask, shard, None, u, r, (128, 64)), sum(on_grid))
        (before, fa4_before), (after, fa4_after) = res["unaligned"], res["aligned"]
        assert fa4_before < r * r and fa4_after == r * r
        assert before["partial"] > 0 and after["partial"] == 0 and after["full"] == int(sfull.sum())
        lines.append(f"sparge {name}: FA4 takes {fa4_before}/{r * r} steps unaligned ({before['full']} full + "
                     f"{before['partial']} partial flex tiles), {fa4_after}/{r * r} aligned ({after['full']} full tiles)")
    print("\nradial 720p x 81 (single device 84320 full tiles):\n  " + "\n  ".join(lines))


# ------------------------------------------------------------------ distributed
def _qkv(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, S, H, D, generator=g, dtype=dtype) for _ in range(3))


def _sp(mesh, q, k, v, backend, align, mask=None):
    from ditfleet.parallel import gather_sequence, sequence_parallel_attention, shard_sequence

    (q_l, shard), (k_l, _), (v_l, _) = (shard_sequence(t, mesh, align=align) for t in (q, k, v))
    out, lse = sequence_parallel_attention(q_l, k_l, v_l, backend=backend, mesh=mesh, shard=shard, return_lse=True,
                                           block_mask=mask)
    return gather_sequence(out, mesh, shard), gather_sequence(lse, mesh, shard, dim=2), shard


def _check(label, out, lse, ref, ref_lse):
    err, lse_err = rel_l2(out, ref), rel_l2(lse, ref_lse)
    assert err <= TOL and lse_err <= TOL, f"{label}: out rel L2 {err:.2e}, lse rel L2 {lse_err:.2e}"
    return max(err, lse_err)


def _summary(calls: list) -> dict:
    return {"calls": len(calls), "on_tiles": all(c["on_tiles"] for c in calls), "full": sum(c["full"] for c in calls),
            "partial": sum(c["partial"] for c in calls), "tiles": [c["tiles"] for c in calls],
            "fa4": [c.get("fa4_partial", c.get("fa4_on_grid")) for c in calls]}


def _world(rank, world):
    from ditfleet.parallel import init_parallel

    meshes = {name: init_parallel(ulysses_size=u, ring_size=r) for name, (u, r) in LAYOUTS[world].items()}
    out = {"errs": {}, "runs": {}}
    # radial, fp32, against its single-device call and a float64 reference with the token mask
    mask = radial_block_mask(7, 143, 0.2, RADIAL_TILE[0])
    q, k, v = _qkv(1, torch.float32)
    radial = CountingRadial(device=CPU, dtype=torch.float32)
    CountingRadial.calls.clear()
    ref, ref_lse = radial(q, k, v, return_lse=True, block_mask=mask)
    out["single_radial"] = _summary(CountingRadial.calls)
    ref64, ref64_lse = reference_attention(q, k, v, mask=mask.to_dense())
    out["errs"]["radial single vs float64"] = _check("radial single", ref, ref_lse, ref64, ref64_lse)
    # Sparge, float64 (statistics summed over ranks cannot flip a selection), top-k and threshold layers
    qs, ks, vs = _qkv(2, torch.float64)
    ks = ks + 1.5 * torch.randn(1, 1, H, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)  # smooth_k matters
    params = {"topk": SpargeParams.topk_mode(H, 0.3, block_q=SPARGE_BLOCK[0], block_k=SPARGE_BLOCK[1]),
              "threshold": SpargeParams.thresholds(H, cdfthreshd=[0.3, 0.5, 0.7, 0.9, 0.6, 0.4], simthreshd1=0.0,
                                                   is_sparse=[True, True, True, True, False, True],
                                                   block_q=SPARGE_BLOCK[0], block_k=SPARGE_BLOCK[1])}
    sparge_refs = {}
    for mode, p in params.items():
        be = CountingSparge(device=CPU, dtype=torch.float64).for_layer(p)
        CountingSparge.calls.clear()
        CountingSparge.head0 = 0
        s_ref, s_lse = be(qs, ks, vs, return_lse=True)
        out[f"single_sparge_{mode}"] = _summary(CountingSparge.calls)
        pred = be.predict(qs, ks)
        assert 0.2 < 1 - pred.density < 0.9, (mode, pred.density)
        oracle = block_sparse_math(qs, ks, vs, pred.blocks, pred.block_shape, scale=D ** -0.5)
        out["errs"][f"sparge {mode} single vs oracle"] = rel_l2(s_ref, oracle)
        assert rel_l2(s_ref, oracle) <= 1e-10
        sparge_refs[mode] = (be, s_ref, s_lse)
    for name, mesh in meshes.items():
        u, r = mesh.ulysses_size, mesh.ring_size
        for aligned in (True, False):
            align = tile_align(mesh, [radial]) if aligned else 1
            assert (align > 1) == aligned
            CountingRadial.calls.clear()
            o, lse, shard = _sp(mesh, q, k, v, radial, align, mask)
            label = f"radial {name} {'aligned' if aligned else 'unaligned'}"
            out["errs"][label] = _check(label, o, lse, ref, ref_lse)
            _check(label + " vs float64", o, lse, ref64, ref64_lse)
            run = _summary(CountingRadial.calls)
            run["steps"] = sp_schedule(mask, shard.chunk, shard.chunk, u, r).stats()["steps"]
            run["group"] = mesh.ulysses_rank
            out["runs"][("radial", name, aligned)] = run
            for mode, (be, s_ref, s_lse) in sparge_refs.items():
                align = tile_align(mesh, [be]) if aligned else 1
                CountingSparge.calls.clear()
                CountingSparge.head0 = mesh.ulysses_rank * (H // u)  # Ulysses gives each rank H / U heads
                o, lse, _ = _sp(mesh, qs, ks, vs, be, align)
                label = f"sparge {mode} {name} {'aligned' if aligned else 'unaligned'}"
                out["errs"][label] = _check(label, o, lse, s_ref, s_lse)
                run = _summary(CountingSparge.calls)
                run["group"] = mesh.ulysses_rank
                out["runs"][(f"sparge_{mode}", name, aligned)] = run
    return out


def _union(group_runs: list) -> tuple[set, int]:
    tiles, n = set(), 0
    for run in group_runs:
        for t in run["tiles"]:
            n += len(t)
            tiles |= t
    return tiles, n


@pytest.mark.parametrize("world", [2, 4])
def test_sparse_ring_at_aligned_windows_runs_the_single_device_tiles(world):
    per_rank = run_distributed(_world, world, timeout=240)
    errs = per_rank[0]["errs"]
    lines = []
    for kind in ("radial", "sparge_topk", "sparge_threshold"):
        single = per_rank[0][f"single_{kind}"]
        assert single["calls"] == 1 and single["partial"] == 0 and single["on_tiles"]
        (single_tiles,) = single["tiles"]
        assert len(single_tiles) == single["full"] > 0
        for name, (u, r) in LAYOUTS[world].items():
            totals = {True: [0, 0], False: [0, 0]}
            for aligned in (True, False):
                runs = [rank_res["runs"][(kind, name, aligned)] for rank_res in per_rank]
                for g in range(u):  # each Ulysses rank's ring group holds its own heads (radial: the same mask)
                    group = [run for run in runs if run["group"] == g]
                    full, partial = sum(x["full"] for x in group), sum(x["partial"] for x in group)
                    totals[aligned][0] += full
                    totals[aligned][1] += partial
                    if aligned:
                        assert all(x["on_tiles"] for x in group), (kind, name)
                        assert partial == 0, (kind, name, partial)
                        tiles, n = _union(group)
                        lo, hi = g * H // u, (g + 1) * H // u
                        want = single_tiles if kind == "radial" else {t for t in single_tiles if lo <= t[1] < hi}
                        assert n == len(tiles) == full, (kind, name, "a tile computed twice")
                        assert tiles == want, (kind, name, len(tiles), len(want))
                        if kind == "radial":  # one kernel call per computed step, none on an empty window
                            assert sum(x["calls"] for x in group) == group[0]["steps"]
                            assert not any(f for x in group for f in x["fa4"])  # FA4: no partial tile -> no flex, no merge
                        else:
                            assert all(f for x in group for f in x["fa4"])  # FA4 takes every step (window on the grid)
                    else:
                        assert partial > 0, (kind, name)
                        if kind == "radial":
                            assert any(f for x in group for f in x["fa4"])  # FA4 would send partial tiles to flex
                        else:
                            assert not all(f for x in group for f in x["fa4"])  # FA4 refuses windows off the grid
            (fa, _), (fu, pu) = totals[True], totals[False]
            assert fa < fu + pu, (kind, name)  # fewer tiles, all full
            want = len(single_tiles) * (u if kind == "radial" else 1)  # radial: each head group runs the shared mask
            lines.append(f"{kind} {name}: aligned {fa} full tiles (single device: {want}), unaligned {fu} full + {pu} "
                         f"partial = {fu + pu}")
    print(f"\n{world} ranks, worst rel L2 {max(errs.values()):.1e} over {len(errs)} cases\n  " + "\n  ".join(lines))
