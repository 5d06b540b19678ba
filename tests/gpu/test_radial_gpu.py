"""Radial kernels on the GPU in bf16 against an fp32 reference with the same token mask (skipped without CUDA).

Covers the full mask (aligned: FA4 runs full tiles only), unaligned (query chunk, key chunk)
windows as ring attention will cut them (partial tiles: flex's mask_mod; FA4's flex half and the
LSE merge), ``kv_lens``, the LSE, dense calls without a mask, and agreement between the kernels.
"""

from __future__ import annotations

import pytest
import torch

from ditfleet.attention.radial import RadialFA4, RadialFlex, radial_block_mask
from ditfleet.attention.reference import reference_attention
from ditfleet.bench.common import rel_l2

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPE = torch.bfloat16
H, D = 4, 128
REL = 1e-2  # bf16 inputs, fp32 accumulation: ~3e-3 typical
LSE_TOL = 2e-2
KERNELS = {"radial_flex": RadialFlex, "radial_fa4": RadialFA4}


def available():
    dev = torch.device("cuda")
    return [k for k, cls in KERNELS.items() if not cls.unavailable_reasons(dev, DTYPE)]


def reference(q, k, v, allowed, scale=None):
    """fp32 attention (full-precision matmuls) with token mask ``allowed``; rows without keys -> 0 / -inf."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        return reference_attention(q, k, v, scale=scale, mask=allowed, dtype=torch.float32)
    finally:
        torch.set_float32_matmul_precision(old)


def inputs(s_q, s_k, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(2, s_q, H, D, generator=g, device="cuda", dtype=DTYPE),
            *(torch.randn(2, s_k, H, D, generator=g, device="cuda", dtype=DTYPE) for _ in range(2)))


def check(out, lse, ref, ref_lse):
    fin = torch.isfinite(ref_lse)
    rows = fin.all(0).all(0)  # rows with keys in every batch / head
    assert bool(torch.isfinite(out[:, rows]).all())
    assert rel_l2(out[:, rows], ref[:, rows]) <= REL
    assert float((lse[fin] - ref_lse[fin]).abs().max()) <= LSE_TOL
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))


MASK = dict(frames=9, tokens_per_frame=300, decay_factor=0.2, block_size=128)  # 2,700 tokens, T % 128 != 0


@pytest.mark.parametrize("key", available())
def test_full_mask(key):
    m = radial_block_mask(*MASK.values())
    be = KERNELS[key](device=torch.device("cuda"), dtype=DTYPE)
    q, k, v = inputs(m.q_len, m.k_len)
    out, lse = be(q, k, v, block_mask=m, return_lse=True)
    ref, ref_lse = reference(q, k, v, m.to_dense(device="cuda"))
    check(out, lse, ref, ref_lse)
    dense_ref, dense_lse = reference(q, k, v, torch.ones(m.shape, dtype=torch.bool, device="cuda"))
    assert rel_l2(out, dense_ref) > 5e-2  # the mask matters
    out_d, lse_d = be(q, k, v, return_lse=True)  # no mask: dense
    check(out_d, lse_d, dense_ref, dense_lse)


@pytest.mark.parametrize("key", available())
@pytest.mark.parametrize("qs,ql,ks,kl", [(675, 675, 0, 675), (675, 675, 2025, 675), (1000, 700, 333, 900), (2400, 675, 2400, 675)])
def test_ring_windows(key, qs, ql, ks, kl):
    """Unaligned (query chunk, key chunk) windows; the last ones run past the end (padding)."""
    m = radial_block_mask(*MASK.values())
    sub = m.sub(qs, ql, ks, kl)
    be = KERNELS[key](device=torch.device("cuda"), dtype=DTYPE)
    q, k, v = inputs(ql, kl, seed=1)
    n = max(1, min(kl, m.k_len - ks))
    out, lse = be(q, k, v, block_mask=sub, kv_lens=[n, n], return_lse=True)
    allowed = sub.to_dense(device="cuda") & (torch.arange(kl, device="cuda") < n)[None, :]
    ref, ref_lse = reference(q, k, v, allowed)
    check(out, lse, ref, ref_lse)


def test_kernels_agree():
    keys = available()
    if len(keys) < 2:
        pytest.skip("only one radial kernel here")
    m = radial_block_mask(*MASK.values())
    q, k, v = inputs(m.q_len, m.k_len, seed=2)
    outs = [KERNELS[key](device=torch.device("cuda"), dtype=DTYPE)(q, k, v, block_mask=m)[0] for key in keys]
    assert rel_l2(outs[0], outs[1]) <= REL
