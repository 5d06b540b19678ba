"""ditfleet's Triton SageAttention2 kernel on a real GPU (skipped without CUDA or triton).

Reference: ``reference_attention(dtype=float32)`` (no TF32). Inputs: ``ditfleet.bench.attention.make_inputs``,
``randn`` (N(0, 1)) and ``video`` (keys with a large shared mean, outlier channels in q and k). Every
launch configuration the tuning kept (the defaults, the deferred FP8 P.V add, pointer loads instead of
TMA, 16-bit P.V) runs at odd sizes (B=2, S=1001, H=6) for D=128 and D=64.

Bounds (issue 16's accuracy targets where the scheme can meet them):

* cosine >= 0.999 everywhere; rel L1 <= 0.03 on video-like inputs and, for 16-bit P.V, on random ones.
* FP8 P.V on random N(0, 1) inputs: e4m3 rounds P and V to 3 mantissa bits (~2.7% rms each) and a
  zero-mean V gives outputs that are themselves random sums, so the scheme's own float64 emulation
  (``emulate_sage_attention``) is at rel L1 ~0.038 there: the kernel is held to 1.15x that emulation
  (and rel L1 <= 0.045), not to 0.03. This is the measured miss reported in benchmarks/notes_sage.md.
* LSE (natural log) max |error| <= 1e-2 on random inputs. On the video-like inputs the INT8 score
  error itself is ~0.16 in the LSE (outlier channels set the INT8 step of every channel): bound 0.3.
  Everywhere the LSE is within 5e-3 of the exact LSE of the kernel's own INT8 scores (its softmax
  arithmetic; the float64 emulation breaks INT8 rounding ties of bf16 inputs differently, by up to
  0.1 in the LSE of the video-like inputs, so it is not used for the LSE).
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from ditfleet.attention import reference_attention  # noqa: E402
from ditfleet.attention.sage_triton import (  # noqa: E402
    SageTriton,
    default_config,
    emulate_sage_attention,
    sage_attend,
    sage_attention_triton,
    sage_quantize,
)
from ditfleet.bench.attention import make_inputs  # noqa: E402

CC = torch.cuda.get_device_capability()
FP8_OK = CC >= (8, 9)
CUDA = torch.device("cuda")
CONFIGS = {  # name -> (pv_fp8, sage_attend keywords)
    "fp8_default": (True, {}),
    "fp8_defer": (True, {"defer": True}),
    "fp8_pointer_loads": (True, {"tma": False}),
    "16bit_default": (False, {}),
}


def _own_scores_lse(qz, s_q, s_k):
    """The exact (float64) LSE of the kernel's own INT8 scores plus its smoothing term: what its softmax
    arithmetic must reproduce, independent of how the quantisation broke rounding ties."""
    qd = qz["q8"][:, :, :s_q].double() * qz["qs"][:, :, :s_q, None].double()
    bn = qz["block_n"]
    kd = qz["k8"][:, :, :s_k].double() * qz["ks"].double().repeat_interleave(bn, dim=2)[:, :, :s_k, None]
    lse2 = torch.logsumexp((qd @ kd.transpose(-1, -2)) * math.log(2.0), dim=-1) / math.log(2.0)
    return (lse2 + qz["corr"].double()) * math.log(2.0)


def _metrics(out, lse, ref_out, ref_lse, emu_out, own_lse):
    o, r, e = out.double(), ref_out.double(), emu_out.double()
    return {
        "cos": float((o * r).sum() / (o.norm() * r.norm())),
        "rel_l1": float((o - r).abs().sum() / r.abs().sum()),
        "emu_rel_l1": float((e - r).abs().sum() / r.abs().sum()),
        "rel_l2": float((o - r).norm() / r.norm()),
        "emu_rel_l2": float((e - r).norm() / r.norm()),
        "lse_err": float((lse.double() - ref_lse.double()).abs().max()),
        "lse_vs_own_scores": float((lse.double() - own_lse).abs().max()),
        "finite": bool(torch.isfinite(out).all()),
    }


def _run(q, k, v, pv_fp8, kw):
    qz = sage_quantize(q, k, v, return_lse=True, pv_fp8=pv_fp8)
    out, lse = sage_attend(qz, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.dtype == torch.float32
    ref_out, ref_lse = reference_attention(q, k, v, dtype=torch.float32)
    bn = default_config(q.shape[-1], pv_fp8)["block_n"]
    emu_out = emulate_sage_attention(q, k, v, block_n=bn, pv_fp8=pv_fp8)
    return _metrics(out, lse, ref_out, ref_lse, emu_out, _own_scores_lse(qz, q.shape[1], k.shape[1]))


def _check(m, pv_fp8, kind):
    assert m["finite"], m
    assert m["cos"] >= 0.999, m
    if pv_fp8 and kind == "randn":
        assert m["rel_l1"] <= min(0.045, 1.15 * m["emu_rel_l1"]), m
    else:
        assert m["rel_l1"] <= 0.03, m
    assert m["rel_l2"] <= 1.25 * m["emu_rel_l2"], m  # no worse than the quantisation scheme allows
    assert m["lse_vs_own_scores"] <= 5e-3, m
    # random: issue 16's target; video-like: the INT8 scores' own error (~0.1-0.2 measured on an H200,
    # 4x outlier channels set every channel's INT8 step), a lost smoothing term would be off by >> 1
    assert m["lse_err"] <= (1e-2 if kind == "randn" else 0.3), m


@pytest.fixture(autouse=True)
def _exact_fp32_reference():
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(old)


@pytest.mark.parametrize("d", [128, 64])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_odd_sizes_match_fp32(config, d):
    pv_fp8, kw = CONFIGS[config]
    if pv_fp8 and not FP8_OK:
        pytest.skip("FP8 tl.dot needs compute capability >= 8.9")
    q, k, v = make_inputs(2, 1001, 6, d, torch.bfloat16, CUDA, seed=1)
    m = _run(q, k, v, pv_fp8, kw)
    print(config, d, m)
    _check(m, pv_fp8, "randn")


@pytest.mark.parametrize("kind", ["randn", "video"])
@pytest.mark.parametrize("pv_fp8", [True, False], ids=["fp8", "16bit"])
def test_accuracy_targets(pv_fp8, kind):
    if pv_fp8 and not FP8_OK:
        pytest.skip("FP8 tl.dot needs compute capability >= 8.9")
    q, k, v = make_inputs(1, 4096, 8, 128, torch.bfloat16, CUDA, seed=2, kind=kind)
    m = _run(q, k, v, pv_fp8, {})
    print(kind, pv_fp8, m)
    _check(m, pv_fp8, kind)


def test_cross_attention_with_a_partial_key_block():
    q, _, _ = make_inputs(1, 1000, 8, 128, torch.bfloat16, CUDA, seed=3)
    _, k, v = make_inputs(1, 257, 8, 128, torch.bfloat16, CUDA, seed=4)
    m = _run(q, k, v, FP8_OK, {})
    _check(m, FP8_OK, "randn")


def test_wrong_input_fails():
    q, k, v = make_inputs(1, 1024, 8, 128, torch.bfloat16, CUDA, seed=5)
    k_wrong = make_inputs(1, 1024, 8, 128, torch.bfloat16, CUDA, seed=6)[1]
    out, lse = sage_attention_triton(q, k_wrong, v, return_lse=True)
    ro, rl = reference_attention(q, k, v, dtype=torch.float32)
    assert float((out.float() - ro).norm() / ro.norm()) > 0.1 and float((lse - rl).abs().max()) > 0.1


@pytest.mark.skipif(not FP8_OK, reason="SageTriton declares compute capability >= 8.9")
def test_backend_with_padded_keys_fp16():
    backend = SageTriton(device=CUDA, dtype=torch.float16)
    assert SageTriton.unavailable_reasons(CUDA, torch.float16) == []
    q, k, v = make_inputs(2, 1000, 4, 64, torch.float16, CUDA, seed=7)
    k, v = k[:, :777], v[:, :777]
    out, lse = backend(q, k, v, kv_lens=[777, 500], return_lse=True)
    ro, rl = reference_attention(q, k, v, kv_lens=[777, 500], dtype=torch.float32)
    assert float((out.float() - ro).norm() / ro.norm()) <= 4.5e-2 and float((lse - rl).abs().max()) <= 1e-2
