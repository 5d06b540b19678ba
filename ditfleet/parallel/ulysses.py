"""Ulysses (DeepSpeed-Ulysses) sequence parallelism: all-to-all sequence <-> heads.

Each of the ``U`` ranks of a Ulysses group holds a sequence chunk with all heads. One all-to-all (q, k and v
packed in one ``[U, N]`` buffer, row ``j`` = the heads of rank ``j``) gives every rank the *whole* group
sequence for ``H_pad / U`` heads; the kernel runs there; a second all-to-all returns the output (and the
LSE) to sequence chunks. The all-to-all is the transport's (:mod:`ditfleet.parallel.transport`: NCCL /
gloo ``all_to_all_single``, or the copy engine's pulls from symmetric memory). Heads that do not divide
``U`` are padded with zero heads (12 heads on 8 ranks run as 16, two per rank: the critical path an uneven
split would have) and dropped after.

No head-group pipelining: on NCCL every pipelined variant measured slower than one exchange (4 x H100,
S = 75,600, H = 40: the transfers are kernels that get no SM beside a running attention kernel).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..attention.base import AttentionBackend
from ..attention.blockmask import BlockSparseMask
from .mesh import ParallelMesh
from .shard import SeqShard
from .transport import transport_for

# attend(q, kv, return_lse) -> (out, lse): q [B, U*S_q, h, D], kv packed [2, B, U*S_k, h, D] for this rank's h heads
Attend = Callable[[torch.Tensor, torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor | None]]


def padded_heads(num_heads: int, ulysses_size: int) -> int:
    """Heads after zero-padding to a multiple of the Ulysses degree (12 on 8 ranks -> 16)."""
    return -(-num_heads // ulysses_size) * ulysses_size


def pad_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``x`` ``[B, S, H, D]`` with zero heads appended up to ``heads`` (no copy when already there)."""
    return x if x.shape[2] == heads else F.pad(x, (0, 0, 0, heads - x.shape[2]))


def ulysses_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, transport, attend: Attend,
                    return_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """All-to-all in, ``attend`` on the group's full sequence for this rank's heads, all-to-all out.

    Args:
        q: ``[B, S_q, H_pad, D]`` local query chunk, heads a multiple of the group size ``U``.
        k, v: ``[B, S_k, H_pad, D]`` local key/value chunk, same dtype.
        transport: the Ulysses group's transport (``send_buffer``, ``all_to_all``; ``g.size``).
        attend: the kernel on the gathered sequence (see ``Attend``).
        return_lse: also return the LSE.

    Returns:
        ``(out, lse)``: ``out`` ``[B, S_q, H_pad, D]`` in q's dtype, ``lse`` float32 ``[B, H_pad, S_q]`` or ``None``.
    """
    u = transport.g.size
    b, s_q, h_pad, d = q.shape
    s_k, h = k.shape[1], h_pad // u
    n_q, n_k = b * s_q * h * d, b * s_k * h * d
    send = transport.send_buffer((u, n_q + 2 * n_k), q.dtype, q.device)
    for t, off, n, s in ((q, 0, n_q, s_q), (k, n_q, n_k, s_k), (v, n_q + n_k, n_k, s_k)):
        send[:, off:off + n].view(u, b, s, h, d).copy_(t.view(b, s, u, h, d).permute(2, 0, 1, 3, 4))
    recv = transport.all_to_all(send, "ulysses exchange")
    q_g = recv[:, :n_q].view(u, b, s_q, h, d).transpose(0, 1).reshape(b, u * s_q, h, d)
    kv = recv.new_empty((2, b, u * s_k, h, d))
    for i in range(2):
        part = recv[:, n_q + i * n_k:n_q + (i + 1) * n_k].view(u, b, s_k, h, d)
        kv[i].view(b, u, s_k, h, d).copy_(part.transpose(0, 1))
    del recv, send
    o, l = attend(q_g, kv, return_lse)
    del q_g, kv
    send_o = transport.send_buffer((u, n_q), o.dtype, o.device)
    send_o.view(u, b, s_q, h, d).copy_(o.reshape(b, u, s_q, h, d).transpose(0, 1))
    out = transport.all_to_all(send_o, "ulysses return").view(u, b, s_q, h, d).permute(1, 2, 0, 3, 4)
    out = out.reshape(b, s_q, h_pad, d)
    lse = None
    if return_lse:
        send_l = transport.send_buffer((u, b * h * s_q), torch.float32, o.device)
        send_l.view(u, b, h, s_q).copy_(l.float().reshape(b, h, u, s_q).permute(2, 0, 1, 3))
        lse = transport.all_to_all(send_l, "ulysses return (lse)").view(u, b, h, s_q).transpose(0, 1)
        lse = lse.reshape(b, h_pad, s_q)
    return out, lse


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
    block_mask: BlockSparseMask | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Ulysses attention over the mesh's ulysses axis (``mesh.ring_size`` must be 1), on the mesh's transport.

    Args:
        q: ``[B, S_q_local, H, D]`` local query chunk (``shard.chunk`` tokens), backend's dtype.
        k, v: ``[B, S_k_local, H, D]`` local key/value chunk (``kv_shard.chunk`` tokens).
        backend: the kernel; runs on the full sequence with ``ceil(H / U)`` heads (as
            ``backend.for_heads(...)`` of the heads this rank gets: Sparge binds its per-head thresholds).
        mesh: parallel mesh with ``ring_size == 1``.
        shard: the query sequence's :class:`SeqShard`.
        kv_shard: the key sequence's shard; ``None`` = ``shard`` (self-attention).
        scale: softmax scale, ``None`` = ``D ** -0.5``.
        return_lse: also return the float32 LSE.
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
    kv_valid = kv_shard.chunk_valid(0, u)  # the gathered sequence is the whole (padded) sequence
    lens = None if kv_valid == kv_shard.chunk * u else [kv_valid] * q.shape[0]
    window = None if block_mask is None else block_mask.sub(0, shard.chunk * u, 0, kv_shard.chunk * u)
    first = mesh.ulysses_rank * (h_pad // u)  # this rank's heads after the all-to-all
    kernel = backend.for_heads(first, first + h_pad // u)  # per-head settings (Sparge)

    def attend(q_full, kv, want_lse):
        return kernel(q_full, kv[0], kv[1], scale=scale, kv_lens=lens, return_lse=want_lse, block_mask=window)

    out, lse = ulysses_forward(pad_heads(q, h_pad), pad_heads(k, h_pad), pad_heads(v, h_pad),
                               transport=transport_for(mesh, "ulysses"), attend=attend, return_lse=return_lse)
    if h_pad != num_heads:
        out = out[:, :, :num_heads].contiguous()
        lse = lse[:, :num_heads].contiguous() if lse is not None else None
    return out, lse
