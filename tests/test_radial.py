"""Radial attention: the block-sparse mask type, the radial mask definition, and the flex kernel (CPU, fp32/fp64)."""

from __future__ import annotations

import json
import math
import random
import time
from types import SimpleNamespace

import pytest
import torch

from ditfleet.attention.blockmask import BlockSparseMask
from ditfleet.attention.radial import (
    RadialFA4,
    RadialFlex,
    _lists,
    flex_block_mask,
    merge_partials,
    radial_block_mask,
)
from ditfleet.attention.reference import reference_attention
from ditfleet.attention.sdpa import SdpaMath
from ditfleet.models.attention_policy import SelfAttentionPolicy
from ditfleet.models.wan.sites import radial_density, wan_video_tokens
from ditfleet.parallel.merge import merge_attention_

CPU = torch.device("cpu")
SETTING = SimpleNamespace(decay_factor=0.2, block_size=128, dense_timesteps=0, dense_layers=0)


def rand(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def masked_reference(q, k, v, allowed, scale=None):
    """Float64 attention with a token mask ``allowed`` (``[S_q, S_k]`` or ``[B|1, H|1, S_q, S_k]``); keyless rows -> 0 / -inf."""
    return reference_attention(q, k, v, scale=scale, mask=allowed)


def close(out, lse, ref, ref_lse, rows=None, tol=1e-5):
    rows = slice(None) if rows is None else rows
    o, r = out[:, rows].double(), ref[:, rows]
    assert float((o - r).abs().max()) <= tol * max(1.0, float(r.abs().max()))
    a, b = lse[..., rows].double(), ref_lse[..., rows]
    assert torch.equal(torch.isinf(a), torch.isinf(b))
    fin = torch.isfinite(b)
    assert float((a[fin] - b[fin]).abs().amax()) <= tol * 10 if bool(fin.any()) else True


# ------------------------------------------------------------------------------ oracles
def oracle_blocks(f, t, decay, bs, *, reference_grid=False, threshold=None):
    """Token-level construction: each pair's T x T mask, shrunk literally (column densities), OR-ed.

    ``reference_grid``: the reference's own per-pair grid (ceil(T/bs) blocks) and floor-sized global
    grid, no forced diagonal -- equal to mit-han-lab's gen_log_mask_shrinked(model_type="wan").
    """
    threshold = bs if threshold is None else threshold
    s = f * t
    nb = s // bs if reference_grid else -(-s // bs)
    out = torch.zeros(nb, nb, dtype=torch.bool)
    idx = torch.arange(t)
    band = (idx[None, :] - idx[:, None]).abs()
    for i in range(f):
        for j in range(f):
            d = abs(i - j)
            if j == 0:
                local = torch.ones(t, t, dtype=torch.bool)
            else:
                if d == 0:
                    w = t
                elif d == 1:
                    w = t // 2
                else:
                    w = max(2 ** t.bit_length() / 2 ** d.bit_length() * decay, bs)
                length = 2 ** t.bit_length() / 2 ** d.bit_length()
                keep = length >= threshold or d % int(threshold / length) == 0
                local = (band <= w) & keep
            ri, rj = (i * t) % bs, (j * t) % bs
            if reference_grid:
                na = nbk = -(-t // bs)
            else:
                na, nbk = (ri + t - 1) // bs + 1, (rj + t - 1) // bs + 1
            canvas = torch.zeros(max(na * bs, ri + t), max(nbk * bs, rj + t), dtype=torch.bool)
            canvas[ri : ri + t, rj : rj + t] = local
            canvas = canvas[: na * bs, : nbk * bs]
            a0, b0 = (i * t) // bs, (j * t) // bs
            rows = torch.tensor([bs if reference_grid else min(bs, s - (a0 + a) * bs) for a in range(na)])
            col = canvas.view(na, bs, nbk, bs).sum(1).float()  # [na, nbk, bs] allowed rows per column
            high = (col / rows[:, None, None].float() > 1 / 3).sum(-1).float()
            nz = (col > 0).sum(-1).float()
            blk = high / (nz + 1e-9) > 0.6
            view = out[a0 : a0 + na, b0 : b0 + nbk]
            view |= blk[: view.shape[0], : view.shape[1]]
    if not reference_grid:
        out[torch.arange(nb), torch.arange(nb)] = True
    return out


# ------------------------------------------------------------------------------ BlockSparseMask
def random_mask(seed, bs=None, q=None, k=None):
    rng = random.Random(seed)
    bs = bs or rng.choice([3, 4, 8, 16])
    q, k = q or rng.randint(1, 90), k or rng.randint(1, 90)
    g = torch.Generator().manual_seed(seed)
    blocks = torch.rand(-(-q // bs), -(-k // bs), generator=g) < 0.5
    return BlockSparseMask.from_blocks(blocks, bs, q, k), blocks.repeat_interleave(bs, 0).repeat_interleave(bs, 1)[:q, :k]


def padded_slice(dense, qs, ql, ks, kl):
    big = torch.zeros(dense.shape[0] + ql + qs, dense.shape[1] + kl + ks, dtype=torch.bool)
    big[: dense.shape[0], : dense.shape[1]] = dense
    return big[qs : qs + ql, ks : ks + kl]


def test_sub_equals_slicing_to_dense_at_random_unaligned_offsets():
    rng = random.Random(0)
    for seed in range(150):
        m, dense = random_mask(seed)
        assert torch.equal(m.to_dense(), dense) and m.allowed() == int(dense.sum())
        qs, ks = rng.randint(0, m.q_len + 4), rng.randint(0, m.k_len + 4)
        ql, kl = rng.randint(0, 50), rng.randint(0, 50)
        s = m.sub(qs, ql, ks, kl)
        want = padded_slice(dense, qs, ql, ks, kl)  # positions past the end are masked
        assert s.shape == (ql, kl)
        assert torch.equal(s.to_dense(), want)
        assert s.allowed() == int(want.sum()) and s.is_empty == (not bool(want.any()))
        if ql and kl:
            assert math.isclose(s.density, float(want.double().mean()))
            a, b, al, bl = rng.randint(0, ql), rng.randint(0, kl), rng.randint(0, 30), rng.randint(0, 30)
            assert torch.equal(s.sub(a, al, b, bl).to_dense(), padded_slice(want, a, al, b, bl))


def test_kernel_blocks_classify_tiles_exactly():
    rng = random.Random(1)
    for seed in range(60):
        m, dense = random_mask(seed + 100)
        s = m.sub(rng.randint(0, 9), rng.randint(1, 70), rng.randint(0, 9), rng.randint(1, 70))
        d = s.to_dense()
        bq, bk = rng.choice([2, 5, 16]), rng.choice([3, 8])
        full, part = s.kernel_blocks(bq, bk)
        assert full.shape == (-(-s.q_len // bq), -(-s.k_len // bk))
        for u in range(full.shape[0]):
            for v in range(full.shape[1]):
                tile = d[u * bq : (u + 1) * bq, v * bk : (v + 1) * bk]
                assert bool(full[u, v]) == bool(tile.all())
                assert bool(part[u, v]) == bool(tile.any() and not tile.all())


def test_mask_type_validation_and_dense_dtypes():
    with pytest.raises(ValueError, match="blocks must be"):
        BlockSparseMask.from_blocks(torch.ones(3, 3, dtype=torch.bool), 4, 20)
    with pytest.raises(ValueError):
        BlockSparseMask.from_blocks(torch.ones(2, 2, dtype=torch.bool), 4, 8).sub(-1, 2, 0, 2)
    m, dense = random_mask(7)
    add = m.to_dense(torch.float32)
    assert torch.equal(add == 0, dense) and bool(torch.isneginf(add[~dense]).all())
    occ = m.chunk_occupancy(7, 5)
    for a in range(occ.shape[0]):
        for b in range(occ.shape[1]):
            assert bool(occ[a, b]) == bool(dense[a * 7 : (a + 1) * 7, b * 5 : (b + 1) * 5].any())


# ------------------------------------------------------------------------------ the radial mask
@pytest.mark.parametrize("f,t,bs,decay", [(7, 37, 16, 0.2), (9, 50, 8, 0.2), (12, 37, 8, 1.0), (6, 100, 16, 0.5), (13, 24, 16, 0.2)])
def test_mask_equals_token_level_oracle(f, t, bs, decay):
    m = radial_block_mask(f, t, decay, bs)
    assert m.blocks.shape == (-(-f * t // bs),) * 2  # ceil grid: tokens per frame need not be a multiple of bs
    assert torch.equal(m.blocks, oracle_blocks(f, t, decay, bs))
    assert bool(m.to_dense().any(1).all())  # every query keeps a key


@pytest.mark.parametrize("f,t,decay", [(12, 512, 0.2), (10, 384, 1.0)])
def test_mask_equals_reference_algorithm_when_aligned(f, t, decay):
    """Block 128 and T a multiple of it: the deviations vanish; equal to the reference's own rules."""
    m = radial_block_mask(f, t, decay, 128)
    ref = oracle_blocks(f, t, decay, 128, reference_grid=True, threshold=128)
    assert torch.equal(m.blocks, ref)


def test_sink_column_and_dense_neighbour_frames():
    f, t = 21, 3600
    m = radial_block_mask(f, t, 0.2, 128)
    s = f * t
    assert m.sub(0, s, 0, t).density == 1.0  # every query attends the whole first frame
    for i in range(f):
        # the frame's own blocks: every block inside frame i x frame i is set
        a0, a1 = -(-(i * t) // 128), ((i + 1) * t) // 128
        assert bool(m.blocks[a0:a1, a0:a1].all())
        for j in (i - 1, i + 1):
            if 0 < j < f:  # neighbours: band |c - r| <= T/2 -> at least 3/4 of the pair, block level
                assert m.sub(i * t, t, j * t, t).density >= 0.70


def test_band_narrows_with_distance():
    f, t = 61, 3600

    def pair_density(m, i, d):
        js = [j for j in (i - d, i + d) if 0 < j < f]  # frame 0 is the sink: dense
        return sum(m.sub(i * t, t, j * t, t).density for j in js) / len(js)

    def group_mean(m, lo):
        return sum(pair_density(m, 30, d) for d in range(lo, min(2 * lo, 31))) / (min(2 * lo, 31) - lo)

    m = radial_block_mask(f, t, 1.0, 128)  # decay 1: half-widths 1024, 512, 256, 128 for d in [2,4), [4,8), [8,16), [16,32)
    means = [group_mean(m, lo) for lo in (2, 4, 8, 16)]
    for wide, narrow in zip(means, means[1:]):
        assert 0.4 <= narrow / wide <= 0.65, means  # halves (block rounding aside) each time d doubles
    far = [m.sub(0, t, d * t, t).density for d in range(32, 61)]  # 2**12 / 2**6 = 64 < 128: keep even d only
    assert max(far[1::2]) < 0.1 * min(far[0::2]), far  # odd distances dropped (only straddling blocks remain)
    m = radial_block_mask(f, t, 0.2, 128)  # reference decay: 204 tokens for d in [2, 4), then the one-block floor
    d1, g2, g4 = pair_density(m, 30, 1), group_mean(m, 2), group_mean(m, 4)
    assert d1 > 0.7 and d1 > g2 > g4
    floor = [pair_density(m, 30, d) for d in range(4, 31)]
    assert min(floor) >= 2 * 128 / t * 0.9 and max(floor) < 0.12  # never below one block on each side


def test_density_at_wan_sizes(capsys):
    cases = {"480p x 81": (81, 480, 832, 0.28, 0.35), "720p x 81": (81, 720, 1280, 0.21, 0.27),
             "720p x 241": (241, 720, 1280, 0.10, 0.15)}
    got, secs = {}, {}
    radial_block_mask.cache_clear()
    for name, (frames, h, w, lo, hi) in cases.items():
        t0 = time.perf_counter()
        got[name] = radial_density(frames, h, w, SETTING)
        secs[name] = time.perf_counter() - t0  # reported, not asserted (tests check correctness, not speed)
        assert lo <= got[name] <= hi, f"{name}: density {got[name]:.4f} outside [{lo}, {hi}]"
    assert got["720p x 241"] < got["720p x 81"] < got["480p x 81"]
    with capsys.disabled():
        print("\nradial density (decay 0.2, block 128): "
              + ", ".join(f"{k} {v:.4f} (mask built in {secs[k]:.2f} s)" for k, v in got.items()))
    assert wan_video_tokens(81, 480, 832) == (21, 1560) and wan_video_tokens(81, 720, 1280) == (21, 3600)
    assert wan_video_tokens(241, 720, 1280) == (61, 3600)


def test_radial_policy_dense_steps_and_layers():
    st = SimpleNamespace(decay_factor=0.2, block_size=16, dense_timesteps=2, dense_layers=3)
    policy = SelfAttentionPolicy(RadialFlex(device=CPU, dtype=torch.float32), radial=st)
    grid = (7, 37, 1)  # 7 frames of 37 tokens

    def plan(layer, step):
        return policy.choose(layer, step, grid).mask

    assert plan(5, 0) is None and plan(5, 1) is None
    assert plan(2, 10) is None
    m = plan(3, 2)
    assert isinstance(m, BlockSparseMask) and m is plan(39, 49)  # cached, shared
    assert m.shape == (259, 259) and m.block_size == 16


# ------------------------------------------------------------------------------ kernels
@pytest.fixture(scope="module")
def flex():
    return RadialFlex(device=CPU, dtype=torch.float32)


def test_flex_full_mask_equals_masked_dense(flex):
    m = radial_block_mask(9, 50, 0.2, 8)
    q, k, v = rand(2, 450, 3, 16, seed=1), rand(2, 450, 3, 16, seed=2), rand(2, 450, 3, 16, seed=3)
    out, lse = flex(q, k, v, block_mask=m, return_lse=True)
    ref, ref_lse = masked_reference(q, k, v, m.to_dense())
    assert out.shape == q.shape and lse.shape == (2, 3, 450) and lse.dtype == torch.float32
    close(out, lse, ref, ref_lse)
    # the mask matters (the test can fail), and no mask means dense attention
    dense, _ = masked_reference(q, k, v, torch.ones(450, 450, dtype=torch.bool))
    assert float((out.double() - dense).abs().max()) > 1e-2
    out_d, lse_d = flex(q, k, v, return_lse=True)
    close(out_d, lse_d, dense, torch.logsumexp(torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * 0.25, -1))


@pytest.mark.parametrize("qs,ql,ks,kl", [(0, 259, 0, 259), (37, 100, 0, 259), (13, 77, 150, 109), (200, 80, 230, 60)])
def test_flex_sub_chunks_equal_masked_dense(flex, qs, ql, ks, kl):
    """(query chunk, key chunk) windows at unaligned offsets; windows running past the end are padding."""
    m = radial_block_mask(7, 37, 0.2, 16)
    q, k, v = rand(1, ql, 2, 16, seed=4), rand(1, kl, 2, 16, seed=5), rand(1, kl, 2, 16, seed=6)
    s = m.sub(qs, ql, ks, kl)
    out, lse = flex(q, k, v, block_mask=s, return_lse=True, scale=0.3)
    ref, ref_lse = masked_reference(q, k, v, s.to_dense(), scale=0.3)
    close(out, lse, ref, ref_lse)


def test_flex_with_the_arithmetic_predicate(flex, monkeypatch):
    """The mask_mod CUDA runs (grid lookup + offsets + limits as tensors), here through eager flex's vmaps."""
    import ditfleet.attention.radial as radial

    monkeypatch.setattr(radial, "CPU_DENSE_LOOKUP", 0)
    base = radial_block_mask(7, 37, 0.2, 16)
    m = BlockSparseMask.from_blocks(base.blocks, 16, 259)  # fresh grid: no cached BlockMask
    s = m.sub(13, 200, 40, 250)
    q, k, v = rand(1, 200, 2, 16, seed=16), rand(1, 250, 2, 16, seed=17), rand(1, 250, 2, 16, seed=18)
    out, lse = flex(q, k, v, block_mask=s, return_lse=True)
    ref, ref_lse = masked_reference(q, k, v, s.to_dense())
    close(out, lse, ref, ref_lse)


def test_flex_kv_lens_restricts_the_mask(flex):
    m = radial_block_mask(7, 37, 0.2, 16)
    s = m.sub(0, 259, 100, 120)  # keys 100..219
    q, k, v = rand(2, 259, 2, 16, seed=7), rand(2, 120, 2, 16, seed=8), rand(2, 120, 2, 16, seed=9)
    lens = [120, 57]
    out, lse = flex(q, k, v, block_mask=s, kv_lens=lens, return_lse=True)
    for b, n in enumerate(lens):
        allowed = s.to_dense() & (torch.arange(120) < n)[None, :]
        ref, ref_lse = masked_reference(q[b : b + 1], k[b : b + 1], v[b : b + 1], allowed)
        close(out[b : b + 1], lse[b : b + 1], ref, ref_lse)


def ring_emulation(backend, m: BlockSparseMask, ring: int, seed: int = 10) -> int:
    """What ring attention will do, in one process: per (query chunk, key chunk) sub-mask at unaligned
    offsets, padded last chunk (``kv_lens``), empty steps skipped, partial results merged by LSE.
    Checks every valid row against the masked float64 reference; returns the number of skipped steps."""
    s_total = m.q_len
    chunk = -(-s_total // ring)
    q, k, v = (rand(1, s_total, 2, 16, seed=seed + i) for i in range(3))
    pad = lambda x: torch.nn.functional.pad(x, (0, 0, 0, 0, 0, ring * chunk - s_total))  # noqa: E731
    qp, kp, vp = pad(q), pad(k), pad(v)
    ref, ref_lse = masked_reference(q, k, v, m.to_dense())
    skipped = 0
    for r in range(ring):
        out = lse = None
        for c in range(ring):
            sub = m.sub(r * chunk, chunk, c * chunk, chunk)
            if sub.is_empty:
                skipped += 1
                continue
            n = min(chunk, s_total - c * chunk)  # > 0: an all-padding key chunk has an empty sub-mask
            o, l = backend(qp[:, r * chunk : (r + 1) * chunk], kp[:, c * chunk : (c + 1) * chunk],
                           vp[:, c * chunk : (c + 1) * chunk], kv_lens=[n], block_mask=sub, return_lse=True)
            if out is None:
                out, lse = o.float().clone(), l.clone()
            else:
                merge_attention_(out, lse, o, l)
        valid = max(0, min(chunk, s_total - r * chunk))
        if valid:
            rows = slice(r * chunk, r * chunk + valid)
            close(out[:, :valid], lse[..., :valid], ref[:, rows], ref_lse[..., rows])
    assert skipped == int((~m.chunk_occupancy(chunk, chunk)).sum())
    return skipped


@pytest.mark.parametrize("ring", [2, 4])
def test_ring_schedule_with_sub_masks_and_lse_merge(flex, ring):
    ring_emulation(flex, radial_block_mask(13, 25, 0.2, 16), ring)  # 325 tokens: unaligned chunks, padded tail
    # a mask with empty (query chunk, key chunk) steps: block-diagonal frames of 50 tokens, block 10
    frame = torch.arange(20) * 10 // 50
    diag = BlockSparseMask.from_blocks(frame[:, None] == frame[None, :], 10, 200)
    assert ring_emulation(flex, diag, ring) > 0


def test_block_mask_on_a_kernel_that_cannot_use_it_raises():
    m = radial_block_mask(7, 37, 0.2, 16)
    q = rand(1, 259, 2, 16)
    with pytest.raises(NotImplementedError, match="block-sparse"):
        SdpaMath(device=CPU, dtype=torch.float32)(q, q, q, block_mask=m)
    with pytest.raises(ValueError, match="block_mask is"):
        RadialFlex(device=CPU, dtype=torch.float32)(q, q[:, :200], q[:, :200], block_mask=m)
    assert RadialFA4.unavailable_reasons(CPU, torch.bfloat16)  # CUDA only
    assert RadialFlex.caps.block_mask and RadialFlex.caps.lse and RadialFA4.caps.block_mask


def test_flex_block_mask_lists_and_merge_helper():
    m = radial_block_mask(9, 50, 0.2, 8).sub(13, 200, 77, 301)
    bm = flex_block_mask(m, CPU, (16, 16))
    full, part = m.kernel_blocks(16, 16)
    assert torch.equal(bm.to_dense()[0, 0].bool(), full | part)
    cnt, idx = _lists(full)
    for u in range(full.shape[0]):  # ascending, selected first (FA4 bounds the highest key tile)
        sel = idx[0, 0, u, : cnt[0, 0, u]].tolist()
        assert sel == sorted(sel) and sel == torch.nonzero(full[u]).flatten().tolist()
    q, k, v = rand(1, 40, 2, 8, seed=13), rand(1, 60, 2, 8, seed=14), rand(1, 60, 2, 8, seed=15)
    allowed = torch.rand(40, 60, generator=torch.Generator().manual_seed(3)) < 0.5
    allowed[5] = False  # a row with no key at all
    halves = allowed.clone(), allowed.clone()
    halves[0][:, 30:] = False
    halves[1][:, :30] = False
    (o1, l1), (o2, l2) = (masked_reference(q, k, v, h) for h in halves)
    o1[:, 5] = float("nan")  # whatever a side with no key holds must not leak
    out, lse = merge_partials(o1, l1.float(), o2, l2.float())
    ref, ref_lse = masked_reference(q, k, v, allowed)
    close(out, lse, ref, ref_lse)


def test_bench_radial_cpu_smoke(tmp_path):
    import argparse

    from ditfleet.bench import radial as bench

    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    out = tmp_path / "radial.json"
    args = p.parse_args(["--cases", "5x48", "--block-size", "16", "--heads", "2", "--head-dim", "16",
                         "--dtype", "fp32", "--device", "cpu", "--warmup", "0", "--iters", "1",
                         "--ref-rows", "32", "--out", str(out)])
    assert bench.main(args) == 0
    rep = json.loads(out.read_text())
    (case,) = rep["results"]
    assert case["tokens"] == 240 and 0 < case["density"] <= 1
    flex_res = case["kernels"]["radial_flex"]
    assert flex_res["status"] == "ok" and flex_res["rel_l2"] < 1e-4 and "speedup" in flex_res
