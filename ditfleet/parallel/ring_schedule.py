"""Which steps of a ring run a kernel and which K/V transfers happen, under a block-sparse mask.

The rotating ring of ``R`` ranks: at step ``s`` rank ``r`` holds key chunk ``(r - s) mod R``; chunk
``c`` starts at rank ``c`` and the transfer of step ``s`` moves it from rank ``c + s`` to rank
``c + s + 1`` (mod ``R``), which holds it at step ``s + 1``.

Everything is decided from ``needs[a][c]``: "query chunk ``a`` attends at least one key of key chunk
``c``". It is a function of the global mask and the shard layout alone, hence identical on every
rank, so every decision below is taken identically by the two ends of each transfer:

* rank ``r`` runs the kernel at step ``s`` iff ``needs[r][(r - s) mod R]`` (an empty sub-mask never
  reaches a kernel);
* chunk ``c`` travels at step ``s`` iff a rank *further along* needs it:
  ``any(needs[(c + t) mod R][c] for t in s + 1 .. R - 1)``. The sender (which holds ``c``) and the
  receiver (which expects ``c``) evaluate the same predicate, so a skipped transfer is skipped on
  both sides and the rotation cannot deadlock; a rank that does not need a chunk still forwards it
  when one beyond it does. The predicate only turns off as ``s`` grows, so a rank that must send
  a chunk has always received it, and a rank that computes on a chunk has always received it.

Without a mask ``needs[a][c]`` is "chunk ``c`` holds a valid (non-padding) key", which is the
ring's earlier rule for padding-only chunks.

``needs`` must be known on the host of every rank before the first step. A mask whose grid is in
host memory (radial: built once on the CPU) is read for it at no cost. A mask whose grid lives on a
GPU (Sparge: predicted every layer from q and k) is *not* read: that would be a device-to-host sync
per layer. Its schedule is the padding-only one (every real (query chunk, key chunk) pair runs, every
needed-by-padding rule holds), and a step whose window is empty costs what the kernel costs on an
empty tile list (FA4: no key tile is loaded; flex: none either), on the device, without the host
waiting. :func:`sp_schedule` with ``exact=True`` reads the device anyway (reports, not the forward).

What the kernels compute in those steps is counted by :func:`sp_tiles` (reports, tests): per step the
``bq x bk`` tiles of its window that run full (no mask inside) or partial (a token predicate inside;
FA4's block-sparse path sends these to flex). Chunks aligned to the tile
(:func:`~ditfleet.parallel.shard.tile_align`) give windows cut into the whole sequence's tiles: every
tile is full or empty exactly as on one device, and the steps' tiles add up to the single-device ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..attention.blockmask import BlockSparseMask
from .shard import SeqShard


@dataclass(frozen=True)
class RingSchedule:
    """The kernel calls and transfers of one rotating ring (see the module docstring).

    Attributes:
        needs: ``needs[a][c]``, ``R x R`` booleans: query chunk ``a`` attends some key of chunk ``c``.
    """

    needs: tuple[tuple[bool, ...], ...]

    @classmethod
    def dense(cls, chunk_valid: Sequence[int]) -> RingSchedule:
        """No mask: every query chunk needs every key chunk that holds a valid key."""
        row = tuple(bool(n) for n in chunk_valid)
        return cls(tuple(row for _ in row))

    @classmethod
    def from_mask(cls, mask: BlockSparseMask, q_chunk: int, k_chunk: int, size: int, *, exact: bool = False) -> RingSchedule:
        """From ``mask`` (over the global unpadded sequences) cut into ``size`` query chunks of ``q_chunk``
        tokens and ``size`` key chunks of ``k_chunk`` tokens (chunks past the end are padding: needed by none).

        The mask's occupancy is read only when its grid is in host memory (or ``exact``: a host sync for a
        grid on a GPU); otherwise every real pair is needed (see the module docstring)."""
        if not (exact or mask.on_host):
            q_len, k_len = mask.shape
            return cls(tuple(tuple(a * q_chunk < q_len and c * k_chunk < k_len for c in range(size))
                             for a in range(size)))

        def build():
            occ = mask.chunk_occupancy(q_chunk, k_chunk).tolist()  # rows / columns past the end: padding
            return tuple(tuple(a < len(occ) and c < len(occ[a]) and bool(occ[a][c]) for c in range(size))
                         for a in range(size))

        # cached with the mask's grid (a ring asks for it at every layer of every step)
        return cls(mask._grid.cached(("ring_needs", mask.key, q_chunk, k_chunk, size), build))

    @property
    def size(self) -> int:
        return len(self.needs)

    def computes(self, rank: int, step: int) -> bool:
        """Rank ``rank`` runs the kernel at step ``step`` (on key chunk ``(rank - step) mod R``)."""
        return self.needs[rank][(rank - step) % self.size]

    def sends(self, chunk: int, step: int) -> bool:
        """Chunk ``chunk`` moves at step ``step`` (from rank ``chunk + step`` to the next); ``step < R - 1``."""
        r = self.size
        return any(self.needs[(chunk + t) % r][chunk] for t in range(step + 1, r))

    def stats(self) -> dict[str, int]:
        """Totals over the whole ring: kernel steps run / skipped, K/V transfers made / skipped."""
        r = self.size
        steps = sum(self.computes(a, s) for a in range(r) for s in range(r))
        sends = sum(self.sends(c, s) for c in range(r) for s in range(r - 1))
        return {"ring_size": r, "steps": steps, "steps_skipped": r * r - steps,
                "sends": sends, "sends_skipped": r * (r - 1) - sends}


def sp_schedule(mask: BlockSparseMask, chunk_q: int, chunk_k: int, ulysses_size: int, ring_size: int, *,
                exact: bool = False) -> RingSchedule:
    """The ring schedule of ring / USP attention under ``mask``: chunks are the Ulysses groups' super-chunks
    (``ulysses_size`` SP chunks of ``chunk_q`` / ``chunk_k`` tokens). ``exact``: read a device grid too
    (what the mask would allow to skip; a host sync, for reports)."""
    return RingSchedule.from_mask(mask, chunk_q * ulysses_size, chunk_k * ulysses_size, ring_size, exact=exact)


def sp_tiles(mask: BlockSparseMask, shard: SeqShard, kv_shard: SeqShard | None, ulysses_size: int, ring_size: int,
             tile: tuple[int, int]) -> dict:
    """The kernel tiles of every ring / USP step under ``mask`` (a host computation, for reports and tests).

    Step ``(a, c)`` (query super-chunk ``a``, key super-chunk ``c``) runs the window the ring gives its
    kernel: queries ``[a * Cq, (a + 1) * Cq)`` against the *valid* keys of super-chunk ``c`` (``kv_lens``
    cuts the padding off before a kernel sees it), ``C = ulysses_size * chunk``; its ``bq x bk`` tiles are
    classified as the block-sparse kernels do (:meth:`BlockSparseMask.kernel_blocks` with ``real_rows``).
    Steps the schedule skips (no valid key, or, for a grid in host memory, an empty window) count nothing.

    Args:
        mask: the mask over the global unpadded sequences (a grid on a GPU is read: a host sync).
        shard, kv_shard: the query / key shards (``kv_shard`` ``None``: ``shard``).
        ulysses_size, ring_size: the mesh's degrees.
        tile: the kernel's ``(bq, bk)``.

    Returns:
        ``{"tile", "aligned" (every window starts on the global tiles), "full", "partial" (summed over
        steps and any (batch, head) dims), "steps" ([a][c] = [full, partial])}``.
    """
    kv_shard = kv_shard or shard
    bq, bk = int(tile[0]), int(tile[1])
    cq, ck = ulysses_size * shard.chunk, ulysses_size * kv_shard.chunk
    valid = [kv_shard.chunk_valid(c, ulysses_size) for c in range(ring_size)]
    sched = RingSchedule.from_mask(mask, cq, ck, ring_size, exact=True)
    steps, aligned = [], True
    for a in range(ring_size):
        row = []
        for c in range(ring_size):
            if not (valid[c] and sched.needs[a][c]):
                row.append([0, 0])
                continue
            window = mask.sub(a * cq, cq, c * ck, valid[c])
            aligned &= window.on_tiles(bq, bk)
            full, partial = window.kernel_blocks(bq, bk, real_rows=True)
            row.append([int(full.sum()), int(partial.sum())])
        steps.append(row)
    return {"tile": [bq, bk], "aligned": aligned, "full": sum(f for r in steps for f, _ in r),
            "partial": sum(p for r in steps for _, p in r), "steps": steps}
