"""Ulysses (DeepSpeed-Ulysses) sequence parallelism: all-to-all sequence <-> heads.

Each of the ``U`` ranks of a Ulysses group holds a sequence chunk with all heads. One
``all_to_all_single`` (q, k and v packed in one buffer) gives every rank the *whole* group
sequence for ``H_pad / U`` heads; the kernel runs there; a second all-to-all returns the
output to sequence chunks. Heads that do not divide ``U`` are padded with zero heads (12 heads
on 8 ranks run as 16, two per rank: the same critical path an uneven split would have) and
dropped after.

``chunks > 1`` splits each rank's heads into groups and pipelines them: the all-to-all of group
``g + 1`` and the return of group ``g - 1`` run (async) while the kernel computes group ``g``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..attention.base import AttentionBackend
from .mesh import ParallelMesh
from .shard import SeqShard

# attend(q, kv, return_lse) -> (out, lse): q ``[B, S_q, h, D]``, kv packed ``[2, B, S_k, h, D]``.
Attend = Callable[[torch.Tensor, torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor | None]]


# ---------------------------------------------------------------- communication helper
def padded_heads(num_heads: int, ulysses_size: int) -> int:
    """Heads after zero-padding to a multiple of the Ulysses degree (12 on 8 ranks -> 16)."""
    return -(-num_heads // ulysses_size) * ulysses_size


def head_groups(heads_per_rank: int, chunks: int) -> list[tuple[int, int]]:
    """Split a rank's heads ``[0, heads_per_rank)`` into ``min(chunks, heads_per_rank)`` near-equal ranges."""
    n = max(1, min(chunks, heads_per_rank))
    bounds = [round(i * heads_per_rank / n) for i in range(n + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(n)]


class UlyssesComm:
    """The two all-to-alls of one Ulysses group, on packed buffers.

    Tensors travel as ``[U, N]`` buffers whose row ``j`` is what rank ``j`` gets, so one
    ``all_to_all_single`` moves q, k and v of one head range together.
    """

    def __init__(self, group, size: int):
        self.group = group
        self.size = size

    def scatter_heads(self, tensors: Sequence[torch.Tensor], h0: int, h1: int):
        """Start sending heads ``[h0, h1)`` of every rank's head block; returns ``(recv, work, shapes)``.

        ``tensors`` are ``[B, S_i, U * h, D]`` (heads already padded); rank ``j`` receives
        heads ``j * h + [h0, h1)`` of every rank's sequence chunk.
        """
        u = self.size
        hg = h1 - h0
        shapes = [(t.shape[0], t.shape[1], hg, t.shape[3]) for t in tensors]
        sizes = [b * s * g * d for b, s, g, d in shapes]
        send = tensors[0].new_empty((u, sum(sizes)))
        off = 0
        for t, (b, s, g, d), n in zip(tensors, shapes, sizes):
            src = t.view(b, s, u, t.shape[2] // u, d)[:, :, :, h0:h1].permute(2, 0, 1, 3, 4)
            send[:, off : off + n].view(u, b, s, g, d).copy_(src)
            off += n
        recv = torch.empty_like(send)
        work = dist.all_to_all_single(recv, send, group=self.group, async_op=True)
        return recv, work, (send, shapes, sizes)

    def unpack(self, recv: torch.Tensor, meta) -> tuple[torch.Tensor, torch.Tensor]:
        """After ``work.wait()``: ``(q, kv)``, q ``[B, U*S_q, h, D]``, kv packed ``[2, B, U*S_k, h, D]``."""
        _, shapes, sizes = meta
        u = self.size
        (b, sq, g, d), (_, sk, _, _) = shapes[0], shapes[1]
        q = recv[:, : sizes[0]].view(u, b, sq, g, d).permute(1, 0, 2, 3, 4).reshape(b, u * sq, g, d)
        kv = recv.new_empty((2, b, u * sk, g, d))
        off = sizes[0]
        for i in range(2):
            src = recv[:, off : off + sizes[1 + i]].view(u, b, sk, g, d).permute(1, 0, 2, 3, 4)
            kv[i].view(b, u, sk, g, d).copy_(src)
            off += sizes[1 + i]
        return q, kv

    def gather_heads(self, out: torch.Tensor, lse: torch.Tensor | None):
        """Start returning ``out`` ``[B, U*S, h, D]`` (and ``lse`` ``[B, h, U*S]``) to sequence chunks."""
        u = self.size
        b, s, g, d = out.shape
        send = out.view(b, u, s // u, g, d).transpose(0, 1).contiguous()
        recv = torch.empty_like(send)
        works = [dist.all_to_all_single(recv, send, group=self.group, async_op=True)]
        lse_recv = None
        if lse is not None:
            lse_send = lse.reshape(b, g, u, s // u).permute(2, 0, 1, 3).contiguous()
            lse_recv = torch.empty_like(lse_send)
            works.append(dist.all_to_all_single(lse_recv, lse_send, group=self.group, async_op=True))
        return recv, lse_recv, works, (send,)


# ---------------------------------------------------------------- forward loop
def ulysses_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    comm: UlyssesComm,
    attend: Attend,
    return_lse: bool,
    chunks: int = 1,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """All-to-all in, ``attend`` on the group's full sequence, all-to-all out, head group by head group.

    Args:
        q: ``[B, S_q, H_pad, D]`` local query chunk, heads a multiple of ``comm.size``.
        k, v: ``[B, S_k, H_pad, D]`` local key/value chunk, same dtype.
        comm: the Ulysses group's :class:`UlyssesComm`.
        attend: kernel on the gathered sequence (see ``Attend``).
        return_lse: also return the LSE.
        chunks: head groups to pipeline (1 = no overlap).

    Returns:
        ``(out, lse)``: ``out`` ``[B, S_q, H_pad, D]`` in q's dtype, ``lse`` float32
        ``[B, H_pad, S_q]`` or ``None``.
    """
    u = comm.size
    b, s_q, h_pad, d = q.shape
    h = h_pad // u
    groups = head_groups(h, chunks)
    out = q.new_empty((b, s_q, u, h, d))
    lse = torch.empty((b, u, h, s_q), dtype=torch.float32, device=q.device) if return_lse else None
    inflight = [comm.scatter_heads((q, k, v), *groups[0])]
    returning = []
    for gi, (h0, h1) in enumerate(groups):
        if gi + 1 < len(groups):  # next group's all-to-all overlaps this group's kernel
            inflight.append(comm.scatter_heads((q, k, v), *groups[gi + 1]))
        recv, work, meta = inflight[gi]
        work.wait()
        q_g, kv_g = comm.unpack(recv, meta)
        inflight[gi] = None  # free the buffers
        o, l = attend(q_g, kv_g, return_lse)
        returning.append((h0, h1, *comm.gather_heads(o, l)))
    for h0, h1, recv, lse_recv, works, _keep in returning:
        for w in works:
            w.wait()
        out[:, :, :, h0:h1].copy_(recv.permute(1, 2, 0, 3, 4))
        if lse is not None:
            lse[:, :, h0:h1].copy_(lse_recv.permute(1, 0, 2, 3))
    return out.view(b, s_q, h_pad, d), (lse.view(b, h_pad, s_q) if lse is not None else None)


# ---------------------------------------------------------------- public function
def pad_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``x`` ``[B, S, H, D]`` with zero heads appended up to ``heads`` (no copy when already there)."""
    return x if x.shape[2] == heads else F.pad(x, (0, 0, 0, heads - x.shape[2]))


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    backend: AttentionBackend,
    mesh: ParallelMesh,
    shard: SeqShard,
    kv_shard: SeqShard | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    chunks: int = 1,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Ulysses attention over the mesh's ulysses axis (``mesh.ring_size`` must be 1).

    Args:
        q: ``[B, S_q_local, H, D]`` local query chunk (``shard.chunk`` tokens), backend's dtype.
        k, v: ``[B, S_k_local, H, D]`` local key/value chunk (``kv_shard.chunk`` tokens).
        backend: the kernel; runs on the full sequence with ``ceil(H / U)`` heads.
        mesh: parallel mesh with ``ring_size == 1``.
        shard: the query sequence's :class:`SeqShard`.
        kv_shard: the key sequence's shard; ``None`` = ``shard`` (self-attention).
        scale: softmax scale, ``None`` = ``D ** -0.5``.
        return_lse: also return the float32 LSE.
        chunks: head groups pipelined against the all-to-alls (1 = none).

    Returns:
        ``(out, lse)``: ``out`` ``[B, S_q_local, H, D]`` in q's dtype; ``lse`` float32
        ``[B, H, S_q_local]`` or ``None``. Padded keys take no part.
    """
    if mesh.ring_size != 1:
        raise ValueError("ulysses_attention needs ring_size 1; use sequence_parallel_attention for USP")
    kv_shard = kv_shard or shard
    u = mesh.ulysses_size
    num_heads = q.shape[2]
    h_pad = padded_heads(num_heads, u)
    comm = UlyssesComm(mesh.group("ulysses"), u)
    kv_valid = kv_shard.chunk_valid(0, u)  # the gathered sequence is the whole (padded) sequence
    lens = None if kv_valid == kv_shard.chunk * u else [kv_valid] * q.shape[0]

    def attend(q_full, kv, want_lse):
        return backend(q_full, kv[0], kv[1], scale=scale, kv_lens=lens, return_lse=want_lse)

    out, lse = ulysses_forward(
        pad_heads(q, h_pad), pad_heads(k, h_pad), pad_heads(v, h_pad),
        comm=comm, attend=attend, return_lse=return_lse, chunks=chunks,
    )
    if h_pad != num_heads:
        out = out[:, :, :num_heads].contiguous()
        lse = lse[:, :num_heads].contiguous() if lse is not None else None
    return out, lse
