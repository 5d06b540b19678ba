"""Ring attention: every rank's queries attend to the keys of every rank of the ring group.

Two implementations (``impl``):

* ``"rotate"`` (default): at step ``s`` rank ``r`` holds key chunk ``(r - s) mod R``; before
  computing on it, it starts sending it to ``r + 1`` and receiving the next one from ``r - 1``
  (K and V packed, one ``batch_isend_irecv``), so the transfer overlaps the kernel. Partial
  results merge by LSE (:func:`ditfleet.parallel.merge.merge_step`: the first block is kept as
  is, later ones folded in by one fused pass, the last merge writes the output dtype).
* ``"allgather"`` (:mod:`ditfleet.parallel.ring_allgather`): K/V gathered head group by head
  group, one kernel call per group over the *whole* key sequence: no LSE merges, calls as long
  as single-GPU ones, less memory than rotating two full K/V chunks; the gather of group
  ``g + 1`` overlaps the kernel of group ``g``. Same communication volume as the rotating ring.

* ``"pull"`` (CUDA; :mod:`ditfleet.parallel.copy_engine`): the rotating ring's steps and merges,
  but each rank pulls the next key chunk straight from its owner's symmetric memory on the copy
  engines instead of NCCL sends, so the transfers take no SMs from the kernel.
* ``"auto"`` (the default): ``"pull"`` where the whole ring group is on one host with CUDA
  symmetric memory (measured on 4 x H100 at S = 75,600, commit 85e48fd: 54.4 vs 56.3 ms with cuDNN,
  45.8 vs 49.7 ms with FA4), else ``"rotate"``. Both give the same steps, merges and result.

Which steps run and which chunks travel is a :class:`~ditfleet.parallel.ring_schedule.RingSchedule`:
padding lives at the global end, so a chunk is valid, partly padded (``kv_lens`` tells the kernel
how many leading keys count) or all padding, and an all-padding chunk is neither computed nor
sent. Under a block-sparse mask (``block_mask``, over the global unpadded sequences) each
``(query chunk, key chunk)`` step runs with its sub-mask (:meth:`BlockSparseMask.sub`), a step
whose sub-mask is empty runs no kernel, and a chunk no rank further along the ring needs is not
sent (both ends know; a chunk is still forwarded through ranks that do not need it themselves).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from ..attention.base import AttentionBackend
from ..attention.blockmask import BlockSparseMask
from .copy_engine import ce_usable, ring_pull_forward
from .merge import merge_step
from .mesh import ParallelMesh
from .ring_allgather import FullAttend, allgather_forward, full_attend
from .ring_schedule import RingSchedule
from .shard import SeqShard

__all__ = ["RING_IMPLS", "BlockAttend", "FullAttend", "RingComm", "RingSchedule", "allgather_forward", "block_attend",
           "full_attend", "ring_attention", "ring_forward", "ring_run"]

RING_IMPLS = ("allgather", "auto", "pull", "rotate")


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
        self.ranks = list(ranks)
        self.next = ranks[(rank + 1) % self.size]
        self.prev = ranks[(rank - 1) % self.size]

    @classmethod
    def from_mesh(cls, mesh: ParallelMesh) -> RingComm:
        """The mesh's ring group (built once per mesh)."""
        return mesh.cached(cls, lambda: cls(mesh.group("ring"), mesh.axis_ranks("ring"), mesh.ring_rank))

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

    def ready(self, like: torch.Tensor) -> None:
        """Once per group, on NCCL: one all-reduce with every rank, before any P2P batch.

        NCCL wants all ranks of a group in its first ``batch_isend_irecv``; a ring that skips
        transfers (padding, block masks) may leave a rank out of one, so the group is brought up
        by a collective first (every rank of the ring reaches here in the same call).
        """
        if self.size > 1 and like.is_cuda and self.group not in _READY:
            dist.all_reduce(torch.zeros(1, device=like.device), group=self.group)
            _READY.append(self.group)


_READY: list = []  # ring groups already brought up (see RingComm.ready)


# ---------------------------------------------------------------- forward loop
# attend(q, k, v, n_valid, chunk_index) -> (out, lse) with lse float32 [B, H, S_q]
BlockAttend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, int], tuple[torch.Tensor, torch.Tensor]]


def ring_forward(
    q: torch.Tensor,
    kv: torch.Tensor,
    *,
    comm: RingComm,
    attend: BlockAttend,
    chunk_valid: Sequence[int],
    merge_impl: str = "auto",
    schedule: RingSchedule | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotating ring: rotate ``kv`` around the ring, attend ``q`` to every needed chunk, merge by LSE.

    Args:
        q: ``[B, S_q, H, D]`` local queries.
        kv: ``[2, B, S_k, H, D]`` packed local keys/values, contiguous; this buffer is reused
            for receiving, so the caller must not need it afterwards.
        comm: the ring's :class:`RingComm`.
        attend: block kernel, called with the number of valid leading keys of the chunk and its index.
        chunk_valid: valid keys of each ring chunk, by chunk index (``0`` = all padding).
        merge_impl: :func:`~ditfleet.parallel.merge.merge_step`'s ``impl``.
        schedule: which steps compute and which chunks travel (identical on every rank);
            ``None``: :meth:`RingSchedule.dense` of ``chunk_valid``.

    Returns:
        ``(out, lse)``: ``out`` ``[B, S_q, H, D]`` in q's dtype, ``lse`` float32 ``[B, H, S_q]``. Rows
        that attend no key at all (every step skipped) get ``out = 0`` and ``lse = -inf``.
    """
    size, rank = comm.size, comm.rank
    sched = schedule or RingSchedule.dense(chunk_valid)
    if sched.size != size:
        raise ValueError(f"ring schedule is for {sched.size} ranks, the ring has {size}")
    comm.ready(q)
    cur, nxt = kv, (torch.empty_like(kv) if size > 1 else None)
    computed = [step for step in range(size) if sched.computes(rank, step)]
    out = lse = None
    for step in range(size):
        held = (rank - step) % size
        reqs = []
        if step + 1 < size:
            incoming = (held - 1) % size
            reqs = comm.start(cur if sched.sends(held, step) else None, nxt if sched.sends(incoming, step) else None)
        if computed and step in computed:
            block_out, block_lse = attend(q, cur[0], cur[1], chunk_valid[held], held)
            if out is None:  # the first block's result is the running state as is
                out, lse = block_out, block_lse.float()
            else:
                dtype = q.dtype if step == computed[-1] else torch.float32
                out, lse = merge_step(out, lse, block_out, block_lse, out_dtype=dtype, impl=merge_impl)
        comm.wait(reqs)
        if step + 1 < size:
            cur, nxt = nxt, cur
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
    impl: str = "auto",
    chunks: int = 5,
    compute_streams: int = 1,
    merge_impl: str = "auto",
    block_mask: BlockSparseMask | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Ring attention over the mesh's ring axis (``mesh.ulysses_size`` must be 1).

    Args:
        q: ``[B, S_q_local, H, D]`` local query chunk (``shard.chunk`` tokens), backend's dtype.
        k, v: ``[B, S_k_local, H, D]`` local key/value chunk (``kv_shard.chunk`` tokens).
        backend: the kernel (``"rotate"`` needs one that returns the LSE).
        mesh: parallel mesh with ``ulysses_size == 1``.
        shard: the query sequence's :class:`SeqShard`.
        kv_shard: the key sequence's shard; ``None`` = ``shard``.
        scale: softmax scale, ``None`` = ``D ** -0.5``.
        return_lse: also return the LSE.
        impl: ``"auto"``, ``"rotate"``, ``"pull"`` (CUDA) or ``"allgather"`` (see the module docstring).
        chunks: ``"allgather"``: head groups pipelined against the gathers.
        compute_streams: ``"allgather"``: 2 alternates the groups' kernels over two CUDA streams.
        merge_impl: ``"rotate"``: merge implementation (``"auto"``, ``"triton"``, ``"torch"``).
        block_mask: mask over the global unpadded ``S_q x S_k`` (a kernel with ``caps.block_mask``), or ``None``.

    Returns:
        ``(out, lse)``: ``out`` ``[B, S_q_local, H, D]`` in q's dtype; ``lse`` float32
        ``[B, H, S_q_local]`` or ``None``. Padded keys take no part.
    """
    if mesh.ulysses_size != 1:
        raise ValueError("ring_attention needs ulysses_size 1; use sequence_parallel_attention for USP")
    kv_shard = kv_shard or shard
    return ring_run(q, k, v, None, comm=RingComm.from_mesh(mesh), backend=backend, scale=scale, q_chunk=shard.chunk,
                    kv_shard=kv_shard, per_chunk=1, block_mask=block_mask, impl=impl, chunks=chunks,
                    compute_streams=compute_streams, merge_impl=merge_impl, return_lse=return_lse)


def ring_run(q, k, v, kv, *, comm: RingComm, backend: AttentionBackend, scale, q_chunk: int, kv_shard: SeqShard,
             per_chunk: int, block_mask: BlockSparseMask | None, impl: str, chunks: int, compute_streams: int,
             merge_impl: str, return_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ring over ``comm`` for ring attention (``per_chunk`` 1) and USP (ring chunks are super-chunks of
    ``per_chunk`` = U SP chunks). ``q_chunk``: query tokens per ring chunk; ``kv``: ``k`` and ``v`` packed
    ``[2, B, S_k, H, D]`` if the caller has them so (``"rotate"`` reuses it), else ``None``."""
    if impl not in RING_IMPLS:
        raise ValueError(f"ring impl must be one of {RING_IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = "pull" if ce_usable(comm.group, q.device) else "rotate"
    size, k_chunk = comm.size, kv_shard.chunk * per_chunk
    valid = [kv_shard.chunk_valid(c, per_chunk) for c in range(size)]
    sched = None if block_mask is None else RingSchedule.from_mask(block_mask, q_chunk, k_chunk, size)
    if impl == "allgather":
        window = None if block_mask is None else block_mask.sub(comm.rank * q_chunk, q_chunk, 0, size * k_chunk)
        return allgather_forward(q, k, v, comm=comm, attend=full_attend(backend, scale, sum(valid), window),
                                 return_lse=return_lse, chunks=chunks, compute_streams=compute_streams,
                                 needs=None if sched is None else sched.needs)
    attend = block_attend(backend, scale, block_mask, q_start=comm.rank * q_chunk, k_chunk=k_chunk)
    if impl == "pull":
        sched = sched or RingSchedule.dense(valid)

        def merge(out, lse, block_out, block_lse, last):
            return merge_step(out, lse, block_out, block_lse, out_dtype=q.dtype if last else torch.float32, impl=merge_impl)

        out, lse = ring_pull_forward(q, k, v, comm=comm, attend=attend, chunk_valid=valid, computes=sched.computes,
                                     merge=merge)
        return out, (lse if return_lse else None)
    out, lse = ring_forward(q, torch.stack((k, v)) if kv is None else kv, comm=comm, attend=attend, chunk_valid=valid,
                            merge_impl=merge_impl, schedule=sched)
    return out, (lse if return_lse else None)
