"""ditfleet's own Triton kernel of SageAttention2 (INT8 QK^T, FP8 PV): the built-in ``sage_attn2`` fallback.

Algorithm (Zhang et al., "SageAttention2", arXiv:2411.10958), per batch element and head:

1. **Smooth K**: ``k -= mean_seq(k)`` per channel. Every score of query row ``i`` moves by the same
   ``scale * q_i . mean_k``, so the softmax is unchanged; the LSE gets that term added back (step 5).
2. **INT8 Q, K**: Q pre-multiplied by ``scale * log2(e)`` (the kernel then uses ``exp2``) and the
   smoothed K are quantized symmetrically to INT8 (round half away from zero), one fp32 scale per
   ``BLOCK_M`` query rows / ``BLOCK_N`` key rows.
3. **FP8 V**: V is quantized to e4m3 per channel, ``v_scale = amax_tokens |v| / 448``, and stored
   transposed (``[B, H, D, S_k]``) so the FP8 tensor-core operand is K-major, as Hopper's wgmma needs.
4. **Kernel** (FlashAttention-style online softmax, fp32): ``S = int8 dot -> int32 -> fp32 * q_scale *
   k_scale``; ``P = exp2(S - m + log2(448))`` lies in ``[0, 448]`` and is cast to e4m3 (SageAttention2's
   ``S_FP8_OFFSET``); each key block's ``P.V`` is its own FP8 dot, added to an fp32 accumulator
   (two-level accumulation, against the ~22-bit accumulator of FP8 MMA); ``out = acc * v_scale / l``
   (the 448 cancels: ``l`` sums the same scaled ``P``).
5. **LSE** (natural log, of the *original* scores) ``= ln2 * (m + log2(l) - log2(448) + q'.mean_k)``
   with ``q' = q * scale * log2(e)``; the correction is computed in fp32 by the Q-quantization kernel.

FP8 ``tl.dot`` (e4m3, Triton's ``float8e4nv``) needs compute capability >= 8.9 in Triton; on sm80-88
``sage_attention_triton(..., pv_fp8=False)`` runs P.V in fp16 (SageAttention1-style); the backend
class declares sm89+ so the registry's description ("FP8 PV") stays true.

Not verified here (no GPU was available when this was written): speed, the tuning defaults (H100 guesses:
``BLOCK_M=128, BLOCK_N=64, num_warps=8`` for D=128 / 4 for D<=64, ``num_stages=3``), and that the
compiled kernel keeps each block's FP8 dot apart from the fp32 accumulator (``max_num_imprecise_acc``
is set to ask for that). Correctness is tested in Triton's CPU interpreter (``tests/test_sage_triton.py``)
and, where CUDA exists, by ``tests/gpu/test_sage_triton_gpu.py``. Quantization is three launches of one
small Triton kernel plus torch reductions (``mean``, ``aminmax``); fusing them into one pass over K and
V would save memory traffic.
"""

from __future__ import annotations

import os

import torch

from .base import LOW_PRECISION, AttentionBackend, Capabilities

try:
    import triton
    import triton.language as tl
except ImportError:  # the registry must still be able to ask why this kernel cannot run
    triton = None
    tl = None

LOG2E = 1.4426950408889634
FP8_MAX = 448.0  # largest finite float8 e4m3fn value

_MODE_Q, _MODE_K, _MODE_V = 0, 1, 2

if triton is not None:
    _LOG2_FP8_MAX = tl.constexpr(8.807354922057604)  # log2(448)
    _LN2 = tl.constexpr(0.6931471805599453)

    @triton.jit
    def _round_e4m3(x):
        # Round fp32 to a 4-bit significand (e4m3's normal grid) by Veltkamp splitting, so that the
        # following cast is exact. Used only under TRITON_INTERPRET: Triton 3.x's interpreter rounds
        # fp32 -> fp8 wrongly when the mantissa carries into the exponent (it halves e.g. 127.8 -> 64).
        t = x * 1048577.0  # 2**20 + 1
        return t - (t - x)

    @triton.jit
    def _quant_kernel(X, Y, Scale, Vec, Corr, L,
                      sxb, sxs, sxh, syb, sys_, syh, syd, mult,
                      H, D: tl.constexpr, BLK: tl.constexpr, MODE: tl.constexpr,
                      WANT_CORR: tl.constexpr, ROUND_FP8: tl.constexpr):
        """One ``BLK x D`` tile of one (batch, head). MODE 0: Q -> int8 (x * mult; Corr = x . mean_k);
        MODE 1: K -> int8 (x - mean_k); MODE 2: V -> e4m3 (x / v_scale). Vec is mean_k or v_scale [B, H, D]."""
        pid = tl.program_id(0)
        h = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        bh = b * H + h
        offs_s = pid * BLK + tl.arange(0, BLK)
        offs_d = tl.arange(0, D)
        row_ok = offs_s < L
        x = tl.load(X + b * sxb + h * sxh + offs_s[:, None] * sxs + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0).to(tl.float32)
        vec = tl.load(Vec + bh * D + offs_d)
        y_ptrs = Y + b * syb + h * syh + offs_s[:, None] * sys_ + offs_d[None, :] * syd
        if MODE == 2:
            x = x / vec[None, :]
            if ROUND_FP8:
                x = _round_e4m3(x)
            tl.store(y_ptrs, x.to(tl.float8e4nv), mask=row_ok[:, None])
        else:
            if MODE == 0:
                x = x * mult
                if WANT_CORR:
                    tl.store(Corr + bh * L + offs_s, tl.sum(x * vec[None, :], 1), mask=row_ok)
            else:
                x = tl.where(row_ok[:, None], x - vec[None, :], 0.0)  # padded rows must not set the scale
            s = tl.maximum(tl.max(tl.abs(x)), 1e-20) / 127.0
            xq = x / s
            xq = xq + tl.where(xq >= 0, 0.5, -0.5)  # the int cast truncates: round half away from zero
            tl.store(y_ptrs, xq.to(tl.int8), mask=row_ok[:, None])
            tl.store(Scale + bh * tl.num_programs(0) + pid, s)

    @triton.jit
    def _attn_kernel(Q, K, V, QS, KS, VS, Corr, O, Lse,
                     sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, svd, sob, sos, soh,
                     S_Q, S_K, H, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     PV_FP8: tl.constexpr, RETURN_LSE: tl.constexpr, ROUND_FP8: tl.constexpr):
        """One ``BLOCK_M`` tile of queries of one (batch, head) against all keys."""
        pid_m = tl.program_id(0)
        h = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        bh = b * H + h
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        m_ok = offs_m < S_Q
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :], mask=m_ok[:, None], other=0)
        q_scale = tl.load(QS + bh * tl.num_programs(0) + pid_m)
        k_ptrs = K + b * skb + h * skh + offs_n[None, :] * sks + offs_d[:, None]  # K^T tile [D, BLOCK_N]
        v_ptrs = V + b * svb + h * svh + offs_n[None, :] * svs + offs_d[:, None] * svd  # V^T tile [D, BLOCK_N]
        ks_ptr = KS + bh * tl.cdiv(S_K, BLOCK_N)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
        for start_n in range(0, S_K, BLOCK_N):
            n_ok = (start_n + offs_n) < S_K
            k = tl.load(k_ptrs + start_n * sks, mask=n_ok[None, :], other=0)
            s = tl.dot(q, k).to(tl.float32) * (q_scale * tl.load(ks_ptr + start_n // BLOCK_N))
            s = tl.where(n_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every block holds at least one valid key
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(s - (m_new[:, None] - _LOG2_FP8_MAX))  # in [0, 448]
            l_i = l_i * alpha + tl.sum(p, 1)
            vt = tl.load(v_ptrs + start_n * svs, mask=n_ok[None, :], other=0.0)
            if PV_FP8:
                if ROUND_FP8:
                    p = _round_e4m3(p)
                # max_num_imprecise_acc=BLOCK_N: each block's FP8 dot starts from zero and is added to
                # acc in true fp32 (Triton would otherwise fold acc into the dot's accumulator).
                pv = tl.dot(p.to(tl.float8e4nv), tl.trans(vt), max_num_imprecise_acc=BLOCK_N)
            else:  # sm80 path: P and V in fp16 (P in [0, 448] keeps 10 mantissa bits; bf16 V is converted)
                pv = tl.dot(p.to(tl.float16), tl.trans(vt.to(tl.float16)))
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        out = acc / l_i[:, None]
        if PV_FP8:
            out = out * tl.load(VS + bh * D + offs_d)[None, :]
        tl.store(O + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=m_ok[:, None])
        if RETURN_LSE:
            corr = tl.load(Corr + bh * S_Q + offs_m, mask=m_ok, other=0.0)
            lse2 = m_i + tl.math.log2(l_i) - _LOG2_FP8_MAX + corr
            tl.store(Lse + bh * S_Q + offs_m, lse2 * _LN2, mask=m_ok)


def default_config(head_dim: int) -> dict[str, int]:
    """Launch defaults (unmeasured guesses for H100): ``block_m``, ``block_n``, ``num_warps``, ``num_stages``."""
    return {"block_m": 128, "block_n": 64, "num_warps": 8 if head_dim >= 128 else 4, "num_stages": 3}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def sage_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    pv_fp8: bool | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SageAttention2 (INT8 QK^T, FP8 PV), no mask, no causal, no dropout.

    Args:
        q: ``[B, S_q, H, D]`` float16 or bfloat16 on CUDA (or CPU under ``TRITON_INTERPRET=1``);
            any strides with a contiguous last dim (others are copied).
        k: ``[B, S_k, H, D]``, same dtype/device; ``S_k`` may differ from ``S_q``; any lengths >= 1.
        v: ``[B, S_k, H, D]``.
        scale: softmax scale; ``None`` means ``D ** -0.5``.
        return_lse: also return the natural-log LSE of the original scores ``scale * q . k``.
        pv_fp8: FP8 P.V (needs sm89+); ``False``: P.V in fp16 (sm80; bf16 V is converted in-kernel);
            ``None``: FP8 where the GPU supports it.
        block_m, block_n, num_warps, num_stages: launch tuning; ``None`` takes :func:`default_config`.
            ``block_n`` is also the K-scale granularity, ``block_m`` the Q-scale granularity; powers of two,
            ``block_n >= 32`` on GPU (FP8 MMA K).

    Returns:
        ``(out, lse)``: ``out`` ``[B, S_q, H, D]`` in q's dtype; ``lse`` float32 ``[B, H, S_q]`` or ``None``.
        Head dims other than 32/64/128 are zero-padded to the next of those (a copy).
    """
    if triton is None:
        raise RuntimeError("sage_attention_triton needs the `triton` package (pip install triton)")
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"q, k, v must be [B, S, H, D] with k, v alike; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    bsz, s_q, heads, d = q.shape
    s_k = k.shape[1]
    if k.shape[0] != bsz or k.shape[2] != heads or k.shape[3] != d:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on B, H or D")
    if q.dtype not in LOW_PRECISION or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must all be float16 or bfloat16; got {q.dtype}, {k.dtype}, {v.dtype}")
    if d > 128 or s_q == 0 or s_k == 0:
        raise ValueError(f"needs 1 <= D <= 128 and non-empty sequences; got D={d}, S_q={s_q}, S_k={s_k}")
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if q.device.type != "cuda" and not interpret:
        raise RuntimeError(f"sage_attention_triton runs on CUDA (tensors are on {q.device}); TRITON_INTERPRET=1 for CPU")
    if pv_fp8 is None:
        pv_fp8 = q.device.type != "cuda" or torch.cuda.get_device_capability(q.device) >= (8, 9)
    if scale is None:
        scale = d ** -0.5
    dp = 32 if d <= 32 else 64 if d <= 64 else 128
    if dp != d:
        q, k, v = (torch.nn.functional.pad(t, (0, dp - d)) for t in (q, k, v))
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if max(t.stride(1) * t.shape[1] for t in (q, k, v)) >= 2**31 or max(s_q, s_k) * heads * dp >= 2**31:
        raise ValueError(f"sequence too long for one call (in-kernel row offsets are int32): S={max(s_q, s_k)}, H={heads}")
    cfg = default_config(dp)
    bm, bn = block_m or cfg["block_m"], block_n or cfg["block_n"]
    if any(x < 16 or x & (x - 1) for x in (bm, bn)):
        raise ValueError(f"block_m, block_n must be powers of two >= 16 (>= 32 for block_n on GPU); got {bm}, {bn}")
    launch = {"num_warps": num_warps or cfg["num_warps"], "num_stages": num_stages or cfg["num_stages"]}
    dev, f32 = q.device, torch.float32
    nbm, nbn = _cdiv(s_q, bm), _cdiv(s_k, bn)

    mean_k = k.mean(dim=1, dtype=f32)  # [B, H, D]
    q8 = torch.empty(q.shape, dtype=torch.int8, device=dev)
    k8 = torch.empty(k.shape, dtype=torch.int8, device=dev)
    qs = torch.empty((bsz, heads, nbm), dtype=f32, device=dev)
    ks = torch.empty((bsz, heads, nbn), dtype=f32, device=dev)
    corr = torch.empty((bsz, heads, s_q), dtype=f32, device=dev) if return_lse else qs
    common = {"D": dp, "ROUND_FP8": interpret}
    _quant_kernel[(nbm, heads, bsz)](
        q, q8, qs, mean_k, corr, s_q, q.stride(0), q.stride(1), q.stride(2),
        q8.stride(0), q8.stride(1), q8.stride(2), 1, scale * LOG2E, heads,
        BLK=bm, MODE=_MODE_Q, WANT_CORR=return_lse, **common)
    _quant_kernel[(nbn, heads, bsz)](
        k, k8, ks, mean_k, ks, s_k, k.stride(0), k.stride(1), k.stride(2),
        k8.stride(0), k8.stride(1), k8.stride(2), 1, 1.0, heads,
        BLK=bn, MODE=_MODE_K, WANT_CORR=False, **common)
    if pv_fp8:
        vmin, vmax = torch.aminmax(v, dim=1)  # [B, H, D]
        vs = torch.maximum(vmax.float(), -vmin.float()).clamp_min(1e-12) / FP8_MAX
        v8 = torch.empty((bsz, heads, dp, _cdiv(s_k, 16) * 16), dtype=torch.float8_e4m3fn, device=dev)
        _quant_kernel[(nbn, heads, bsz)](
            v, v8, vs, vs, vs, s_k, v.stride(0), v.stride(1), v.stride(2),
            v8.stride(0), v8.stride(3), v8.stride(1), v8.stride(2), 1.0, heads,
            BLK=bn, MODE=_MODE_V, WANT_CORR=False, **common)
        v_arg, v_strides = v8, (v8.stride(0), v8.stride(3), v8.stride(1), v8.stride(2))
    else:
        vs, v_arg, v_strides = qs, v, (v.stride(0), v.stride(1), v.stride(2), 1)

    out = torch.empty((bsz, s_q, heads, dp), dtype=q.dtype, device=dev)
    lse = torch.empty((bsz, heads, s_q), dtype=f32, device=dev) if return_lse else qs
    _attn_kernel[(nbm, heads, bsz)](
        q8, k8, v_arg, qs, ks, vs, corr, out, lse,
        q8.stride(0), q8.stride(1), q8.stride(2), k8.stride(0), k8.stride(1), k8.stride(2), *v_strides,
        out.stride(0), out.stride(1), out.stride(2), s_q, s_k, heads,
        BLOCK_M=bm, BLOCK_N=bn, PV_FP8=pv_fp8, RETURN_LSE=return_lse, **common, **launch)
    if dp != d:
        out = out[..., :d]
    return out, (lse if return_lse else None)


def emulate_sage_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    block_m: int = 128,
    block_n: int = 64,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The kernel's quantization scheme in plain torch (computed in ``dtype``): the error floor for tests.

    Same smoothing, INT8 blocks and rounding, FP8 V and P scaling as the kernel, but P is rounded against
    each row's final max (the kernel: the running max), so the two agree statistically, not bitwise.
    Dense: memory ``O(B * H * S_q * S_k)``. Shapes as :func:`sage_attention_triton`; returns ``out`` only.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = (t.transpose(1, 2).to(dtype) for t in (q, k, v))  # [B, H, S, D]

    def int8_blocks(x: torch.Tensor, blk: int) -> torch.Tensor:
        n = x.shape[2]
        xb = torch.nn.functional.pad(x, (0, 0, 0, (-n) % blk)).unflatten(2, (-1, blk))
        s = xb.abs().amax(dim=(3, 4), keepdim=True).clamp_min(1e-20) / 127
        return (torch.trunc(xb / s + 0.5 * torch.sign(xb)) * s).flatten(2, 3)[:, :, :n]

    def e4m3(x: torch.Tensor) -> torch.Tensor:
        return x.float().to(torch.float8_e4m3fn).to(dtype)

    s = int8_blocks(q * (scale * LOG2E), block_m) @ int8_blocks(k - k.mean(dim=2, keepdim=True), block_n).transpose(-1, -2)
    p = torch.exp2(s - s.amax(dim=-1, keepdim=True)) * FP8_MAX
    vs = v.abs().amax(dim=2, keepdim=True).clamp_min(1e-12) / FP8_MAX
    return ((e4m3(p) @ (e4m3(v / vs) * vs)) / p.sum(dim=-1, keepdim=True)).transpose(1, 2)


class SageTriton(AttentionBackend):
    """ditfleet's Triton SageAttention2 kernel: the ``sage_attn2`` fallback when ``sageattention`` is absent."""

    key = "sage_triton"
    description = "ditfleet Triton SageAttention2 kernel (INT8 QK, FP8 PV)"
    caps = Capabilities(
        lse=True, devices=frozenset({"cuda"}), dtypes=LOW_PRECISION, max_head_dim=128, min_compute_capability=(8, 9)
    )
    requires_modules = ("triton",)
    install_hint = "pip install 'ditfleet[triton]' (triton ships with PyTorch's CUDA wheels)"

    def _forward(self, q, k, v, *, scale, return_lse):
        return sage_attention_triton(q, k, v, scale=scale, return_lse=return_lse)
