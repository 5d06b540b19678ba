"""ditfleet's own Triton kernel of SageAttention2 (INT8 QK^T, FP8 or 16-bit PV): the built-in ``sage_attn2``.

Algorithm (Zhang et al., "SageAttention2", arXiv:2411.10958), per batch element and head:

1. **Smooth K**: ``k -= mean_seq(k)`` per channel. Every score of query row ``i`` moves by the same
   ``scale * q_i . mean_k``, so the softmax is unchanged; the LSE gets that term added back (step 5).
   The mean is exact: one stats kernel writes per-block column sums (and, for FP8 V, per-block
   ``max |v|``), a tiny torch sum adds them up.
2. **INT8 Q, K**: Q pre-multiplied by ``scale * log2(e)`` (the kernel then uses ``exp2``) and the
   smoothed K are quantized symmetrically to INT8 (round half away from zero): one fp32 scale per
   ``q_group`` query rows (default 1: per row; the per-row scale costs nothing in the kernel, it is
   folded into the one FMA per score that exists anyway) and one per ``BLOCK_N`` key rows. Q8 and K8
   are written head-major and zero-padded to whole blocks (``[B, H, S_pad, D]``), so every load of the
   main loop is a whole, unmasked (TMA) tile. (The kernel of 33df121 loaded masked tiles in every
   iteration; when ``S_k % 16 != 0`` Triton could not vectorise the masked FP8 ``V^T`` load, which went
   to one-byte loads without cp.async: 93.8 ms at S=32760 against 41.9 ms at S=32768 on an H200.)
3. **V**: ``pv_fp8=True`` (SageAttention2): V is quantized to e4m3 per channel,
   ``v_scale = amax_tokens |v| / 448``, stored transposed and padded (``[B, H, D, S_pad]``) so the FP8
   tensor-core operand is K-major, as Hopper's wgmma needs, and with each 32-key group in the order in
   which a thread holds P's columns in the QK accumulator, so P reaches the FP8 wgmma without register
   shuffles (``_pv_fp8``); ``P = exp2(S - m + log2(448))`` lies in ``[0, 448]`` and is cast to e4m3
   (SageAttention2's ``S_FP8_OFFSET``); each key block's ``P.V`` is its own FP8 dot added to an fp32
   accumulator (two-level accumulation). ``pv_fp8=False`` (SageAttention1 style): P is cast to the
   input dtype and multiplied with the bf16/fp16 V as given (no V pass).
4. **Kernel** (FlashAttention-style online softmax, fp32). The INT8 dot accumulates onto the int32
   ``0x4B400000``, the bit pattern of ``1.5 * 2**23``: the int32 result read as fp32 *is*
   ``12582912 + score`` (exact while ``|score| < 2**22``; ``127**2 * 128 < 2**21``), so no int->float
   conversion is issued. The scales and the running max are folded into one FMA per score before
   ``exp2`` (the fp32 bias ``m + 12582912 * c`` rounds by up to ``0.75 * c`` log2 units, ``c`` = q
   scale * k scale, ~1e-4 for N(0, 1) inputs). The main loop runs over whole key blocks without
   masks; a partial last block is a separate masked step.
5. **LSE** (natural log, of the *original* scores) ``= ln2 * (m + log2(l) [- log2(448)] + q'.mean_k)``
   with ``q' = q * scale * log2(e)``; the correction is computed in fp32 by the Q-quantization kernel.

Measured on one H200 (Triton 3.6, B=1, H=40, D=128, bf16, quantisation included; cuDNN SDPA 38.7 /
206 ms): FP8 P.V 27.4 ms at S=32760 (1.42x cuDNN) and 144.4 ms at S=75600 (1.43x); 16-bit P.V 34.9 /
182.5 ms (1.11x / 1.13x). Accuracy against fp32 on random N(0, 1) inputs: FP8 P.V rel L1 ~0.038,
cosine ~0.9993 (e4m3 rounds P and V to 3 mantissa bits, ~2.7% rms each, and on a zero-mean V the
output is itself a random sum, so nothing averages out: the scheme's float64 emulation
:func:`emulate_sage_attention` is at the same 0.038); 16-bit P.V ~0.012 (the INT8 score error alone);
LSE error ~4e-3. ``benchmarks/notes_sage.md`` has the tuning runs and what bounds the speed.

Loads go through TMA tensor descriptors on sm90+ (``tma=None``), through plain pointers elsewhere and
in Triton's CPU interpreter tests (both paths run in the interpreter).
"""

from __future__ import annotations

import math
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
MAGIC_I32 = 0x4B400000  # int32 bits of the float 1.5 * 2**23
MAGIC_F32 = 12582912.0

if triton is not None:
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:  # Triton < 3.4: pointer loads only
        TensorDescriptor = None

    _LOG2_FP8_MAX = tl.constexpr(8.807354922057604)  # log2(448)
    _LN2 = tl.constexpr(0.6931471805599453)
    _MAGIC_I = tl.constexpr(MAGIC_I32)
    _MAGIC_F = tl.constexpr(MAGIC_F32)

    @triton.jit
    def _round_e4m3(x):
        # Round fp32 to a 4-bit significand (e4m3's normal grid) by Veltkamp splitting, so that the
        # following cast is exact. Used only under TRITON_INTERPRET (INTERPRET): Triton 3.x's interpreter
        # rounds fp32 -> fp8 wrongly when the mantissa carries into the exponent (it halves e.g. 127.8 -> 64).
        t = x * 1048577.0  # 2**20 + 1
        return t - (t - x)

    @triton.jit
    def _stats_kernel(K, V, KSum, VMax, skb, sks, skh, svb, svs, svh, S, H,
                      D: tl.constexpr, BLK: tl.constexpr, WANT_V: tl.constexpr):
        """Per ``BLK``-row block of one (batch, head): column sums of K (-> mean_k) and, for FP8 V, max |V|."""
        pid = tl.program_id(0)
        h = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        offs_s = pid * BLK + tl.arange(0, BLK)
        offs_d = tl.arange(0, D)
        ok = offs_s[:, None] < S
        out = ((b * H + h) * tl.num_programs(0) + pid) * D + offs_d
        k = tl.load(K + b * skb + h * skh + offs_s[:, None] * sks + offs_d[None, :], mask=ok, other=0.0)
        tl.store(KSum + out, tl.sum(k.to(tl.float32), 0))
        if WANT_V:
            v = tl.load(V + b * svb + h * svh + offs_s[:, None] * svs + offs_d[None, :], mask=ok, other=0.0)
            tl.store(VMax + out, tl.max(tl.abs(v.to(tl.float32)), 0))

    @triton.jit
    def _int8_tile(x, QG: tl.constexpr, BLK: tl.constexpr):
        """Symmetric INT8 of a ``[BLK, D]`` fp32 tile, one scale per ``QG`` rows: ``(int8 tile, scales [BLK])``."""
        if QG == 1:
            amax = tl.max(tl.abs(x), 1)
        elif QG == BLK:
            amax = tl.zeros([BLK], tl.float32) + tl.max(tl.abs(x))
        else:
            g = tl.max(tl.reshape(tl.abs(x), [BLK // QG, QG * x.shape[1]]), 1)  # [BLK // QG]
            amax = tl.reshape(tl.broadcast_to(g[:, None], [BLK // QG, QG]), [BLK])
        s = tl.maximum(amax, 1e-20) / 127.0
        xq = x / s[:, None]
        xq = xq + tl.where(xq >= 0, 0.5, -0.5)  # the int cast truncates: round half away from zero
        return xq.to(tl.int8), s

    @triton.jit
    def _quant_kernel(X, X8, Scale, MeanK, Corr, V, V8, VScale,
                      sxb, sxs, sxh, svb, svs, svh, S, SP, H, mult,
                      D: tl.constexpr, BLK: tl.constexpr, QG: tl.constexpr, IS_Q: tl.constexpr,
                      WANT_CORR: tl.constexpr, WANT_V: tl.constexpr, INTERPRET: tl.constexpr):
        """One ``BLK``-row block of one (batch, head), padded rows included (they get zeros).

        IS_Q: Q -> int8 of ``q * mult`` (per-``QG``-row scales; Corr = ``(q * mult) . mean_k``);
        else K -> int8 of ``k - mean_k`` (one scale per block) and, with WANT_V, V -> e4m3 of
        ``v / v_scale`` stored transposed (``V8 [B, H, D, SP]``). Outputs are ``[B, H, SP, D]`` int8.
        """
        pid = tl.program_id(0)
        h = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        bh = b * H + h
        offs_s = pid * BLK + tl.arange(0, BLK)
        offs_d = tl.arange(0, D)
        row_ok = offs_s < S
        x = tl.load(X + b * sxb + h * sxh + offs_s[:, None] * sxs + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0).to(tl.float32)
        mean = tl.load(MeanK + bh * D + offs_d)
        if IS_Q:
            x = x * mult
            if WANT_CORR:
                tl.store(Corr + bh * S + offs_s, tl.sum(x * mean[None, :], 1), mask=row_ok)
            xq, s = _int8_tile(x, QG, BLK)
            tl.store(Scale + bh * SP + offs_s, s)
        else:
            x = tl.where(row_ok[:, None], x - mean[None, :], 0.0)  # padded rows must not set the scale
            xq, s = _int8_tile(x, BLK, BLK)
            tl.store(Scale + bh * tl.num_programs(0) + pid, tl.max(s))
        tl.store(X8 + (bh * SP + offs_s[:, None]) * D + offs_d[None, :], xq)
        if WANT_V:
            v = tl.load(V + b * svb + h * svh + offs_s[:, None] * svs + offs_d[None, :],
                        mask=row_ok[:, None], other=0.0).to(tl.float32)
            v = v / tl.load(VScale + bh * D + offs_d)[None, :]
            if INTERPRET:
                v = _round_e4m3(v)
            # transposed, and each 32-key group in the order _pv_fp8 wants, by a register permutation, so
            # that the store is contiguous along the keys
            vt = tl.trans(v.to(tl.float8e4nv))  # [D, BLK]
            vt = tl.reshape(tl.permute(tl.reshape(vt, [D, BLK // 32, 2, 2, 4, 2]), (0, 1, 2, 4, 3, 5)), [D, BLK])
            tl.store(V8 + (bh * D + offs_d[:, None]) * SP + pid * BLK + tl.arange(0, BLK)[None, :], vt)

    @triton.jit
    def _qk(q, Kd, bh, start_n, offs_n, offs_d, SKP, D: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr, TMA: tl.constexpr):
        """Scores of one key block as fp32 ``12582912 + q8 . k8`` (exact): the INT8 dot accumulates onto
        the int32 bits of 12582912.0, so reading the result as fp32 needs no conversion."""
        if TMA:
            k = Kd.load([(bh * SKP + start_n).to(tl.int32), 0])
        else:
            k = tl.load(Kd + (bh * SKP + start_n + offs_n[:, None]) * D + offs_d[None, :])
        s = tl.dot(q, tl.trans(k), acc=tl.full([BLOCK_M, BLOCK_N], _MAGIC_I, tl.int32), out_dtype=tl.int32)
        return s.to(tl.float32, bitcast=True)

    @triton.jit
    def _softmax(s, m_i, l_i, qs, KS, bh, start_n, offs_n, S_K, nbn, BLOCK_N: tl.constexpr, PV_FP8: tl.constexpr,
                 MASK: tl.constexpr, ROWSUM_TC: tl.constexpr = False):
        """Online-softmax step of one key block with scores ``s`` (from :func:`_qk`): ``(p, l, m, alpha)``.
        ``MASK``: the partial last block. ``ROWSUM_TC``: ``l`` is returned unchanged (the caller sums the
        e4m3 P on the tensor cores, :func:`_rowsum_fp8`)."""
        if MASK:
            s = tl.where((start_n + offs_n)[None, :] < S_K, s, float("-inf"))
        c = qs * tl.load(KS + bh * nbn + start_n // BLOCK_N)  # [BLOCK_M]: q scale (per row) * k scale
        m_new = tl.maximum(m_i, (tl.max(s, 1) - _MAGIC_F) * c)  # finite: every block holds a valid key
        alpha = tl.math.exp2(m_i - m_new)
        if PV_FP8:
            bias = m_new + _MAGIC_F * c - _LOG2_FP8_MAX  # P in [0, 448]
        else:
            bias = m_new + _MAGIC_F * c
        p = tl.math.exp2(s * c[:, None] - bias[:, None])
        if ROWSUM_TC:
            return p, l_i, m_new, alpha
        return p, l_i * alpha + tl.sum(p, 1), m_new, alpha

    @triton.jit
    def _pv_fp8(p, Vd, bh, start_n, offs_n, offs_d, SKP, D: tl.constexpr, BLOCK_N: tl.constexpr,
                INTERPRET: tl.constexpr, TMA: tl.constexpr):
        """One key block's FP8 ``P.V`` from zero (the caller adds it to the fp32 accumulator: two-level
        accumulation): ``(P8 . V8, P8)``, P8 the e4m3 P with its columns in V8's key order. V8 holds each
        32-key group's columns in the order ``32q + 16a + 4c + 2b + e`` for key ``32q + 16a + 8b + 2c + e``:
        the order in which a thread holds P's columns in the wgmma accumulator is then the order the FP8 A
        operand wants, so no shuffles are needed (``_quant_kernel`` writes V8 in that order). The V tile is
        loaded before P is cast (the other order costs 16 PRMT per block in Triton 3.6's SASS)."""
        if TMA:
            vt = Vd.load([(bh * D).to(tl.int32), start_n])  # V^T tile [D, BLOCK_N]
        else:
            vt = tl.load(Vd + (bh * D + offs_d[:, None]) * SKP + start_n + offs_n[None, :])
        if INTERPRET:
            p = _round_e4m3(p)
        p8 = p.to(tl.float8e4nv)
        p8 = tl.reshape(tl.permute(tl.reshape(p8, [p8.shape[0], BLOCK_N // 32, 2, 2, 4, 2]), (0, 1, 2, 4, 3, 5)),
                        [p8.shape[0], BLOCK_N])
        return tl.dot(p8, tl.trans(vt)), p8

    @triton.jit
    def _pv_fp8_acc(acc, p, Vd, bh, start_n, offs_n, offs_d, SKP, D: tl.constexpr, BLOCK_N: tl.constexpr,
                    INTERPRET: tl.constexpr, TMA: tl.constexpr):
        """``acc + P8 . V8`` accumulated by the tensor cores in place (the wgmma's own accumulation, no fp32
        add; on Hopper the FP8 MMA adds with reduced precision, hence the default is two-level)."""
        if TMA:
            vt = Vd.load([(bh * D).to(tl.int32), start_n])
        else:
            vt = tl.load(Vd + (bh * D + offs_d[:, None]) * SKP + start_n + offs_n[None, :])
        if INTERPRET:
            p = _round_e4m3(p)
        p8 = p.to(tl.float8e4nv)
        p8 = tl.reshape(tl.permute(tl.reshape(p8, [p8.shape[0], BLOCK_N // 32, 2, 2, 4, 2]), (0, 1, 2, 4, 3, 5)),
                        [p8.shape[0], BLOCK_N])
        return tl.dot(p8, tl.trans(vt), acc)

    @triton.jit
    def _rowsum_fp8(p8, ones8):
        """Row sums of the e4m3 P on the tensor cores: ``p8 [BLOCK_M, BLOCK_N] @ ones [BLOCK_N, 16]``
        (fp32 accumulation from zero; all 16 columns equal). Replaces ``BLOCK_N - 1`` FADDs per row."""
        return tl.dot(p8, ones8)

    @triton.jit
    def _pv_16(acc, p, Vd, b, h, start_n, offs_n, offs_d, svb, svs, svh, S_K, D: tl.constexpr,
               BLOCK_N: tl.constexpr, INTERPRET: tl.constexpr, TMA: tl.constexpr, MASK: tl.constexpr):
        """``acc + P.V`` of one key block, P cast to V's (16-bit) dtype."""
        if TMA:
            v = tl.reshape(Vd.load([b.to(tl.int32), start_n, h, 0]), [BLOCK_N, D])
        elif MASK:
            v = tl.load(Vd + b * svb + h * svh + (start_n + offs_n)[:, None] * svs + offs_d[None, :],
                        mask=(start_n + offs_n)[:, None] < S_K, other=0.0)
        else:
            v = tl.load(Vd + b * svb + h * svh + (start_n + offs_n)[:, None] * svs + offs_d[None, :])
        if INTERPRET:  # Triton's interpreter multiplies bf16 tiles as raw bits: widen (after rounding P)
            return tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc)
        return tl.dot(p.to(v.dtype), v, acc)

    @triton.jit
    def _attn_kernel(Qd, Kd, Vd, QS, KS, VS, Corr, O, Lse,
                     svb, svs, svh, sob, sos, soh, S_Q, S_K, SQP, SKP, H,
                     D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     PV_FP8: tl.constexpr, RETURN_LSE: tl.constexpr, INTERPRET: tl.constexpr, TMA: tl.constexpr,
                     DEFER: tl.constexpr, ROWSUM_TC: tl.constexpr = False, INPLACE: tl.constexpr = False):
        """One ``BLOCK_M`` tile of queries of one (batch, head) against all keys.

        ``DEFER`` (FP8 P.V): a block's P.V dot is added to the accumulator one block later, inside an
        ``if`` (Triton then leaves the dot in flight across the next block's QK dot instead of waiting
        for it at once). ``ROWSUM_TC`` (FP8 P.V, not with ``DEFER``): the softmax row sums ``l`` are
        ``P8 @ ones`` on the tensor cores (the e4m3-rounded P, the same weights the P.V dot uses) instead
        of ``BLOCK_N - 1`` fp32 adds per row.
        """
        pid_m = tl.program_id(0)
        h = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        bh = b * H + h
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        if TMA:
            q = Qd.load([(bh * SQP + pid_m * BLOCK_M).to(tl.int32), 0])
        else:
            q = tl.load(Qd + (bh * SQP + offs_m[:, None]) * D + offs_d[None, :])
        qs = tl.load(QS + bh * SQP + offs_m)
        nbn = SKP // BLOCK_N
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
        n_full = (S_K // BLOCK_N) * BLOCK_N
        if ROWSUM_TC:  # the row sums come from the tensor cores: l_acc [BLOCK_M, 16], all columns equal
            ones8 = tl.full([BLOCK_N, 16], 1.0, tl.float32).to(tl.float8e4nv)
            l_acc = tl.zeros([BLOCK_M, 16], dtype=tl.float32)
        if PV_FP8 and DEFER:
            pv = tl.zeros([BLOCK_M, D], dtype=tl.float32)
            alpha = tl.full([BLOCK_M], 1.0, tl.float32)
            for start_n in range(0, n_full, BLOCK_N):
                s = _qk(q, Kd, bh, start_n, offs_n, offs_d, SKP, D, BLOCK_M, BLOCK_N, TMA)
                if start_n < S_K:  # always true; see the docstring
                    acc = acc * alpha[:, None] + pv
                p, l_i, m_i, alpha = _softmax(s, m_i, l_i, qs, KS, bh, start_n, offs_n, S_K, nbn, BLOCK_N, True, False)
                pv, p8 = _pv_fp8(p, Vd, bh, start_n, offs_n, offs_d, SKP, D, BLOCK_N, INTERPRET, TMA)
            acc = acc * alpha[:, None] + pv
        elif PV_FP8 and INPLACE:
            for start_n in range(0, n_full, BLOCK_N):
                s = _qk(q, Kd, bh, start_n, offs_n, offs_d, SKP, D, BLOCK_M, BLOCK_N, TMA)
                p, l_i, m_i, alpha = _softmax(s, m_i, l_i, qs, KS, bh, start_n, offs_n, S_K, nbn, BLOCK_N, True, False)
                if start_n < S_K:  # always true; see the docstring
                    acc = acc * alpha[:, None]
                acc = _pv_fp8_acc(acc, p, Vd, bh, start_n, offs_n, offs_d, SKP, D, BLOCK_N, INTERPRET, TMA)
        else:
            for start_n in range(0, n_full, BLOCK_N):
                s = _qk(q, Kd, bh, start_n, offs_n, offs_d, SKP, D, BLOCK_M, BLOCK_N, TMA)
                p, l_i, m_i, alpha = _softmax(s, m_i, l_i, qs, KS, bh, start_n, offs_n, S_K, nbn, BLOCK_N, PV_FP8,
                                              False, ROWSUM_TC)
                if PV_FP8:
                    pv, p8 = _pv_fp8(p, Vd, bh, start_n, offs_n, offs_d, SKP, D, BLOCK_N, INTERPRET, TMA)
                    acc = acc * alpha[:, None] + pv
                    if ROWSUM_TC:
                        l_acc = l_acc * alpha[:, None] + _rowsum_fp8(p8, ones8)
                else:
                    acc = _pv_16(acc * alpha[:, None], p, Vd, b, h, start_n, offs_n, offs_d, svb, svs, svh, S_K,
                                 D, BLOCK_N, INTERPRET, TMA, False)
        if n_full < S_K:
            s = _qk(q, Kd, bh, n_full, offs_n, offs_d, SKP, D, BLOCK_M, BLOCK_N, TMA)
            p, l_i, m_i, alpha = _softmax(s, m_i, l_i, qs, KS, bh, n_full, offs_n, S_K, nbn, BLOCK_N, PV_FP8, True,
                                          ROWSUM_TC)
            if PV_FP8:
                pv, p8 = _pv_fp8(p, Vd, bh, n_full, offs_n, offs_d, SKP, D, BLOCK_N, INTERPRET, TMA)
                acc = acc * alpha[:, None] + pv
                if ROWSUM_TC:
                    l_acc = l_acc * alpha[:, None] + _rowsum_fp8(p8, ones8)
            else:
                acc = _pv_16(acc * alpha[:, None], p, Vd, b, h, n_full, offs_n, offs_d, svb, svs, svh, S_K,
                             D, BLOCK_N, INTERPRET, TMA, True)
        if ROWSUM_TC:
            l_i = tl.max(l_acc, 1)
        out = acc / l_i[:, None]
        if PV_FP8:
            out = out * tl.load(VS + bh * D + offs_d)[None, :]
        m_ok = offs_m < S_Q
        tl.store(O + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=m_ok[:, None])
        if RETURN_LSE:
            corr = tl.load(Corr + bh * S_Q + offs_m, mask=m_ok, other=0.0)
            lse2 = m_i + tl.math.log2(l_i) + corr
            if PV_FP8:
                lse2 = lse2 - _LOG2_FP8_MAX
            tl.store(Lse + bh * S_Q + offs_m, lse2 * _LN2, mask=m_ok)


# Launch defaults, measured on one H200 (benchmarks/sage_tune.py, benchmarks/notes_sage.md): one warp
# group per program (block_m=64, num_warps=4), so that three programs share a multiprocessor and one's
# tensor-core work overlaps another's exp2 work (with block_m=128 / 8 warps the two warp groups of a
# program run in lockstep between Triton's barriers, and the kernel was ~25% slower).
_CONFIGS = {  # (pv_fp8, head_dim <= 64) -> config
    (True, False): {"block_m": 64, "block_n": 128, "num_warps": 4, "num_stages": 2, "q_group": 1, "defer": False,
                    "row_sum_tc": False, "pv_inplace": False},
    (True, True): {"block_m": 64, "block_n": 128, "num_warps": 4, "num_stages": 3, "q_group": 1, "defer": False,
                    "row_sum_tc": False, "pv_inplace": False},
    (False, False): {"block_m": 64, "block_n": 128, "num_warps": 4, "num_stages": 2, "q_group": 1, "defer": False,
                    "row_sum_tc": False, "pv_inplace": False},
    (False, True): {"block_m": 64, "block_n": 128, "num_warps": 4, "num_stages": 2, "q_group": 1, "defer": False,
                    "row_sum_tc": False, "pv_inplace": False},
}


def default_config(head_dim: int, pv_fp8: bool = True) -> dict[str, int]:
    """Launch defaults for a (padded) head dim and P.V mode: ``block_m``, ``block_n``, ``num_warps``,
    ``num_stages``, ``q_group`` (query rows per Q scale) and the FP8 loop variants ``defer``,
    ``row_sum_tc``, ``pv_inplace`` (see :func:`sage_attend`)."""
    return dict(_CONFIGS[(bool(pv_fp8), head_dim <= 64)])


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pv_fp8: bool | None) -> None:
    """Raise a clear error for anything :func:`sage_attention_triton` cannot compute exactly as documented."""
    if triton is None:
        raise RuntimeError("sage_attention_triton needs the `triton` package (pip install triton)")
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"q, k, v must be [B, S, H, D] with k, v alike; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on B, H or D")
    if q.dtype not in LOW_PRECISION or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"sage_attention_triton quantises bfloat16/float16 inputs (INT8 QK, FP8 or 16-bit PV); "
                        f"got q, k, v in {q.dtype}, {k.dtype}, {v.dtype}: cast them, or use a dense kernel for float32")
    if q.shape[3] > 128 or min(q.shape[1], k.shape[1], q.shape[0], q.shape[2]) == 0:
        raise ValueError(f"sage_attention_triton needs head dim <= 128 and non-empty tensors; got D={q.shape[3]}, "
                         f"S_q={q.shape[1]}, S_k={k.shape[1]} (head dim 256 and larger: use a dense kernel)")
    if q.device.type == "cuda":
        cc = torch.cuda.get_device_capability(q.device)
        need = (8, 9) if pv_fp8 else (8, 0)
        if cc < need:
            raise RuntimeError(f"sage_attention_triton with {'FP8' if pv_fp8 else '16-bit'} P.V needs compute "
                               f"capability >= {need[0]}.{need[1]}; this GPU is {cc[0]}.{cc[1]}")
    elif os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError(f"sage_attention_triton runs on CUDA (tensors are on {q.device}); TRITON_INTERPRET=1 for CPU")


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
    q_group: int | None = None,
    tma: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SageAttention2 (INT8 QK^T; FP8 or 16-bit PV), no mask, no causal, no dropout.

    Args:
        q: ``[B, S_q, H, D]`` float16 or bfloat16 on CUDA (or CPU under ``TRITON_INTERPRET=1``); any
            strides with a contiguous last dim (others are copied).
        k: ``[B, S_k, H, D]``, same dtype/device; ``S_k`` may differ from ``S_q``; any lengths >= 1.
        v: ``[B, S_k, H, D]``.
        scale: softmax scale; ``None`` means ``D ** -0.5``.
        return_lse: also return the natural-log LSE of the original scores ``scale * q . k``.
        pv_fp8: True: P and V in e4m3 (SageAttention2, needs sm89+); False: P in the input dtype times
            the input V (~1/3 of the FP8 error, no V pass, but slower than dense FA4 on Hopper); ``None``:
            FP8 where the GPU has FP8 tensor cores (sm89+) and in the interpreter, else 16-bit.
        block_m, block_n, num_warps, num_stages: launch tuning; ``None`` takes :func:`default_config`.
            ``block_n`` is also the K-scale granularity; powers of two, >= 16 (>= 32 for block_n on GPU).
        q_group: query rows per Q scale (a power of two dividing ``block_m``); ``None``: the default.
        tma: load tiles through TMA descriptors (sm90+); ``None``: where the GPU has TMA.

    Returns:
        ``(out, lse)``: ``out`` ``[B, S_q, H, D]`` in q's dtype; ``lse`` float32 ``[B, H, S_q]`` or ``None``.
        Head dims other than 32/64/128 are zero-padded to the next of those (a copy).
    """
    qz = sage_quantize(q, k, v, scale=scale, return_lse=return_lse, pv_fp8=pv_fp8, block_m=block_m,
                       block_n=block_n, q_group=q_group)
    return sage_attend(qz, num_warps=num_warps, num_stages=num_stages, tma=tma)


def sage_quantize(q, k, v, *, scale=None, return_lse=False, pv_fp8=None, block_m=None, block_n=None,
                  q_group=None) -> dict:
    """Steps 1-2 of the module docstring (K mean, INT8 Q/K, FP8 V): the inputs of :func:`sage_attend`.

    Arguments as :func:`sage_attention_triton`. Returns a dict of the quantized tensors (``q8``, ``k8``
    int8 ``[B, H, S_pad, D_pad]``; ``qs`` fp32 ``[B, H, S_q_pad]``; ``ks`` fp32 ``[B, H, S_k_pad / block_n]``;
    ``v8`` e4m3 ``[B, H, D_pad, S_k_pad]`` and ``vs`` fp32 ``[B, H, D_pad]`` for FP8 P.V, else the padded
    input ``v``; ``corr`` fp32 ``[B, H, S_q]`` when ``return_lse``) and the launch sizes.
    """
    if pv_fp8 is None:
        pv_fp8 = q.device.type != "cuda" or torch.cuda.get_device_capability(q.device) >= (8, 9)
    check_inputs(q, k, v, pv_fp8)
    bsz, s_q, heads, d = q.shape
    s_k = k.shape[1]
    interpret = q.device.type != "cuda"
    if scale is None:
        scale = d ** -0.5
    dp = 32 if d <= 32 else 64 if d <= 64 else 128
    if dp != d:
        q, k, v = (torch.nn.functional.pad(t, (0, dp - d)) for t in (q, k, v))
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    cfg = default_config(dp, pv_fp8)
    bm, bn = block_m or cfg["block_m"], block_n or cfg["block_n"]
    qg = q_group or cfg["q_group"]
    if any(x < 16 or x & (x - 1) for x in (bm, bn)) or bn < 32 or qg < 1 or qg & (qg - 1) or bm % qg:
        raise ValueError(f"block_m (>= 16), block_n (>= 32) must be powers of two and q_group a power of two "
                         f"dividing block_m; got {bm}, {bn}, {qg}")
    dev, f32 = q.device, torch.float32
    nbm, nbn = _cdiv(s_q, bm), _cdiv(s_k, bn)
    sqp, skp = nbm * bm, nbn * bn
    if bsz * heads * max(sqp, skp) * dp >= 2**31 or max(t.stride(0) * bsz for t in (q, k, v)) >= 2**31:
        raise ValueError(f"too large for one call (int32 tile coordinates): B={bsz}, S={max(s_q, s_k)}, H={heads}")

    # 1. K column sums (and max |V| for FP8) per key block -> exact mean_k (and v_scale) by a tiny torch sum.
    ksum = torch.empty((bsz, heads, nbn, dp), dtype=f32, device=dev)
    vmax = torch.empty((bsz, heads, nbn, dp), dtype=f32, device=dev) if pv_fp8 else ksum
    _stats_kernel[(nbn, heads, bsz)](k, v, ksum, vmax, k.stride(0), k.stride(1), k.stride(2),
                                     v.stride(0), v.stride(1), v.stride(2), s_k, heads,
                                     D=dp, BLK=bn, WANT_V=pv_fp8)
    mean_k = ksum.sum(dim=2) / s_k  # [B, H, D]
    # 2. K (+ V) and Q quantization, head-major and zero-padded to whole blocks.
    k8 = torch.empty((bsz, heads, skp, dp), dtype=torch.int8, device=dev)
    ks = torch.empty((bsz, heads, nbn), dtype=f32, device=dev)
    if pv_fp8:
        vs = vmax.amax(dim=2).clamp_min(1e-12) / FP8_MAX  # [B, H, D]
        v8 = torch.empty((bsz, heads, dp, skp), dtype=torch.float8_e4m3fn, device=dev)
    else:
        vs, v8 = ks, v
    _quant_kernel[(nbn, heads, bsz)](k, k8, ks, mean_k, ks, v, v8, vs,
                                     k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
                                     s_k, skp, heads, 1.0, D=dp, BLK=bn, QG=bn, IS_Q=False, WANT_CORR=False,
                                     WANT_V=pv_fp8, INTERPRET=interpret)
    q8 = torch.empty((bsz, heads, sqp, dp), dtype=torch.int8, device=dev)
    qs = torch.empty((bsz, heads, sqp), dtype=f32, device=dev)
    corr = torch.empty((bsz, heads, s_q), dtype=f32, device=dev) if return_lse else None
    _quant_kernel[(nbm, heads, bsz)](q, q8, qs, mean_k, qs if corr is None else corr, q, q8, qs,
                                     q.stride(0), q.stride(1), q.stride(2), 0, 0, 0,
                                     s_q, sqp, heads, scale * LOG2E, D=dp, BLK=bm, QG=qg, IS_Q=True,
                                     WANT_CORR=return_lse, WANT_V=False, INTERPRET=interpret)
    return {"q8": q8, "qs": qs, "k8": k8, "ks": ks, "v8": v8, "vs": vs, "corr": corr, "pv_fp8": pv_fp8,
            "shape": (bsz, s_q, s_k, heads, d, dp), "block_m": bm, "block_n": bn, "dtype": q.dtype,
            "interpret": interpret}


def sage_attend(qz: dict, *, num_warps: int | None = None, num_stages: int | None = None,
                tma: bool | None = None, defer: bool | None = None, row_sum_tc: bool | None = None,
                pv_inplace: bool | None = None, maxnreg: int | None = None,
                kernel=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Step 3-5: the attention kernel on :func:`sage_quantize`'s output; returns ``(out, lse | None)``.

    Variants of the FP8 P.V loop (``None``: :func:`default_config`; each measured in
    ``benchmarks/notes_sage.md``): ``defer`` (the P.V add one block later); ``row_sum_tc`` (the softmax
    row sums as ``P8 @ ones`` on the tensor cores: ``l`` then sums the e4m3-rounded P, the weights the
    P.V dot uses, and the LSE carries that rounding, up to ~7e-3 on random inputs); ``pv_inplace``
    (the FP8 dot accumulates into the running fp32 accumulator itself, one wgmma wait per block
    instead of two, but Hopper's FP8 MMA adds with reduced precision: 3x the rel L1 on video-like
    inputs). At most one of the three. On one H200 each is slower than the default (the first two
    need more registers than 3 programs per SM allow).
    ``maxnreg``: Triton's register cap per thread. ``kernel`` replaces ``_attn_kernel`` (same signature;
    ``benchmarks/sage_tune.py``'s probes).
    """
    bsz, s_q, s_k, heads, d, dp = qz["shape"]
    bm, bn, pv_fp8, interpret = qz["block_m"], qz["block_n"], qz["pv_fp8"], qz["interpret"]
    q8, k8, v = qz["q8"], qz["k8"], qz["v8"]
    sqp, skp = q8.shape[2], k8.shape[2]
    if tma is None:
        tma = not interpret and TensorDescriptor is not None and torch.cuda.get_device_capability(q8.device) >= (9, 0)
    if tma and TensorDescriptor is None:
        raise RuntimeError("tma=True needs triton.tools.tensor_descriptor (Triton >= 3.4)")
    cfg = default_config(dp, pv_fp8)
    launch = {"num_warps": num_warps or cfg["num_warps"], "num_stages": num_stages or cfg["num_stages"]}
    defer = cfg["defer"] if defer is None else defer
    row_sum_tc = cfg["row_sum_tc"] if row_sum_tc is None else row_sum_tc
    pv_inplace = cfg["pv_inplace"] if pv_inplace is None else pv_inplace
    if (row_sum_tc or pv_inplace) and not pv_fp8:
        raise ValueError("row_sum_tc and pv_inplace are variants of the FP8 P.V loop (pv_fp8=True)")
    if defer + row_sum_tc + pv_inplace > 1:
        raise ValueError(f"at most one of defer, row_sum_tc, pv_inplace; got {defer}, {row_sum_tc}, {pv_inplace}")
    if maxnreg is not None:
        launch["maxnreg"] = maxnreg
    if tma and not pv_fp8 and (v.data_ptr() % 16 or any(st * v.element_size() % 16 for st in v.stride()[:3])):
        v = v.contiguous()  # TMA needs 16-byte aligned rows
    dev, f32 = q8.device, torch.float32
    out = torch.empty((bsz, s_q, heads, dp), dtype=qz["dtype"], device=dev)
    return_lse = qz["corr"] is not None
    lse = torch.empty((bsz, heads, s_q), dtype=f32, device=dev) if return_lse else qz["qs"]
    if tma:
        qd = TensorDescriptor(q8, [bsz * heads * sqp, dp], [dp, 1], [bm, dp])
        kd = TensorDescriptor(k8, [bsz * heads * skp, dp], [dp, 1], [bn, dp])
        if pv_fp8:
            vd = TensorDescriptor(v, [bsz * heads * dp, skp], [skp, 1], [dp, bn])
        else:  # the input V itself, [B, S, H, D]; rows past S_k read as zeros
            vd = TensorDescriptor(v, list(v.shape), list(v.stride()), [1, bn, 1, dp])
    else:
        qd, kd, vd = q8, k8, v
    sv = (0, 0, 0) if pv_fp8 else v.stride()[:3]
    (kernel or _attn_kernel)[(sqp // bm, heads, bsz)](
        qd, kd, vd, qz["qs"], qz["ks"], qz["vs"], qz["corr"] if return_lse else lse, out, lse, *sv,
        out.stride(0), out.stride(1), out.stride(2), s_q, s_k, sqp, skp, heads,
        D=dp, BLOCK_M=bm, BLOCK_N=bn, PV_FP8=pv_fp8, RETURN_LSE=return_lse, INTERPRET=interpret, TMA=tma, DEFER=defer,
        ROWSUM_TC=row_sum_tc, INPLACE=pv_inplace, **launch)
    if dp != d:
        out = out[..., :d]
    return out, (lse if return_lse else None)




def emulate_sage_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    block_n: int = 128,
    q_group: int = 1,
    pv_fp8: bool = True,
    return_lse: bool = False,
    dtype: torch.dtype = torch.float64,
):
    """The kernel's quantization scheme in plain torch (computed in ``dtype``): the error floor for tests.

    Same smoothing, INT8 groups (``q_group`` query rows, ``block_n`` key rows per scale) and rounding,
    FP8 V and P scaling (or P rounded to the input dtype) as the kernel, but P is rounded against each
    row's final max (the kernel: the running max), so the two agree statistically, not bitwise. Dense:
    memory ``O(B * H * S_q * S_k)``. Shapes as :func:`sage_attention_triton`.

    Returns:
        ``out`` ``[B, S_q, H, D]`` in ``dtype``; with ``return_lse``, ``(out, lse)`` where ``lse``
        ``[B, H, S_q]`` is the natural-log LSE of the INT8 scores plus the smoothing term (the kernel's
        LSE sees the INT8 error only: its fp32 ``l`` sums unrounded P).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    in_dtype = q.dtype
    q, k, v = (t.transpose(1, 2).to(dtype) for t in (q, k, v))  # [B, H, S, D]
    qq = q * (scale * LOG2E)
    mean_k = k.mean(dim=2, keepdim=True)
    s = int8_groups(qq, q_group) @ int8_groups(k - mean_k, block_n).transpose(-1, -2)  # log2 units
    m = s.amax(dim=-1, keepdim=True)
    if pv_fp8:
        p = torch.exp2(s - m) * FP8_MAX
        vs = v.abs().amax(dim=2, keepdim=True).clamp_min(1e-12) / FP8_MAX
        pv = e4m3_round(p) @ (e4m3_round(v / vs) * vs)
    else:
        p = torch.exp2(s - m)
        pv = p.to(in_dtype).to(dtype) @ v
    out = (pv / p.sum(dim=-1, keepdim=True)).transpose(1, 2)
    if not return_lse:
        return out
    lse2 = m.squeeze(-1) + torch.log2(torch.exp2(s - m).sum(dim=-1)) + (qq @ mean_k.transpose(-1, -2)).squeeze(-1)
    return out, lse2 * math.log(2.0)


def int8_groups(x: torch.Tensor, group: int) -> torch.Tensor:
    """Symmetric INT8 quantize-dequantize of ``x`` ``[B, H, S, D]`` with one scale per ``group`` rows along S.

    ``scale = max|x| / 127`` over the group (rows past S do not count), values rounded half away from
    zero; returns the dequantized values in ``x``'s dtype (the kernel's ``_int8_tile``).
    """
    n = x.shape[2]
    xb = torch.nn.functional.pad(x, (0, 0, 0, (-n) % group)).unflatten(2, (-1, group))
    s = xb.abs().amax(dim=(3, 4), keepdim=True).clamp_min(1e-20) / 127
    return (torch.trunc(xb / s + 0.5 * torch.sign(xb)) * s).flatten(2, 3)[:, :, :n]


def e4m3_round(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to float8 e4m3fn (round to nearest even, saturating at 448 is not needed here)."""
    return x.float().to(torch.float8_e4m3fn).to(x.dtype)


class SageTriton(AttentionBackend):
    """ditfleet's Triton SageAttention2 kernel: the ``sage_attn2`` kernel when ``sageattention`` is absent."""

    key = "sage_triton"
    description = "ditfleet Triton SageAttention2 kernel (INT8 QK, FP8 PV)"
    caps = Capabilities(
        lse=True, devices=frozenset({"cuda"}), dtypes=LOW_PRECISION, max_head_dim=128, min_compute_capability=(8, 9)
    )
    requires_modules = ("triton",)
    install_hint = "pip install 'ditfleet[triton]' (triton ships with PyTorch's CUDA wheels)"

    def _forward(self, q, k, v, *, scale, return_lse):
        return sage_attention_triton(q, k, v, scale=scale, return_lse=return_lse, pv_fp8=True)
