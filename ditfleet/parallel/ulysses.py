"""Ulysses (DeepSpeed-Ulysses) sequence parallelism: all-to-all sequence <-> heads.

Each of the ``U`` ranks of a Ulysses group holds a sequence chunk with all heads. An all-to-all
gives every rank the *whole* group sequence for ``H_pad / U`` heads; the kernel runs there; a
second all-to-all returns the output to sequence chunks. Heads that do not divide ``U`` are
padded with zero heads (12 heads on 8 ranks run as 16, two per rank: the same critical path an
uneven split would have) and dropped after.

Implementations (``impl``):

* ``"auto"`` (default): ``"ce"`` where the group is on one host with CUDA symmetric memory and
  peer access (:func:`~ditfleet.parallel.copy_engine.ce_usable`, agreed by every rank), else ``"p2p"``.
* ``"ce"`` (CUDA): no NCCL, and transfers and synchronization take no SM: each rank pushes its rows of every
  head group into the owners' symmetric inboxes by strided copy-engine copies and raises flags
  there (stream memory operations); kernels wait for the flags, outputs are pushed home the same
  way (:mod:`ditfleet.parallel.ulysses_ce`). Head groups overlap the kernel without taking SMs.
* ``"p2p"``: one grouped batch of P2P sends/receives per direction (one NCCL launch).
  Receives land directly in the kernel's contiguous ``[B, U*S, h, D]`` buffers (for ``B == 1``
  the rows from rank ``p`` are one contiguous slice; larger batches go through a staging copy),
  the local head block is copied straight from the input (never sent to itself), and outputs
  are sent as row slices of the kernel's result: no unpack pass, no output transpose.
* ``"packed"``: the original path, one ``all_to_all_single`` on a packed q/k/v buffer plus an
  unpack copy; kept as the baseline.

``chunks > 1`` splits each rank's heads into groups and pipelines them: group ``g + 1``'s
exchange (and group ``g - 1``'s return) run while the kernel computes group ``g``
(:mod:`ditfleet.parallel.pipeline` holds the stream rules). ``chunks=None`` (the default) picks
per implementation (:func:`default_chunks`): two-head groups on ``"ce"``, whose transfers take no
SM, and one group on the NCCL paths, where every pipelined variant measured slower (4 x H100,
S = 75,600, H = 40; see the README's benchmark section).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..attention.base import AttentionBackend
from ..attention.blockmask import BlockSparseMask
from .copy_engine import ce_usable
from .mesh import ParallelMesh
from .pipeline import Pipeline, exchange, finish_recv, recv_slot
from .shard import SeqShard
from .ulysses_ce import ulysses_ce_forward
from .ulysses_packed import Attend, UlyssesComm, packed_forward, head_groups

ULYSSES_IMPLS = ("auto", "ce", "p2p", "packed")


# ---------------------------------------------------------------- head padding
def padded_heads(num_heads: int, ulysses_size: int) -> int:
    """Heads after zero-padding to a multiple of the Ulysses degree (12 on 8 ranks -> 16)."""
    return -(-num_heads // ulysses_size) * ulysses_size


# ---------------------------------------------------------------- forward loops
def _p2p_scatter(pipe: Pipeline, comm: UlyssesComm, src, h0: int, h1: int):
    """On the comm stream: heads ``[h0, h1)`` of every rank's block, gathered over the group's sequence.

    ``src`` are q, k, v viewed ``[B, S_i, U, h, D]``. Returns ``(q_g, kv_g, event)``: q_g
    ``[B, U*S_q, hg, D]``, kv_g ``[2, B, U*S_k, hg, D]`` (both contiguous), event = data ready.
    """
    u, me, peers = comm.size, comm.rank, comm.ranks
    b, s_q, _, _, d = src[0].shape
    s_k, hg = src[1].shape[1], h1 - h0
    with pipe.on_comm():
        q_g = src[0].new_empty((b, u * s_q, hg, d))
        kv_g = src[0].new_empty((2, b, u * s_k, hg, d))
        sends, recvs, post = [], [], []
        for tag, (x, dst) in enumerate(zip(src, (q_g, kv_g[0], kv_g[1]))):
            s = x.shape[1]
            for p in range(u):
                block, slot = x[:, :, p, h0:h1], dst[:, p * s : (p + 1) * s]
                if p == me:
                    slot.copy_(block)
                else:
                    sends.append((block.contiguous(), peers[p], tag))
                    recvs.append((recv_slot(slot, post), peers[p], tag))
        exchange(sends, recvs, comm.group)
        finish_recv(post)
        return q_g, kv_g, pipe.mark()


def _p2p_gather(pipe: Pipeline, comm: UlyssesComm, o, l, out, lse, h0: int, h1: int, ready) -> None:
    """On the comm stream, after ``ready``: send row slices of ``o`` ``[B, U*S, hg, D]`` (and ``l``
    ``[B, hg, U*S]``) home; write them into ``out`` ``[B, S, U, h, D]`` / ``lse`` ``[B, U, h, S]``."""
    u, me, peers = comm.size, comm.rank, comm.ranks
    s = out.shape[1]
    with pipe.on_comm():
        pipe.comm_wait(ready)
        pipe.used_here(o, l)
        sends, recvs, post = [], [], []
        for p in range(u):
            rows, dst = o[:, p * s : (p + 1) * s], out[:, :, p, h0:h1]
            lrows = l[:, :, p * s : (p + 1) * s] if l is not None else None
            if p == me:
                dst.copy_(rows)
                if l is not None:
                    lse[:, p, h0:h1].copy_(lrows)
                continue
            sends.append((rows.contiguous(), peers[p], 3))
            recvs.append((recv_slot(dst, post), peers[p], 3))
            if l is not None:
                sends.append((lrows.contiguous(), peers[p], 4))
                recvs.append((recv_slot(lse[:, p, h0:h1], post), peers[p], 4))
        exchange(sends, recvs, comm.group)
        finish_recv(post)


def _p2p_forward(q, k, v, *, comm: UlyssesComm, attend: Attend, return_lse: bool, chunks: int, compute_streams: int):
    """The ``"p2p"`` implementation of :func:`ulysses_forward` (same contract)."""
    u = comm.size
    b, s_q, h_pad, d = q.shape
    h = h_pad // u
    groups = head_groups(h, chunks)
    out = q.new_empty((b, s_q, u, h, d))
    lse = torch.empty((b, u, h, s_q), dtype=torch.float32, device=q.device) if return_lse else None
    src = [t.unflatten(2, (u, h)) for t in (q, k, v)]
    pipe = Pipeline(q, "ulysses", compute_streams)
    pipe.keep(q, k, v, out, lse)
    pending = _p2p_scatter(pipe, comm, src, *groups[0])
    for gi, (h0, h1) in enumerate(groups):
        # Comm-stream order: scatter(g + 1), then gather(g) (which waits for kernel g): the next
        # group's inputs travel while kernel g runs, and group g's outputs during kernel g + 1.
        nxt = _p2p_scatter(pipe, comm, src, *groups[gi + 1]) if gi + 1 < len(groups) else None
        q_g, kv_g, ready = pending
        with pipe.on_compute(gi, after=ready):
            pipe.used_here(q_g, kv_g)
            o, l = attend(q_g, kv_g, return_lse, (h0, h1))
            done = pipe.mark()
        _p2p_gather(pipe, comm, o, l, out, lse, h0, h1, done)
        pending = nxt
        del q_g, kv_g, o, l  # freed as the pipeline goes (their streams are recorded)
    pipe.finish()
    return out.view(b, s_q, h_pad, d), (lse.view(b, h_pad, s_q) if lse is not None else None)


def default_chunks(impl: str, heads_per_rank: int) -> int:
    """Head groups Ulysses pipelines when the caller names none.

    ``"ce"``: groups of two heads (``ceil(heads_per_rank / 2)``). Its transfers take no SM, so
    group ``g + 1`` travels while kernel ``g`` runs, and only the first group's inputs and the last
    group's outputs stay exposed. Measured on 4 x H100 at S = 75,600 and 10 heads per rank (cuDNN):
    five two-head kernels take what one ten-head kernel takes (51.3 vs 51.8 ms), ten one-head
    kernels 5 % more (54.5 ms). The NCCL paths (``"p2p"``, ``"packed"``): 1 -- their transfers are kernels that
    get no SM beside a running attention kernel, and every pipelined variant measured slower.
    """
    return max(1, -(-heads_per_rank // 2)) if impl == "ce" else 1


def ulysses_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    comm: UlyssesComm,
    attend: Attend,
    return_lse: bool,
    chunks: int | None = None,
    impl: str = "auto",
    compute_streams: int = 1,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """All-to-all in, ``attend`` on the group's full sequence, all-to-all out, head group by head group.

    Args:
        q: ``[B, S_q, H_pad, D]`` local query chunk, heads a multiple of ``comm.size``.
        k, v: ``[B, S_k, H_pad, D]`` local key/value chunk, same dtype.
        comm: the Ulysses group's :class:`UlyssesComm`.
        attend: kernel on the gathered sequence (see ``Attend``).
        return_lse: also return the LSE.
        chunks: head groups to pipeline (1 = no overlap); ``None``: :func:`default_chunks` of the
            implementation that runs.
        impl: ``"auto"``, ``"ce"`` (copy engines over symmetric memory; CUDA only), ``"p2p"`` (direct
            receives, no unpack) or ``"packed"`` (all_to_all_single + unpack); see the module docstring.
        compute_streams: ``"p2p"`` only: 2 alternates the groups' kernels over two streams.

    Returns:
        ``(out, lse)``: ``out`` ``[B, S_q, H_pad, D]`` in q's dtype, ``lse`` float32
        ``[B, H_pad, S_q]`` or ``None``.
    """
    if impl not in ULYSSES_IMPLS:
        raise ValueError(f"ulysses impl must be one of {ULYSSES_IMPLS}, got {impl!r}")
    if chunks is not None and chunks < 1:
        raise ValueError(f"ulysses chunks must be >= 1, got {chunks}")
    if impl == "auto":
        impl = "ce" if compute_streams == 1 and ce_usable(comm.group, q.device) else "p2p"
    if chunks is None:
        chunks = default_chunks(impl, q.shape[2] // comm.size)
    if impl == "packed":
        return packed_forward(q, k, v, comm=comm, attend=attend, return_lse=return_lse, chunks=chunks)
    if impl == "ce":
        if compute_streams != 1:
            raise ValueError(f"ulysses impl 'ce' runs its kernels on one stream (compute_streams=1), got {compute_streams}")
        with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():  # the driver calls use it
            return ulysses_ce_forward(q, k, v, comm=comm, attend=attend, return_lse=return_lse, chunks=chunks)
    return _p2p_forward(q, k, v, comm=comm, attend=attend, return_lse=return_lse, chunks=chunks,
                        compute_streams=compute_streams)


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
    chunks: int | None = None,
    impl: str = "auto",
    compute_streams: int = 1,
    block_mask: BlockSparseMask | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Ulysses attention over the mesh's ulysses axis (``mesh.ring_size`` must be 1).

    Args:
        q: ``[B, S_q_local, H, D]`` local query chunk (``shard.chunk`` tokens), backend's dtype.
        k, v: ``[B, S_k_local, H, D]`` local key/value chunk (``kv_shard.chunk`` tokens).
        backend: the kernel; runs on the full sequence with ``ceil(H / U)`` heads (as
            ``backend.for_heads(...)`` of the heads each call gets: Sparge binds its per-head thresholds).
        mesh: parallel mesh with ``ring_size == 1``.
        shard: the query sequence's :class:`SeqShard`.
        kv_shard: the key sequence's shard; ``None`` = ``shard`` (self-attention).
        scale: softmax scale, ``None`` = ``D ** -0.5``.
        return_lse: also return the float32 LSE.
        chunks: head groups pipelined against the all-to-alls (1 = none; ``None``: :func:`default_chunks`).
        impl: ``"auto"``, ``"ce"``, ``"p2p"`` or ``"packed"`` (see the module docstring).
        compute_streams: 1, or 2 to alternate the head groups' kernels over two CUDA streams.
        block_mask: mask over the global unpadded ``S_q x S_k`` (a kernel with ``caps.block_mask``):
            every rank holds the whole sequence for its heads, so the kernel gets the whole mask
            (its window over the padded sequence: positions past the end are masked). ``None``: dense.

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
    comm = UlyssesComm.from_mesh(mesh)
    kv_valid = kv_shard.chunk_valid(0, u)  # the gathered sequence is the whole (padded) sequence
    lens = None if kv_valid == kv_shard.chunk * u else [kv_valid] * q.shape[0]
    window = None if block_mask is None else block_mask.sub(0, shard.chunk * u, 0, kv_shard.chunk * u)

    first_head = comm.rank * (h_pad // u)  # this rank's heads after the all-to-all

    def attend(q_full, kv, want_lse, heads):
        kernel = backend.for_heads(first_head + heads[0], first_head + heads[1])  # per-head settings (Sparge)
        return kernel(q_full, kv[0], kv[1], scale=scale, kv_lens=lens, return_lse=want_lse, block_mask=window)

    out, lse = ulysses_forward(
        pad_heads(q, h_pad), pad_heads(k, h_pad), pad_heads(v, h_pad),
        comm=comm, attend=attend, return_lse=return_lse, chunks=chunks, impl=impl, compute_streams=compute_streams,
    )
    if h_pad != num_heads:
        out = out[:, :, :num_heads].contiguous()
        lse = lse[:, :num_heads].contiguous() if lse is not None else None
    return out, lse
