"""Sequence sharding: contiguous chunks by SP rank, padding at the global end only.

A global length ``S`` over ``P`` sequence-parallel ranks becomes ``P`` chunks of
``ceil(S / P)`` tokens; the last ``P * chunk - S`` positions are padding. Because padding sits
at the end, every chunk (and every run of neighbouring chunks) holds a *leading* run of valid
tokens, so valid key counts are plain integers (``kv_lens``) that every backend understands.

Tile alignment (block-sparse kernels under a ring): with ``align = T`` the chunk is rounded up to
a multiple of ``T``, ``chunk = ceil(S / (P * T)) * T`` (padding still at the global end only, at
most ``P * T - 1`` tokens), so every ring window starts on the kernel's tiles and is cut into the
tiles of the whole sequence: a full tile stays one full tile on one rank instead of being split
into partial tiles of two windows (:func:`tile_align` picks ``T`` from the kernels and the mesh).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..attention.base import AttentionBackend
from .mesh import ParallelMesh

# ``all_gather_into_tensor`` was renamed ``all_gather_single`` (torch >= 2.10); same semantics.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True)
class SeqShard:
    """Where one sharded sequence lives.

    Attributes:
        global_len: real (unpadded) sequence length.
        sp_size: number of chunks (the mesh's ``sp_size``).
        sp_rank: index of the chunk this process holds.
        chunk: tokens per chunk, ``ceil(global_len / (sp_size * align)) * align``.
        align: the chunk is a multiple of it (1: no alignment, ``ceil(global_len / sp_size)``).
    """

    global_len: int
    sp_size: int
    sp_rank: int
    chunk: int
    align: int = 1

    def __post_init__(self) -> None:
        if self.align < 1 or self.chunk % self.align:
            raise ValueError(f"SeqShard: chunk {self.chunk} is not a multiple of align {self.align}")

    @classmethod
    def for_length(cls, global_len: int, mesh: ParallelMesh, *, align: int = 1) -> SeqShard:
        """The shard of a sequence of ``global_len`` tokens on this process of ``mesh``, chunks a multiple of ``align``."""
        if global_len < 1:
            raise ValueError(f"sequence length must be >= 1, got {global_len}")
        if int(align) < 1:
            raise ValueError(f"shard alignment must be >= 1, got {align}")
        align = int(align)
        chunk = -(-global_len // (mesh.sp_size * align)) * align
        return cls(global_len, mesh.sp_size, mesh.sp_rank, chunk, align)

    @property
    def padded_len(self) -> int:
        return self.chunk * self.sp_size

    @property
    def pad(self) -> int:
        """Padding tokens at the global end."""
        return self.padded_len - self.global_len

    @property
    def start(self) -> int:
        """Global position of this process's first token."""
        return self.sp_rank * self.chunk

    def valid_in(self, start: int, length: int) -> int:
        """Valid (non-padding) tokens among global positions ``[start, start + length)``."""
        return max(0, min(length, self.global_len - start))

    def chunk_valid(self, index: int, chunks_per_block: int = 1) -> int:
        """Valid tokens of block ``index`` when neighbouring chunks are grouped ``chunks_per_block`` at a time."""
        size = self.chunk * chunks_per_block
        return self.valid_in(index * size, size)

    @property
    def local_valid(self) -> int:
        """Valid tokens of this process's own chunk."""
        return self.valid_in(self.start, self.chunk)


def tile_align(mesh: ParallelMesh | None, backends: Iterable[AttentionBackend | None]) -> int:
    """The chunk alignment that keeps ``backends``' block-sparse tiles whole under ``mesh``'s ring.

    The ring's windows start at multiples of its chunk (ring: one SP chunk; USP: a super-chunk of
    ``U`` SP chunks), so the chunk is aligned to ``T = lcm`` of every tile of the kernels that declare
    one (:attr:`~ditfleet.attention.base.AttentionBackend.seq_tile`), or under USP to ``T / gcd(T, U)``
    (then ``U * chunk`` is a multiple of ``T``). 1 (no extra padding) without a ring (Ulysses windows
    start at 0), without a mesh, or when no kernel has a tile (dense kernels).

    Args:
        mesh: the parallel mesh, or ``None``.
        backends: the kernels that will run on the sharded sequence (``None`` entries are skipped).
    """
    if mesh is None or mesh.ring_size == 1:
        return 1
    t = 1
    for backend in backends:
        tile = None if backend is None else backend.seq_tile
        if tile:
            t = math.lcm(t, *(int(x) for x in tile))
    return t // math.gcd(t, mesh.ulysses_size)


def shard_sequence(x: torch.Tensor, mesh: ParallelMesh, dim: int = 1, *, align: int = 1) -> tuple[torch.Tensor, SeqShard]:
    """This process's contiguous chunk of ``x`` along ``dim``, zero-padded at the global end.

    Args:
        x: the full tensor, identical on every rank of the SP group, any dtype; ``x.shape[dim]``
            is the global sequence length.
        mesh: the parallel mesh (the chunk index is ``mesh.sp_rank``).
        dim: the sequence dim.
        align: chunks are a multiple of it (:func:`tile_align`; 1: ``ceil(S / sp_size)``).

    Returns:
        ``(x_local, shard)``: ``x_local`` has ``shard.chunk`` tokens along ``dim`` (a contiguous
        copy, so the full tensor can be freed), same dtype and device as ``x``; ``shard`` is the
        :class:`SeqShard` record ``gather_sequence`` and the attention wrappers need.
    """
    dim = dim % x.dim()
    shard = SeqShard.for_length(x.shape[dim], mesh, align=align)
    local = x.narrow(dim, shard.start, shard.local_valid) if shard.local_valid else x.narrow(dim, 0, 0)
    if local.shape[dim] < shard.chunk:
        pad = [0, 0] * (x.dim() - 1 - dim) + [0, shard.chunk - local.shape[dim]]
        local = F.pad(local, pad)
    return local.contiguous(), shard


def gather_sequence(x_local: torch.Tensor, mesh: ParallelMesh, shard: SeqShard, dim: int = 1) -> torch.Tensor:
    """All-gather the chunks of the SP group and drop the padding: the inverse of ``shard_sequence``.

    Args:
        x_local: this process's chunk, ``shard.chunk`` tokens along ``dim``, any dtype.
        mesh: the parallel mesh.
        shard: the record ``shard_sequence`` returned.
        dim: the sequence dim.

    Returns:
        The full tensor, ``shard.global_len`` tokens along ``dim``, same dtype/device, on every rank.
    """
    dim = dim % x_local.dim()
    if x_local.shape[dim] != shard.chunk:
        raise ValueError(f"gather_sequence: local length {x_local.shape[dim]} != shard chunk {shard.chunk}")
    if mesh.sp_size == 1:
        return x_local.narrow(dim, 0, shard.global_len)
    from .transport import bounded, peer_wait

    front = x_local.movedim(dim, 0).contiguous()
    out = front.new_empty((mesh.sp_size * front.shape[0], *front.shape[1:]))
    with peer_wait("gather_sequence", mesh.peers("sp"), mesh.timeout_s):
        bounded(all_gather_single(out, front, group=mesh.group("sp"), async_op=True), front, mesh.timeout_s)
    return out[: shard.global_len].movedim(0, dim)
