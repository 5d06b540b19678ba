"""The LSE merge of two partial attention results as one Triton pass (see :mod:`ditfleet.parallel.merge`).

One program handles ``BLOCK_S`` query rows of one (batch, head): it reads the running output
and LSE (any float dtype), the block's output and LSE, and writes the merged output (in the
destination's dtype: float32 for a running state, the model dtype for the last block) and LSE.
Destination and running state may be the same tensors (in place: each program reads its tile
before writing it). Rows where neither side saw a key keep the running output (LSE ``-inf``).

Runs wherever Triton does: CUDA, or the CPU interpreter (``TRITON_INTERPRET=1`` set before
``triton`` is imported), which is how the CPU tests check it against the torch merge.
"""

from __future__ import annotations

import torch

try:  # an optional dependency: merge.py falls back to torch without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None


def available() -> bool:
    """True when Triton imports."""
    return triton is not None


if triton is not None:

    @triton.jit
    def _merge_kernel(
        acc, acc_lse, blk, blk_lse, dst, dst_lse,
        S, H, D,
        sa_b, sa_s, sa_h, sb_b, sb_s, sb_h, sd_b, sd_s, sd_h,
        la_b, la_h, la_s, lb_b, lb_h, lb_s, ld_b, ld_h, ld_s,
        BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid_s = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        rows = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
        cols = tl.arange(0, BLOCK_D)
        rmask = rows < S
        mask = rmask[:, None] & (cols[None, :] < D)
        rows64 = rows.to(tl.int64)

        la = tl.load(acc_lse + b * la_b + h * la_h + rows64 * la_s, mask=rmask, other=-float("inf")).to(tl.float32)
        lb = tl.load(blk_lse + b * lb_b + h * lb_h + rows64 * lb_s, mask=rmask, other=-float("inf")).to(tl.float32)
        mx = tl.maximum(la, lb)
        empty = mx == -float("inf")
        mx = tl.where(empty, 0.0, mx)
        ea = tl.exp(la - mx)
        eb = tl.exp(lb - mx)
        total = ea + eb
        safe = tl.where(empty, 1.0, total)
        wa = tl.where(empty, 1.0, ea / safe)  # neither side has a key: keep the running output
        wb = tl.where(empty, 0.0, eb / safe)
        new_lse = tl.where(empty, -float("inf"), mx + tl.log(safe))

        a = tl.load(acc + b * sa_b + h * sa_h + rows64[:, None] * sa_s + cols[None, :], mask=mask, other=0.0)
        o = tl.load(blk + b * sb_b + h * sb_h + rows64[:, None] * sb_s + cols[None, :], mask=mask, other=0.0)
        # A side with weight 0 contributes nothing, even if its rows hold garbage (never computed).
        a = tl.where(wa[:, None] > 0, a.to(tl.float32), 0.0)
        o = tl.where(wb[:, None] > 0, o.to(tl.float32), 0.0)
        res = wa[:, None] * a + wb[:, None] * o
        tl.store(dst + b * sd_b + h * sd_h + rows64[:, None] * sd_s + cols[None, :],
                 res.to(dst.dtype.element_ty), mask=mask)
        tl.store(dst_lse + b * ld_b + h * ld_h + rows64 * ld_s, new_lse, mask=rmask)


def merge_triton(
    acc: torch.Tensor,
    acc_lse: torch.Tensor,
    block: torch.Tensor,
    block_lse: torch.Tensor,
    dst: torch.Tensor,
    dst_lse: torch.Tensor,
    *,
    block_s: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``(acc, acc_lse)`` with ``(block, block_lse)`` into ``(dst, dst_lse)`` in one pass.

    Args:
        acc: running output ``[B, S, H, D]``, any float dtype, last dim contiguous.
        acc_lse: its LSE ``[B, H, S]`` (float32; ``-inf`` where it saw no key).
        block: the block's output ``[B, S, H, D]``, any float dtype, last dim contiguous.
        block_lse: the block's LSE ``[B, H, S]`` float32 (``-inf`` where it had no valid key).
        dst: merged output ``[B, S, H, D]`` (float32 for a running state, or the output dtype);
            may be ``acc`` itself.
        dst_lse: merged LSE ``[B, H, S]`` float32; may be ``acc_lse`` itself.
        block_s: query rows per program.

    Returns:
        ``(dst, dst_lse)``.
    """
    if triton is None:
        raise RuntimeError("merge_triton needs the `triton` package")
    b, s, h, d = acc.shape
    for name, t in (("acc", acc), ("block", block), ("dst", dst)):
        if t.shape != acc.shape or t.stride(-1) != 1:
            raise ValueError(f"merge_triton: {name} must be {tuple(acc.shape)} with a contiguous last dim, "
                             f"got {tuple(t.shape)} strides {t.stride()}")
    for name, t in (("acc_lse", acc_lse), ("block_lse", block_lse), ("dst_lse", dst_lse)):
        if t.shape != (b, h, s):
            raise ValueError(f"merge_triton: {name} must be {(b, h, s)}, got {tuple(t.shape)}")
    if dst_lse.dtype != torch.float32:
        raise TypeError(f"merge_triton: dst_lse must be float32, got {dst_lse.dtype}")
    grid = (triton.cdiv(s, block_s), b * h)
    _merge_kernel[grid](
        acc, acc_lse, block, block_lse, dst, dst_lse,
        s, h, d,
        acc.stride(0), acc.stride(1), acc.stride(2),
        block.stride(0), block.stride(1), block.stride(2),
        dst.stride(0), dst.stride(1), dst.stride(2),
        *acc_lse.stride(), *block_lse.stride(), *dst_lse.stride(),
        BLOCK_S=block_s, BLOCK_D=triton.next_power_of_2(d),
    )
    return dst, dst_lse
