"""Sparge kernels on the GPU (skipped without CUDA): the compiled flex kernel with per-(batch, head) masks in
bf16 against an fp32 reference with the same token mask, ring windows, kv_lens, no recompilation across
masks, the predictor on CUDA vs CPU, and spas_sage_attn (when installed) against the built-in kernel.

FlashAttention-4 path (skipped where FA4's block sparsity cannot run): S = 1001, H = 6 against the fp32
reference with the same token mask (per-head thresholds, a dense head, padded kv_lens, aligned windows
with query tiles that get no key), every block on equal to dense, and the fused Triton predictor
against the torch one (and against a float64 run of the torch one), with no host sync in the predictor."""

from __future__ import annotations

import pytest
import torch

from ditfleet.attention.reference import reference_attention
from ditfleet.attention.sparge import SpargeFlex, SpargeParams, SpargeSpas, predict_block_mask
from ditfleet.bench.common import rel_l2
from ditfleet.bench.sparge import compare, structured_qkv

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPE = torch.bfloat16
REL = 1e-2
LSE_TOL = 2e-2


def cuda():
    return torch.device("cuda", torch.cuda.current_device())


def reference(q, k, v, allowed, scale=None):
    """fp32 attention (full-precision matmuls) with token mask ``allowed``; rows without keys -> 0 / -inf."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        return reference_attention(q, k, v, scale=scale, mask=allowed, dtype=torch.float32)
    finally:
        torch.set_float32_matmul_precision(old)


def check(out, lse, ref, ref_lse):
    fin = torch.isfinite(ref_lse)  # [B, H, S]: (batch, head, query) with some key
    rows = fin.transpose(1, 2)  # [B, S, H], the leading dims of out
    assert bool(torch.isfinite(out[rows]).all())
    assert rel_l2(out[rows], ref[rows]) <= REL
    assert bool((out[~rows] == 0).all())  # no key: out 0
    assert float((lse[fin] - ref_lse[fin]).abs().max()) <= LSE_TOL
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))


@pytest.fixture(scope="module")
def qkv():
    q, k, v = structured_qkv((3, 30, 30), 4, 128, dtype=DTYPE, device=cuda(), seed=0)  # 2,700 tokens: short last blocks
    return q, k, v


PARAMS = dict(cdfthreshd=[0.5, 0.9, 0.95, 1.0], simthreshd1=[0.0, 0.1, -1.0, 0.2], is_sparse=[True, True, True, False])


def flex(params):
    return SpargeFlex(device=cuda(), dtype=DTYPE, impl="flex").for_layer(params)


def test_flex_per_head_mask(qkv):
    q, k, v = qkv
    be = SpargeFlex(device=cuda(), dtype=DTYPE, impl="flex").for_layer(SpargeParams.thresholds(4, **PARAMS))
    out, lse = be(q, k, v, return_lse=True)
    m = be.predict(q, k)
    assert 0.05 < 1 - m.density < 0.95
    ref, ref_lse = reference(q, k, v, m.to_dense(device="cuda"))
    check(out, lse, ref, ref_lse)


@pytest.mark.parametrize("qs,ql,ks,kl", [(0, 900, 900, 900), (900, 900, 1800, 900), (1000, 700, 333, 900), (2400, 675, 2400, 675)])
def test_ring_windows(qkv, qs, ql, ks, kl):
    """Unaligned (query chunk, key chunk) windows of the global mask, the last running past the end (padding)."""
    q, k, v = qkv
    be = flex(SpargeParams.thresholds(4, **PARAMS))
    mask = be.predict(q, k)
    sub = mask.sub(qs, ql, ks, kl)
    pad = lambda x, s, n: torch.nn.functional.pad(x[:, s : s + n], (0, 0, 0, 0, 0, max(0, s + n - x.shape[1])))  # noqa: E731
    qq, kk, vv = pad(q, qs, ql), pad(k, ks, kl), pad(v, ks, kl)
    n = max(1, min(kl, q.shape[1] - ks))
    out, lse = be(qq, kk, vv, kv_lens=[n], block_mask=sub, return_lse=True)
    allowed = sub.to_dense(device="cuda") & (torch.arange(kl, device="cuda") < n)
    ref, ref_lse = reference(qq, kk, vv, allowed)
    check(out, lse, ref, ref_lse)


def test_kv_lens_and_no_recompile_across_masks(qkv):
    q, k, v = qkv
    be = flex(SpargeParams.thresholds(4, **PARAMS))
    n = 2500
    out, lse = be(q, k, v, kv_lens=[n], return_lse=True)
    ref, ref_lse = be(q[:, :n].contiguous(), k[:, :n].contiguous(), v[:, :n].contiguous(), return_lse=True)
    assert rel_l2(out[:, :n], ref) <= REL
    be(q, k, v, return_lse=True)  # compile for the full length
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in range(3):  # new inputs -> new masks (same shapes): the compiled kernel is reused
            q2, k2, v2 = structured_qkv((3, 30, 30), 4, 128, dtype=DTYPE, device=cuda(), seed=seed + 1)
            be(q2, k2, v2, return_lse=True)


def test_predictor_cuda_matches_cpu(qkv):
    q, k, _ = qkv
    p = SpargeParams.thresholds(4, **PARAMS)
    gpu = predict_block_mask(q.float(), k.float(), p).blocks.cpu()
    cpu = predict_block_mask(q.float().cpu(), k.float().cpu(), p).blocks
    assert float((gpu != cpu).float().mean()) < 0.005


@pytest.mark.skipif(bool(SpargeSpas.unavailable_reasons(torch.device("cuda"), DTYPE)) if torch.cuda.is_available() else True,
                    reason="spas_sage_attn not usable here")
def test_spas_sage_attn_agrees_with_builtin(qkv):
    q, k, v = qkv
    p = SpargeParams.thresholds(4, **PARAMS)
    spas = SpargeSpas(device=cuda(), dtype=DTYPE).for_layer(p)
    builtin = SpargeFlex(device=cuda(), dtype=DTYPE).for_layer(p)
    o_spas, _ = spas(q, k, v)
    o_flex, _ = builtin(q, k, v)
    cmp = compare(o_spas, o_flex)
    assert cmp["cosine"] > 0.99 and cmp["rel_l1"] < 0.1  # INT8 / FP8 quantisation and the PV skip, same mask rule


# ------------------------------------------------------------------ FlashAttention-4 path
def fa4_reasons():
    return SpargeFlex(device=cuda(), dtype=DTYPE).fa4_reasons if torch.cuda.is_available() else ["no CUDA"]


needs_fa4 = pytest.mark.skipif(bool(fa4_reasons()), reason=f"Sparge on FA4 cannot run here: {fa4_reasons()}")
S6, H6 = 1001, 6
PARAMS6 = dict(cdfthreshd=[0.5, 0.9, 0.95, 1.0, 0.7, 0.8], simthreshd1=[0.0, 0.1, -1.0, 0.2, 0.05, 0.1],
               is_sparse=[True, True, True, False, True, True])


@pytest.fixture(scope="module")
def qkv6():
    q, k, v = structured_qkv((1, 7, 143), H6, 128, dtype=DTYPE, device=cuda(), seed=3)  # 1001 tokens
    g = torch.Generator(device="cuda").manual_seed(4)
    noise = lambda x: (x.float() + 0.3 * torch.randn(x.shape, generator=g, device="cuda")).to(DTYPE)  # noqa: E731
    return torch.cat([q, noise(q)]), torch.cat([k, noise(k)]), torch.cat([v, noise(v)])  # B = 2


@needs_fa4
@pytest.mark.parametrize("block_k", [64, 128])
def test_fa4_matches_fp32_reference(qkv6, block_k):
    q, k, v = qkv6
    be = SpargeFlex(device=cuda(), dtype=DTYPE, impl="fa4").for_layer(
        SpargeParams.thresholds(H6, block_k=block_k, **PARAMS6))
    out, lse = be(q, k, v, return_lse=True)
    m = be.predict(q, k)
    assert 0.05 < 1 - m.density < 0.95
    check(out, lse, *reference(q, k, v, m.to_dense(device="cuda")))
    n = 900  # padded self-attention: padded queries attend no key
    out, lse = be(q, k, v, kv_lens=[n, n], return_lse=True)
    mp = be.predict(q[:, :n], k[:, :n])
    ref, ref_lse = reference(q[:, :n], k[:, :n], v[:, :n], mp.to_dense(device="cuda"))
    check(out[:, :n], lse[..., :n], ref, ref_lse)
    assert bool((out[:, n:] == 0).all()) and bool(torch.isneginf(lse[..., n:]).all())


@needs_fa4
def test_fa4_aligned_windows_and_empty_query_tiles(qkv6):
    """Windows on the grid (the kernel runs them on FA4), one cutting keys so that some query tiles get none."""
    q, k, v = qkv6
    p = SpargeParams.thresholds(H6, **PARAMS6)
    be = SpargeFlex(device=cuda(), dtype=DTYPE, impl="fa4").for_layer(p)
    m = be.predict(q, k)
    for qs, ql, ks, kl in [(128, 512, 64, 320), (0, 1001, 640, 361), (768, 300, 192, 192)]:
        sub = m.sub(qs, ql, ks, kl)
        qq = torch.nn.functional.pad(q[:, qs : qs + ql], (0, 0, 0, 0, 0, max(0, qs + ql - S6)))
        kk, vv = k[:, ks : ks + kl], v[:, ks : ks + kl]
        out, lse = be(qq, kk, vv, block_mask=sub, return_lse=True)
        check(out, lse, *reference(qq, kk, vv, sub.to_dense(device="cuda")))


@needs_fa4
def test_fa4_all_blocks_on_equals_dense(qkv6):
    from ditfleet.attention.flash import FlashAttn4

    q, k, v = qkv6
    be = SpargeFlex(device=cuda(), dtype=DTYPE, impl="fa4").for_layer(SpargeParams.thresholds(H6, cdfthreshd=1.0,
                                                                                                 simthreshd1=0.1))
    out, lse = be(q, k, v, return_lse=True)
    assert bool(be.predict(q, k).blocks.all())
    ones = torch.ones(S6, S6, dtype=torch.bool, device="cuda")
    check(out, lse, *reference(q, k, v, ones))
    dense, dense_lse = FlashAttn4(device=cuda(), dtype=DTYPE)(q, k, v, return_lse=True)
    assert rel_l2(out, dense) <= 2e-3 and float((lse - dense_lse).abs().max()) <= 1e-3


@pytest.mark.parametrize("mode", ["threshold", "topk"])
def test_triton_predictor_matches_torch_and_syncs_nothing(qkv6, mode):
    from ditfleet.attention.sparge_predict import triton_predictor_reasons

    if triton_predictor_reasons(cuda(), DTYPE):
        pytest.skip(f"{triton_predictor_reasons(cuda(), DTYPE)}")
    q, k, _ = qkv6
    p = SpargeParams.thresholds(H6, **PARAMS6) if mode == "threshold" else SpargeParams.topk_mode(H6, [0.5, 0.3, 0.2, 1.0, 0.6, 0.1])
    for kv in (None, [900, 900]):
        got = predict_block_mask(q, k, p, kv_lens=kv, impl="triton")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any host sync in the fused predictor raises
        try:
            again = predict_block_mask(q, k, p, kv_lens=kv, impl="triton")
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.equal(got.blocks, again.blocks)
        want = predict_block_mask(q, k, p, kv_lens=kv, impl="torch").blocks
        assert float((got.blocks != want).float().mean()) < 0.005
        n = 900 if kv else S6
        f64 = predict_block_mask(q[:, :n].double().cpu(), k[:, :n].double().cpu(), p).blocks
        assert float((got.blocks.cpu() != f64).float().mean()) < 0.01
        assert 0.02 < 1 - got.density < 0.98
