"""The sequence-parallel attention entry point (Ulysses, ring, or USP = Ulysses inside ring),
the local cross-attention helper, and the start-up check of a backend against the mesh.

USP layout: the sequence chunk of a process is its SP rank ``ring_rank * U + ulysses_rank``, so
the ``U`` chunks of a Ulysses group are neighbours and the group's all-to-all yields one
contiguous *super-chunk* of ``U * chunk`` tokens (for ``H_pad / U`` heads). Ring peers (same
Ulysses rank, successive ring ranks) then pass super-chunks around the ring. Padding is
only at the global end, so the valid keys of super-chunk ``c`` are ``clamp(S - c * U * chunk, 0, U * chunk)``.

How the data moves (NCCL, or the copy engine) is the mesh's transport, chosen once when the mesh is built
(``parallel.transport``; :mod:`ditfleet.parallel.transport`); the algorithms here do not depend on it.

Block-sparse masks (radial attention): ``block_mask`` is one mask over the *global unpadded*
sequences, the same on every rank. Ulysses runs the kernel on the whole (padded) group sequence
with the whole mask (positions past the end are masked by the window); the ring runs each
``(query chunk, key chunk)`` step with its sub-mask, skips steps whose sub-mask is empty and K/V
transfers nobody further along needs (:mod:`ditfleet.parallel.ring_schedule`); USP does both,
with super-chunks as the ring's chunks.

Kernels with per-head settings or their own masks (Sparge; the hooks of
:class:`~ditfleet.attention.base.AttentionBackend`): Ulysses gives each head group the kernel
``backend.for_heads(...)`` of the heads it holds, which predicts its mask on the whole gathered
sequence itself; a ring (or the ring of USP) cannot see the whole sequence, so when
``backend.predicts_mask`` the group first builds the *global* mask from all-reduced block
statistics (``backend.predict_sharded_mask``, two small all-reduces per call) and then runs the
ring as under any block mask, with its empty steps skipped.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..attention.base import AttentionBackend
from ..attention.blockmask import BlockSparseMask
from ..errors import ConfigError
from .mesh import ParallelMesh
from .ring import ring_attention, ring_run
from .shard import SeqShard
from .transport import bounded, peer_wait, transport_for
from .ulysses import pad_heads, padded_heads, ulysses_attention, ulysses_forward

SEQ_P_ATTN_KEY = "parallel.seq_p_attn_type"


def check_backend_for_mesh(backend: AttentionBackend, mesh: ParallelMesh) -> None:
    """Fail at start-up when ``backend`` cannot run sequence-parallel on ``mesh``.

    Raises:
        ConfigError: (key ``parallel.seq_p_attn_type``) the ring degree is > 1 and the backend
            returns no LSE, which ring attention needs to merge partial results.
    """
    if mesh.ring_size > 1 and not backend.caps.lse:
        raise ConfigError(
            SEQ_P_ATTN_KEY,
            f"ring attention (ring_size {mesh.ring_size}) needs a kernel that returns the LSE, but "
            f"{backend.key} ({backend.description}) does not; use Ulysses only (ring_size 1, "
            f"ulysses_size {mesh.sp_size}) or pick a kernel with LSE for this site",
        )


def _check_shapes(q, k, v, shard: SeqShard, kv_shard: SeqShard) -> None:
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"q, k, v must be [B, S, H, D] with k, v alike; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] != shard.chunk:
        raise ValueError(f"local q has {q.shape[1]} tokens, its shard says {shard.chunk} (global {shard.global_len})")
    if k.shape[1] != kv_shard.chunk:
        raise ValueError(f"local k/v have {k.shape[1]} tokens, kv_shard says {kv_shard.chunk} (global {kv_shard.global_len})")


def sequence_parallel_attention(
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
    """Attention of a sharded query sequence over a sharded key sequence, across the SP group.

    Runs Ulysses (``ring_size == 1``), ring (``ulysses_size == 1``), USP (both > 1) or the plain
    kernel (SP degree 1). The result equals single-device attention over the unpadded sequences.

    Args:
        q: ``[B, S_q_local, H, D]`` this rank's query chunk (``shard.chunk`` tokens, from
            :func:`shard_sequence`), in the backend's dtype and device.
        k: ``[B, S_k_local, H, D]`` this rank's key chunk (``kv_shard.chunk`` tokens).
        v: ``[B, S_k_local, H, D]`` this rank's value chunk.
        backend: the site's kernel (an :class:`AttentionBackend`); must return the LSE when
            ``mesh.ring_size > 1``.
        mesh: the parallel mesh.
        shard: the query sequence's :class:`SeqShard`.
        kv_shard: the key sequence's shard; ``None`` means ``shard`` (self-attention).
        scale: softmax scale; ``None`` = ``D ** -0.5``.
        return_lse: also return the float32 LSE of the local queries.
        block_mask: a :class:`~ditfleet.attention.blockmask.BlockSparseMask` of shape
            ``(shard.global_len, kv_shard.global_len)`` over the *global unpadded* sequences, identical
            on every rank (radial attention); needs a backend with ``caps.block_mask``. ``None``: dense,
            or the mask the backend predicts itself (``backend.predicts_mask``: Sparge).

    Returns:
        ``(out, lse)``: ``out`` ``[B, S_q_local, H, D]`` in q's dtype; ``lse`` float32
        ``[B, H, S_q_local]`` when ``return_lse``, else ``None``. Rows of padded queries are
        unspecified (``gather_sequence`` drops them); under a mask, rows it leaves without any
        key get ``out = 0`` and ``lse = -inf``, as on one device.

    Raises:
        ConfigError: ring degree > 1 with a backend that returns no LSE.
        NotImplementedError: ``block_mask`` with a backend that takes none (on every rank, before
            any communication).
        ValueError: ``block_mask`` of the wrong shape, or given to a kernel that predicts its own.
    """
    kv_shard = kv_shard or shard
    check_backend_for_mesh(backend, mesh)
    _check_shapes(q, k, v, shard, kv_shard)
    if block_mask is not None:
        if backend.predicts_mask:
            raise ValueError(f"{backend.key} predicts its own block mask; block_mask must be None")
        _check_mask(backend, block_mask, shard, kv_shard)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    u, r = mesh.ulysses_size, mesh.ring_size
    if u == 1 and r == 1:
        lens = None if kv_shard.pad == 0 else [kv_shard.global_len] * q.shape[0]
        mask = None if block_mask is None else block_mask.sub(0, q.shape[1], 0, k.shape[1])
        return backend(q, k, v, scale=scale, kv_lens=lens, return_lse=return_lse, block_mask=mask)
    if r == 1:
        return ulysses_attention(q, k, v, backend=backend, mesh=mesh, shard=shard, kv_shard=kv_shard, scale=scale,
                                 return_lse=return_lse, block_mask=block_mask)
    if u == 1:
        if backend.predicts_mask:
            block_mask = _sharded_mask(backend, q, k, mesh, q_offset=mesh.ring_rank * shard.chunk,
                                       k_offset=mesh.ring_rank * kv_shard.chunk, shard=shard, kv_shard=kv_shard, scale=scale)
        return ring_attention(q, k, v, backend=backend, mesh=mesh, shard=shard, kv_shard=kv_shard, scale=scale,
                              return_lse=return_lse, block_mask=block_mask)
    return _usp(q, k, v, backend=backend, mesh=mesh, shard=shard, kv_shard=kv_shard, scale=scale,
                return_lse=return_lse, block_mask=block_mask)


def _check_mask(backend: AttentionBackend, mask: BlockSparseMask, shard: SeqShard, kv_shard: SeqShard) -> None:
    if not backend.caps.block_mask:
        raise NotImplementedError(f"{backend.key} ({backend.description}) does not take a block-sparse mask")
    if not isinstance(mask, BlockSparseMask):
        raise TypeError(f"block_mask must be a BlockSparseMask, got {type(mask).__name__}")
    if tuple(mask.shape) != (shard.global_len, kv_shard.global_len):
        raise ValueError(f"block_mask is {tuple(mask.shape)}, the global sequences are "
                         f"{shard.global_len} x {kv_shard.global_len} (the mask is over the unpadded global sequences)")


def _sharded_mask(backend: AttentionBackend, q, k, mesh: ParallelMesh, *, q_offset: int, k_offset: int, shard: SeqShard,
                  kv_shard: SeqShard, scale: float):
    """The global mask of a mask-predicting kernel over the ring group's chunks (same on every ring rank)."""
    group = mesh.group("ring")
    def all_reduce(t):
        with peer_wait("sparge mask statistics", mesh.peers("ring"), mesh.timeout_s):
            bounded(dist.all_reduce(t, group=group, async_op=True), t, mesh.timeout_s)

    return backend.predict_sharded_mask(q, k, q_offset=q_offset, k_offset=k_offset, q_length=shard.global_len,
                                        k_length=kv_shard.global_len, scale=scale, all_reduce=all_reduce)


def _usp(q, k, v, *, backend, mesh: ParallelMesh, shard: SeqShard, kv_shard: SeqShard, scale, return_lse, block_mask):
    """Ulysses inside each ring group: all-to-all to super-chunks, ring over them, all-to-all back."""
    u = mesh.ulysses_size
    num_heads = q.shape[2]
    h_pad = padded_heads(num_heads, u)
    ring = transport_for(mesh, "ring")
    first = mesh.ulysses_rank * (h_pad // u)  # this rank's heads after the all-to-all
    kernel = backend.for_heads(first, first + h_pad // u)

    def attend(q_super, kv_super, want_lse):
        mask = block_mask
        if kernel.predicts_mask:  # every rank of this ring holds the same heads: the collectives match
            mask = _sharded_mask(kernel, q_super, kv_super[0], mesh, q_offset=ring.g.rank * u * shard.chunk,
                                 k_offset=ring.g.rank * u * kv_shard.chunk, shard=shard, kv_shard=kv_shard, scale=scale)
        return ring_run(q_super, kv_super, transport=ring, backend=kernel, scale=scale, q_chunk=u * shard.chunk,
                        kv_shard=kv_shard, per_chunk=u, block_mask=mask, return_lse=want_lse)

    out, lse = ulysses_forward(pad_heads(q, h_pad), pad_heads(k, h_pad), pad_heads(v, h_pad),
                               transport=transport_for(mesh, "ulysses"), attend=attend, return_lse=return_lse)
    if h_pad != num_heads:
        out = out[:, :, :num_heads].contiguous()
        lse = lse[:, :num_heads].contiguous() if lse is not None else None
    return out, lse


def cross_attention(
    q: torch.Tensor,
    context_k: torch.Tensor,
    context_v: torch.Tensor,
    *,
    backend: AttentionBackend,
    scale: float | None = None,
    context_lens: list[int] | None = None,
    return_lse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Local query shard against the full, replicated context (text / CLIP tokens): no communication.

    Args:
        q: ``[B, S_q_local, H, D]`` this rank's query chunk (padded rows are harmless).
        context_k: ``[B, S_ctx, H, D]`` the whole context's keys, identical on every rank.
        context_v: ``[B, S_ctx, H, D]`` its values.
        backend: the site's kernel.
        scale: softmax scale; ``None`` = ``D ** -0.5``.
        context_lens: valid leading context tokens per batch element, ``None`` = all.
        return_lse: also return the float32 LSE.

    Returns:
        ``(out, lse)``: ``out`` ``[B, S_q_local, H, D]`` in q's dtype; ``lse`` float32
        ``[B, H, S_q_local]`` or ``None``.
    """
    return backend(q, context_k, context_v, scale=scale, kv_lens=context_lens, return_lse=return_lse)
