"""The one LSE merge of partial attention results (ring attention, and anything else that splits keys).

Two partial results over disjoint key sets, ``(o1, l1)`` and ``(o2, l2)``, combine exactly into
the result over the union:

    l = logaddexp(l1, l2)
    o = exp(l1 - l) * o1 + exp(l2 - l) * o2 = o1 + exp(l2 - l) * (o2 - o1)

The running output is kept in float32 and updated in place; a block whose keys were all masked
(``lse = -inf``) leaves it unchanged, and a running state that has seen no key yet
(``lse = -inf``, any ``out``) takes the block as is.

:func:`merge_step` is the ring's merge: the first block's result is used as is (no float32 copy),
each later block is folded in by one fused pass (Triton on CUDA; torch elsewhere), and the last
merge writes the output dtype directly, so there is no final cast pass.
"""

from __future__ import annotations

import warnings

import torch

MERGE_IMPLS = ("auto", "triton", "torch")
_TRITON_BROKEN: list[str] = []  # set once the Triton merge failed under impl="auto" (then torch is used)


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


def _use_triton(impl: str, *tensors: torch.Tensor) -> bool:
    if impl not in MERGE_IMPLS:
        raise ValueError(f"merge impl must be one of {MERGE_IMPLS}, got {impl!r}")
    if impl == "torch":
        return False
    from . import triton_merge

    if impl == "triton":
        if not triton_merge.available():
            raise RuntimeError("merge impl 'triton' needs the `triton` package")
        return True
    return triton_merge.available() and not _TRITON_BROKEN and all(t.is_cuda for t in tensors)


def merge_step(
    acc: torch.Tensor,
    acc_lse: torch.Tensor,
    block_out: torch.Tensor,
    block_lse: torch.Tensor,
    *,
    out_dtype: torch.dtype = torch.float32,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold one block into a running result; the merged output comes back in ``out_dtype``.

    Args:
        acc: running output ``[B, S, H, D]``: float32 (then it is updated in place when
            ``out_dtype`` is float32) or, for the first merge, the first block's own output.
        acc_lse: its LSE ``[B, H, S]`` float32 (updated in place when ``acc`` is float32).
        block_out: the block's output ``[B, S, H, D]``, any float dtype.
        block_lse: the block's LSE ``[B, H, S]`` float32, ``-inf`` where it had no valid key.
        out_dtype: float32 for a running state, or the model dtype for the last block.
        impl: ``"auto"`` (Triton for CUDA tensors when it imports, else torch), ``"triton"`` or ``"torch"``.

    Returns:
        ``(out, lse)``: ``out`` ``[B, S, H, D]`` in ``out_dtype``, ``lse`` float32 ``[B, H, S]``.
    """
    in_place = acc.dtype == torch.float32 and out_dtype == torch.float32 and acc_lse.dtype == torch.float32
    if _use_triton(impl, acc, block_out) and acc.stride(-1) == 1 and block_out.stride(-1) == 1:
        from .triton_merge import merge_triton

        dst = acc if in_place else torch.empty(acc.shape, dtype=out_dtype, device=acc.device)
        dst_lse = acc_lse if in_place else torch.empty(acc_lse.shape, dtype=torch.float32, device=acc.device)
        try:
            return merge_triton(acc, acc_lse, block_out, block_lse, dst, dst_lse)
        except Exception as e:  # noqa: BLE001 - "auto" never fails where torch works
            if impl != "auto":
                raise
            _TRITON_BROKEN.append(f"{type(e).__name__}: {e}")
            warnings.warn(f"fused Triton LSE merge failed, using the torch merge from now on: {_TRITON_BROKEN[0]}",
                          RuntimeWarning, stacklevel=2)
    if not in_place:
        acc = acc.to(torch.float32, copy=True)
        acc_lse = acc_lse.to(torch.float32, copy=True)
    merge_attention_(acc, acc_lse, block_out, block_lse)
    return acc.to(out_dtype), acc_lse
