"""Ring attention by head-group all-gathers (``ring_impl="allgather"``; see :mod:`ditfleet.parallel.ring`).

K/V are gathered head group by head group (one grouped P2P batch per group, received straight into
the kernel's contiguous ``[B, R*S, hg, D]`` buffers) and the kernel runs once per head group over
the *whole* key sequence: no LSE merges, no LSE needed from the kernel. With ``chunks > 1`` the
gather of group ``g + 1`` overlaps the kernel of group ``g`` (:mod:`ditfleet.parallel.pipeline`).

Under a block mask the kernel gets the mask of the local query chunk against the whole key
sequence, and a chunk whose keys the receiver's queries never attend (``needs``, see
:mod:`ditfleet.parallel.ring_schedule`) is not sent: its slot is zero-filled instead (the mask
excludes it; zeros keep the kernel's masked products finite).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..attention.base import AttentionBackend
from ..attention.blockmask import BlockSparseMask
from .pipeline import Pipeline, exchange, finish_recv, recv_slot
from .ulysses_packed import head_groups

# attend(q, k_full, v_full, want_lse, heads) -> (out, lse | None); heads = (h0, h1) of the group in q's heads
FullAttend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool, tuple[int, int]],
                      tuple[torch.Tensor, torch.Tensor | None]]


def _gather_heads(pipe: Pipeline, comm, k, v, h0: int, h1: int, needs: Sequence[Sequence[bool]] | None):
    """On the comm stream: heads ``[h0, h1)`` of every ring rank's K/V chunk, as ``[B, R*S_k, hg, D]``."""
    r, me, peers = comm.size, comm.rank, comm.ranks
    b, s, _, d = k.shape
    with pipe.on_comm():
        fulls = [k.new_empty((b, r * s, h1 - h0, d)) for _ in range(2)]
        sends, recvs, post = [], [], []
        for tag, (x, full) in enumerate(zip((k, v), fulls)):
            own = full[:, me * s : (me + 1) * s]
            own.copy_(x[:, :, h0:h1])
            src = own if own.is_contiguous() else x[:, :, h0:h1].contiguous()
            for p in range(r):
                if p == me:
                    continue
                if needs is None or needs[p][me]:
                    sends.append((src, peers[p], tag))
                slot = full[:, p * s : (p + 1) * s]
                if needs is None or needs[me][p]:
                    recvs.append((recv_slot(slot, post), peers[p], tag))
                else:
                    slot.zero_()
        exchange(sends, recvs, comm.group)
        finish_recv(post)
        return fulls[0], fulls[1], pipe.mark()


def allgather_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    comm,
    attend: FullAttend,
    return_lse: bool,
    chunks: int = 1,
    compute_streams: int = 1,
    needs: Sequence[Sequence[bool]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Ring attention by head-group all-gathers: gather group ``g + 1``'s K/V while group ``g`` computes.

    Args:
        q: ``[B, S_q, H, D]`` local queries.
        k, v: ``[B, S_k, H, D]`` local key/value chunks (any strides; only read).
        comm: the ring's :class:`~ditfleet.parallel.ring.RingComm` (chunk ``p`` of the gathered keys
            comes from ring rank ``p``).
        attend: ``attend(q_g, k_full, v_full, want_lse, (h0, h1))``: the kernel on the gathered keys
            ``[B, R*S_k, hg, D]`` of heads ``[h0, h1)`` (padding, if any, at the end; the callback masks it).
        return_lse: also return the LSE.
        chunks: head groups (1 = gather everything, then one kernel call).
        compute_streams: 1, or 2 to alternate the groups' kernels over two CUDA streams.
        needs: ``needs[a][c]``: ring rank ``a``'s queries attend some key of rank ``c``'s chunk (the
            same on every rank); chunks nobody needs are not sent. ``None``: all are.

    Returns:
        ``(out, lse)``: ``out`` ``[B, S_q, H, D]`` in q's dtype, ``lse`` float32 ``[B, H, S_q]`` or ``None``.
    """
    b, s_q, h, d = q.shape
    groups = head_groups(h, chunks)
    out = lse = None
    if len(groups) > 1:  # one group: the kernel's own result is returned
        out = q.new_empty(q.shape)
        lse = torch.empty((b, h, s_q), dtype=torch.float32, device=q.device) if return_lse else None
    comm.ready(q)
    pipe = Pipeline(q, "ring", compute_streams)
    pipe.keep(q, k, v, out, lse)
    pending = _gather_heads(pipe, comm, k, v, *groups[0], needs)
    for gi, (h0, h1) in enumerate(groups):
        nxt = _gather_heads(pipe, comm, k, v, *groups[gi + 1], needs) if gi + 1 < len(groups) else None
        k_g, v_g, ready = pending
        with pipe.on_compute(gi, after=ready):
            pipe.used_here(k_g, v_g)
            q_g = q if len(groups) == 1 else q[:, :, h0:h1].contiguous()
            o, l = attend(q_g, k_g, v_g, return_lse, (h0, h1))
            if len(groups) == 1:
                out, lse = o, l
            else:
                out[:, :, h0:h1].copy_(o)
                if lse is not None:
                    lse[:, h0:h1].copy_(l)
        pending = nxt
        del k_g, v_g  # freed as the pipeline goes (their use on the compute stream is recorded)
    pipe.finish()
    return out, lse


def full_attend(backend: AttentionBackend, scale: float | None, n_valid: int,
                block_mask: BlockSparseMask | None = None) -> FullAttend:
    """The all-gather ring's kernel: ``backend`` over the gathered keys, of which ``n_valid`` lead.

    ``block_mask``: the window of the local queries against the whole (padded) key sequence, or ``None``;
    a per-(batch, head) mask (Sparge) is cut to each call's head group.
    """

    def attend(q, k, v, want_lse, heads):
        lens = None if n_valid == k.shape[1] else [n_valid] * q.shape[0]
        mask = None if block_mask is None else block_mask.select_heads(*heads)
        return backend(q, k, v, scale=scale, kv_lens=lens, return_lse=want_lse, block_mask=mask)

    return attend
