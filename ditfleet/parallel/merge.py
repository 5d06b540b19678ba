"""The one LSE merge of partial attention results (ring attention, and anything else that splits keys).

Two partial results over disjoint key sets, ``(o1, l1)`` and ``(o2, l2)``, combine exactly into
the result over the union:

    l = logaddexp(l1, l2)
    o = exp(l1 - l) * o1 + exp(l2 - l) * o2 = o1 + exp(l2 - l) * (o2 - o1)

The running output is kept in float32 and updated in place; a block whose keys were all masked
(``lse = -inf``) leaves it unchanged, and a running state that has seen no key yet
(``lse = -inf``, any ``out``) takes the block as is.
"""

from __future__ import annotations

import torch


def merge_attention_(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold one block's partial attention into the running result, in place.

    Args:
        out: running output ``[B, S, H, D]`` float32 (updated in place).
        lse: running LSE ``[B, H, S]`` float32, natural log (updated in place).
        block_out: the block's output ``[B, S, H, D]``, any float dtype.
        block_lse: the block's LSE ``[B, H, S]`` float32; ``-inf`` where the block had no valid key.

    Returns:
        ``(out, lse)``, the same tensors, now covering the union of keys.
    """
    if out.dtype != torch.float32 or lse.dtype != torch.float32:
        raise TypeError(f"merge_attention_: running out/lse must be float32, got {out.dtype}/{lse.dtype}")
    new_lse = torch.logaddexp(lse, block_lse.float())
    # Weight of the block; 0 where neither side has a key (new_lse = -inf would give nan).
    w = torch.exp(block_lse - new_lse).nan_to_num_(nan=0.0)
    out.lerp_(block_out.to(torch.float32), w.transpose(1, 2).unsqueeze(-1))
    lse.copy_(new_lse)
    return out, lse


def merge_attention(
    outs: list[torch.Tensor], lses: list[torch.Tensor], dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge several partial results (a list version of :func:`merge_attention_`).

    Args:
        outs: partial outputs, each ``[B, S, H, D]``, any float dtype.
        lses: their LSEs, each float32 ``[B, H, S]``.
        dtype: dtype of the returned output; ``None`` keeps ``outs[0].dtype``.

    Returns:
        ``(out, lse)``: ``out`` ``[B, S, H, D]`` in ``dtype``, ``lse`` float32 ``[B, H, S]``.
    """
    if not outs or len(outs) != len(lses):
        raise ValueError(f"merge_attention: need matching non-empty lists, got {len(outs)} outs and {len(lses)} lses")
    out = outs[0].to(torch.float32, copy=True)
    lse = lses[0].to(torch.float32, copy=True)
    for o, l in zip(outs[1:], lses[1:]):
        merge_attention_(out, lse, o, l)
    return out.to(dtype or outs[0].dtype), lse
