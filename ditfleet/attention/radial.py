"""Radial attention: a static O(n log n) block mask from spatio-temporal energy decay, and its kernels.

The mask (definition of mit-han-lab/radial-attention, ``radial_attn/attn_mask.py``,
``gen_log_mask_shrinked`` with ``model_type="wan"``), rebuilt here vectorised at block level; it knows
only ``frames x tokens_per_frame`` (a model turns its video into that grid, e.g.
:func:`ditfleet.models.wan.sites.wan_video_tokens`; which layer / step runs it is the model's attention
policy, :mod:`ditfleet.models.attention_policy`):

- tokens are frame-major: ``F`` latent frames of ``T`` tokens, ``S = F * T``;
- query frame ``i`` / key frame ``j`` at temporal distance ``d = |i - j|`` get a token mask over
  their ``T x T`` in-frame positions ``(r, c)``:

  * ``j == 0``: all ones (the first frame is an attention sink);
  * ``d == 0``: all ones; ``d == 1``: band ``|c - r| <= T // 2``;
  * ``d >= 2``: band ``|c - r| <= max(2**bitlen(T) / 2**bitlen(d) * decay_factor, block_size)``:
    the width halves each time ``d`` doubles, never below one block;
  * thinning of far pairs: with ``L = 2**bitlen(T) / 2**bitlen(d)``, if ``L < block_size`` the
    pair is kept only when ``d % int(block_size / L) == 0``;

- each pair's token mask is reduced to blocks of the global grid as the reference does: a block
  is set when, among its columns that hold any allowed pair, more than 60 % have more than a
  third of the block's rows allowed. Pairs are OR-ed.

Deviations (documented, tested): the reference hard-codes 128 as the thinning threshold (equal
to its block size; here it is ``block_size``); a pair's pattern covers every block its frames
touch (the reference's per-pair grid of ``ceil(T / block_size)`` blocks drops the last tokens of
a frame that straddles one block more: 480p density 0.3194 -> 0.3203, 720p unchanged, and the
last frame's tail would get no key at all); the grid has ``ceil(S / block_size)`` blocks
(the reference needs ``S`` to be a multiple of 128) and the short last block's "third of the
rows" counts its real rows; and the diagonal blocks are always set, so that every query keeps
at least one key.
The counting is analytic (per pair kind, cached), never a ``T x T`` tensor, so 61 frames x 3,600
tokens build in well under a second.

Kernels (both ``caps.block_mask``, both return the LSE, both dense when given no mask):

- :class:`RadialFlex`: ``torch.nn.attention.flex_attention`` with a ``BlockMask`` made by
  ``BlockMask.from_kv_blocks`` from :meth:`BlockSparseMask.kernel_blocks` (full tiles run without
  ``mask_mod``, partial tiles with the exact token predicate); compiled on CUDA, eager on CPU.
- :class:`RadialFA4`: FlashAttention-4's block-sparse forward (Hopper / Blackwell; the call lives in
  :mod:`ditfleet.attention.fa4_sparse`, shared with Sparge) on the full tiles; partial tiles (unaligned ring windows, Blackwell's 256-row tiles) go to flex and merge
  by LSE, so no CuTe ``mask_mod`` is needed.

Both declare their tile (:attr:`~ditfleet.attention.base.AttentionBackend.seq_tile`): ring chunks
aligned to it give windows cut into the whole sequence's tiles, so with the mask's blocks a multiple
of the tile (the default 128 on 128) no tile is partial and FA4 runs every step alone, with no flex
call and no extra LSE merge. Tiles are classified by their real query rows (``real_rows``): the
padding rows a sharded sequence ends with do not turn the last tile partial; they get ``out = 0``,
``lse = -inf`` afterwards (one slice).
"""

from __future__ import annotations

import functools
import inspect
import math
import re
import warnings
from typing import TYPE_CHECKING, Any

import torch

from .base import LOW_PRECISION, AttentionBackend, Capabilities
from .blockmask import BlockSparseMask, allowed_tokens
from .fa4_sparse import fa4_block_sparse_attention, fa4_block_sparse_reasons

if TYPE_CHECKING:  # config imports the attention registry; avoid a cycle at runtime
    from ..config import RadialAttnSetting

FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32})
CPU_DENSE_LOOKUP = 1 << 26  # token pairs up to which eager (CPU) flex gets a precomputed token table


# ------------------------------------------------------------------------------ mask definition
def window_width(d: int, tokens_per_frame: int, decay_factor: float, block_size: int) -> int:
    """Half-width (tokens) of the diagonal band of a frame pair at temporal distance ``d`` (``>= tokens_per_frame``: dense)."""
    if d == 0:
        return tokens_per_frame
    if d == 1:
        return tokens_per_frame // 2
    decay = 2 ** tokens_per_frame.bit_length() / 2 ** d.bit_length() * decay_factor
    return int(math.floor(max(decay, block_size)))


def pair_thinned(d: int, tokens_per_frame: int, block_size: int) -> bool:
    """True when a far frame pair at distance ``d`` is dropped by the reference's thinning."""
    length = 2 ** tokens_per_frame.bit_length() / 2 ** d.bit_length()
    if length >= block_size:
        return False
    return d % int(block_size / length) != 0


def _pair_blocks(ri: int, rj: int, width: int, t: int, bs: int, rows: tuple[int, ...]) -> torch.Tensor:
    """Block pattern of one frame pair, bool ``[len(rows), ceil((rj + t) / bs)]``: the blocks its two frames
    touch, the query frame starting ``ri`` and the key frame ``rj`` tokens into their first block, for
    the band ``|c - r| <= width`` (the reference's shrink rule).

    ``rows[a]``: tokens in block row ``a`` (``bs``, except in the sequence's short last block), the
    denominator of "more than a third of the block's rows".
    """
    a = torch.arange(len(rows), dtype=torch.int64)
    b = torch.arange((rj + t - 1) // bs + 1, dtype=torch.int64)
    r0 = (a * bs - ri).clamp(0, t)[:, None, None]  # in-frame rows of block row a: [r0, r1)
    r1 = ((a + 1) * bs - ri).clamp(0, t)[:, None, None]
    c = (b[:, None] * bs - rj + torch.arange(bs, dtype=torch.int64)[None, :])[None]  # in-frame columns, [1, nb, bs]
    valid = (c >= 0) & (c < t)
    count = (torch.minimum(r1, c + width + 1) - torch.maximum(r0, c - width)).clamp(min=0) * valid  # [na, nb, bs]
    high = (3 * count > torch.tensor(rows, dtype=torch.int64)[:, None, None]).sum(-1)  # columns > 1/3 dense
    nonzero = (count > 0).sum(-1)
    return 5 * high > 3 * nonzero  # high / nonzero > 0.6


@functools.lru_cache(maxsize=32)
def radial_block_mask(frames: int, tokens_per_frame: int, decay_factor: float = 0.2, block_size: int = 128) -> BlockSparseMask:
    """The radial mask of ``frames`` latent frames of ``tokens_per_frame`` tokens (cached).

    Returns:
        A root :class:`BlockSparseMask` over ``S = frames * tokens_per_frame`` queries and keys, grid
        ``ceil(S / block_size)`` squared (on the CPU; kernels move what they need).
    """
    f, t, bs = int(frames), int(tokens_per_frame), int(block_size)
    if f < 1 or t < 1 or bs < 1 or not decay_factor > 0:
        raise ValueError(f"radial mask needs frames, tokens_per_frame, block_size >= 1 and decay_factor > 0; "
                         f"got {frames}, {tokens_per_frame}, {block_size}, {decay_factor}")
    s = f * t
    nb = -(-s // bs)
    blocks = torch.zeros(nb, nb, dtype=torch.bool)
    patterns: dict[tuple, torch.Tensor] = {}
    for i in range(f):
        ri, a0 = (i * t) % bs, (i * t) // bs
        rows = tuple(min(bs, s - (a0 + a) * bs) for a in range((ri + t - 1) // bs + 1))
        for j in range(f):
            d = abs(i - j)
            if j == 0:
                w = t  # attention sink
            elif pair_thinned(d, t, bs):
                continue
            else:
                w = min(window_width(d, t, decay_factor, bs), t)
            rj, b0 = (j * t) % bs, (j * t) // bs
            key = (ri, rj, w, rows)
            if key not in patterns:
                patterns[key] = _pair_blocks(ri, rj, w, t, bs, rows)
            p = patterns[key]
            view = blocks[a0 : a0 + p.shape[0], b0 : b0 + p.shape[1]]
            view |= p[: view.shape[0], : view.shape[1]]
    diag = torch.arange(nb)
    blocks[diag, diag] = True
    return BlockSparseMask.from_blocks(blocks, bs, s)


def radial_mask_for(frames: int, tokens_per_frame: int, setting: RadialAttnSetting | Any) -> BlockSparseMask:
    """:func:`radial_block_mask` with ``setting``'s ``decay_factor`` and ``block_size``."""
    return radial_block_mask(int(frames), int(tokens_per_frame), float(setting.decay_factor), int(setting.block_size))


# ------------------------------------------------------------------------------ flex attention
@functools.lru_cache(maxsize=None)
def _flex_api() -> tuple[Any, bool, bool]:
    """``(flex_attention, accepts return_aux, from_kv_blocks accepts compute_q_blocks)``."""
    from torch.nn.attention import flex_attention as fa

    aux = "return_aux" in inspect.signature(fa.flex_attention).parameters
    qblocks = "compute_q_blocks" in inspect.signature(fa.BlockMask.from_kv_blocks).parameters
    return fa.flex_attention, aux, qblocks


FLEX_RECOMPILE_LIMIT = 64


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    """``flex_attention`` compiled (static shapes), with dynamo's recompile limit raised to
    :data:`FLEX_RECOMPILE_LIMIT`.

    Every distinct shape (heads per rank, ring window, batch) compiles once. Past dynamo's default limit
    of 8 the call silently falls back to eager flex, which materialises the ``S_q x S_k`` scores: seen
    on 4 x H100 when one process ran radial at 40 and 20 heads per rank for several video sizes (the
    run then crawled). Raising the limit is a process-wide dynamo setting, made once here.
    """
    import torch._dynamo

    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < FLEX_RECOMPILE_LIMIT:
            setattr(cfg, name, FLEX_RECOMPILE_LIMIT)
    return torch.compile(_flex_api()[0], dynamic=False)


def _lists(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected tiles per row as flex / FA4 lists: counts int32 ``[1, 1, NU]``, ascending indices int32 ``[1, 1, NU, NV]``."""
    cnt = sel.sum(-1, dtype=torch.int32)
    idx = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return cnt[None, None].contiguous(), idx[None, None].contiguous()


def flex_block_mask(mask: BlockSparseMask, device: torch.device, tile: tuple[int, int] = (128, 128), *, partial_only: bool = False):
    """The flex ``BlockMask`` of ``mask``'s window (cached per window, tile, device).

    Full tiles carry no ``mask_mod``; partial tiles apply :func:`allowed_tokens`. ``partial_only``
    leaves the full tiles out (the flex half of :class:`RadialFA4`).
    """
    from torch.nn.attention.flex_attention import BlockMask

    device = torch.device(device)

    def build():
        full, partial = mask.kernel_blocks(tile[0], tile[1], device, real_rows=True)
        kv_cnt, kv_idx = _lists(partial)
        full_cnt, full_idx = _lists(torch.zeros_like(full) if partial_only else full)
        p = mask.token_params(device)
        padded, bs, q_off, k_off, q_lim, k_lim = p["padded"], p["block_size"], p["q_off"], p["k_off"], p["q_lim"], p["k_lim"]

        if device.type == "cpu" and mask.q_len * mask.k_len <= CPU_DENSE_LOOKUP:
            # Eager flex evaluates mask_mod on every pair through four nested vmaps; one lookup into
            # the precomputed token table is ~4x cheaper there than the arithmetic predicate.
            table = mask.to_dense()

            def mask_mod(b, h, q_idx, kv_idx):
                return table[q_idx, kv_idx]
        else:
            def mask_mod(b, h, q_idx, kv_idx):
                return allowed_tokens(q_idx, kv_idx, padded=padded, block_size=bs, q_off=q_off, k_off=k_off,
                                      q_lim=q_lim, k_lim=k_lim)

        kwargs = {"compute_q_blocks": False} if _flex_api()[2] else {}
        return BlockMask.from_kv_blocks(kv_cnt, kv_idx, full_cnt, full_idx, BLOCK_SIZE=tile, mask_mod=mask_mod,
                                        seq_lengths=(mask.q_len, mask.k_len), **kwargs)

    return mask._grid.cached(("flex", mask.key, tile, str(device), partial_only), build)


def flex_masked_attention(q, k, v, mask: BlockSparseMask, *, scale: float, return_lse: bool,
                          tile: tuple[int, int] = (128, 128), partial_only: bool = False):
    """Block-sparse attention through flex: ``[B, S, H, D]`` in, ``(out [B, S_q, H, D], lse float32 [B, H, S_q] | None)``.

    Rows with no allowed key get ``out = 0`` and ``lse = -inf`` (padding rows past the window's real ones too).
    """
    out, lse = run_flex(q, k, v, flex_block_mask(mask, q.device, tile, partial_only=partial_only), scale=scale,
                        return_lse=return_lse)
    return no_key_rows(out, lse, mask.q_real)


def no_key_rows(out: torch.Tensor, lse: torch.Tensor | None, real: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows from ``real`` on (padding queries, run unmasked inside full tiles) set to ``out = 0``, ``lse = -inf``,
    in place: ``out`` ``[B, S_q, H, D]``, ``lse`` ``[B, H, S_q]`` or ``None``."""
    if real < out.shape[1]:
        out[:, real:] = 0
        if lse is not None:
            lse[:, :, real:] = float("-inf")
    return out, lse


def run_flex(q, k, v, block_mask, *, scale: float, return_lse: bool):
    """``flex_attention`` with a prepared ``BlockMask`` (compiled on CUDA, eager on CPU) on ``[B, S, H, D]`` tensors.

    Returns ``(out [B, S_q, H, D], lse float32 [B, H, S_q] | None)`` (natural log); shared by radial and sparge.
    """
    flex, has_aux, _ = _flex_api()
    fn = _compiled_flex() if q.device.type == "cuda" else flex
    bm = block_mask
    kwargs: dict[str, Any] = {}
    if return_lse:
        if has_aux:
            from torch.nn.attention.flex_attention import AuxRequest

            kwargs["return_aux"] = AuxRequest(lse=True)
        else:
            kwargs["return_lse"] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "flex_attention called without torch.compile" on CPU
        res = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=bm, scale=scale, **kwargs)
    if not return_lse:
        return res.transpose(1, 2), None
    out, aux = res
    lse = aux.lse if has_aux else aux
    return out.transpose(1, 2), lse.float()


def _dense_backend(device: torch.device, dtype: torch.dtype) -> AttentionBackend:
    """The kernel ``torch_sdpa`` runs here (what radial backends use for dense steps and layers)."""
    from .registry import torch_sdpa_kernel

    return torch_sdpa_kernel(device, dtype)[1](device=device, dtype=dtype)


def _check_mask(key: str, mask: BlockSparseMask) -> None:
    if not isinstance(mask, BlockSparseMask):
        raise TypeError(f"{key}: block_mask must be a BlockSparseMask, got {type(mask).__name__}")


class RadialFlex(AttentionBackend):
    """Radial (block-sparse) attention through ``flex_attention``: compiled on CUDA, eager on CPU."""

    key = "radial_flex"
    description = "radial attention, flex_attention block-sparse kernel"
    caps = Capabilities(lse=True, devices=frozenset({"cpu", "cuda"}), dtypes=FLOATS, max_head_dim=256, block_mask=True)
    install_hint = "needs torch >= 2.5 (torch.nn.attention.flex_attention)"
    requires_modules = ("torch.nn.attention.flex_attention",)
    tile: tuple[int, int] = (128, 128)

    @property
    def seq_tile(self) -> tuple[int, int]:
        return tuple(self.tile)

    @functools.cached_property
    def dense(self) -> AttentionBackend:
        return _dense_backend(self.device, self.dtype)

    def _forward(self, q, k, v, *, scale, return_lse, block_mask: BlockSparseMask | None = None):
        if block_mask is None:
            return self.dense._forward(q, k, v, scale=scale, return_lse=return_lse)
        _check_mask(self.key, block_mask)
        return flex_masked_attention(q, k, v, block_mask, scale=scale, return_lse=return_lse, tile=self.tile)


# ------------------------------------------------------------------------------ FlashAttention-4
def merge_partials(o1, l1, o2, l2) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact union of two attention results over disjoint key sets (``[B, S, H, D]`` outs, float32 ``[B, H, S]`` LSEs).

    A side with ``lse = -inf`` (no key) contributes nothing, whatever its output holds.
    """
    lse = torch.logaddexp(l1, l2)
    w1 = torch.exp(l1 - lse).nan_to_num_(nan=0.0).transpose(1, 2).unsqueeze(-1)
    w2 = torch.exp(l2 - lse).nan_to_num_(nan=0.0).transpose(1, 2).unsqueeze(-1)
    o1 = torch.where(w1 > 0, o1.float(), 0.0)
    o2 = torch.where(w2 > 0, o2.float(), 0.0)
    return o1 * w1 + o2 * w2, lse


class RadialFA4(AttentionBackend):
    """Radial attention on FlashAttention-4's block-sparse forward (sm90 / sm100), flex for partial tiles.

    FA4's block-sparse tiles: ``(q_stage * 128, 128)`` with ``q_stage = 2`` on sm100 when
    ``S_q > 128`` (its ``block_size`` must be a multiple of ``q_stage * tile_m`` by ``tile_n``). Tile
    lists are sorted ascending: FA4 applies the key-length bound to the first tile it processes,
    which is the last of each list, i.e. the highest key tile.
    """

    key = "radial_fa4"
    description = "radial attention, FlashAttention-4 block-sparse kernel"
    caps = Capabilities(lse=True, devices=frozenset({"cuda"}), dtypes=LOW_PRECISION, max_head_dim=256,
                        min_compute_capability=(9, 0), block_mask=True)
    install_hint = "pip install flash-attn-4"
    requires_modules = ("flash_attn.cute",)
    tile_n: int = 128
    tile_m: int = 128

    @classmethod
    def unavailable_reasons(cls, device, dtype):
        reasons = super().unavailable_reasons(device, dtype)
        if not reasons:
            reasons.extend(fa4_block_sparse_reasons(device))
        return reasons

    @functools.cached_property
    def dense(self) -> AttentionBackend:
        from .flash import FlashAttn4

        return FlashAttn4(device=self.device, dtype=self.dtype)

    @property
    def seq_tile(self) -> tuple[int, int]:
        """The tile of long query windows on this GPU (``(tile_m, tile_n)`` where no GPU is visible)."""
        if self.device.type != "cuda" or not torch.cuda.is_available():
            return (self.tile_m, self.tile_n)
        return self.tiles(1 << 30)

    def tiles(self, s_q: int) -> tuple[int, int]:
        """FA4's block-sparse tile ``(bq, bk)`` for ``s_q`` queries on this GPU (or what FA4 asked for last time)."""
        major = torch.cuda.get_device_capability(self.device)[0]
        q_stage = 2 if major == 10 and s_q > self.tile_m else 1
        bq, bk = q_stage * self.tile_m, self.tile_n
        learned = self.__dict__.get("_learned_tiles", {})
        return learned.get("bq", bq), learned.get("bk", bk)

    def _learn_tiles(self, err: ValueError) -> bool:
        """Adopt the tile sizes an FA4 block-size ``ValueError`` names (releases differ); False if it names none."""
        msg = str(err)
        learned = self.__dict__.setdefault("_learned_tiles", {})
        n = re.search(r"sparse_block_size\[1\]=(\d+)|BLOCK_SIZE_KV=(\d+)", msg)
        m = re.search(r"must be a multiple of (\d+)", msg)
        if n:
            learned["bk"] = int(n.group(1) or n.group(2))
        if m:
            learned["bq"] = int(m.group(1))
        return bool(n or m)

    def _plan(self, mask: BlockSparseMask, bq: int, bk: int, device: torch.device) -> dict:
        """FA4 tile lists of a window (cached with the mask: no per-call argsort or host sync)."""

        def build():
            full, partial = mask.kernel_blocks(bq, bk, device, real_rows=True)
            full_cnt, full_idx = _lists(full)
            no_tile = (full.sum(-1) == 0).repeat_interleave(bq)[: mask.q_len]  # rows FA4 computes nothing for
            no_tile[mask.q_real :] = False  # padding rows: set by no_key_rows (a slice, not a masked pass)
            return {"full_cnt": full_cnt, "full_idx": full_idx, "has_partial": bool(partial.any()),
                    "no_tile": no_tile if bool(no_tile.any()) else None}

        return mask._grid.cached(("fa4", mask.key, bq, bk, str(device)), build)

    def _forward(self, q, k, v, *, scale, return_lse, block_mask: BlockSparseMask | None = None):
        if block_mask is None:
            return self.dense._forward(q, k, v, scale=scale, return_lse=return_lse)
        _check_mask(self.key, block_mask)
        for attempt in range(2):
            bq, bk = self.tiles(q.shape[1])
            plan = self._plan(block_mask, bq, bk, q.device)
            try:
                out, lse = self._fa4(q, k, v, plan, (bq, bk), scale, return_lse or plan["has_partial"])
                break
            except ValueError as e:
                if attempt or not self._learn_tiles(e):
                    raise
        if plan["no_tile"] is not None:  # whatever FA4 left there: define it as "no key" (out 0, lse -inf)
            out = out.masked_fill(plan["no_tile"][None, :, None, None], 0.0)
            if lse is not None:
                lse = lse.masked_fill(plan["no_tile"][None, None, :], float("-inf"))
        if plan["has_partial"]:  # the rest, exactly, through flex; merged by LSE
            o2, l2 = flex_masked_attention(q, k, v, block_mask, scale=scale, return_lse=True, tile=(bq, bk), partial_only=True)
            merged, lse = merge_partials(out, lse, o2, l2)
            out = merged.to(q.dtype)
        out, lse = no_key_rows(out, lse, block_mask.q_real)  # padding rows FA4 ran inside full tiles
        return out, (lse if return_lse else None)

    def _fa4(self, q, k, v, plan: dict, block: tuple[int, int], scale: float, need_lse: bool):
        return fa4_block_sparse_attention(q, k, v, full_cnt=plan["full_cnt"], full_idx=plan["full_idx"], block=block,
                                          scale=scale, return_lse=need_lse, key=self.key)
