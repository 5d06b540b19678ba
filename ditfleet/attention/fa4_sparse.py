"""FlashAttention-4's block-sparse forward (``flash_attn.cute``), shared by radial and Sparge attention.

FA4 takes per-(batch, head) tile lists: for each query tile, how many key tiles to compute and which,
as ``full`` tiles (no mask inside the tile) and ``mask`` tiles (a CuTe ``mask_mod`` applies; not used
here: both callers send partial tiles elsewhere or have none). The lists must be in ascending key
order: FA4 walks each list from its end and applies the key-length bound to the first tile it
processes only, so the highest key tile (the one a short last block lives in) must come last.

Release differences are absorbed here: the installed ``flash_attn_func`` takes either one
``block_sparse_tensors`` (a ``BlockSparseTensorsTorch``, 4.0 betas) or the four lists as keywords,
and may or may not take ``block_size`` and ``return_lse``; each is inspected once.

Tiles on sm90 (read from FA4 4.0.0b36's ``interface.py``): the sparse block is ``(bq, bk)`` with
``bq`` a multiple of the kernel's ``tile_m`` (128 for head dim 128) and ``bk`` equal to the kernel's
``tile_n`` (FA4 shrinks ``tile_n`` to ``bk`` when ``bk < 128`` and ``bk % 16 == 0``, so 128 x 64
Sparge blocks run 128 x 64 tiles). On sm100 ``bq`` must be a multiple of ``2 * 128`` for more than
128 queries (two query stages per CTA).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

FA4_ARCHS = (9, 10, 11)  # compute capability majors with FA4 block sparsity


@functools.lru_cache(maxsize=None)
def fa4_block_sparse_api() -> tuple[str | None, str]:
    """How the installed ``flash_attn.cute.flash_attn_func`` takes block sparsity: ``("tensors"|"kwargs"|None, why)``."""
    try:
        from flash_attn.cute import flash_attn_func
    except Exception as e:  # noqa: BLE001 - any import failure is a reason
        return None, f"cannot import flash_attn.cute: {type(e).__name__}: {e}"
    params = inspect.signature(flash_attn_func).parameters
    if "block_sparse_tensors" in params:
        return "tensors", ""
    if "full_block_cnt" in params and "mask_block_cnt" in params:
        return "kwargs", ""
    return None, "installed flash_attn.cute.flash_attn_func has no block-sparse arguments"


@functools.lru_cache(maxsize=None)
def _fa4_params() -> frozenset[str]:
    from flash_attn.cute import flash_attn_func

    return frozenset(inspect.signature(flash_attn_func).parameters)


def fa4_block_sparse_reasons(device: torch.device, archs: tuple[int, ...] = FA4_ARCHS) -> list[str]:
    """Why FA4's block-sparse forward cannot run on ``device`` (compute capability major in ``archs``); empty when it can."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return [f"FlashAttention-4 block sparsity needs a CUDA GPU (device is {device.type})"]
    major, minor = torch.cuda.get_device_capability(device)
    if major not in archs:
        names = " / ".join(f"sm{a}0" for a in archs)
        return [f"FlashAttention-4 block sparsity runs on {names} here (GPU is sm{major}{minor})"]
    api, why = fa4_block_sparse_api()
    return [] if api is not None else [why]


def tile_lists(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FA4 (and flex) tile lists of a tile map, on its device, without sorting or a host sync.

    Args:
        sel: bool ``[B, H, NU, NV]`` (or ``[NU, NV]``): tile ``(u, v)`` is computed.

    Returns:
        ``(cnt, idx)``: int32 ``[B, H, NU]`` selected tiles per row, and int32 ``[B, H, NU, NV]`` their
        column indices in ascending order in the first ``cnt`` entries (the rest are 0).
    """
    if sel.dim() == 2:
        sel = sel[None, None]
    sel = sel.to(torch.bool)
    nv = sel.shape[-1]
    cnt = sel.sum(-1, dtype=torch.int32)
    pos = torch.cumsum(sel, -1, dtype=torch.int32) - 1  # slot of each selected column
    pos = torch.where(sel, pos, nv)  # unselected columns go to a dump slot
    cols = torch.arange(nv, dtype=torch.int32, device=sel.device).expand_as(pos)
    idx = torch.zeros(*sel.shape[:-1], nv + 1, dtype=torch.int32, device=sel.device)
    idx.scatter_(-1, pos.to(torch.int64), cols)
    return cnt.contiguous(), idx[..., :nv].contiguous()


def fa4_block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, full_cnt: torch.Tensor,
                               full_idx: torch.Tensor, block: tuple[int, int], scale: float, return_lse: bool,
                               key: str = "fa4") -> tuple[torch.Tensor, torch.Tensor | None]:
    """FA4's block-sparse forward over the ``full`` tile lists (no ``mask_mod``).

    Args:
        q: ``[B, S_q, H, D]``; k, v: ``[B, S_k, H, D]`` (fp16 / bf16, CUDA).
        full_cnt: int32 ``[B|1, H|1, ceil(S_q / bq)]`` tiles per query tile.
        full_idx: int32 ``[B|1, H|1, ceil(S_q / bq), NV]`` ascending key-tile indices (``NV <= ceil(S_k / bk)``).
        block: the sparse block ``(bq, bk)`` in tokens (see the module docstring for what FA4 accepts).
        scale: softmax scale.
        return_lse: also return the float32 LSE ``[B, H, S_q]`` (natural log).
        key: the caller's kernel key, for messages.

    Returns:
        ``(out [B, S_q, H, D], lse | None)``. Query tiles with no key tile get ``out = 0``, ``lse = -inf``
        on sm90 (FA4 zeroes the accumulator of an empty tile); callers that need it elsewhere fill them.

    Raises:
        ValueError: from FA4, when it does not take these tiles (callers may adapt and retry).
        NotImplementedError: the installed FA4 has no block-sparse arguments.
    """
    from flash_attn.cute import flash_attn_func

    from .flash import _split_result

    api, why = fa4_block_sparse_api()
    if api is None:
        raise NotImplementedError(f"{key}: {why}")
    # no mask tiles: a count of zeros and a one-column (compact) index list, which FA4 accepts
    mask_cnt = torch.zeros_like(full_cnt)
    mask_idx = torch.zeros((*full_idx.shape[:-1], 1), dtype=torch.int32, device=full_idx.device)
    lists = {"mask_block_cnt": mask_cnt, "mask_block_idx": mask_idx, "full_block_cnt": full_cnt,
             "full_block_idx": full_idx}
    kwargs: dict[str, Any] = {"softmax_scale": scale, "causal": False}
    params = _fa4_params()
    if api == "tensors":
        from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

        if "block_size" in BlockSparseTensorsTorch._fields:
            lists["block_size"] = tuple(block)
        kwargs["block_sparse_tensors"] = BlockSparseTensorsTorch(**lists)
    else:
        kwargs.update(lists)
        if "block_size" in params:
            kwargs["block_size"] = tuple(block)
    if "return_lse" in params:
        kwargs["return_lse"] = return_lse
    return _split_result(flash_attn_func(q, k, v, **kwargs), return_lse, key)


# ------------------------------------------------------------------ tile lists of BlockSparseMask windows
def _lists_key(mask, device) -> tuple:
    return ("fa4_lists", mask.key, str(torch.device(device)))


def window_tile_lists(mask, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """FA4 full-tile lists of a :class:`~ditfleet.attention.blockmask.BlockSparseMask` window whose blocks are
    FA4's tiles, or ``None`` when the window does not fall on its grid.

    The window must start on a block boundary on both axes and hold only real keys
    (``k_start + k_len <= k_lim``: keys past the end are sliced off by ``kv_lens`` before a kernel
    sees them). Query rows past the window's real rows (``q_lim``) may exist: their tiles are
    listed as the grid has them (or empty past the grid) and the caller sets those rows to
    "no key". Tile ``(u, w)`` of the window is then grid block ``(q_start / bq + u, k_start / bk + w)``,
    whole (a short last block is the sequence's end, which FA4 bounds itself), so no tile is partial.

    Returns:
        ``(cnt int32 [B|1, H|1, NU], idx int32 [B|1, H|1, NU, NV])`` on ``device`` (cached with the grid; no host sync),
        ``NU = ceil(q_len / bq)``, ``NV = ceil(k_len / bk)``.
    """
    bq, bk = mask.block_shape
    if mask.q_len < 1 or mask.k_len < 1 or mask.q_start % bq or mask.k_start % bk:
        return None
    if mask.k_start + mask.k_len > mask.k_lim:
        return None
    device = torch.device(device)

    def build():
        a0, b0 = mask.q_start // bq, mask.k_start // bk
        nu, nv = -(-mask.q_len // bq), -(-mask.k_len // bk)
        blocks = mask.blocks.to(device)
        if blocks.dim() == 2:
            blocks = blocks[None, None]
        sub = blocks[..., a0 : a0 + nu, b0 : b0 + nv]
        if sub.shape[-2] < nu:  # query tiles past the grid (padding rows): no key tile
            sub = torch.nn.functional.pad(sub.to(torch.int8), (0, 0, 0, nu - sub.shape[-2]))
        return tile_lists(sub)

    return mask._grid.cached(_lists_key(mask, device), build)


def seed_tile_lists(mask, device: torch.device | str, cnt: torch.Tensor, idx: torch.Tensor) -> None:
    """Store the lists a predictor already built for root window ``mask`` (what :func:`window_tile_lists` returns)."""
    mask._grid.cached(_lists_key(mask, device), lambda: (cnt, idx))


def fa4_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, *, scale: float, return_lse: bool,
                         key: str = "fa4") -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Attention of ``q`` over ``k`` / ``v`` restricted to mask window ``mask`` on FA4's tiles, or ``None`` when the
    window does not fall on its grid (see :func:`window_tile_lists`; the caller then runs another kernel).

    ``mask``'s blocks are FA4's sparse blocks (``(block_q, block_k)``; per (batch, head) or shared).
    Rows the window leaves without any key get ``out = 0`` and ``lse = -inf``: rows past its real
    queries, and query tiles with an empty list in windows that cut the key range, are set so here
    (one masked fill on the device); in a window over all keys an empty list comes so from FA4 itself
    (sm90: an empty tile's accumulator is zeroed and its softmax reset, ``flash_fwd_sm90.py`` /
    ``softmax.finalize`` of 4.0.0b36; Sparge's own masks have no empty row there: the sink, and at
    least one block per query block).
    Shapes: q ``[B, S_q, H, D]``, k / v ``[B, S_k, H, D]`` with ``(S_q, S_k) == mask.shape``.
    """
    lists = window_tile_lists(mask, q.device)
    if lists is None:
        return None
    cnt, idx = lists
    out, lse = fa4_block_sparse_attention(q, k, v, full_cnt=cnt, full_idx=idx, block=mask.block_shape, scale=scale,
                                          return_lse=return_lse, key=key)
    bq = mask.block_shape[0]
    if mask.k_start > 0 or mask.k_len < mask.global_shape[1]:
        # a window that cuts keys can leave query tiles without any: make them "no key" here too, on the
        # device (FA4 sm90 already zeroes such a tile, which the GPU tests could not yet confirm)
        empty = (cnt == 0).repeat_interleave(bq, -1)[..., : mask.q_len]  # [B|1, H|1, S_q]
        out = out.masked_fill(empty.transpose(1, 2)[..., None], 0.0)
        if lse is not None:
            lse = lse.masked_fill(empty, float("-inf"))
    real = max(0, min(mask.q_len, mask.q_lim - mask.q_start))
    if real < mask.q_len:  # padding rows of the window: no key
        out[:, real:] = 0
        if lse is not None:
            lse[:, :, real:] = float("-inf")
    return out, lse
