"""Every attention kernel available on this GPU, in bf16, against an fp32 reference (skipped without CUDA).

Tolerance, in the style of flash-attn's tests: a kernel's error against
``reference_attention(dtype=float32)`` must stay within ``RATIO`` x the error that plain PyTorch
math gets on the same bf16 inputs (``SdpaMath``: fp32 scores and softmax, bf16 output), plus an
absolute floor (one bf16 rounding step at the output's magnitude; ``LSE_FLOOR`` for the LSE) so
that a baseline that happens to be tiny does not make the test flaky.

The Sage kernels (``sage_triton``, ``sageattention2``, ``sageattention1``) quantise Q and K to
INT8 (SageAttention 2 also P.V to FP8): their error is set by quantisation, not bf16 rounding,
so they get a fixed bound instead: rel L2 <= ``SAGE_REL_L2`` (and LSE error <= ``SAGE_LSE``).

Layer-bound kernels (Sparge) run bound to a layer with every block computed: dense attention through
their own predictor and block-sparse kernel (:func:`build_kernel`).
"""

from __future__ import annotations

import pytest
import torch

from ditfleet.attention import reference_attention, registry
from ditfleet.attention.sdpa import SdpaMath
from ditfleet.bench.common import rel_l2

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

B, H, D = 2, 6, 128
DTYPE = torch.bfloat16
SAGE = frozenset({"sage_triton", "sageattention2", "sageattention1"})
RATIO = 3.0
REL_FLOOR = 1e-3
LSE_FLOOR = 2e-3
SAGE_REL_L2 = 5e-2
SAGE_LSE = 5e-2

# name -> (S_q, S_k, kv_lens)
CASES = {
    "self": (1001, 1001, None),
    "self_padded": (1001, 1001, [1001, 900]),
    "cross": (1000, 512, None),
    "cross_padded": (1000, 512, [512, 300]),
}


def make_case(name: str, device: torch.device, seed: int = 0):
    """Inputs (bf16 ``[B, S, H, D]``), the fp32 reference and the bf16 PyTorch-math baseline of one case."""
    s_q, s_k, kv_lens = CASES[name]
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, s_q, H, D, generator=g, device=device, dtype=DTYPE)
    k = torch.randn(B, s_k, H, D, generator=g, device=device, dtype=DTYPE)
    v = torch.randn(B, s_k, H, D, generator=g, device=device, dtype=DTYPE)
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # no TF32 in the reference
    try:
        ref_out, ref_lse = reference_attention(q, k, v, kv_lens=kv_lens, dtype=torch.float32)
    finally:
        torch.set_float32_matmul_precision(old)
    base_out, base_lse = SdpaMath(device=device, dtype=DTYPE)(q, k, v, kv_lens=kv_lens, return_lse=True)
    return {
        "q": q, "k": k, "v": v, "kv_lens": kv_lens, "ref_out": ref_out, "ref_lse": ref_lse,
        "base_rel": rel_l2(base_out, ref_out),
        "base_max": float((base_out.float() - ref_out).abs().max()),
        "base_lse": float((base_lse - ref_lse).abs().max()),
    }


def build_kernel(cls, device: torch.device, num_heads: int):
    """An instance of ``cls`` ready to run: layer-bound kernels (Sparge, ``per_layer``) are bound to a layer
    whose every block is computed (``cdfthreshd = 1``), so their whole sparse path (predictor, block
    map, block-sparse kernel) runs and must equal dense attention."""
    be = cls(device=device, dtype=DTYPE)
    if getattr(cls, "per_layer", False):
        from ditfleet.attention.sparge import SpargeParams

        be = be.for_layer(SpargeParams.thresholds(num_heads, cdfthreshd=1.0, simthreshd1=0.1))
    return be


def run_kernel(be, q, k, v, kv_lens, return_lse):
    """``be``'s forward; a layer-bound (self-attention) kernel takes one key length per call, so a batch with
    different ``kv_lens`` runs one batch element at a time."""
    if not getattr(be, "per_layer", False) or kv_lens is None or len(set(kv_lens)) == 1:
        return be(q, k, v, kv_lens=kv_lens, return_lse=return_lse)
    parts = [be(q[b : b + 1], k[b : b + 1], v[b : b + 1], kv_lens=[n], return_lse=return_lse) for b, n in enumerate(kv_lens)]
    return torch.cat([o for o, _ in parts]), (torch.cat([lse for _, lse in parts]) if return_lse else None)


def check_kernel(cls, case: dict, device: torch.device) -> None:
    """Run ``cls`` on ``case`` and assert its output (and LSE, when it has one) is within tolerance."""
    q, k, v, kv_lens = case["q"], case["k"], case["v"], case["kv_lens"]
    out, lse = run_kernel(build_kernel(cls, device, q.shape[2]), q, k, v, kv_lens, cls.caps.lse)
    assert out.shape == q.shape and out.dtype == DTYPE
    ref_out, ref_lse = case["ref_out"], case["ref_lse"]
    if getattr(cls, "per_layer", False) and kv_lens is not None and q.shape[1] == k.shape[1]:
        # self-attention padding bounds the queries too: padded rows attend no key (out 0, lse -inf);
        # the rest is compared below
        pad = torch.arange(q.shape[1], device=device)[None, :] >= torch.tensor(kv_lens, device=device)[:, None]  # [B, S]
        assert bool((out[pad] == 0).all()) and bool(torch.isneginf(lse.transpose(1, 2)[pad]).all()), cls.key
        out = torch.where(pad[:, :, None, None], ref_out.to(out.dtype), out)
        lse = torch.where(pad[:, None, :], ref_lse, lse)
    assert bool(torch.isfinite(out).all()), f"{cls.key}: non-finite output"
    err_rel = rel_l2(out, ref_out)
    err_max = float((out.float() - ref_out).abs().max())
    if cls.key in SAGE:
        assert err_rel <= SAGE_REL_L2, f"{cls.key}: rel L2 {err_rel:.3e} > {SAGE_REL_L2} (quantised-kernel bound)"
    else:
        atol = torch.finfo(DTYPE).eps * float(ref_out.abs().max())  # one bf16 step at the output's magnitude
        assert err_rel <= RATIO * case["base_rel"] + REL_FLOOR, (
            f"{cls.key}: rel L2 {err_rel:.3e} vs PyTorch bf16 math {case['base_rel']:.3e}")
        assert err_max <= RATIO * case["base_max"] + atol, (
            f"{cls.key}: max abs err {err_max:.3e} vs PyTorch bf16 math {case['base_max']:.3e} (+{atol:.1e})")
    if cls.caps.lse:
        assert lse is not None and lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.dtype == torch.float32
        err_lse = float((lse - ref_lse).abs().max())
        bound = SAGE_LSE if cls.key in SAGE else RATIO * case["base_lse"] + LSE_FLOOR
        assert err_lse <= bound, f"{cls.key}: LSE max abs err {err_lse:.3e} > {bound:.3e}"


@pytest.fixture(scope="module")
def cases():
    device = torch.device("cuda")
    return {name: make_case(name, device) for name in CASES}


@pytest.mark.parametrize("case_name", list(CASES))
@pytest.mark.parametrize("key", list(registry.KERNELS))
def test_kernel_matches_fp32_reference(key, case_name, cases):
    device = torch.device("cuda")
    try:
        cls = registry.kernel_class(key)
    except ImportError as e:
        pytest.skip(f"{key}: cannot import ({e})")
    reasons = cls.unavailable_reasons(device, DTYPE)
    if D > cls.caps.max_head_dim:
        reasons.append(f"head dim {D} > {cls.caps.max_head_dim}")
    if reasons:
        pytest.skip(f"{key}: {'; '.join(reasons)}")
    check_kernel(cls, cases[case_name], device)
