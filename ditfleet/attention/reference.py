"""Float64 reference attention, the yardstick of every backend test, ``doctor`` and the benchmarks."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    kv_lens: Sequence[int] | None = None,
    dtype: torch.dtype = torch.float64,
    chunk: int = 4096,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention in ``dtype`` (float64 by default), by query chunks.

    Args:
        q: ``[B, S_q, H, D]`` any float dtype.
        k: ``[B, S_k, H, D]``.
        v: ``[B, S_k, H, D]``.
        scale: softmax scale, ``None`` = ``D ** -0.5``.
        kv_lens: valid leading keys per batch element, or ``None`` for all.
        dtype: compute dtype of the reference.
        chunk: query rows per step (bounds memory to ``chunk * S_k`` scores per head).
        mask: bool token mask, True = query ``i`` may attend key ``j``: ``[S_q, S_k]`` or
            ``[B or 1, H or 1, S_q, S_k]`` (a block-sparse mask's ``to_dense()``); ``None``: all.

    Returns:
        ``(out, lse)``: ``out`` ``[B, S_q, H, D]`` and ``lse`` ``[B, H, S_q]``, both in ``dtype``; rows
        left without any key get ``out = 0`` and ``lse = -inf``.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    qq = q.transpose(1, 2).to(dtype)
    kk = k.transpose(1, 2).to(dtype)
    vv = v.transpose(1, 2).to(dtype)
    valid = None
    if kv_lens is not None:
        pos = torch.arange(k.shape[1], device=k.device)
        valid = pos[None, :] < torch.as_tensor(list(kv_lens), device=k.device)[:, None]  # [B, S_k]
        valid = valid[:, None, None, :]
    if mask is not None:
        mask = mask.to(device=q.device, dtype=torch.bool)
        mask = mask[None, None] if mask.dim() == 2 else mask
    outs, lses = [], []
    for i in range(0, qq.shape[2], chunk):
        s = torch.matmul(qq[:, :, i : i + chunk], kk.transpose(-1, -2)) * scale
        if valid is not None:
            s = s.masked_fill(~valid, float("-inf"))
        if mask is not None:
            s = s.masked_fill(~mask[..., i : i + chunk, :], float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        outs.append(torch.matmul(torch.exp(s - lse[..., None]).nan_to_num_(0.0), vv))
        lses.append(lse)
    return torch.cat(outs, dim=2).transpose(1, 2), torch.cat(lses, dim=2)
