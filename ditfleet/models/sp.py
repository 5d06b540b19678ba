"""Sequence parallelism as a model declares it (the ``_cp_plan`` idea of Diffusers, reduced).

A model class states *where* its token sequence is split over the sequence-parallel (SP) group
and where it is gathered back, as a :class:`SeqParallelPlan`; the model's forward passes the
named tensors through :meth:`SeqParallel.split` / :meth:`SeqParallel.gather` at exactly those
points, and runs its self-attention through :meth:`SeqParallel.attention`. Without a mesh, or
with an SP degree of 1, all three are the identity / the plain kernel, so model code has no
``world_size`` branches. The splitting itself is ``ditfleet.parallel.shard_sequence``: contiguous
chunks by SP rank, zero padding at the global end, padded keys excluded by the attention layer.

Block-sparse kernels under a ring: the model names its self-attention kernels once at start-up
(:meth:`SeqParallel.use_kernels`), and the split aligns every chunk to their tiles
(:func:`ditfleet.parallel.shard.tile_align`), so each ring step's window is cut into the tiles of the
whole sequence (full tiles stay on the block-sparse path). Dense kernels, Ulysses and a single
process keep unaligned chunks (no extra padding).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ..attention.base import AttentionBackend
from ..attention.blockmask import BlockSparseMask
from ..parallel import ParallelMesh, SeqShard, check_backend_for_mesh, gather_sequence, sequence_parallel_attention, shard_sequence
from ..parallel.shard import tile_align


@dataclass(frozen=True)
class SeqParallelPlan:
    """Which per-token tensors a model splits and gathers, with their sequence dim.

    Attributes:
        split: ``name -> dim`` of the tensors split (together, same length) where the sequence
            is formed; every name must be passed to each :meth:`SeqParallel.split` call.
        gather: ``name -> dim`` of the tensors gathered before the sequence leaves the model.
        doc: one line saying where, for readers and reports.
        optional: ``name -> dim`` of per-token tensors that some forwards have and others do not
            (per-token timesteps); when passed to :meth:`SeqParallel.split` they are split with the
            ``split`` tensors (same length, same chunks).
    """

    split: Mapping[str, int] = field(default_factory=dict)
    gather: Mapping[str, int] = field(default_factory=dict)
    doc: str = ""
    optional: Mapping[str, int] = field(default_factory=dict)


class SeqParallel:
    """Applies a :class:`SeqParallelPlan` on this process of a :class:`ParallelMesh` (or none)."""

    def __init__(self, plan: SeqParallelPlan, mesh: ParallelMesh | None = None):
        self.plan = plan
        self.mesh = mesh
        self.align = 1  # chunks are a multiple of it (use_kernels)

    @property
    def active(self) -> bool:
        """True when the sequence is really split (SP degree > 1)."""
        return self.mesh is not None and self.mesh.sp_size > 1

    def check_backend(self, backend: AttentionBackend) -> None:
        """Start-up check that ``backend`` can run the sharded self-attention (ring needs the LSE)."""
        if self.active:
            check_backend_for_mesh(backend, self.mesh)

    def use_kernels(self, *backends: AttentionBackend | None) -> None:
        """Start-up: every kernel the sharded self-attention may run (``None`` entries skipped), replacing any
        earlier set. Each is checked (:meth:`check_backend`) and :meth:`split` aligns chunks to their
        block-sparse tiles under a ring (:attr:`align`; 1 for dense kernels, Ulysses, or no mesh)."""
        for backend in backends:
            if backend is not None:
                self.check_backend(backend)
        self.align = tile_align(self.mesh, backends) if self.active else 1

    def split(self, **tensors: torch.Tensor) -> tuple[dict[str, torch.Tensor], SeqShard | None]:
        """This process's chunk of each tensor named in ``plan.split`` (all required) and ``plan.optional`` (any).

        Returns:
            ``(local, shard)``: the chunks by name (the tensors themselves when inactive) and the
            :class:`SeqShard` to pass to :meth:`attention` and :meth:`gather` (``None`` when inactive).
        """
        dims = {**self.plan.optional, **self.plan.split}
        self._check_names({k: v for k, v in tensors.items() if k not in self.plan.optional}, self.plan.split, "split")
        if not self.active:
            return dict(tensors), None
        out, shard = {}, None
        for name, t in tensors.items():
            out[name], s = shard_sequence(t, self.mesh, dim=dims[name], align=self.align)
            if shard is not None and s != shard:
                raise ValueError(f"sequence-parallel split: {name!r} has {s.global_len} tokens, others {shard.global_len}")
            shard = s
        return out, shard

    def gather(self, shard: SeqShard | None, **tensors: torch.Tensor) -> dict[str, torch.Tensor]:
        """The full tensors (padding dropped) on every rank, for the names in ``plan.gather``."""
        self._check_names(tensors, self.plan.gather, "gather")
        if not self.active:
            return dict(tensors)
        return {name: gather_sequence(t, self.mesh, shard, dim=self.plan.gather[name]) for name, t in tensors.items()}

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        backend: AttentionBackend,
        shard: SeqShard | None,
        block_mask: BlockSparseMask | None = None,
    ) -> torch.Tensor:
        """Self-attention of the (local) sequence: the kernel itself, or sequence-parallel over the mesh.

        Args:
            q, k, v: ``[B, S_local, H, D]`` in the backend's dtype.
            backend: the site's kernel.
            shard: what :meth:`split` returned.
            block_mask: a block-sparse mask over the whole (global, unpadded) sequence, the same on
                every rank (the parallel layer cuts it per rank and step); ``None``: dense.

        Returns:
            ``[B, S_local, H, D]``.
        """
        if not self.active:
            return backend(q, k, v, block_mask=block_mask)[0]
        return sequence_parallel_attention(q, k, v, backend=backend, mesh=self.mesh, shard=shard, block_mask=block_mask)[0]

    @staticmethod
    def _check_names(tensors: Mapping[str, torch.Tensor], declared: Mapping[str, int], what: str) -> None:
        if set(tensors) != set(declared):
            raise ValueError(f"sequence-parallel {what}: got {sorted(tensors)}, the model's plan declares {sorted(declared)}")
