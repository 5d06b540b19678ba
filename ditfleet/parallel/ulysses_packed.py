"""The packed Ulysses path: :class:`UlyssesComm` (one ``all_to_all_single`` on a packed q/k/v buffer,
then an unpack copy) and its forward loop. The baseline beside :mod:`ditfleet.parallel.ulysses`'s
default ``"p2p"`` path, which shares the class for the group's ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from .mesh import ParallelMesh

# attend(q, kv, return_lse, heads) -> (out, lse): q ``[B, S_q, hg, D]``, kv packed ``[2, B, S_k, hg, D]``;
# heads = (h0, h1): the group's range within this rank's ``h = H_pad / U`` heads (rank j holds
# padded heads ``j * h + [0, h)``), for kernels bound to particular heads (Sparge thresholds).
Attend = Callable[[torch.Tensor, torch.Tensor, bool, tuple[int, int]], tuple[torch.Tensor, torch.Tensor | None]]


def head_groups(heads_per_rank: int, chunks: int) -> list[tuple[int, int]]:
    """Split a rank's heads ``[0, heads_per_rank)`` into ``min(chunks, heads_per_rank)`` near-equal ranges."""
    n = max(1, min(chunks, heads_per_rank))
    bounds = [round(i * heads_per_rank / n) for i in range(n + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(n)]


class UlyssesComm:
    """One Ulysses group: its ranks (for the ``"p2p"`` path) and the two packed all-to-alls.

    In the packed path tensors travel as ``[U, N]`` buffers whose row ``j`` is what rank ``j``
    gets, so one ``all_to_all_single`` moves q, k and v of one head range together.

    Args:
        group: the Ulysses process group.
        size: its size ``U``.
        ranks: global ranks of the group in group order (``None``: asked from the group).
        rank: this process's index in the group (``None``: asked from the group).
    """

    def __init__(self, group, size: int, ranks: Sequence[int] | None = None, rank: int | None = None):
        self.group = group
        self.size = size
        self._ranks = list(ranks) if ranks is not None else None
        self._rank = rank

    @classmethod
    def from_mesh(cls, mesh: ParallelMesh) -> UlyssesComm:
        """The mesh's Ulysses group (built once per mesh)."""
        return mesh.cached(cls, lambda: cls(mesh.group("ulysses"), mesh.ulysses_size, mesh.axis_ranks("ulysses"),
                                             mesh.ulysses_rank))

    @property
    def ranks(self) -> list[int]:
        """Global ranks of the group, in group order (for P2P)."""
        if self._ranks is None:
            self._ranks = list(dist.get_process_group_ranks(self.group))
        return self._ranks

    @property
    def rank(self) -> int:
        """This process's index in the group."""
        if self._rank is None:
            self._rank = dist.get_rank(self.group)
        return self._rank

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


def packed_forward(q, k, v, *, comm: UlyssesComm, attend: Attend, return_lse: bool, chunks: int):
    """The ``"packed"`` implementation of :func:`~ditfleet.parallel.ulysses.ulysses_forward` (same contract)."""
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
        o, l = attend(q_g, kv_g, return_lse, (h0, h1))
        returning.append((h0, h1, *comm.gather_heads(o, l)))
    for h0, h1, recv, lse_recv, works, _keep in returning:
        for w in works:
            w.wait()
        out[:, :, :, h0:h1].copy_(recv.permute(1, 2, 0, 3, 4))
        if lse is not None:
            lse[:, :, h0:h1].copy_(lse_recv.permute(1, 0, 2, 3))
    return out.view(b, s_q, h_pad, d), (lse.view(b, h_pad, s_q) if lse is not None else None)
