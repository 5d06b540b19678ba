"""Ring attention: every rank's queries attend to the keys of every rank of the ring group.

At step ``s`` rank ``r`` computes on key chunk ``(r - s) mod R`` while the transport brings the chunk of
the next step (:mod:`ditfleet.parallel.transport`: NCCL rotates chunks to the next rank; the copy engine
pulls each chunk from its owner). Partial results merge by LSE (:func:`ditfleet.parallel.merge.merge_step`:
the first block is kept as is, later ones folded in by one fused pass, the last merge writes the output
dtype). One loop, :func:`ring_forward`, for every transport.

Which steps run and which chunks travel is a :class:`~ditfleet.parallel.ring_schedule.RingSchedule`:
padding lives at the global end, so a chunk is valid, partly padded (``kv_lens`` tells the kernel how many
leading keys count) or all padding, and an all-padding chunk is neither computed nor sent. Under a
block-sparse mask (``block_mask``, over the global unpadded sequences) each ``(query chunk, key chunk)``
step runs with its sub-mask (:meth:`BlockSparseMask.sub`), a step whose sub-mask is empty runs no kernel,
and a chunk no rank further along the ring needs is not sent (both ends know).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..attention.base import AttentionBackend
from ..attention.blockmask import BlockSparseMask
from .merge import merge_step
from .mesh import ParallelMesh
from .ring_schedule import RingSchedule
from .shard import SeqShard
from .transport import transport_for

__all__ = ["BlockAttend", "RingSchedule", "block_attend", "ring_attention", "ring_forward", "ring_run"]

# attend(q, k, v, n_valid, chunk_index) -> (out, lse) with lse float32 [B, H, S_q]
BlockAttend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, int], tuple[torch.Tensor, torch.Tensor]]


def ring_forward(
    q: torch.Tensor,
    kv: torch.Tensor,
    *,
    transport,
    attend: BlockAttend,
    chunk_valid: Sequence[int],
    schedule: RingSchedule | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ring loop: attend ``q`` to every needed key chunk of the ring, merging by LSE.

    Args:
        q: ``[B, S_q, H, D]`` local queries.
        kv: ``[2, B, S_k, H, D]`` packed local keys/values, contiguous; the NCCL transport reuses this
            buffer for receiving, so the caller must not need it afterwards.
        transport: the ring group's transport (``ring_begin/prefetch/chunk/advance/end``; ``g.size``, ``g.rank``).
        attend: block kernel, called with the number of valid leading keys of the chunk and its index.
        chunk_valid: valid keys of each ring chunk, by chunk index (``0`` = all padding).
        schedule: which steps compute and which chunks travel (identical on every rank);
            ``None``: :meth:`RingSchedule.dense` of ``chunk_valid``.

    Returns:
        ``(out, lse)``: ``out`` ``[B, S_q, H, D]`` in q's dtype, ``lse`` float32 ``[B, H, S_q]``. Rows
        that attend no key at all (every step skipped) get ``out = 0`` and ``lse = -inf``.
    """
    size, rank = transport.g.size, transport.g.rank
    sched = schedule or RingSchedule.dense(chunk_valid)
    if sched.size != size:
        raise ValueError(f"ring schedule is for {sched.size} ranks, the ring has {size}")
    computed = [step for step in range(size) if sched.computes(rank, step)]
    out = lse = None
    transport.ring_begin(kv, sched)
    try:
        for step in range(size):
            transport.ring_prefetch(step)  # what step + 1 needs travels while this step computes
            if step in computed:
                held = (rank - step) % size
                cur = transport.ring_chunk(step)
                block_out, block_lse = attend(q, cur[0], cur[1], chunk_valid[held], held)
                if out is None:  # the first block's result is the running state as is
                    out, lse = block_out, block_lse.float()
                else:
                    dtype = q.dtype if step == computed[-1] else torch.float32
                    out, lse = merge_step(out, lse, block_out, block_lse, out_dtype=dtype)
            transport.ring_advance(step)
    finally:
        transport.ring_end()
    if out is None:  # these queries attend no key anywhere (e.g. padding rows under a mask)
        b, s_q, h, _ = q.shape
        return q.new_zeros(q.shape), torch.full((b, h, s_q), float("-inf"), dtype=torch.float32, device=q.device)
    return out.to(q.dtype), lse


def block_attend(backend: AttentionBackend, scale: float | None, block_mask: BlockSparseMask | None = None, *,
                 q_start: int = 0, k_chunk: int = 0) -> BlockAttend:
    """The ring's block kernel: ``backend`` with ``kv_lens`` for a partly padded chunk, LSE on.

    With ``block_mask`` (over the global sequences) the step on key chunk ``c`` gets the sub-mask of
    queries ``[q_start, q_start + S_q)`` x keys ``[c * k_chunk, c * k_chunk + S_k)``.
    """

    def attend(q, k, v, n, c):
        lens = None if n == k.shape[1] else [n] * q.shape[0]
        sub = None if block_mask is None else block_mask.sub(q_start, q.shape[1], c * k_chunk, k.shape[1])
        return backend(q, k, v, scale=scale, kv_lens=lens, return_lse=True, block_mask=sub)

    return attend


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
    block_mask: BlockSparseMask | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Ring attention over the mesh's ring axis (``mesh.ulysses_size`` must be 1), on the mesh's transport.

    Args:
        q: ``[B, S_q_local, H, D]`` local query chunk (``shard.chunk`` tokens), backend's dtype.
        k, v: ``[B, S_k_local, H, D]`` local key/value chunk (``kv_shard.chunk`` tokens).
        backend: the kernel; must return the LSE.
        mesh: parallel mesh with ``ulysses_size == 1``.
        shard: the query sequence's :class:`SeqShard`.
        kv_shard: the key sequence's shard; ``None`` = ``shard``.
        scale: softmax scale, ``None`` = ``D ** -0.5``.
        return_lse: also return the LSE.
        block_mask: mask over the global unpadded ``S_q x S_k`` (a kernel with ``caps.block_mask``), or ``None``.

    Returns:
        ``(out, lse)``: ``out`` ``[B, S_q_local, H, D]`` in q's dtype; ``lse`` float32
        ``[B, H, S_q_local]`` or ``None``. Padded keys take no part.
    """
    if mesh.ulysses_size != 1:
        raise ValueError("ring_attention needs ulysses_size 1; use sequence_parallel_attention for USP")
    kv_shard = kv_shard or shard
    return ring_run(q, torch.stack((k, v)), transport=transport_for(mesh, "ring"), backend=backend, scale=scale,
                    q_chunk=shard.chunk, kv_shard=kv_shard, per_chunk=1, block_mask=block_mask, return_lse=return_lse)


def ring_run(q, kv, *, transport, backend: AttentionBackend, scale, q_chunk: int, kv_shard: SeqShard, per_chunk: int,
             block_mask: BlockSparseMask | None, return_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ring for ring attention (``per_chunk`` 1) and USP (ring chunks are super-chunks of ``per_chunk`` = U SP
    chunks). ``q_chunk``: query tokens per ring chunk; ``kv``: packed ``[2, B, S_k, H, D]`` (reused by the ring)."""
    size, rank = transport.g.size, transport.g.rank
    k_chunk = kv_shard.chunk * per_chunk
    valid = [kv_shard.chunk_valid(c, per_chunk) for c in range(size)]
    sched = None if block_mask is None else RingSchedule.from_mask(block_mask, q_chunk, k_chunk, size)
    attend = block_attend(backend, scale, block_mask, q_start=rank * q_chunk, k_chunk=k_chunk)
    out, lse = ring_forward(q, kv, transport=transport, attend=attend, chunk_valid=valid, schedule=sched)
    return out, (lse if return_lse else None)
