"""Sparge attention: the mask predictor against an independent float64 oracle, per-head block masks,
the flex kernel (CPU), the dense limits, the Ulysses / ring compositions at the attention level."""

from __future__ import annotations

import math
import random

import pytest
import torch

from ditfleet.attention.blockmask import BlockSparseMask
from ditfleet.attention.reference import reference_attention
from ditfleet.attention.sparge import (
    SpargeFlex,
    SpargeParams,
    SpargeSpas,
    _lists,
    block_sparse_math,
    block_stats,
    flex_block_mask,
    head_sparsity,
    key_sum,
    predict_block_mask,
)
from ditfleet.parallel.merge import merge_attention_

CPU = torch.device("cpu")


def rand(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def blocky(b, s, h, d, *, seed, block=64, strength=2.0, dtype=torch.float64):
    """Random rows plus a random direction per span of ``block`` tokens with a random weight, so block
    self-similarities spread over [0, 0.8] and pooled scores differ between blocks."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, s, h, d, generator=g, dtype=torch.float64)
    nspan = -(-s // block)
    dirs = torch.randn(b, nspan, h, d, generator=g, dtype=torch.float64)
    w = strength * torch.rand(b, nspan, h, 1, generator=g, dtype=torch.float64)
    x = x + (w * dirs).repeat_interleave(block, 1)[:, :s]
    return x.to(dtype)


# ------------------------------------------------------------------------------ float64 oracle
def oracle_map(q, k, *, cdf=None, topk=None, sim, is_sparse, scale, bq=128, bk=64, sink=True, smooth=True, k_len=None):
    """SpargeAttn's predictor written out per (batch, head, block) in float64, Gram matrices and all."""
    b_, s_q, h_, _ = q.shape
    k_len = k.shape[1] if k_len is None else k_len
    nq, nk = -(-s_q // bq), -(-k_len // bk)
    out = torch.zeros(b_, h_, nq, nk, dtype=torch.bool)

    def stats(x, bs):
        res = []
        for i in range(0, x.shape[0], bs):
            xb = x[i : i + bs]
            nrm = xb.norm(dim=1, keepdim=True)
            u = torch.where(nrm > 0, xb / nrm, torch.zeros_like(xb))
            res.append((xb.mean(0), float((u @ u.T).mean())))
        return res

    for b in range(b_):
        for h in range(h_):
            if not is_sparse[h]:
                out[b, h] = True
                continue
            qq = q[b, :, h].double()
            kk = k[b, :k_len, h].double()
            if smooth:
                kk = kk - kk.mean(0)
            qb, kb = stats(qq, bq), stats(kk, bk)
            ksim = [s > sim[h] for _, s in kb]
            for a, (pq, sq) in enumerate(qb):
                if not sq > sim[h]:
                    out[b, h, a] = True
                    continue
                scores = [float(pq @ pk) * scale if ksim[c] else -math.inf for c, (pk, _) in enumerate(kb)]
                m = max(scores)
                if m == -math.inf:
                    out[b, h, a] = True
                    continue
                ex = [math.exp(s - m) for s in scores]
                z = sum(ex)
                p = [e / z for e in ex]
                order = sorted(range(nk), key=lambda c: -p[c])
                if topk is not None:
                    n = min(nk, max(1, math.ceil(topk[h] * nk - 1e-9)))
                elif cdf[h] >= 1:
                    n = nk
                else:
                    n, cum = 0, 0.0
                    for c in order:
                        cum += p[c]
                        if cum > cdf[h]:
                            break
                        n += 1
                    n = max(n, 1)
                for c in order[:n]:
                    out[b, h, a, c] = True
                for c in range(nk):
                    if not ksim[c]:
                        out[b, h, a, c] = True
                if sink:
                    out[b, h, a, 0] = True
    return out


CASES = [  # (B, S, H, D, seed)
    (1, 700, 3, 16, 0),
    (2, 515, 2, 32, 1),
    (1, 1024, 4, 8, 2),
    (1, 129, 2, 16, 3),
]


@pytest.mark.parametrize("b,s,h,d,seed", CASES)
def test_predictor_equals_float64_oracle_threshold_mode(b, s, h, d, seed):
    q, k = blocky(b, s, h, d, seed=seed), blocky(b, s, h, d, seed=seed + 100)
    rng = random.Random(seed)
    cdf = [rng.choice([0.3, 0.6, 0.85, 0.95, 1.0]) for _ in range(h)]
    sim = [rng.choice([-1.0, 0.0, 0.1, 0.3]) for _ in range(h)]
    sparse = [True] * h
    sparse[-1] = h == 1 or rng.random() < 0.5
    p = SpargeParams.thresholds(h, cdfthreshd=cdf, simthreshd1=sim, is_sparse=sparse)
    scale = d**-0.5
    got = predict_block_mask(q, k, p).blocks.cpu()
    want = oracle_map(q, k, cdf=cdf, sim=sim, is_sparse=sparse, scale=scale)
    assert torch.equal(got, want)
    assert 0 < float(got.float().mean()) < 1  # the case is not trivially dense or empty


@pytest.mark.parametrize("b,s,h,d,seed", CASES[:3])
def test_predictor_equals_float64_oracle_topk_mode(b, s, h, d, seed):
    q, k = blocky(b, s, h, d, seed=seed + 7), blocky(b, s, h, d, seed=seed + 77)
    topk = [0.5, 0.3, 0.1, 1.0][:h]
    p = SpargeParams.topk_mode(h, topk)
    got = predict_block_mask(q, k, p).blocks.cpu()
    want = oracle_map(q, k, topk=topk, sim=[-0.1] * h, is_sparse=[True] * h, scale=d**-0.5)
    assert torch.equal(got, want)


def test_predictor_float32_agrees_with_float64_oracle():
    """float32 inputs: statistics in float32; only near-threshold blocks may flip."""
    b, s, h, d = 1, 1024, 4, 32
    q, k = blocky(b, s, h, d, seed=5), blocky(b, s, h, d, seed=6)
    p = SpargeParams.thresholds(h, cdfthreshd=[0.5, 0.8, 0.9, 0.97], simthreshd1=[0.05, 0.1, 0.2, -1.0])
    got = predict_block_mask(q.float(), k.float(), p).blocks
    want = oracle_map(q, k, cdf=p.cdfthreshd.tolist(), sim=p.simthreshd1.tolist(), is_sparse=[True] * h, scale=d**-0.5)
    assert float((got != want).float().mean()) < 0.01


def test_predictor_with_kv_lens_ignores_padding():
    b, s, h, d = 2, 600, 2, 16
    q, k = blocky(b, s, h, d, seed=11), blocky(b, s, h, d, seed=12)
    n = 450
    junk = torch.full_like(q[:, n:], 50.0)
    qp, kp = torch.cat([q[:, :n], junk], 1), torch.cat([k[:, :n], junk], 1)
    p = SpargeParams.thresholds(h, cdfthreshd=[0.7, 0.9], simthreshd1=[0.05, 0.1])
    m = predict_block_mask(qp, kp, p, kv_lens=[n, n])
    assert m.shape == (n, n)
    assert torch.equal(m.blocks, predict_block_mask(q[:, :n], k[:, :n], p).blocks)
    with pytest.raises(NotImplementedError, match="same for every batch"):
        predict_block_mask(qp, kp, p, kv_lens=[n, n - 1])


def test_block_stats_are_additive_over_unaligned_chunks():
    x = rand(2, 333, 3, 8, seed=4, dtype=torch.float64)
    mean = key_sum(x) / x.shape[1]
    whole = block_stats(x, 64, mean=mean)
    parts = None
    for off in (0, 50, 170, 301):
        end = {0: 50, 50: 170, 170: 301, 301: 400}[off]
        st = block_stats(x[:, off:end] if end <= 333 else torch.nn.functional.pad(x[:, off:], (0, 0, 0, 0, 0, end - 333)),
                         64, offset=off, length=333, mean=mean)
        parts = st if parts is None else parts + st
    assert torch.equal(parts.count, whole.count)
    assert torch.allclose(parts.total, whole.total) and torch.allclose(parts.unit, whole.unit)
    assert torch.allclose(whole.similarity()[0, 0, 0], (lambda u: (u @ u.T).mean())(
        torch.nn.functional.normalize(x[0, :64, 0] - mean[0, 0], dim=-1)))


# ------------------------------------------------------------------------------ kernel
def masked_reference(q, k, v, allowed, scale=None):
    """Float64 attention with a token mask ``allowed`` (``[S_q, S_k]`` or ``[B|1, H|1, S_q, S_k]``); keyless rows -> 0 / -inf."""
    return reference_attention(q, k, v, scale=scale, mask=allowed)


def close(out, lse, ref, ref_lse, tol=2e-5):
    assert float((out.double() - ref).abs().max()) <= tol * max(1.0, float(ref.abs().max()))
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    fin = torch.isfinite(ref_lse)
    if bool(fin.any()):
        assert float((lse.double()[fin] - ref_lse[fin]).abs().max()) <= 10 * tol


def bound(params, dtype=torch.float32):
    return SpargeFlex(device=CPU, dtype=dtype).for_layer(params)


@pytest.fixture(scope="module")
def qkv():
    b, s, h, d = 2, 600, 3, 16
    return blocky(b, s, h, d, seed=21, dtype=torch.float32), blocky(b, s, h, d, seed=22, dtype=torch.float32), \
        rand(b, s, h, d, seed=23)


def test_flex_kernel_matches_masked_reference_per_head(qkv):
    q, k, v = qkv
    p = SpargeParams.thresholds(3, cdfthreshd=[0.5, 0.9, 0.3], simthreshd1=[0.05, 0.1, -1.0], is_sparse=[True, True, False])
    be = bound(p)
    out, lse = be(q, k, v, return_lse=True)
    m = be.predict(q, k)
    dense = m.to_dense()
    assert dense.shape == (2, 3, 600, 600) and bool(dense[:, 2].all())  # is_sparse 0: dense head
    ref, ref_lse = masked_reference(q, k, v, dense)
    close(out, lse, ref, ref_lse)
    assert torch.allclose(block_sparse_math(q, k, v, m.blocks, (128, 64), scale=16**-0.5).double(), ref, atol=1e-5)
    sp = head_sparsity(m)
    assert sp[2] == 0 and sp[0] > 0.2


def test_cdfthreshd_one_equals_dense(qkv):
    q, k, v = qkv
    for sim in (-1.0, 0.1, 1.0):
        be = bound(SpargeParams.thresholds(3, cdfthreshd=1.0, simthreshd1=sim))
        assert bool(be.predict(q, k).blocks.all())
        out, lse = be(q, k, v, return_lse=True)
        ref, ref_lse = reference_attention(q, k, v)
        close(out, lse, ref, ref_lse)


def test_topk_keeps_ceil_fraction_plus_sink(qkv):
    q, k, _ = qkv
    p = SpargeParams.topk_mode(3, [0.5, 0.25, 0.3], simthreshd1=-1.0)  # every block similar: pure top-k
    m = predict_block_mask(q, k, p).blocks
    nk = m.shape[-1]  # 10 key blocks
    counts = m.sum(-1)
    for h, t in enumerate([0.5, 0.25, 0.3]):
        n = math.ceil(t * nk - 1e-9)
        assert bool(((counts[:, h] == n) | (counts[:, h] == n + 1)).all())  # + the sink when it was not among them
    assert bool(m[..., 0].all())


def test_kv_lens_padding_rows_and_keys(qkv):
    q, k, v = qkv
    p = SpargeParams.thresholds(3, cdfthreshd=[0.6, 0.9, 0.8], simthreshd1=0.05)
    be = bound(p)
    n = 470
    out, lse = be(q, k, v, kv_lens=[n, n], return_lse=True)
    ref, ref_lse = be(q[:, :n].contiguous(), k[:, :n].contiguous(), v[:, :n].contiguous(), return_lse=True)
    close(out[:, :n], lse[..., :n], ref.double(), ref_lse.double())
    assert bool((out[:, n:] == 0).all()) and bool(torch.isneginf(lse[..., n:]).all())  # padded queries: no keys


def test_dense_layer_unbound_and_head_errors(qkv):
    q, k, v = qkv
    unbound = SpargeFlex(device=CPU, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="not bound"):
        unbound(q, k, v)
    dense_layer = unbound.for_layer(None)
    out, lse = dense_layer(q, k, v, return_lse=True)
    close(out, lse, *reference_attention(q, k, v))
    with pytest.raises(ValueError, match="for_heads"):
        bound(SpargeParams.thresholds(4, cdfthreshd=0.9, simthreshd1=0.1))(q, k, v)
    with pytest.raises(TypeError):
        unbound.for_layer({"cdfthreshd": 0.9})
    assert SpargeFlex.caps.lse and SpargeFlex.caps.block_mask and SpargeFlex.per_layer and SpargeFlex.needs_global_mask
    assert not SpargeSpas.caps.lse and SpargeSpas.unavailable_reasons(CPU, torch.bfloat16)


def test_flex_block_mask_lists_per_head():
    """The kv lists flex's compiled kernel walks (eager CPU flex ignores them): full + partial tiles per (b, h)."""
    g = torch.Generator().manual_seed(3)
    blocks = torch.rand(2, 3, 5, 9, generator=g) < 0.4
    m = BlockSparseMask.from_blocks(blocks, (128, 64), 600, 560).sub(100, 300, 37, 400)
    bm = flex_block_mask(m, CPU)
    full, part = m.kernel_blocks(128, 64)
    assert full.shape == (2, 3, 3, 7)
    assert torch.equal(bm.to_dense().bool(), full | part)
    cnt, idx = _lists(full)
    for b in range(2):
        for h in range(3):
            for u in range(full.shape[2]):
                sel = idx[b, h, u, : cnt[b, h, u]].tolist()
                assert sel == torch.nonzero(full[b, h, u]).flatten().tolist()


# ------------------------------------------------------------------------------ per-head BlockSparseMask
def test_per_head_mask_windows_equal_slicing():
    rng = random.Random(0)
    for seed in range(40):
        bq, bk = rng.choice([(4, 2), (3, 5), (8, 8)])
        ql, kl = rng.randint(1, 60), rng.randint(1, 60)
        g = torch.Generator().manual_seed(seed)
        blocks = torch.rand(2, 3, -(-ql // bq), -(-kl // bk), generator=g) < 0.5
        m = BlockSparseMask.from_blocks(blocks, (bq, bk), ql, kl)
        dense = blocks.repeat_interleave(bq, 2).repeat_interleave(bk, 3)[..., :ql, :kl]
        assert torch.equal(m.to_dense(), dense)
        assert torch.equal(m.allowed_counts(), dense.sum((-2, -1)))
        qs, ks, qn, kn = rng.randint(0, ql + 3), rng.randint(0, kl + 3), rng.randint(0, 40), rng.randint(0, 40)
        s = m.sub(qs, qn, ks, kn)
        big = torch.zeros(2, 3, ql + qs + qn, kl + ks + kn, dtype=torch.bool)
        big[..., :ql, :kl] = dense
        want = big[..., qs : qs + qn, ks : ks + kn]
        assert torch.equal(s.to_dense(), want)
        assert s.allowed() == int(want.sum()) and s.is_empty == (not bool(want.any()))
        if qn and kn:
            assert math.isclose(s.density, float(want.double().mean()))
            tq, tk = rng.choice([2, 5, 16]), rng.choice([3, 8])
            full, part = s.kernel_blocks(tq, tk)
            for u in range(full.shape[-2]):
                for w in range(full.shape[-1]):
                    tile = want[..., u * tq : (u + 1) * tq, w * tk : (w + 1) * tk]
                    assert torch.equal(full[..., u, w], tile.all(-1).all(-1))
                    assert torch.equal(part[..., u, w], tile.any(-1).any(-1) & ~tile.all(-1).all(-1))
            occ = s.chunk_occupancy(7, 5)
            for a in range(occ.shape[0]):
                for c in range(occ.shape[1]):
                    assert bool(occ[a, c]) == bool(want[..., a * 7 : (a + 1) * 7, c * 5 : (c + 1) * 5].any())
    with pytest.raises(ValueError, match="block_shape"):
        _ = BlockSparseMask.from_blocks(torch.ones(1, 1, 2, 3, dtype=torch.bool), (4, 2), 8, 6).block_size


# ------------------------------------------------------------------------------ parallel compositions
def test_ulysses_head_groups_with_padded_heads_equal_single_device(qkv):
    """Ulysses: each rank holds every token for a slice of the (zero-padded) heads and binds that slice."""
    q, k, v = qkv  # 3 heads; Ulysses 2 pads to 4
    p = SpargeParams.thresholds(3, cdfthreshd=[0.5, 0.9, 0.7], simthreshd1=[0.05, 0.1, 0.0])
    be = bound(p)
    ref, ref_lse = be(q, k, v, return_lse=True)
    pad = lambda x: torch.nn.functional.pad(x, (0, 0, 0, 1))  # noqa: E731  4th head of zeros
    qp, kp, vp = pad(q), pad(k), pad(v)
    outs, lses = [], []
    for h0, h1 in ((0, 2), (2, 4)):
        part = be.for_heads(h0, h1)
        o, l = part(qp[:, :, h0:h1].contiguous(), kp[:, :, h0:h1].contiguous(), vp[:, :, h0:h1].contiguous(), return_lse=True)
        outs.append(o)
        lses.append(l)
    out, lse = torch.cat(outs, 2)[:, :, :3], torch.cat(lses, 1)[:, :3]
    close(out, lse, ref.double(), ref_lse.double(), tol=1e-6)
    assert not bool(be.for_heads(2, 4).params.is_sparse[1])  # the padded head runs dense


@pytest.mark.parametrize("ring,s_total", [(3, 600), (4, 517)])
def test_ring_schedule_from_gathered_stats_equals_single_device(ring, s_total):
    """Ring: every rank holds a contiguous (padded) chunk; partial block statistics are summed (the
    all-reduce), the global mask predicted once, each (query chunk, key chunk) step runs its window
    of it, partial results merge by LSE -- equal to the single-device result on every valid row."""
    b, h, d = 1, 3, 16
    q = blocky(b, s_total, h, d, seed=31, dtype=torch.float64)
    k = blocky(b, s_total, h, d, seed=32, dtype=torch.float64)
    v = rand(b, s_total, h, d, seed=33, dtype=torch.float64)
    p = SpargeParams.thresholds(h, cdfthreshd=[0.5, 0.8, 0.95], simthreshd1=[0.05, 0.1, 0.0])
    be = SpargeFlex(device=CPU, dtype=torch.float64).for_layer(p)
    scale = d**-0.5
    ref, ref_lse = be(q, k, v, return_lse=True)
    chunk = -(-s_total // ring)
    pad = lambda x: torch.nn.functional.pad(x, (0, 0, 0, 0, 0, ring * chunk - s_total))  # noqa: E731
    qp, kp, vp = pad(q), pad(k), pad(v)
    rank = lambda x, r: x[:, r * chunk : (r + 1) * chunk]  # noqa: E731
    # 1) mean key: all-reduce of the local key sums
    ksum = sum(key_sum(rank(kp, r), offset=r * chunk, length=s_total) for r in range(ring))
    mean = ksum / s_total
    # 2) partial statistics of each rank, summed (all-reduce SUM of total / unit / count)
    stats = [be.local_stats(rank(qp, r), rank(kp, r), q_offset=r * chunk, k_offset=r * chunk, q_length=s_total,
                            k_length=s_total, k_mean=mean) for r in range(ring)]
    qs, ks = stats[0]
    for a, c in stats[1:]:
        qs, ks = qs + a, ks + c
    mask = be.mask_from_stats(qs, ks, scale=scale)
    assert torch.equal(mask.blocks, be.predict(q, k).blocks)
    assert 0.05 < 1 - mask.density < 0.95  # a real mask: the windows cut through kept and skipped tiles
    # 3) the ring: per step, the window of the global mask; merge by LSE
    skipped = 0
    for r in range(ring):
        out = lse = None
        for c in range(ring):
            sub = mask.sub(r * chunk, chunk, c * chunk, chunk)
            if sub.is_empty:
                skipped += 1
                continue
            n = min(chunk, s_total - c * chunk)
            o, l = be(rank(qp, r), rank(kp, c), rank(vp, c), kv_lens=[n], block_mask=sub, return_lse=True)
            if out is None:
                out, lse = o.float().clone(), l.clone()
            else:
                merge_attention_(out, lse, o, l)
        valid = max(0, min(chunk, s_total - r * chunk))
        rows = slice(r * chunk, r * chunk + valid)
        close(out[:, :valid], lse[..., :valid], ref[:, rows].double(), ref_lse[..., rows].double(), tol=2e-6)
    assert skipped == int((~mask.chunk_occupancy(chunk, chunk)).sum())


def test_sequence_parallel_mask_with_threaded_all_reduce():
    """The helper parallel/ calls on every ring rank, with a real (threaded) all-reduce: same mask everywhere,
    equal to the single-device prediction."""
    import threading

    from ditfleet.attention.sparge import sequence_parallel_mask

    ring, s_total, b, h, d = 3, 517, 2, 3, 16
    q = blocky(b, s_total, h, d, seed=41)
    k = blocky(b, s_total, h, d, seed=42)
    p = SpargeParams.thresholds(h, cdfthreshd=[0.5, 0.8, 0.95], simthreshd1=[0.05, 0.1, 0.0])
    be = SpargeFlex(device=CPU, dtype=torch.float64).for_layer(p)
    chunk = -(-s_total // ring)
    qp, kp = (torch.nn.functional.pad(x, (0, 0, 0, 0, 0, ring * chunk - s_total)) for x in (q, k))
    barrier, slots, results = threading.Barrier(ring), [None] * ring, [None] * ring

    def all_reduce_for(r):
        def all_reduce(t):
            slots[r] = t.clone()
            barrier.wait()
            total = sum(slots)
            barrier.wait()
            t.copy_(total)
        return all_reduce

    def rank(r):
        sl = slice(r * chunk, (r + 1) * chunk)
        results[r] = sequence_parallel_mask(be, qp[:, sl], kp[:, sl], q_offset=r * chunk, k_offset=r * chunk,
                                            q_length=s_total, k_length=s_total, scale=d**-0.5,
                                            all_reduce=all_reduce_for(r))

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(ring)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    want = be.predict(q, k).blocks
    assert all(m is not None and m.shape == (s_total, s_total) and torch.equal(m.blocks, want) for m in results)


def test_spas_fallback_reasons_on_cpu():
    reasons = SpargeSpas.unavailable_reasons(CPU, torch.bfloat16)
    assert any("CUDA" in r for r in reasons)


def test_bench_sparge_cpu_smoke(tmp_path):
    import argparse
    import json

    from ditfleet.bench import sparge as bench

    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    out = tmp_path / "sparge.json"
    args = p.parse_args(["--cases", "2x8x16", "--heads", "2", "--head-dim", "16", "--dtype", "fp32", "--device", "cpu",
                         "--warmup", "0", "--iters", "1", "--out", str(out)])
    assert bench.main(args) == 0
    rep = json.loads(out.read_text())
    (case,) = rep["results"]
    assert case["tokens"] == 256 and {k["inputs"] for k in case["inputs"]} == {"random", "structured"}
    for kind in case["inputs"]:
        for setting, r in kind["settings"].items():
            assert r["status"] == "ok" and 0 <= r["sparsity"] < 1 and r["cosine"] > 0
            if setting == "thr" and r["sparsity"] == 0:
                assert r["rel_l1"] < 1e-5


# ------------------------------------------------------------------------------ fused predictor, FA4 path, no sync
_INTERP_SCRIPT = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
from test_sparge import blocky, oracle_map
from ditfleet.attention.sparge import SpargeParams, predict_block_mask
bad = []
for b, s, h, d, seed, n in [(1, 700, 3, 16, 0, 700), (2, 515, 2, 32, 1, 450)]:
    q = blocky(b, s, h, d, seed=seed, dtype=torch.float32)
    k = blocky(b, s, h, d, seed=seed + 100, dtype=torch.float32)
    for p in (SpargeParams.thresholds(h, cdfthreshd=[0.3, 0.6, 0.95][:h], simthreshd1=[0.0, 0.1, -1.0][:h],
                                      is_sparse=[True] * (h - 1) + [False]),
              SpargeParams.topk_mode(h, [0.5, 0.3, 0.1][:h])):
        m = predict_block_mask(q, k, p, kv_lens=[n] * b, impl="triton")
        want = oracle_map(q[:, :n].double(), k[:, :n].double(), cdf=None if p.topk is not None else p.cdfthreshd.tolist(),
                          topk=None if p.topk is None else p.topk.tolist(), sim=p.simthreshd1.tolist(),
                          is_sparse=p.is_sparse.tolist(), scale=d ** -0.5)
        cnt, idx = m._grid.cache[("fa4_lists", m.key, "cpu")]
        lists_ok = torch.equal(cnt, m.blocks.sum(-1, dtype=torch.int32)) and all(
            idx[i, j, a, : cnt[i, j, a]].tolist() == torch.nonzero(m.blocks[i, j, a]).flatten().tolist()
            for i in range(b) for j in range(h) for a in range(m.blocks.shape[2]))
        flips = float((m.blocks != want).float().mean())
        if flips > 0 or not lists_ok or not 0 < float(want.float().mean()) < 1:
            bad.append((b, s, p.mode, flips, lists_ok))
from ditfleet.attention.sparge import block_stats, key_sum
x = blocky(2, 333, 3, 8, seed=4, dtype=torch.float32)
mean = key_sum(x) / 333
for off, end in ((0, 50), (50, 170), (301, 333)):  # unaligned chunks, additive sums (the ring's statistics)
    got = block_stats(x[:, off:end], 64, offset=off, length=333, mean=mean, fused=True)
    want = block_stats(x[:, off:end], 64, offset=off, length=333, mean=mean, fused=False)
    if not (torch.equal(got.count, want.count) and torch.allclose(got.total, want.total, atol=1e-5)
            and torch.allclose(got.unit, want.unit, atol=1e-5)):
        bad.append(("stats", off))
print("BAD" if bad else "OK", bad)
"""


def test_fused_triton_predictor_equals_float64_oracle_in_interpreter():
    """The Triton kernels (statistics, selection into FA4 tile lists) on the CPU through Triton's interpreter:
    the same block map as the independent float64 oracle, and lists that hold exactly its blocks, ascending."""
    import os
    import pathlib
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    tests = str(pathlib.Path(__file__).parent)
    res = subprocess.run([sys.executable, "-c", _INTERP_SCRIPT, tests], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith("OK"), res.stdout


def test_tile_lists_and_aligned_window_lists():
    from ditfleet.attention.fa4_sparse import tile_lists, window_tile_lists

    g = torch.Generator().manual_seed(5)
    blocks = torch.rand(2, 3, 6, 11, generator=g) < 0.4
    cnt, idx = tile_lists(blocks)
    for b in range(2):
        for h in range(3):
            for u in range(6):
                assert idx[b, h, u, : cnt[b, h, u]].tolist() == torch.nonzero(blocks[b, h, u]).flatten().tolist()
    m = BlockSparseMask.from_blocks(blocks, (8, 4), 45, 43)
    for qs, ql, ks, kl in [(0, 45, 0, 43), (8, 30, 4, 20), (16, 40, 8, 35), (0, 50, 0, 43)]:  # last: rows past the end
        w = m.sub(qs, ql, ks, kl)
        got = window_tile_lists(w, CPU)
        full, part = w.kernel_blocks(8, 4)
        real = min(ql, 45 - qs)
        assert got is not None and not bool(part[..., : real // 8, :].any())  # aligned: whole tiles only
        c, i = got
        want = torch.zeros_like(full)
        nu = -(-real // 8)
        want[..., :nu, :] = blocks[..., qs // 8 : qs // 8 + nu, ks // 4 : ks // 4 + full.shape[-1]]
        assert torch.equal(c, want.sum(-1, dtype=torch.int32))
    assert window_tile_lists(m.sub(3, 20, 0, 20), CPU) is None  # off the grid
    assert window_tile_lists(m.sub(0, 20, 4, 60), CPU) is None  # keys past the end inside the window


def _fake_fa4(q, k, v, *, full_cnt, full_idx, block, scale, return_lse, key="fa4"):
    """FA4's block-sparse forward as documented (whole tiles from the lists, keys bounded by S_k), in float64;
    rows without any tile get garbage (NaN, lse 7), so that the caller's handling of them is tested."""
    bq, bk = block
    b, s_q, h, _ = q.shape
    s_k = k.shape[1]
    cnt = full_cnt.expand(b, h, -1)
    idx = full_idx.expand(b, h, -1, -1)
    tiles = torch.zeros(b, h, cnt.shape[-1], -(-s_k // bk), dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            for u in range(cnt.shape[-1]):
                tiles[bi, hi, u, idx[bi, hi, u, : cnt[bi, hi, u]].long()] = True
    allowed = tiles.repeat_interleave(bq, 2).repeat_interleave(bk, 3)[..., :s_q, :s_k]
    out, lse = reference_attention(q, k, v, scale=scale, mask=allowed)
    empty = ~allowed.any(-1)  # [B, H, S_q]: whatever a kernel leaves there, the caller must define it
    out = out.masked_fill(empty.transpose(1, 2)[..., None], float("nan"))
    lse = lse.masked_fill(empty, 7.0)
    return out.to(q.dtype), (lse.float() if return_lse else None)


def test_fa4_path_dispatch_with_a_documented_fa4(qkv, monkeypatch):
    """SpargeFlex's FA4 path with FA4 replaced by its documented semantics: whole sequences, kv_lens padding,
    aligned and unaligned ring windows (the latter go to flex) equal the masked float64 reference."""
    from ditfleet.attention import fa4_sparse

    fa4_calls = []
    monkeypatch.setattr(fa4_sparse, "fa4_block_sparse_attention", lambda *a, **kw: (fa4_calls.append(1), _fake_fa4(*a, **kw))[1])
    monkeypatch.setattr(SpargeFlex, "fa4_reasons", property(lambda self: ["impl='flex'"] if self.impl == "flex" else []))
    q, k, v = (x.double() for x in qkv)
    p = SpargeParams.thresholds(3, cdfthreshd=[0.5, 0.9, 0.3], simthreshd1=[0.05, 0.1, -1.0], is_sparse=[True, True, False])
    be = SpargeFlex(device=CPU, dtype=torch.float64, impl="fa4").for_layer(p)
    out, lse = be(q, k, v, return_lse=True)
    m = be.predict(q, k)
    close(out, lse, *masked_reference(q, k, v, m.to_dense()))
    n = 470  # padded self-attention: padded queries attend no key
    out, lse = be(q, k, v, kv_lens=[n, n], return_lse=True)
    mp = be.predict(q[:, :n], k[:, :n])
    ref, ref_lse = masked_reference(q[:, :n], k[:, :n], v[:, :n], mp.to_dense())
    close(out[:, :n], lse[..., :n], ref, ref_lse)
    assert bool((out[:, n:] == 0).all()) and bool(torch.isneginf(lse[..., n:]).all())
    for qs, ql, ks, kl in [(128, 256, 64, 320), (0, 600, 192, 400), (100, 200, 37, 300)]:  # aligned x 2, unaligned
        sub = m.sub(qs, ql, ks, kl)
        pad = lambda x, s0, ln: torch.nn.functional.pad(x[:, s0 : s0 + ln], (0, 0, 0, 0, 0, max(0, s0 + ln - 600)))  # noqa: E731
        qq, kk, vv = pad(q, qs, ql), pad(k, ks, kl), pad(v, ks, kl)
        nk = min(kl, 600 - ks)
        flex_only = SpargeFlex(device=CPU, dtype=torch.float64, impl="flex").for_layer(p)
        if (qs, ks) == (100, 37):
            with pytest.raises(ValueError, match="not on the mask's grid"):
                be(qq, kk, vv, kv_lens=[nk, nk], block_mask=sub, return_lse=True)
            be = SpargeFlex(device=CPU, dtype=torch.float64).for_layer(p)  # auto: flex for this window
        o, l = be(qq, kk, vv, kv_lens=[nk, nk], block_mask=sub, return_lse=True)
        allowed = sub.to_dense() & (torch.arange(kl) < nk)
        close(o, l, *masked_reference(qq, kk, vv, allowed))
        o2, l2 = flex_only(qq, kk, vv, kv_lens=[nk, nk], block_mask=sub, return_lse=True)
        close(o, l, o2.double(), l2.double(), tol=1e-9)
    assert len(fa4_calls) == 4  # whole, padded, two aligned windows; the unaligned one ran flex


def test_sparge_ring_path_reads_nothing_back_from_the_device(monkeypatch):
    """The host side of Sparge under ring / USP, on tensors of the meta device (any read of a value raises):
    gathered-statistics mask, ring schedule, each step's window, its FA4 lists and flex tile classes.
    And no .cpu() / .item() / .tolist() call at all on that path (counted)."""
    from ditfleet.attention.fa4_sparse import window_tile_lists
    from ditfleet.attention.sparge import sequence_parallel_mask
    from ditfleet.parallel.ring_schedule import RingSchedule, sp_schedule

    meta = torch.device("meta")
    calls = []
    for name in ("cpu", "item", "tolist"):
        orig = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _n=name, _o=orig, **kw: (calls.append(_n), _o(self, *a, **kw))[1])
    ring, s, h, d = 3, 1001, 3, 16
    chunk = -(-s // ring)
    p = SpargeParams.thresholds(h, cdfthreshd=[0.5, 0.8, 0.95], simthreshd1=[0.05, 0.1, 0.0])
    be = SpargeFlex(device=meta, dtype=torch.float32).for_layer(p)
    p.on(meta)  # the settings' one host-to-device copy happens at start-up (cached), not per layer
    calls.clear()
    for r in range(ring):
        x = torch.empty(1, chunk, h, d, device=meta)
        mask = sequence_parallel_mask(be, x, x, q_offset=r * chunk, k_offset=r * chunk, q_length=s, k_length=s,
                                      scale=d**-0.5, all_reduce=lambda t: None)
        sched = RingSchedule.from_mask(mask, chunk, chunk, ring)
        assert sched.needs == tuple(tuple(True for _ in range(ring)) for _ in range(ring))  # every real step runs
        for step in range(ring):
            c = (r - step) % ring
            sub = mask.sub(r * chunk, chunk, c * chunk, min(chunk, s - c * chunk))
            window_tile_lists(sub, meta)
            sub.kernel_blocks(128, 64, meta)
            sub.token_params(meta)
    assert calls == []
    with pytest.raises((NotImplementedError, RuntimeError)):  # reading the device mask: what the forward never does
        sp_schedule(mask, chunk, chunk, 1, ring, exact=True)
