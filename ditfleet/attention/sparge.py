"""Sparge attention: a per-(batch, head) block mask predicted from q and k, and its two kernels.

The predictor (SpargeAttn, thu-ml; ``spas_sage_attn/utils.py::get_block_map_meansim`` with
``smooth_k`` as its CUDA entry points call it), rebuilt here from additive block statistics so
that it also runs on statistics gathered across ranks (ring / USP):

- queries are cut into blocks of ``block_q = 128`` tokens, keys into blocks of ``block_k = 64``;
  keys are first *smoothed*: the mean key over the (valid) sequence is subtracted
  (``smooth_k``; it shifts every score of a query block by the same amount, so it changes only
  the key blocks' self-similarity below, never the softmax);
- per block: the mean-pooled vector, and its *self-similarity*: the mean pairwise cosine of its
  rows, ``||sum_i x_i/|x_i| ||^2 / n^2`` (diagonal included, as SpargeAttn's Gram-matrix mean);
  a block is *similar* when that exceeds ``simthreshd1`` (per head);
- block scores: pooled q . pooled k * scale, non-similar key blocks excluded (``-inf``), softmax
  over key blocks;
- selection per query block: threshold mode keeps the largest-probability key blocks while their
  cumulative probability stays ``<= cdfthreshd`` (SpargeAttn's ``searchsorted(cdf, thr,
  right=True)``), at least one; ``cdfthreshd >= 1`` keeps every block (exactly dense, whatever the
  rounding of the cumulative sum). Top-k mode (``sparge_attn_setting.topk``, no checkpoint) keeps
  ``ceil(topk * n_key_blocks)`` blocks;
- always computed: every key block of a non-similar query block (its pooled vector does not
  represent it), every non-similar key block for every query, and the first key block (attention
  sink, SpargeAttn's ``attention_sink=True`` at inference); heads with ``is_sparse = 0`` are dense.

Deviations from SpargeAttn (documented, tested against an independent float64 oracle):
statistics, scores, softmax and cumulative sums are computed in float32 (float64 for float64
inputs; SpargeAttn: the input dtype, bf16 / fp16); the last, short block of a sequence uses its
real rows (SpargeAttn's Triton kernel loads the missing rows unmasked, which in practice makes that
block non-similar); a zero row has no direction and adds nothing to its block's similarity (it
adds a NaN in SpargeAttn); rows of the ``kv_lens`` padding take no part; top-k rounds up
(SpargeAttn truncates, then keeps at least one); and ``pvthreshd`` (SpargeAttn's in-kernel skip of
the P.V product for key blocks whose scores sit ``pvthreshd`` (log2 units) below the running
maximum) is used by the ``spas_sage_attn`` kernel only: the built-in kernel computes every selected
block exactly.

The predictor lives in :mod:`.sparge_predict`: torch (CPU, float64, the ring's gathered statistics)
and fused in two Triton kernels on CUDA (statistics; selection straight into FlashAttention-4's tile
lists), no host sync either way.

Kernels:

- :class:`SpargeFlex` (built in): the predictor plus a block-sparse kernel with per-(batch, head)
  masks: FlashAttention-4's block-sparse forward (:mod:`.fa4_sparse`, shared with radial) on sm90 for
  windows on the mask's grid (128 x 64 blocks are FA4 tiles of 128 x 64), ``flex_attention`` elsewhere
  (``from_kv_blocks``, 128 x 64 tiles; full tiles without ``mask_mod``, partial ones — only in
  unaligned ring windows — with the exact token predicate; compiled on CUDA, eager on CPU).
  Returns the LSE, so it runs under Ulysses, ring and USP (the ring computes the mask from
  gathered statistics: :func:`block_stats`, :func:`predict_from_stats`). Its tile
  (:attr:`~ditfleet.attention.base.AttentionBackend.seq_tile`) is the mask's block, so ring chunks
  aligned to it put every ring step on the mask's grid: FA4 runs each step on the grid's own tiles
  (no flex, no partial tile), with the ring's one LSE merge per step and no host sync (the mask stays
  on the device; the ring runs every real step, an empty one on an empty tile list).
- :class:`SpargeSpas`: ``spas_sage_attn.spas_sage2_attn_meansim_cuda`` (INT8 QK, FP8 PV) with the
  per-head tensors; no LSE, so Ulysses only.

A site's backend (what the registry builds) is not yet bound to a layer: the model binds one per
DiT block with :meth:`SpargeFlex.for_layer` (``None``: a dense layer), and Ulysses binds the heads
a rank holds with :meth:`SpargeFlex.for_heads`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .base import LOW_PRECISION, AttentionBackend, Capabilities
from .blockmask import BlockSparseMask, allowed_tokens
from .sparge_predict import BlockStats, _acc_dtype, block_counts, block_stats, key_sum, predict_from_stats

BLOCK_Q = 128  # SpargeAttn's query block
BLOCK_K = 64  # SpargeAttn's key block
TOPK_SIMTHRESHD1 = -0.1  # SpargeAttn's top-k entry points' default: nearly every block counts as similar
DEFAULT_PVTHRESHD = 20.0  # SpargeAttn's value when the PV threshold is not tuned
FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
PREDICTOR_IMPLS = ("auto", "torch", "triton")
_TRITON_BROKEN: list[str] = []  # set once the fused predictor failed under impl="auto" (then torch predicts)
KERNEL_IMPLS = ("auto", "fa4", "flex")
_NEG_INF = float("-inf")


# ------------------------------------------------------------------------------ parameters
def _per_head(value: Any, num_heads: int, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A scalar or ``[num_heads]`` value as a CPU tensor ``[num_heads]``."""
    t = torch.as_tensor(value).detach().to("cpu")
    if t.dim() == 0:
        t = t.expand(num_heads)
    if t.shape != (num_heads,):
        raise ValueError(f"{name}: expected a scalar or [{num_heads}] values, got shape {list(t.shape)}")
    return t.to(dtype).contiguous()


@dataclass(frozen=True, eq=False)
class SpargeParams:
    """One layer's per-head Sparge settings (CPU tensors ``[H]``).

    Attributes:
        is_sparse: bool ``[H]``: False heads run dense.
        simthreshd1: float32 ``[H]``: self-similarity threshold of q / k blocks.
        cdfthreshd: float32 ``[H]`` in [0, 1] (threshold mode), or ``None`` (top-k mode).
        topk: float32 ``[H]`` in (0, 1] (top-k mode), or ``None``.
        pvthreshd: float32 ``[H]`` >= 0: SpargeAttn's PV-skip threshold (``spas_sage_attn`` only).
        simthreshd2: float32 ``[H]``: kept for the checkpoint format (unused by SpargeAttn's kernels too).
        block_q, block_k: predictor blocks in tokens (SpargeAttn: 128, 64).
        sink: always compute the first key block.
        smooth_k: subtract the mean key before the key blocks' statistics.
    """

    is_sparse: torch.Tensor
    simthreshd1: torch.Tensor
    cdfthreshd: torch.Tensor | None
    topk: torch.Tensor | None
    pvthreshd: torch.Tensor
    simthreshd2: torch.Tensor
    block_q: int = BLOCK_Q
    block_k: int = BLOCK_K
    sink: bool = True
    smooth_k: bool = True
    _dev: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if (self.cdfthreshd is None) == (self.topk is None):
            raise ValueError("SpargeParams: set exactly one of cdfthreshd (threshold mode) and topk (top-k mode)")
        h = int(self.is_sparse.numel())
        for name in ("is_sparse", "simthreshd1", "cdfthreshd", "topk", "pvthreshd", "simthreshd2"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != (h,):
                raise ValueError(f"SpargeParams.{name}: shape {list(t.shape)}, expected [{h}]")
        if self.block_q < 1 or self.block_k < 1:
            raise ValueError(f"SpargeParams: block sizes must be >= 1, got {self.block_q}, {self.block_k}")

    # ---- construction
    @classmethod
    def thresholds(cls, num_heads: int, *, cdfthreshd: Any, simthreshd1: Any, is_sparse: Any = True,
                   pvthreshd: Any = DEFAULT_PVTHRESHD, simthreshd2: Any = 0.0, **kw: Any) -> SpargeParams:
        """Threshold mode; every value a scalar (all heads) or ``[num_heads]``."""
        return cls(is_sparse=_per_head(is_sparse, num_heads, "is_sparse", torch.bool),
                   simthreshd1=_per_head(simthreshd1, num_heads, "simthreshd1"),
                   cdfthreshd=_per_head(cdfthreshd, num_heads, "cdfthreshd"), topk=None,
                   pvthreshd=_per_head(pvthreshd, num_heads, "pvthreshd"),
                   simthreshd2=_per_head(simthreshd2, num_heads, "simthreshd2"), **kw)

    @classmethod
    def topk_mode(cls, num_heads: int, topk: Any, *, simthreshd1: Any = TOPK_SIMTHRESHD1, **kw: Any) -> SpargeParams:
        """Top-k mode (``sparge_attn_setting.topk``): keep ``ceil(topk * n_key_blocks)`` key blocks per query block."""
        t = _per_head(topk, num_heads, "topk")
        if not bool(((t > 0) & (t <= 1)).all()):
            raise ValueError(f"topk must lie in (0, 1], got {t.tolist()}")
        return cls(is_sparse=torch.ones(num_heads, dtype=torch.bool),
                   simthreshd1=_per_head(simthreshd1, num_heads, "simthreshd1"), cdfthreshd=None, topk=t,
                   pvthreshd=torch.full((num_heads,), DEFAULT_PVTHRESHD), simthreshd2=torch.zeros(num_heads), **kw)

    @property
    def num_heads(self) -> int:
        return int(self.is_sparse.numel())

    @property
    def mode(self) -> str:
        return "topk" if self.topk is not None else "threshold"

    def select_heads(self, start: int, stop: int) -> SpargeParams:
        """The settings of heads ``[start, stop)``; heads at or past ``num_heads`` (Ulysses' zero padding) are dense."""
        if not 0 <= start <= stop:
            raise ValueError(f"select_heads: need 0 <= start <= stop, got {start}, {stop}")
        h = self.num_heads
        idx = torch.arange(start, stop)
        real = idx < h
        src = idx.clamp(max=max(h - 1, 0))

        def pick(t: torch.Tensor | None, pad: Any) -> torch.Tensor | None:
            if t is None:
                return None
            return torch.where(real, t[src], torch.as_tensor(pad, dtype=t.dtype))

        return dataclasses.replace(
            self, is_sparse=pick(self.is_sparse, False), simthreshd1=pick(self.simthreshd1, 1.0),
            cdfthreshd=pick(self.cdfthreshd, 1.0), topk=pick(self.topk, 1.0), pvthreshd=pick(self.pvthreshd, DEFAULT_PVTHRESHD),
            simthreshd2=pick(self.simthreshd2, 0.0), _dev={})

    def on(self, device: torch.device) -> dict[str, torch.Tensor | None]:
        """The per-head tensors on ``device`` (cached): ``is_sparse`` bool, the rest float32."""
        key = str(device)
        if key not in self._dev:
            self._dev[key] = {
                "is_sparse": self.is_sparse.to(device, torch.bool),
                **{n: (None if getattr(self, n) is None else getattr(self, n).to(device, torch.float32))
                   for n in ("simthreshd1", "cdfthreshd", "topk", "pvthreshd", "simthreshd2")},
            }
        return self._dev[key]

    def topk_counts(self, n_key_blocks: int, device: torch.device) -> torch.Tensor:
        """Top-k mode: key blocks each head keeps out of ``n_key_blocks``, int32 ``[H]`` on ``device`` (cached;
        computed on the CPU, so no device value is read). ``ceil(topk * n)`` with a small slack (a float32 0.3
        is 0.30000001: without it, 0.3 x 10 blocks would round up to 4), at least 1."""
        if self.topk is None:
            raise ValueError("topk_counts: threshold-mode settings have no top-k")
        key = ("topk_counts", int(n_key_blocks), str(device))
        if key not in self._dev:
            n = torch.ceil(self.topk.double() * n_key_blocks - 1e-3).to(torch.int64).clamp(1, n_key_blocks)
            self._dev[key] = n.to(torch.int32).to(device)
        return self._dev[key]

    def describe(self) -> str:
        sparse = int(self.is_sparse.sum())
        if self.topk is not None:
            return f"top-k {self.topk.tolist()} ({sparse}/{self.num_heads} heads sparse)"
        return (f"cdfthreshd {[round(x, 3) for x in self.cdfthreshd.tolist()]}, simthreshd1 "
                f"{[round(x, 3) for x in self.simthreshd1.tolist()]} ({sparse}/{self.num_heads} heads sparse)")


def predict_block_mask(q: torch.Tensor, k: torch.Tensor, params: SpargeParams, *, scale: float | None = None,
                       kv_lens: Sequence[int] | None = None, q_len: int | None = None, impl: str = "auto") -> BlockSparseMask:
    """Sparge's mask for whole sequences ``q`` ``[B, S_q, H, D]``, ``k`` ``[B, S_k, H, D]`` (one device / Ulysses).

    Args:
        params: the layer's settings for these ``H`` heads.
        scale: softmax scale; ``None``: ``D ** -0.5``.
        kv_lens: valid leading keys, the same for every batch element (self-attention: ``None`` or the
            unpadded length); they also bound the queries when ``S_q == S_k`` (self-attention).
        q_len: valid leading queries (default: as described above).
        impl: ``"auto"`` (the fused Triton predictor, :mod:`.sparge_predict`, for fp16 / bf16 / fp32 on CUDA;
            else torch), ``"triton"`` or ``"torch"`` (the statistics below, in float32 / float64). The Triton
            one also leaves FlashAttention-4's tile lists of the mask in its cache (no second pass).

    Returns:
        A root :class:`BlockSparseMask` over the valid ``q_len x k_len`` tokens, per (batch, head), blocks
        ``(block_q, block_k)``, on ``q``'s device. Use ``.sub(0, S_q, 0, S_k)`` to lay it over padded tensors.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k_len = _uniform_len(kv_lens, k.shape[1])
    if q_len is None:
        q_len = k_len if q.shape[1] == k.shape[1] else q.shape[1]
    if impl not in PREDICTOR_IMPLS:
        raise ValueError(f"sparge: predictor impl must be one of {PREDICTOR_IMPLS}, got {impl!r}")
    if impl != "torch":
        from .sparge_predict import predict_lists, triton_predictor_reasons

        why = triton_predictor_reasons(q.device, q.dtype)
        if impl == "triton" and why and not (q.device.type == "cpu" and _triton_interpreted()):
            raise ValueError(f"sparge: the Triton predictor cannot run here: {'; '.join(why)}")
        if impl == "triton" or not (why or _TRITON_BROKEN):
            from .fa4_sparse import seed_tile_lists

            try:
                blocks, cnt, idx = predict_lists(q, k, params, scale=scale, q_len=q_len, k_len=k_len)
            except Exception as e:  # noqa: BLE001 - "auto" never fails where the torch predictor works
                if impl == "triton":
                    raise
                _TRITON_BROKEN.append(f"{type(e).__name__}: {e}")
                warnings.warn(f"sparge: the fused Triton predictor failed, using the torch one from now on: "
                              f"{_TRITON_BROKEN[0][:500]}", RuntimeWarning, stacklevel=2)
            else:
                mask = BlockSparseMask.from_blocks(blocks, (params.block_q, params.block_k), q_len, k_len, device=q.device)
                seed_tile_lists(mask, q.device, cnt, idx)
                return mask
    mean = key_sum(k, length=k_len) / k_len if params.smooth_k else None
    qs = block_stats(q, params.block_q, length=q_len, fused=False)
    ks = block_stats(k, params.block_k, length=k_len, mean=mean, fused=False)
    blocks = predict_from_stats(qs, ks, params, scale=scale)
    return BlockSparseMask.from_blocks(blocks, (params.block_q, params.block_k), q_len, k_len, device=q.device)


def _triton_interpreted() -> bool:
    """Triton's CPU interpreter is on (``TRITON_INTERPRET=1``: CPU tests of the fused predictor)."""
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def sequence_parallel_mask(backend: _SpargeBase, q: torch.Tensor, k: torch.Tensor, *, q_offset: int, k_offset: int,
                           q_length: int, k_length: int, scale: float,
                           all_reduce: Callable[[torch.Tensor], object]) -> BlockSparseMask:
    """The global Sparge mask of a sequence split over ranks (ring attention; USP: over the ring group, on super-chunks).

    Every rank of the group calls this with its own chunks; ``all_reduce(t)`` must sum ``t`` in place
    over the group (``lambda t: torch.distributed.all_reduce(t, group=ring_group)``). Two collectives:
    the key sum (the mean ``smooth_k`` subtracts; ``[B, H, D]``), then one flat buffer with the
    query and key block statistics (``2 * B * H * D * (ceil(S / 128) + ceil(S / 64))`` floats). Every
    rank returns the same root mask over the real ``q_length x k_length`` tokens; ring steps run
    ``mask.sub(...)`` windows of it (``sequence_parallel_attention(..., block_mask=mask)``).

    Args:
        backend: the layer's bound Sparge backend (for USP: bound to this rank's heads, :meth:`for_heads`).
        q, k: this rank's chunks ``[B, S_local, H, D]`` (padding past the global end allowed).
        q_offset, k_offset: global position of their first token.
        q_length, k_length: real tokens of the global sequences.
        scale: softmax scale.
    """
    p = backend.params
    if p is None:
        raise ValueError(f"{backend.key}: a dense layer has no Sparge mask")
    mean = None
    if p.smooth_k:
        ksum = key_sum(k, offset=k_offset, length=k_length)
        all_reduce(ksum)
        mean = ksum / k_length
    qs, ks = backend.local_stats(q, k, q_offset=q_offset, k_offset=k_offset, q_length=q_length, k_length=k_length,
                                 k_mean=mean)
    parts = (qs.total, qs.unit, ks.total, ks.unit)
    flat = torch.cat([t.reshape(-1) for t in parts])
    all_reduce(flat)
    views, i = [], 0
    for t in parts:
        views.append(flat[i : i + t.numel()].view(t.shape))
        i += t.numel()
    qs = BlockStats(views[0], views[1], block_counts(q_length, p.block_q, q.device), p.block_q, q_length)
    ks = BlockStats(views[2], views[3], block_counts(k_length, p.block_k, k.device), p.block_k, k_length)
    return backend.mask_from_stats(qs, ks, scale=scale)


def _uniform_len(kv_lens: Sequence[int] | None, s_k: int) -> int:
    if kv_lens is None:
        return s_k
    lens = {int(n) for n in kv_lens}
    if len(lens) != 1:
        raise NotImplementedError(f"sparge: kv_lens must be the same for every batch element (self-attention), got {sorted(lens)}")
    n = lens.pop()
    if not 1 <= n <= s_k:
        raise ValueError(f"sparge: kv_lens must lie in [1, {s_k}], got {n}")
    return n


def head_sparsity(mask: BlockSparseMask) -> torch.Tensor:
    """Skipped fraction of token pairs per head, float64 ``[H]`` (mean over the batch), of a per-(batch, head) mask."""
    counts = mask.allowed_counts().double()
    area = mask.q_len * mask.k_len
    if counts.dim() == 0:
        return (1 - counts / area).reshape(1)
    return 1 - counts.mean(0) / area


# ------------------------------------------------------------------------------ kernels
def _lists(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected tiles per row as flex lists: counts int32 ``[B, H, NU]``, ascending indices int32 ``[B, H, NU, NV]``."""
    if sel.dim() == 2:
        sel = sel[None, None]
    cnt = sel.sum(-1, dtype=torch.int32)
    idx = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return cnt.contiguous(), idx.contiguous()


def flex_block_mask(mask: BlockSparseMask, device: torch.device, tile: tuple[int, int] | None = None):
    """The flex ``BlockMask`` of a (per-(batch, head) or shared) mask window, cached with its grid.

    Tiles default to the mask's blocks (128 x 64 for Sparge). Full tiles carry no ``mask_mod``;
    partial tiles (unaligned ring windows) apply the exact token predicate.
    """
    from torch.nn.attention.flex_attention import BlockMask

    from .radial import _flex_api

    device = torch.device(device)
    tile = mask.block_shape if tile is None else tile

    def build():
        full, partial = mask.kernel_blocks(tile[0], tile[1], device, real_rows=True)
        kv_cnt, kv_idx = _lists(partial)
        full_cnt, full_idx = _lists(full)
        prm = mask.token_params(device)
        padded, bs, q_off, k_off, q_lim, k_lim = (prm[n] for n in ("padded", "block_size", "q_off", "k_off", "q_lim", "k_lim"))
        if mask.lead_shape:
            def mask_mod(b, h, q_idx, kv_idx):
                return allowed_tokens(q_idx, kv_idx, padded=padded, block_size=bs, q_off=q_off, k_off=k_off,
                                      q_lim=q_lim, k_lim=k_lim, b=b, h=h)
        else:
            def mask_mod(b, h, q_idx, kv_idx):
                return allowed_tokens(q_idx, kv_idx, padded=padded, block_size=bs, q_off=q_off, k_off=k_off,
                                      q_lim=q_lim, k_lim=k_lim)

        kwargs = {"compute_q_blocks": False} if _flex_api()[2] else {}
        return BlockMask.from_kv_blocks(kv_cnt, kv_idx, full_cnt, full_idx, BLOCK_SIZE=tuple(tile), mask_mod=mask_mod,
                                        seq_lengths=(mask.q_len, mask.k_len), **kwargs)

    return mask._grid.cached(("flex", mask.key, tuple(tile), str(device)), build)


def _check_lead(mask: BlockSparseMask, q: torch.Tensor) -> None:
    if mask.lead_shape:
        mb, mh = mask.lead_shape
        if mb not in (1, q.shape[0]) or mh not in (1, q.shape[2]):
            raise ValueError(f"sparge: mask is per {mb} x {mh} (batch, head), q has {q.shape[0]} x {q.shape[2]}")


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockSparseMask, *, scale: float,
                     return_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Block-sparse attention through flex (compiled on CUDA, eager on CPU): ``[B, S, H, D]`` in,
    ``(out [B, S_q, H, D], lse float32 [B, H, S_q] | None)`` out; rows without any key get 0 / ``-inf``
    (padding rows past the window's real ones too)."""
    from .radial import no_key_rows, run_flex

    _check_lead(mask, q)
    out, lse = run_flex(q, k, v, flex_block_mask(mask, q.device), scale=scale, return_lse=return_lse)
    return no_key_rows(out, lse, mask.q_real)


def block_sparse_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks: torch.Tensor, block: tuple[int, int], *,
                      scale: float, chunk: int = 1024) -> torch.Tensor:
    """Plain-PyTorch block-sparse attention of a root map ``blocks`` bool ``[B, H, NQ, NK]`` (tuning on CPU, tests).

    Returns float32 (float64 for float64 inputs) ``[B, S_q, H, D]``; rows without keys are 0.
    """
    acc = _acc_dtype(q.dtype)
    bq, bk = block
    s_q, s_k = q.shape[1], k.shape[1]
    kt = k.transpose(1, 2).to(acc)
    vv = v.transpose(1, 2).to(acc)
    key_block = torch.arange(s_k, device=q.device) // bk
    out = torch.empty(q.shape[0], q.shape[2], s_q, q.shape[3], dtype=acc, device=q.device)
    for i in range(0, s_q, chunk):
        qq = q[:, i : i + chunk].transpose(1, 2).to(acc)
        rows = torch.arange(i, i + qq.shape[2], device=q.device) // bq
        allowed = blocks[:, :, rows][..., key_block]  # [B, H, c, S_k]
        s = torch.matmul(qq, kt.transpose(-1, -2)) * scale
        s = s.masked_fill(~allowed, _NEG_INF)
        m = torch.logsumexp(s, -1, keepdim=True)
        out[:, :, i : i + chunk] = torch.matmul(torch.exp(s - m).nan_to_num_(0.0), vv)
    return out.transpose(1, 2)


def _dense_backend(device: torch.device, dtype: torch.dtype) -> AttentionBackend:
    """The kernel ``torch_sdpa`` runs here (dense layers and heads-agnostic dense calls)."""
    from .registry import torch_sdpa_kernel

    return torch_sdpa_kernel(device, dtype)[1](device=device, dtype=dtype)


@dataclass
class _SpargeBase(AttentionBackend):
    """What both Sparge kernels share: per-layer binding, head slicing, the predictor path of ``forward``.

    ``params`` is the bound layer's settings (``None`` with ``bound``: a dense layer); an unbound
    instance (what the registry builds per site) refuses to run.
    """

    params: SpargeParams | None = None
    bound: bool = False
    _heads: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # for_heads views

    per_layer: ClassVar[bool] = True  # the model binds one instance per DiT block (for_layer)
    needs_global_mask: ClassVar[bool] = False  # under ring, the caller predicts on gathered statistics

    def for_layer(self, params: SpargeParams | None) -> _SpargeBase:
        """This kernel bound to one layer's settings; ``None``: the layer runs dense (absent from the checkpoint)."""
        if params is not None and not isinstance(params, SpargeParams):
            raise TypeError(f"{self.key}: for_layer takes SpargeParams or None, got {type(params).__name__}")
        return dataclasses.replace(self, params=params, bound=True)

    def for_heads(self, start: int, stop: int) -> _SpargeBase:
        """The same layer restricted to heads ``[start, stop)`` of its ``H`` (Ulysses ranks / head groups;
        indices ``>= H`` are Ulysses' zero-padded heads and run dense)."""
        self._require_bound()
        if self.params is None or (start, stop) == (0, self.params.num_heads):
            return self
        if (start, stop) not in self._heads:  # built once per head range (start-up cost, not per forward)
            self._heads[start, stop] = dataclasses.replace(self, params=self.params.select_heads(start, stop))
        return self._heads[start, stop]

    @property
    def predicts_mask(self) -> bool:
        """A bound sparse layer of a kernel that needs the whole sequences' mask (:class:`SpargeFlex`)."""
        return self.bound and self.params is not None and self.needs_global_mask

    def predict_sharded_mask(self, q, k, *, q_offset, k_offset, q_length, k_length, scale, all_reduce):
        """The layer's global mask from split sequences (ring / USP): :func:`sequence_parallel_mask`."""
        return sequence_parallel_mask(self, q, k, q_offset=q_offset, k_offset=k_offset, q_length=q_length,
                                      k_length=k_length, scale=scale, all_reduce=all_reduce)

    @functools.cached_property
    def dense(self) -> AttentionBackend:
        return _dense_backend(self.device, self.dtype)

    def _require_bound(self) -> None:
        if not self.bound:
            raise RuntimeError(f"{self.key}: this Sparge kernel is not bound to a DiT layer; the model must call "
                               "for_layer(params) once per block (ditfleet.attention.sparge_ckpt.layer_params)")

    def _check_heads(self, q: torch.Tensor) -> None:
        if self.params is not None and self.params.num_heads != q.shape[2]:
            raise ValueError(f"{self.key}: bound to {self.params.num_heads} heads but q has {q.shape[2]}; under Ulysses "
                             "bind the rank's heads with for_heads(start, stop)")

    def predict(self, q: torch.Tensor, k: torch.Tensor, *, scale: float | None = None,
                kv_lens: Sequence[int] | None = None) -> BlockSparseMask:
        """This layer's mask for whole sequences (see :func:`predict_block_mask`)."""
        self._require_bound()
        if self.params is None:
            raise ValueError(f"{self.key}: a dense layer has no Sparge mask")
        self._check_heads(q)
        return predict_block_mask(q, k, self.params, scale=scale, kv_lens=kv_lens)

    def mask_from_stats(self, q_stats: BlockStats, k_stats: BlockStats, *, scale: float) -> BlockSparseMask:
        """The global mask from gathered statistics (ring / USP): a root mask over the real global sequences."""
        self._require_bound()
        if self.params is None:
            raise ValueError(f"{self.key}: a dense layer has no Sparge mask")
        blocks = predict_from_stats(q_stats, k_stats, self.params, scale=scale)
        return BlockSparseMask.from_blocks(blocks, (self.params.block_q, self.params.block_k), q_stats.length,
                                           k_stats.length, device=blocks.device)

    def local_stats(self, q: torch.Tensor, k: torch.Tensor, *, q_offset: int, k_offset: int, q_length: int, k_length: int,
                    k_mean: torch.Tensor | None) -> tuple[BlockStats, BlockStats]:
        """This rank's partial statistics of its chunks (to all-reduce, then :meth:`mask_from_stats`)."""
        self._require_bound()
        p = self.params
        if p is None:
            raise ValueError(f"{self.key}: a dense layer has no Sparge mask")
        mean = k_mean if p.smooth_k else None
        return (block_stats(q, p.block_q, offset=q_offset, length=q_length),
                block_stats(k, p.block_k, offset=k_offset, length=k_length, mean=mean))


_FA4_REFUSED: dict[tuple, str] = {}  # (block_q, block_k, head dim, dtype) -> why FA4 refused it (then flex runs it)


@dataclass
class SpargeFlex(_SpargeBase):
    """Sparge attention, built in: the mask predictor plus a block-sparse kernel with per-(batch, head) masks.

    The kernel is FlashAttention-4's block-sparse forward where it runs (sm90, ``flash_attn.cute``,
    fp16 / bf16; the mask's ``block_q x block_k`` blocks are FA4's tiles, 128 x 64 by default) and
    the window falls on the mask's grid (whole sequences, Ulysses, ``kv_lens``); ``flex_attention``
    elsewhere (CPU, other GPUs, fp32, unaligned ring windows, shapes FA4 refuses). The predictor is the
    fused Triton one on CUDA (:mod:`.sparge_predict`), the torch one elsewhere. :attr:`runs` says
    which, and why. ``impl`` (``"auto"``, ``"fa4"``, ``"flex"``) forces a kernel (benchmarks, tests).

    Called without ``block_mask``, a bound sparse layer predicts its mask from the q / k it is given,
    which must then be whole sequences (one device, or Ulysses after its all-to-all); ``kv_lens``
    mark the padding of both keys and queries (self-attention). Called with ``block_mask`` (a ring
    step's window of the global mask from :meth:`mask_from_stats`), it runs that mask.
    """

    impl: str = "auto"

    key: ClassVar[str] = "sparge_flex"
    description: ClassVar[str] = ("Sparge attention, built-in mask predictor (fused Triton on CUDA) + FlashAttention-4 "
                                  "block-sparse kernel (sm90, flash_attn.cute), else flex_attention")
    caps: ClassVar[Capabilities] = Capabilities(lse=True, devices=frozenset({"cpu", "cuda"}), dtypes=FLOATS,
                                                max_head_dim=256, block_mask=True)
    install_hint: ClassVar[str] = "needs torch >= 2.5 (torch.nn.attention.flex_attention)"
    requires_modules: ClassVar[tuple[str, ...]] = ("torch.nn.attention.flex_attention",)
    needs_global_mask: ClassVar[bool] = True  # under ring, the caller predicts on gathered statistics

    def __post_init__(self) -> None:
        if self.impl not in KERNEL_IMPLS:
            raise ValueError(f"{self.key}: impl must be one of {KERNEL_IMPLS}, got {self.impl!r}")

    @property
    def seq_tile(self) -> tuple[int, int] | None:
        """The mask's ``(block_q, block_k)``: FA4's (and flex's) tile here; ``None`` for a bound dense layer.
        An unbound site kernel has SpargeAttn's 128 x 64 (what :meth:`for_layer` settings use)."""
        if not self.bound:
            return (BLOCK_Q, BLOCK_K)
        return None if self.params is None else (self.params.block_q, self.params.block_k)

    @classmethod
    def unavailable_reasons(cls, device, dtype):
        reasons = super().unavailable_reasons(device, dtype)
        if device.type == "cuda" and dtype == torch.float64:
            reasons.append("dtype float64 runs on the CPU only")
        return reasons

    @functools.cached_property
    def fa4_reasons(self) -> list[str]:
        """Why this instance does not run FA4 (empty when it does, for windows on the mask's grid)."""
        from .base import module_available
        from .fa4_sparse import fa4_block_sparse_reasons

        if self.impl == "flex":
            return ["impl='flex'"]
        if self.device.type != "cuda":
            return [f"FlashAttention-4 needs CUDA (device is {self.device.type})"]
        if self.dtype not in LOW_PRECISION:
            return [f"FlashAttention-4 takes fp16 / bf16, not {str(self.dtype).removeprefix('torch.')}"]
        if not module_available("flash_attn.cute"):
            return ["package `flash_attn.cute` is not installed (pip install flash-attn-4)"]
        # sm100 needs 256-row sparse blocks for more than 128 queries (two query stages); Sparge's are 128
        return fa4_block_sparse_reasons(self.device, archs=(9,))

    @property
    def runs(self) -> str:
        """What runs a sparse layer here: kernel and predictor, and why FA4 does not (if it does not)."""
        from .sparge_predict import triton_predictor_reasons

        pred = "fused Triton predictor" if not triton_predictor_reasons(self.device, self.dtype) else "torch predictor"
        if _TRITON_BROKEN:
            pred = f"torch predictor (the Triton one failed: {_TRITON_BROKEN[0][:200]})"
        if self.fa4_reasons:
            return f"flex_attention block-sparse kernel, {pred} (not FA4: {'; '.join(self.fa4_reasons)})"
        refused = "; ".join(f"{k[0]}x{k[1]} D={k[2]}: {why}" for k, why in _FA4_REFUSED.items())
        return (f"FlashAttention-4 block-sparse kernel (flex for unaligned ring windows), {pred}"
                + (f"; FA4 refused {refused}" if refused else ""))

    def forward(self, q, k, v, *, scale=None, kv_lens=None, return_lse=False, block_mask=None):
        self._require_bound()
        if block_mask is not None or self.params is None:
            if block_mask is not None and block_mask.lead_shape and kv_lens is not None and len({int(n) for n in kv_lens}) > 1:
                raise NotImplementedError(f"{self.key}: a per-batch mask with different kv_lens per batch element")
            return super().forward(q, k, v, scale=scale, kv_lens=kv_lens, return_lse=return_lse, block_mask=block_mask)
        self._check(q, k, v, kv_lens, return_lse)
        self._check_heads(q)
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        mask = predict_block_mask(q, k, self.params, scale=scale, kv_lens=kv_lens)
        window = mask if mask.shape == (q.shape[1], k.shape[1]) else mask.sub(0, q.shape[1], 0, k.shape[1])
        return super().forward(q, k, v, scale=scale, kv_lens=kv_lens, return_lse=return_lse, block_mask=window)

    __call__ = forward

    def _forward(self, q, k, v, *, scale, return_lse, block_mask: BlockSparseMask | None = None):
        if block_mask is None:
            return self.dense._forward(q, k, v, scale=scale, return_lse=return_lse)
        if not isinstance(block_mask, BlockSparseMask):
            raise TypeError(f"{self.key}: block_mask must be a BlockSparseMask, got {type(block_mask).__name__}")
        _check_lead(block_mask, q)
        refusal = (*block_mask.block_shape, q.shape[-1], q.dtype)
        if not self.fa4_reasons and refusal not in _FA4_REFUSED:
            from .fa4_sparse import fa4_window_attention

            try:
                res = fa4_window_attention(q, k, v, block_mask, scale=scale, return_lse=return_lse, key=self.key)
            except Exception as e:  # noqa: BLE001 - FA4 refused these blocks / head dim (or failed): flex from now on
                if self.impl == "fa4":
                    raise
                _FA4_REFUSED[refusal] = f"{type(e).__name__}: {e}"[:500]
                warnings.warn(f"{self.key}: FlashAttention-4 failed on {refusal[:3]} blocks x head dim, flex runs them "
                              f"from now on: {_FA4_REFUSED[refusal]}", RuntimeWarning, stacklevel=2)
                res = None
            if res is not None:
                return res
            if self.impl == "fa4" and refusal not in _FA4_REFUSED:
                raise ValueError(f"{self.key}: impl='fa4' but the window {block_mask} is not on the mask's grid")
        elif self.impl == "fa4":
            raise RuntimeError(f"{self.key}: impl='fa4' but FA4 cannot run: {'; '.join(self.fa4_reasons) or _FA4_REFUSED[refusal]}")
        return sparse_attention(q, k, v, block_mask, scale=scale, return_lse=return_lse)


@functools.lru_cache(maxsize=None)
def _spas_entry(topk: bool) -> tuple[Any, frozenset[str]] | None:
    """SpargeAttn's entry point for this GPU (SpargeAttn's own choice: SageAttention-2 kernels on sm >= 8.9)."""
    import spas_sage_attn

    major, minor = torch.cuda.get_device_capability()
    stem = "meansim_topk_cuda" if topk else "meansim_cuda"
    names = [f"spas_sage_attn_{stem}"]
    if 10 * major + minor >= 89:
        names.insert(0, f"spas_sage2_attn_{stem}")
    for name in names:
        fn = getattr(spas_sage_attn, name, None)
        if fn is not None:
            try:
                params = frozenset(inspect.signature(fn).parameters)
            except (TypeError, ValueError):
                params = frozenset()
            return fn, params
    return None


@dataclass
class SpargeSpas(_SpargeBase):
    """SpargeAttn's own CUDA kernels (``spas_sage_attn``: INT8 QK, FP8 PV, PV-skip by ``pvthreshd``) with per-head tensors.

    No LSE: Ulysses only. Heads with ``is_sparse = 0`` get ``cdfthreshd = 1, simthreshd1 = 1``
    (SpargeAttn's own encoding of a dense head). Calls SpargeAttn cannot take (fewer than 128
    queries, head dim not 64 / 128, top-k on a release without a top-k entry point) run the
    built-in predictor and kernel instead.
    """

    key: ClassVar[str] = "sparge_spas"
    description: ClassVar[str] = "SpargeAttn (spas_sage_attn: INT8 QK / FP8 PV, per-head tuned thresholds)"
    caps: ClassVar[Capabilities] = Capabilities(lse=False, devices=frozenset({"cuda"}), dtypes=LOW_PRECISION,
                                                max_head_dim=128, min_compute_capability=(8, 0))
    install_hint: ClassVar[str] = "build SpargeAttn from source: github thu-ml/SpargeAttn, pip install -e ."
    requires_modules: ClassVar[tuple[str, ...]] = ("spas_sage_attn",)
    needs_global_mask: ClassVar[bool] = False

    @functools.cached_property
    def builtin(self) -> SpargeFlex:
        return SpargeFlex(device=self.device, dtype=self.dtype, params=self.params, bound=True)

    def forward(self, q, k, v, *, scale=None, kv_lens=None, return_lse=False, block_mask=None):
        self._require_bound()
        if self.params is None:  # a dense layer
            return super().forward(q, k, v, scale=scale, kv_lens=kv_lens, return_lse=return_lse, block_mask=block_mask)
        self._check(q, k, v, kv_lens, return_lse)
        self._check_heads(q)
        n = _uniform_len(kv_lens, k.shape[1])
        if n == k.shape[1] or q.shape[1] != k.shape[1]:
            return super().forward(q, k, v, scale=scale, kv_lens=kv_lens, return_lse=return_lse, block_mask=block_mask)
        # self-attention with padding at the end: the padded queries take no part either
        out = torch.zeros_like(q)
        o, _ = super().forward(q[:, :n], k, v, scale=scale, kv_lens=kv_lens, return_lse=False, block_mask=block_mask)
        out[:, :n] = o
        return out, None

    __call__ = forward

    def _forward(self, q, k, v, *, scale, return_lse):
        if self.params is None:
            return self.dense._forward(q, k, v, scale=scale, return_lse=return_lse)
        p = self.params
        entry = _spas_entry(p.topk is not None)
        if q.shape[1] < 128 or q.shape[-1] not in (64, 128) or entry is None:
            out, _ = self.builtin.forward(q, k, v, scale=scale)
            return out, None
        fn, accepted = entry
        t = p.on(q.device)
        dense = ~t["is_sparse"]
        kwargs: dict[str, Any] = {"tensor_layout": "NHD", "scale": scale, "is_causal": False, "smooth_k": p.smooth_k,
                                  "simthreshd1": torch.where(dense, 1.0, t["simthreshd1"]), "pvthreshd": t["pvthreshd"],
                                  "attention_sink": p.sink}
        if p.topk is not None:
            kwargs.update(topk=torch.where(dense, 1.0, t["topk"]), cdfthreshd=None)
        else:
            kwargs["cdfthreshd"] = torch.where(dense, 1.0, t["cdfthreshd"])
        if accepted:
            kwargs = {k_: v_ for k_, v_ in kwargs.items() if k_ in accepted}
        out = fn(q.contiguous(), k.contiguous(), v.contiguous(), **kwargs)
        if isinstance(out, tuple):
            out = out[0]
        return out.to(q.dtype), None


def bind_layers(backend: AttentionBackend, params: Sequence[SpargeParams | None]) -> list[AttentionBackend]:
    """One bound backend per DiT block: ``params[i]`` for block ``i`` (``None``: dense)."""
    if not hasattr(backend, "for_layer"):
        raise TypeError(f"{backend.key} is not a Sparge kernel (it has no per-layer binding)")
    return [backend.for_layer(p) for p in params]


def describe_density(mask: BlockSparseMask) -> str:
    return f"sparsity {1 - mask.density:.3f} ({math.prod(mask.lead_shape) or 1} masks)"
