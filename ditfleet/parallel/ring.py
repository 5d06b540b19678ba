"""Ring attention: K/V chunks rotate around the ring by P2P while each rank attends to the one it holds.

At step ``s`` rank ``r`` holds key chunk ``(r - s) mod R``. Before computing on it, the rank
starts sending it to ``r + 1`` and receiving the next one from ``r - 1`` (K and V packed in one
buffer, one ``batch_isend_irecv``), so the transfer overlaps the kernel; it waits only after.
Two buffers alternate. Partial results merge by LSE in float32 (:mod:`ditfleet.parallel.merge`);
the output is cast to the input dtype once, at the end.

Padding lives at the global end, so a chunk is valid, partly padded (``kv_lens`` tells the
kernel how many leading keys count) or all padding: such a chunk is neither computed nor sent
(sender and receiver both know it is empty). Any backend that returns the LSE works.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from ..attention.base import AttentionBackend
from .merge import merge_attention_
from .mesh import ParallelMesh
from .shard import SeqShard


# ---------------------------------------------------------------- communication helper
class RingComm:
    """Rotation of one packed K/V buffer to the next rank of a ring group.

    Args:
        group: the ring process group.
        ranks: global ranks of the group, in ring order.
        rank: this process's index in ``ranks``.
    """

    def __init__(self, group, ranks: Sequence[int], rank: int):
        self.group = group
        self.size = len(ranks)
        self.rank = rank
        self.next = ranks[(rank + 1) % self.size]
        self.prev = ranks[(rank - 1) % self.size]

    @classmethod
    def from_mesh(cls, mesh: ParallelMesh) -> RingComm:
        return cls(mesh.group("ring"), mesh.axis_ranks("ring"), mesh.ring_rank)

    def start(self, send: torch.Tensor | None, recv: torch.Tensor | None) -> list:
        """Start sending ``send`` to the next rank and receiving ``recv`` from the previous one."""
        ops = []
        if send is not None:
            ops.append(dist.P2POp(dist.isend, send, self.next, self.group))
        if recv is not None:
            ops.append(dist.P2POp(dist.irecv, recv, self.prev, self.group))
        return dist.batch_isend_irecv(ops) if ops else []

    @staticmethod
    def wait(reqs: list) -> None:
        for req in reqs:
            req.wait()


# ---------------------------------------------------------------- forward loop
# attend(q, k, v, n_valid) -> (out, lse) with lse float32 [B, H, S_q]
BlockAttend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


def ring_forward(
    q: torch.Tensor,
    kv: torch.Tensor,
    *,
    comm: RingComm,
    attend: BlockAttend,
    chunk_valid: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``kv`` around the ring, attend ``q`` to every chunk, merge by LSE.

    Args:
        q: ``[B, S_q, H, D]`` local queries.
        kv: ``[2, B, S_k, H, D]`` packed local keys/values, contiguous; this buffer is reused
            for receiving, so the caller must not need it afterwards.
        comm: the ring's :class:`RingComm`.
        attend: block kernel, called with the number of valid leading keys of the chunk.
        chunk_valid: valid keys of each ring chunk, by chunk index (``0`` = all padding).

    Returns:
        ``(out, lse)``: ``out`` ``[B, S_q, H, D]`` in q's dtype, ``lse`` float32 ``[B, H, S_q]``.
    """
    size, rank = comm.size, comm.rank
    cur, nxt = kv, (torch.empty_like(kv) if size > 1 else None)
    out = lse = None
    for step in range(size):
        held = (rank - step) % size
        reqs = []
        if step + 1 < size:
            incoming = (held - 1) % size
            reqs = comm.start(cur if chunk_valid[held] else None, nxt if chunk_valid[incoming] else None)
        n = chunk_valid[held]
        if n:
            block_out, block_lse = attend(q, cur[0], cur[1], n)
            if out is None:
                out, lse = block_out.to(torch.float32), block_lse.to(torch.float32)
            else:
                merge_attention_(out, lse, block_out, block_lse)
        comm.wait(reqs)
        if step + 1 < size:
            cur, nxt = nxt, cur
    if out is None:  # no valid key anywhere: impossible for a global length >= 1
        raise RuntimeError("ring attention saw no valid key chunk")
    return out.to(q.dtype), lse


def block_attend(backend: AttentionBackend, scale: float | None) -> BlockAttend:
    """The ring's block kernel: ``backend`` with ``kv_lens`` for a partly padded chunk, LSE on."""

    def attend(q, k, v, n):
        lens = None if n == k.shape[1] else [n] * q.shape[0]
        out, lse = backend(q, k, v, scale=scale, kv_lens=lens, return_lse=True)
        return out, lse

    return attend


# ---------------------------------------------------------------- public function
def ring_attention(
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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Ring attention over the mesh's ring axis (``mesh.ulysses_size`` must be 1).

    Args:
        q: ``[B, S_q_local, H, D]`` local query chunk (``shard.chunk`` tokens), backend's dtype.
        k, v: ``[B, S_k_local, H, D]`` local key/value chunk (``kv_shard.chunk`` tokens).
        backend: a kernel that returns the LSE (``backend.caps.lse``).
        mesh: parallel mesh with ``ulysses_size == 1``.
        shard: the query sequence's :class:`SeqShard`.
        kv_shard: the key sequence's shard; ``None`` = ``shard``.
        scale: softmax scale, ``None`` = ``D ** -0.5``.
        return_lse: also return the LSE.

    Returns:
        ``(out, lse)``: ``out`` ``[B, S_q_local, H, D]`` in q's dtype; ``lse`` float32
        ``[B, H, S_q_local]`` or ``None``. Padded keys take no part.
    """
    if mesh.ulysses_size != 1:
        raise ValueError("ring_attention needs ulysses_size 1; use sequence_parallel_attention for USP")
    kv_shard = kv_shard or shard
    comm = RingComm.from_mesh(mesh)
    valid = [kv_shard.chunk_valid(c) for c in range(comm.size)]
    out, lse = ring_forward(q, torch.stack((k, v)), comm=comm, attend=block_attend(backend, scale), chunk_valid=valid)
    return out, (lse if return_lse else None)
