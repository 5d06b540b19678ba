"""Sparge's mask predictor: the block statistics and the selection rule, in torch and fused in Triton.

The rule is described in :mod:`.sparge`. Two implementations:

- torch (:func:`block_stats`, :func:`predict_from_stats`): the CPU path, float64 inputs, and the ring /
  USP path (additive statistics that ranks all-reduce; on CUDA :func:`block_stats` gathers them with
  the Triton statistics kernel below).
- fused, on CUDA (:func:`predict_lists`), in float32:

  1. :func:`triton_block_stats` (``_block_stats_kernel``), one program per (block, batch x head): reads
     the block's rows once, optionally subtracts the mean key (``smooth_k``), and writes either the
     additive sums :class:`BlockStats` holds (row sum, sum of unit rows) or, for whole sequences,
     the block's mean row and self-similarity directly. Rows at or past the sequence's length take
     no part. (Keys take two launches: their plain sums give the mean key first.)
  2. the block scores, pooled q . pooled k * scale: one batched matmul (cuBLAS) on ``[B, H, N, D]``.
  3. :func:`triton_select` (``_select_kernel``), one program per (query block, batch x head): masks
     the non-similar key blocks, softmax, sorts the probabilities (bitonic ``tl.sort``), picks top-k
     or the CDF prefix, adds the always-computed blocks (non-similar keys, a non-similar query block,
     the sink, dense heads), and writes the bool block map *and* FlashAttention-4's tile lists
     (count and ascending indices) in the same pass.

Ties in probability go to the lower key-block index, as the torch path's stable sort does. Nothing
is read back to the host: no ``.item()``, no sync; shapes come from host integers. The float64
oracle of the tests (``tests/test_sparge.py::oracle_map``) is independent of both.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # sparge imports this module
    from .sparge import SpargeParams

_NEG_INF = float("-inf")

TRITON_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})
ROW_CHUNK = 32  # rows per step of the statistics kernel


# ------------------------------------------------------------------------------ block statistics (torch: CPU, float64; the ring)
@dataclass
class BlockStats:
    """Additive statistics of one sequence's blocks over its global block grid.

    Partial statistics (one rank's tokens) of the same grid add up (``a + b``, or an all-reduce
    SUM of ``total`` and ``unit``) to the statistics of the union of their tokens.

    Attributes:
        total: ``[B, H, N, D]`` sum of the (smoothed) rows of each block, float32 (float64 for float64 inputs).
        unit: ``[B, H, N, D]`` sum of the rows normalised to unit length.
        count: int64 ``[N]`` rows counted per block (same device).
        block: block size in tokens.
        length: real tokens of the global sequence (``N = ceil(length / block)``).
    """

    total: torch.Tensor
    unit: torch.Tensor
    count: torch.Tensor
    block: int
    length: int

    def __add__(self, other: BlockStats) -> BlockStats:
        if (self.block, self.length, self.total.shape) != (other.block, other.length, other.total.shape):
            raise ValueError(f"BlockStats: cannot add grids {self.block}/{self.length}/{tuple(self.total.shape)} and "
                             f"{other.block}/{other.length}/{tuple(other.total.shape)}")
        return BlockStats(self.total + other.total, self.unit + other.unit, self.count + other.count, self.block, self.length)

    @property
    def num_blocks(self) -> int:
        return int(self.total.shape[2])

    def pooled(self) -> torch.Tensor:
        """Mean (smoothed) row per block ``[B, H, N, D]``."""
        return self.total / self.count.clamp(min=1).to(self.total.dtype)[:, None]

    def similarity(self) -> torch.Tensor:
        """Mean pairwise cosine of each block's rows ``[B, H, N]`` (diagonal included)."""
        n = self.count.clamp(min=1).to(self.unit.dtype)
        return self.unit.pow(2).sum(-1) / (n * n)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def key_sum(k: torch.Tensor, *, offset: int = 0, length: int | None = None) -> torch.Tensor:
    """Sum of the valid key rows of a (local) chunk ``[B, S, H, D]`` at global ``offset``: ``[B, H, D]`` float32/64.

    Under ring attention, the all-reduced sum divided by ``length`` is the mean key ``smooth_k`` subtracts.
    """
    length = offset + k.shape[1] if length is None else length
    n = max(0, min(k.shape[1], length - offset))
    return k[:, :n].sum(1, dtype=_acc_dtype(k.dtype))


def block_stats(x: torch.Tensor, block: int, *, offset: int = 0, length: int | None = None,
                mean: torch.Tensor | None = None, fused: bool | None = None) -> BlockStats:
    """Statistics of the blocks of ``x`` over the global block grid of ``length`` tokens.

    Args:
        x: ``[B, S, H, D]`` tokens at global positions ``[offset, offset + S)`` (a rank's chunk, or the
            whole sequence); rows at or past ``length`` (padding) are left out.
        block: block size in tokens.
        offset: global position of ``x``'s first row (need not be block-aligned).
        length: real tokens of the global sequence; ``None``: ``offset + S``.
        mean: ``[B, H, D]`` subtracted from every row first (``smooth_k``), or ``None``.
        fused: gather them with the Triton kernel (:func:`triton_block_stats`, float32); ``None``: for
            fp16 / bf16 / fp32 on CUDA where Triton imports; ``False``: torch.

    Returns:
        :class:`BlockStats` over all ``ceil(length / block)`` blocks (zero where ``x`` has no row).
    """
    b, s, h, d = x.shape
    length = offset + s if length is None else int(length)
    if offset < 0 or length < 1 or block < 1:
        raise ValueError(f"block_stats: need offset >= 0, length >= 1, block >= 1; got {offset}, {length}, {block}")
    if fused is None:
        fused = x.is_cuda and x.dtype in TRITON_DTYPES and not triton_reasons()
    if fused:
        total, unit = triton_block_stats(x, block, offset=offset, length=length, mean=mean)
        return BlockStats(total, unit, _local_counts(x.shape[1], block, offset, length, x.device), block, length)
    acc = _acc_dtype(x.dtype)
    nblocks = -(-length // block)
    n = max(0, min(s, length - offset))  # valid local rows
    total = x.new_zeros((b, h, nblocks, d), dtype=acc)
    unit = torch.zeros_like(total)
    count = torch.zeros(nblocks, dtype=torch.int64, device=x.device)
    if n == 0:
        return BlockStats(total, unit, count, block, length)
    first, lead = offset // block, offset % block
    nloc = -(-(lead + n) // block)
    pad = (0, 0, 0, 0, lead, nloc * block - lead - n)
    hc = max(1, min(h, (1 << 26) // max(1, b * n * d)))  # heads per step: float32 temporaries stay ~256 MiB
    for h0 in range(0, h, hc):
        rows = x[:, :n, h0 : h0 + hc].to(acc)
        if mean is not None:
            rows = rows - mean[:, h0 : h0 + hc].to(acc)[:, None]
        norm = rows.norm(dim=-1, keepdim=True)
        units = torch.where(norm > 0, rows / norm.clamp(min=torch.finfo(acc).tiny), torch.zeros((), dtype=acc, device=x.device))
        for src, dst in ((rows, total), (units, unit)):  # [B, n, hc, D] -> [B, hc, nloc, D]
            folded = torch.nn.functional.pad(src, pad).view(b, nloc, block, src.shape[2], d).sum(2).permute(0, 2, 1, 3)
            dst[:, h0 : h0 + hc, first : first + nloc] = folded
        del rows, norm, units
    return BlockStats(total, unit, _local_counts(s, block, offset, length, x.device), block, length)


def _local_counts(s: int, block: int, offset: int, length: int, device) -> torch.Tensor:
    """Rows of a chunk of ``s`` rows at ``offset`` in each block of the ``length``-token grid: int64 ``[N]``."""
    nblocks = -(-length // block)
    n = max(0, min(s, length - offset))
    count = torch.zeros(nblocks, dtype=torch.int64, device=device)
    if n:
        first, nloc = offset // block, -(-(offset % block + n) // block)
        pos = torch.arange(first, first + nloc, device=device)
        lo = torch.clamp(pos * block, min=offset)
        hi = torch.clamp((pos + 1) * block, max=offset + n)
        count[first : first + nloc] = (hi - lo).clamp(min=0)
    return count


def predict_from_stats(q_stats: BlockStats, k_stats: BlockStats, params: SpargeParams, *, scale: float) -> torch.Tensor:
    """The block map from (global) block statistics: bool ``[B, H, NQ, NK]``, True = computed.

    Args:
        q_stats: query statistics (blocks of ``params.block_q``, no smoothing).
        k_stats: key statistics (blocks of ``params.block_k``, smoothed when ``params.smooth_k``).
        params: the layer's settings for exactly these ``H`` heads.
        scale: softmax scale of the block scores (the attention's).
    """
    b, h, nq, _ = q_stats.total.shape
    nk = k_stats.num_blocks
    if params.num_heads != h or k_stats.total.shape[1] != h:
        raise ValueError(f"sparge: settings for {params.num_heads} heads, statistics for {h} / {k_stats.total.shape[1]}")
    dev = q_stats.total.device
    p = params.on(dev)
    sim_thr = p["simthreshd1"].to(q_stats.total.dtype)[None, :, None]
    sim_q = q_stats.similarity() > sim_thr  # [B, H, NQ]
    sim_k = k_stats.similarity() > sim_thr.to(k_stats.total.dtype)  # [B, H, NK]
    score = torch.matmul(q_stats.pooled(), k_stats.pooled().transpose(-1, -2)) * scale  # [B, H, NQ, NK]
    score = score.masked_fill(~sim_k[:, :, None, :], _NEG_INF)
    prob = torch.softmax(score, dim=-1).nan_to_num_(0.0)  # a row of only non-similar keys: all computed anyway
    sorted_p, order = torch.sort(prob, dim=-1, descending=True, stable=True)
    if params.topk is not None:
        n_sel = params.topk_counts(nk, dev).to(torch.int64)[None, :, None].expand(b, h, nq)
    else:
        thr = p["cdfthreshd"].to(sorted_p.dtype)[None, :, None]
        cdf = torch.cumsum(sorted_p, dim=-1)
        n_sel = (cdf <= thr[..., None]).sum(-1)
        n_sel = torch.where(thr >= 1, torch.full_like(n_sel, nk), n_sel).clamp(min=1)
    keep_sorted = torch.arange(nk, device=dev)[None, None, None, :] < n_sel[..., None]
    sel = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    sel |= ~sim_k[:, :, None, :]
    sel |= ~sim_q[:, :, :, None]
    if params.sink:
        sel[..., 0] = True
    sel |= ~p["is_sparse"][None, :, None, None]
    return sel


def block_counts(length: int, block: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Rows per block of a ``length``-token sequence in blocks of ``block``: int64 ``[ceil(length / block)]``."""
    n = -(-length // block)
    start = torch.arange(n, device=device) * block
    return torch.clamp(length - start, max=block).to(torch.int64)



# ------------------------------------------------------------------------------ fused (Triton)
@functools.lru_cache(maxsize=None)
def triton_reasons() -> tuple[str, ...]:
    """Why the Triton predictor cannot be built here (empty when it can)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return (f"cannot import triton: {type(e).__name__}: {e}",)
    return ()


def triton_predictor_reasons(device: torch.device, dtype: torch.dtype) -> list[str]:
    """Why :func:`predict_lists` cannot run for ``device`` / ``dtype`` (empty when it can)."""
    reasons = list(triton_reasons())
    if torch.device(device).type != "cuda":
        reasons.append("the fused predictor runs on CUDA (Triton)")
    if dtype not in TRITON_DTYPES:
        reasons.append(f"the fused predictor takes fp16 / bf16 / fp32, not {dtype}")
    return reasons


@functools.lru_cache(maxsize=None)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def _block_stats_kernel(x_ptr, mean_ptr, out_a_ptr, out_b_ptr, s_b, s_s, s_h, n_heads, n_rows, offset, first,
                            block, n_blocks, D: tl.constexpr, DP: tl.constexpr, RB: tl.constexpr,
                            HAS_MEAN: tl.constexpr, WANT_UNIT: tl.constexpr, FINAL: tl.constexpr):
        j = tl.program_id(0)  # local block
        bh = tl.program_id(1)
        b = bh // n_heads
        h = bh % n_heads
        gblock = first + j
        lo = tl.maximum(gblock * block - offset, 0)  # local rows [lo, hi) of this block
        hi = tl.minimum((gblock + 1) * block - offset, n_rows)
        d = tl.arange(0, DP)
        dmask = d < D
        base = x_ptr + b.to(tl.int64) * s_b + h.to(tl.int64) * s_h
        if HAS_MEAN:
            mu = tl.load(mean_ptr + bh.to(tl.int64) * D + d, mask=dmask, other=0.0)
        total = tl.zeros([DP], dtype=tl.float32)
        unit = tl.zeros([DP], dtype=tl.float32)
        for r0 in range(lo, hi, RB):
            r = r0 + tl.arange(0, RB)
            rmask = r < hi
            m2 = rmask[:, None] & dmask[None, :]
            x = tl.load(base + r.to(tl.int64)[:, None] * s_s + d[None, :], mask=m2, other=0.0).to(tl.float32)
            if HAS_MEAN:
                x = tl.where(m2, x - mu[None, :], 0.0)
            total += tl.sum(x, axis=0)
            if WANT_UNIT:
                nrm = tl.sqrt(tl.sum(x * x, axis=1))
                inv = tl.where(nrm > 0, 1.0 / tl.where(nrm > 0, nrm, 1.0), 0.0)
                unit += tl.sum(x * inv[:, None], axis=0)
        o = bh.to(tl.int64) * n_blocks + gblock
        n = tl.maximum(hi - lo, 1).to(tl.float32)
        if FINAL:  # mean row [.., N, D] and self-similarity [.., N]
            tl.store(out_a_ptr + o * D + d, total / n, mask=dmask)
            tl.store(out_b_ptr + o, tl.sum(unit * unit, axis=0) / (n * n))
        else:  # additive sums
            tl.store(out_a_ptr + o * D + d, total, mask=dmask)
            if WANT_UNIT:
                tl.store(out_b_ptr + o * D + d, unit, mask=dmask)

    @triton.jit
    def _select_kernel(score_ptr, simq_ptr, simk_ptr, thr_ptr, sparse_ptr, cdf_ptr, nsel_ptr, sel_ptr, cnt_ptr,
                       idx_ptr, n_heads, nq, nk, NKP: tl.constexpr, TOPK: tl.constexpr, SINK: tl.constexpr):
        a = tl.program_id(0)  # query block
        bh = tl.program_id(1)
        h = bh % n_heads
        row = bh.to(tl.int64) * nq + a
        c = tl.arange(0, NKP)
        valid = c < nk
        thr = tl.load(thr_ptr + h)
        s = tl.load(score_ptr + row * nk + c, mask=valid, other=float("-inf"))
        simk_v = tl.load(simk_ptr + bh.to(tl.int64) * nk + c, mask=valid, other=0.0)
        simk = valid & (simk_v > thr)
        lone_k = valid & (simk_v <= thr)  # non-similar key blocks: always computed
        lone_q = tl.load(simq_ptr + row) <= thr  # a non-similar query block: every key block computed
        s = tl.where(simk, s, float("-inf"))
        m = tl.max(s, axis=0)
        e = tl.where(s > float("-inf"), tl.exp(s - tl.where(m > float("-inf"), m, 0.0)), 0.0)
        z = tl.sum(e, axis=0)
        p = tl.where(valid, e / tl.where(z > 0, z, 1.0), -1.0)  # padding sorts last
        srt = tl.sort(p, descending=True)
        if TOPK:
            n_sel = tl.load(nsel_ptr + h)
        else:
            cthr = tl.load(cdf_ptr + h)
            cdf = tl.cumsum(tl.maximum(srt, 0.0), axis=0)
            n_sel = tl.sum(((cdf <= cthr) & valid).to(tl.int32), axis=0)
            n_sel = tl.where(cthr >= 1.0, nk, n_sel)
            n_sel = tl.maximum(n_sel, 1)
        pivot = tl.sum(tl.where(c == n_sel - 1, srt, 0.0), axis=0)  # n_sel-th largest probability
        above = valid & (p > pivot)
        tie = valid & (p == pivot)
        tie_rank = tl.cumsum(tie.to(tl.int32), axis=0) - 1  # ties go to the lower indices first
        sel = above | (tie & (tie_rank < n_sel - tl.sum(above.to(tl.int32), axis=0)))
        dense = (tl.load(sparse_ptr + h) == 0) | lone_q
        sel = sel | lone_k | (valid & dense)
        if SINK:
            sel = sel | (c == 0)
        seli = sel.to(tl.int32)
        tl.store(sel_ptr + row * nk + c, seli.to(tl.int8), mask=valid)
        tl.store(cnt_ptr + row, tl.sum(seli, axis=0))
        pos = tl.cumsum(seli, axis=0) - 1
        tl.store(idx_ptr + row * nk + pos, c, mask=seli > 0)

    return _block_stats_kernel, _select_kernel


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def triton_block_stats(x: torch.Tensor, block: int, *, offset: int = 0, length: int | None = None,
                       mean: torch.Tensor | None = None, final: bool = False, want_unit: bool = True
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Block statistics of ``x`` over the global grid of ``length`` tokens (one Triton launch).

    Args:
        x: ``[B, S, H, D]`` (fp16 / bf16 / fp32; the last dim contiguous) at global positions ``[offset, offset + S)``.
        block: block size in tokens.
        offset: global position of ``x``'s first row.
        length: real tokens of the global sequence (rows at or past it are left out); ``None``: ``offset + S``.
        mean: float32 ``[B, H, D]`` subtracted from every row first, or ``None``.
        final: write the block means and self-similarities instead of sums (whole sequences only).
        want_unit: also sum the unit rows (``False``: the row sums alone, e.g. for the mean key).

    Returns:
        ``final=False``: ``(total, unit)`` float32 ``[B, H, N, D]`` (``unit`` ``None`` without ``want_unit``),
        zero on blocks ``x`` has no row of; ``final=True``: ``(pooled [B, H, N, D], similarity [B, H, N])``.
        ``N = ceil(length / block)``.
    """
    stats_kernel, _ = _kernels()
    b, s, h, d = x.shape
    length = offset + s if length is None else int(length)
    if x.stride(-1) != 1:
        x = x.contiguous()
    nblocks = -(-length // block)
    n = max(0, min(s, length - offset))
    alloc = torch.empty if final else torch.zeros
    out_a = alloc((b, h, nblocks, d), dtype=torch.float32, device=x.device)
    if final:
        out_b = torch.empty((b, h, nblocks), dtype=torch.float32, device=x.device)
    else:
        out_b = torch.zeros_like(out_a) if want_unit else None
    if n == 0:
        return out_a, out_b
    first = offset // block
    nloc = -(-(offset % block + n) // block)
    if final and (offset != 0 or nloc != nblocks):
        raise ValueError("triton_block_stats: final=True needs the whole sequence (offset 0)")
    mu = mean.to(torch.float32).contiguous() if mean is not None else out_a
    stats_kernel[(nloc, b * h)](
        x, mu, out_a, out_a if out_b is None else out_b, x.stride(0), x.stride(1), x.stride(2), h, n, offset, first,
        block, nblocks, D=d, DP=_next_pow2(d), RB=ROW_CHUNK, HAS_MEAN=mean is not None, WANT_UNIT=want_unit or final,
        FINAL=final, num_warps=4)
    return out_a, out_b


def triton_select(score: torch.Tensor, sim_q: torch.Tensor, sim_k: torch.Tensor, t: dict, *, n_sel: torch.Tensor | None,
                  sink: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Sparge selection of every query block from its block scores (one Triton launch).

    Args:
        score: float32 ``[B, H, NQ, NK]`` pooled q . pooled k * scale (contiguous).
        sim_q: float32 ``[B, H, NQ]``; sim_k: float32 ``[B, H, NK]`` block self-similarities.
        t: the layer's per-head tensors on the device (:meth:`SpargeParams.on`): ``simthreshd1``,
            ``is_sparse``, ``cdfthreshd`` (threshold mode).
        n_sel: int32 ``[H]`` blocks each head keeps in top-k mode (``None``: threshold mode).
        sink: always compute key block 0.

    Returns:
        ``(blocks, cnt, idx)``: bool ``[B, H, NQ, NK]`` (True = computed); int32 ``[B, H, NQ]`` computed
        blocks per query block; int32 ``[B, H, NQ, NK]`` their indices, ascending, in the first ``cnt``
        entries (FlashAttention-4's ``full_block_cnt`` / ``full_block_idx``).
    """
    _, select_kernel = _kernels()
    b, h, nq, nk = score.shape
    sel = torch.empty((b, h, nq, nk), dtype=torch.int8, device=score.device)
    cnt = torch.empty((b, h, nq), dtype=torch.int32, device=score.device)
    idx = torch.zeros((b, h, nq, nk), dtype=torch.int32, device=score.device)
    sparse = t["is_sparse"].to(torch.int32)
    thr = t["simthreshd1"]
    cdf = t["cdfthreshd"] if n_sel is None else thr
    nsel = n_sel if n_sel is not None else sparse
    nkp = _next_pow2(nk)
    select_kernel[(nq, b * h)](
        score.contiguous(), sim_q.contiguous(), sim_k.contiguous(), thr, sparse, cdf, nsel, sel, cnt, idx, h, nq, nk,
        NKP=nkp, TOPK=n_sel is not None, SINK=bool(sink), num_warps=4 if nkp <= 1024 else 8)
    return sel.view(torch.bool), cnt, idx


def predict_lists(q: torch.Tensor, k: torch.Tensor, params, *, scale: float, q_len: int, k_len: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparge's block map of whole sequences, fused (see the module docstring); no host sync.

    Args:
        q: ``[B, S_q, H, D]``; k: ``[B, S_k, H, D]`` (fp16 / bf16 / fp32, CUDA, or CPU under ``TRITON_INTERPRET=1``).
        params: the layer's :class:`~ditfleet.attention.sparge.SpargeParams` for these ``H`` heads.
        scale: softmax scale of the block scores.
        q_len, k_len: real leading queries / keys (the rest is padding and takes no part).

    Returns:
        ``(blocks, cnt, idx)`` as :func:`triton_select`: bool ``[B, H, ceil(q_len / block_q), ceil(k_len / block_k)]``
        and FlashAttention-4's tile lists of that map.
    """
    if params.num_heads != q.shape[2] or k.shape[2] != q.shape[2]:
        raise ValueError(f"sparge: settings for {params.num_heads} heads, q / k have {q.shape[2]} / {k.shape[2]}")
    bq, bk = params.block_q, params.block_k
    pooled_q, sim_q = triton_block_stats(q, bq, length=q_len, final=True)
    mean = None
    if params.smooth_k:
        ksum, _ = triton_block_stats(k, bk, length=k_len, want_unit=False)
        mean = ksum.sum(2) / k_len  # [B, H, D]: the mean valid key
    pooled_k, sim_k = triton_block_stats(k, bk, length=k_len, mean=mean, final=True)
    score = torch.matmul(pooled_q, pooled_k.transpose(-1, -2)) * scale  # [B, H, NQ, NK] float32
    n_sel = params.topk_counts(pooled_k.shape[2], q.device) if params.topk is not None else None
    return triton_select(score, sim_q, sim_k, params.on(q.device), n_sel=n_sel, sink=params.sink)
