"""Ring attention: every rank's queries attend to the keys of every rank of the ring group.

Two implementations (``impl``):

* ``"rotate"`` (default): the classic ring, described below.
* ``"allgather"``: K/V are gathered head group by head group (one grouped P2P batch
  per group, received straight into the kernel's contiguous ``[B, R*S, hg, D]`` buffers) and
  the kernel runs once per head group over the *whole* key sequence: no LSE merges, no LSE
  needed from the kernel, calls as long as single-GPU ones (short-key calls cost ~12% more on
  H100), and less memory than rotating two full K/V chunks. With ``chunks > 1`` the gather of
  group ``g + 1`` overlaps the kernel of group ``g`` (:mod:`ditfleet.parallel.pipeline`).
  Communication volume equals the rotating ring's: ``(R - 1) / R`` of K and V per rank.
* ``"rotate"``: at step ``s`` rank ``r`` holds key chunk ``(r - s) mod R``;
  before computing on it, it starts sending it to ``r + 1`` and receiving the next one from
  ``r - 1`` (K and V packed, one ``batch_isend_irecv``), so the transfer overlaps the kernel.
  Partial results merge by LSE (:func:`ditfleet.parallel.merge.merge_step`: the first block
  is kept as is, later ones folded in by one fused pass, the last merge writes the output dtype).

Padding lives at the global end, so a chunk is valid, partly padded (``kv_lens`` tells the
kernel how many leading keys count) or all padding: in the rotating ring such a chunk is
neither computed nor sent (sender and receiver both know it is empty).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from ..attention.base import AttentionBackend
from .merge import merge_step
from .mesh import ParallelMesh
from .pipeline import Pipeline, exchange, finish_recv, recv_slot
from .shard import SeqShard
from .ulysses import head_groups

RING_IMPLS = ("allgather", "rotate")


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
# attend(q, k_full, v_full, want_lse) -> (out, lse | None)
FullAttend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor | None]]


def ring_forward(
    q: torch.Tensor,
    kv: torch.Tensor,
    *,
    comm: RingComm,
    attend: BlockAttend,
    chunk_valid: Sequence[int],
    merge_impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotating ring: rotate ``kv`` around the ring, attend ``q`` to every chunk, merge by LSE.

    Args:
        q: ``[B, S_q, H, D]`` local queries.
        kv: ``[2, B, S_k, H, D]`` packed local keys/values, contiguous; this buffer is reused
            for receiving, so the caller must not need it afterwards.
        comm: the ring's :class:`RingComm`.
        attend: block kernel, called with the number of valid leading keys of the chunk.
        chunk_valid: valid keys of each ring chunk, by chunk index (``0`` = all padding).
        merge_impl: :func:`~ditfleet.parallel.merge.merge_step`'s ``impl``.

    Returns:
        ``(out, lse)``: ``out`` ``[B, S_q, H, D]`` in q's dtype, ``lse`` float32 ``[B, H, S_q]``.
    """
    size, rank = comm.size, comm.rank
    cur, nxt = kv, (torch.empty_like(kv) if size > 1 else None)
    computed = [step for step in range(size) if chunk_valid[(rank - step) % size]]
    if not computed:  # no valid key anywhere: impossible for a global length >= 1
        raise RuntimeError("ring attention saw no valid key chunk")
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
            if out is None:  # the first block's result is the running state as is
                out, lse = block_out, block_lse.float()
            else:
                dtype = q.dtype if step == computed[-1] else torch.float32
                out, lse = merge_step(out, lse, block_out, block_lse, out_dtype=dtype, impl=merge_impl)
        comm.wait(reqs)
        if step + 1 < size:
            cur, nxt = nxt, cur
    return out.to(q.dtype), lse


def _gather_heads(pipe: Pipeline, comm: RingComm, k, v, h0: int, h1: int):
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
                if p != me:
                    sends.append((src, peers[p], tag))
                    recvs.append((recv_slot(full[:, p * s : (p + 1) * s], post), peers[p], tag))
        exchange(sends, recvs, comm.group)
        finish_recv(post)
        return fulls[0], fulls[1], pipe.mark()


def allgather_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    comm: RingComm,
    attend: FullAttend,
    return_lse: bool,
    chunks: int = 1,
    compute_streams: int = 1,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Ring attention by head-group all-gathers: gather group ``g + 1``'s K/V while group ``g`` computes.

    Args:
        q: ``[B, S_q, H, D]`` local queries.
        k, v: ``[B, S_k, H, D]`` local key/value chunks (any strides; only read).
        comm: the ring's :class:`RingComm` (chunk ``p`` of the gathered keys comes from ring rank ``p``).
        attend: ``attend(q_g, k_full, v_full, want_lse)``: the kernel on the gathered keys
            ``[B, R*S_k, hg, D]`` (padding, if any, at the end; the callback masks it).
        return_lse: also return the LSE.
        chunks: head groups (1 = gather everything, then one kernel call).
        compute_streams: 1, or 2 to alternate the groups' kernels over two CUDA streams.

    Returns:
        ``(out, lse)``: ``out`` ``[B, S_q, H, D]`` in q's dtype, ``lse`` float32 ``[B, H, S_q]`` or ``None``.
    """
    b, s_q, h, d = q.shape
    groups = head_groups(h, chunks)
    out = lse = None
    if len(groups) > 1:  # one group: the kernel's own result is returned
        out = q.new_empty(q.shape)
        lse = torch.empty((b, h, s_q), dtype=torch.float32, device=q.device) if return_lse else None
    pipe = Pipeline(q, "ring", compute_streams)
    pipe.keep(q, k, v, out, lse)
    pending = _gather_heads(pipe, comm, k, v, *groups[0])
    for gi, (h0, h1) in enumerate(groups):
        nxt = _gather_heads(pipe, comm, k, v, *groups[gi + 1]) if gi + 1 < len(groups) else None
        k_g, v_g, ready = pending
        with pipe.on_compute(gi, after=ready):
            pipe.used_here(k_g, v_g)
            q_g = q if len(groups) == 1 else q[:, :, h0:h1].contiguous()
            o, l = attend(q_g, k_g, v_g, return_lse)
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


def block_attend(backend: AttentionBackend, scale: float | None) -> BlockAttend:
    """The ring's block kernel: ``backend`` with ``kv_lens`` for a partly padded chunk, LSE on."""

    def attend(q, k, v, n):
        lens = None if n == k.shape[1] else [n] * q.shape[0]
        out, lse = backend(q, k, v, scale=scale, kv_lens=lens, return_lse=True)
        return out, lse

    return attend


def full_attend(backend: AttentionBackend, scale: float | None, n_valid: int) -> FullAttend:
    """The all-gather ring's kernel: ``backend`` over the gathered keys, of which ``n_valid`` lead."""

    def attend(q, k, v, want_lse):
        lens = None if n_valid == k.shape[1] else [n_valid] * q.shape[0]
        return backend(q, k, v, scale=scale, kv_lens=lens, return_lse=want_lse)

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
    impl: str = "rotate",
    chunks: int = 5,
    compute_streams: int = 1,
    merge_impl: str = "auto",
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
        impl: ``"allgather"`` or ``"rotate"`` (see the module docstring).
        chunks: ``"allgather"``: head groups pipelined against the gathers.
        compute_streams: ``"allgather"``: 2 alternates the groups' kernels over two CUDA streams.
        merge_impl: ``"rotate"``: merge implementation (``"auto"``, ``"triton"``, ``"torch"``).

    Returns:
        ``(out, lse)``: ``out`` ``[B, S_q_local, H, D]`` in q's dtype; ``lse`` float32
        ``[B, H, S_q_local]`` or ``None``. Padded keys take no part.
    """
    if mesh.ulysses_size != 1:
        raise ValueError("ring_attention needs ulysses_size 1; use sequence_parallel_attention for USP")
    kv_shard = kv_shard or shard
    comm = RingComm.from_mesh(mesh)
    valid = [kv_shard.chunk_valid(c) for c in range(comm.size)]
    if impl == "allgather":
        return allgather_forward(q, k, v, comm=comm, attend=full_attend(backend, scale, sum(valid)),
                                 return_lse=return_lse, chunks=chunks, compute_streams=compute_streams)
    if impl != "rotate":
        raise ValueError(f"ring impl must be one of {RING_IMPLS}, got {impl!r}")
    out, lse = ring_forward(q, torch.stack((k, v)), comm=comm, attend=block_attend(backend, scale),
                            chunk_valid=valid, merge_impl=merge_impl)
    return out, (lse if return_lse else None)
