"""A backend-neutral block-sparse attention mask, exact at token level under any windowing.

A :class:`BlockSparseMask` is a boolean *block grid* over a global query sequence of
``q_total`` tokens and a global key sequence of ``k_total`` tokens: grid cell ``(a, b)`` says
whether queries ``[a*bs, (a+1)*bs)`` may attend keys ``[b*bs, (b+1)*bs)`` (``bs`` is
``block_size``; the last row/column of blocks may be shorter than ``bs``). The mask is the same
for every batch element and head.

A mask is also a *window* onto that grid: ``q_len`` queries starting at global position
``q_start`` and ``k_len`` keys starting at ``k_start``. The root mask's window is the whole grid;
:meth:`BlockSparseMask.sub` cuts a window at arbitrary token offsets (ring attention's
``(query chunk, key chunk)`` steps, ``kv_lens`` slicing). A token pair of the window is allowed
iff both positions are real tokens inside every enclosing window and their grid cell is set;
positions outside (e.g. the padding at the end of a sharded sequence) are masked.

Design choice for unaligned windows: the grid is never re-gridded. A kernel that tiles a window
with its own tile size ``(bq, bk)`` asks :meth:`kernel_blocks` for a classification of its
tiles into *full* (every token pair allowed: run without a mask), *partial* (some allowed: run
with the token-level predicate :func:`allowed_tokens`, applied only inside those tiles) and
empty (skipped). Exactness is therefore kept at token level whatever the offsets, and aligned
windows (offsets and tile sizes multiples of ``bs``) have no partial tiles at all.

Tile-aligned windows (sequence parallelism): a window whose query / key offsets are multiples of
the kernel's tile is cut into exactly the tiles of the whole sequence, so it classifies them as
the whole sequence does (:meth:`on_tiles`). The one difference is padding: a sharded sequence pads
at its end, so the last window holds query rows past the real ones (``q_lim``); with
``real_rows=True`` :meth:`kernel_blocks` classifies a tile by its real rows only (the caller sets
the padding rows to "no key" itself), so the tile that ends the sequence stays full and a tile of
padding rows only is empty. Keys past ``k_lim`` are never ignored (they would enter the softmax of
real rows): kernels slice them off first (``kv_lens``).

Per-(batch, head) masks (Sparge attention predicts one per head): the grid may carry two
leading dims, ``[B, H, NA, NB]``, and the blocks may be rectangular, ``(block_q, block_k)`` tokens
(Sparge: 128 x 64). Windows, counting and tile classification work the same, per leading index;
:meth:`BlockSparseMask.chunk_occupancy` (what a ring schedule reads, for grids in host memory
only: a predicted grid stays on its device) reduces over them ("any head needs it"). The 2-D square case is unchanged: one mask for every batch element and head.

All counting uses a 2-D prefix sum over the grid (``F(x, y)`` = allowed pairs in
``[0, x) x [0, y)`` at token level), so densities, emptiness tests and tile classifications are
vectorised and never build an ``S x S`` tensor. Only :meth:`to_dense` does, for tests.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

_CACHE_ENTRIES = 64


@dataclass(eq=False)
class _Grid:
    """The shared, immutable part of a mask and every window cut from it, plus per-device caches.

    Attributes:
        blocks: bool ``[*lead, NA, NB]``, ``lead`` is ``()`` or ``(B, H)``; ``NA = ceil(q_total / block_q)``,
            ``NB = ceil(k_total / block_k)``. On the CPU (masks built once, e.g. radial) or on the device
            that predicted it (Sparge): :attr:`home`.
        block_q, block_k: block size in tokens along the query / key axis.
        q_total, k_total: real tokens of the global query / key sequence.
    """

    blocks: torch.Tensor
    block_q: int
    block_k: int
    q_total: int
    k_total: int
    _dev: dict = field(default_factory=dict)
    cache: OrderedDict = field(default_factory=OrderedDict)

    @property
    def home(self) -> torch.device:
        return self.blocks.device

    @property
    def lead(self) -> tuple[int, ...]:
        return tuple(self.blocks.shape[:-2])

    def tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prefix, padded)`` on ``device``.

        ``prefix``: int64 ``[*lead, NA + 2, NB + 2]``, ``prefix[..., a, b] = blocks[..., :a, :b].sum()`` (the extra
        last row/column repeat the one before, so ``a + 1`` lookups at the edge are safe).
        ``padded``: bool ``[*lead, NA + 1, NB + 1]``, the grid with one all-False row and column appended
        (what out-of-range indices are clamped to).
        """
        key = str(device)
        if key not in self._dev:
            b = self.blocks.to(device)
            na, nb = b.shape[-2:]
            lead = b.shape[:-2]
            prefix = torch.zeros(*lead, na + 2, nb + 2, dtype=torch.int64, device=device)
            prefix[..., 1 : na + 1, 1 : nb + 1] = b.to(torch.int64).cumsum(-2).cumsum(-1)
            prefix[..., na + 1, :] = prefix[..., na, :]
            prefix[..., :, nb + 1] = prefix[..., :, nb]
            padded = torch.zeros(*lead, na + 1, nb + 1, dtype=torch.bool, device=device)
            padded[..., :na, :nb] = b
            self._dev[key] = (prefix, padded)
        return self._dev[key]

    def cached(self, key, build):
        """Small LRU cache shared by every window of this grid (kernel-specific conversions)."""
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        value = build()
        self.cache[key] = value
        while len(self.cache) > _CACHE_ENTRIES:
            self.cache.popitem(last=False)
        return value


class BlockSparseMask:
    """Block-sparse mask over a global sequence, seen through a (query, key) token window.

    Build one with :meth:`from_blocks`; cut windows with :meth:`sub`. Instances are immutable and
    cheap (a window shares the grid and its caches with the mask it was cut from).

    Attributes:
        q_start, k_start: global position of the window's first query / key.
        q_len, k_len: window size in tokens (the ``S_q`` / ``S_k`` of the attention call it serves).
        q_lim, k_lim: global exclusive bounds of the real tokens visible in this window.
    """

    __slots__ = ("_grid", "q_start", "k_start", "q_len", "k_len", "q_lim", "k_lim")

    def __init__(self, grid: _Grid, q_start: int, k_start: int, q_len: int, k_len: int, q_lim: int, k_lim: int):
        self._grid = grid
        self.q_start, self.k_start, self.q_len, self.k_len = q_start, k_start, q_len, k_len
        self.q_lim, self.k_lim = q_lim, k_lim

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_blocks(cls, blocks: torch.Tensor, block_size: int | tuple[int, int], q_len: int, k_len: int | None = None,
                    *, device: torch.device | str | None = None) -> BlockSparseMask:
        """A root mask from its block grid.

        Args:
            blocks: bool ``[ceil(q_len / block_q), ceil(k_len / block_k)]`` (one mask for every batch element
                and head), or ``[B, H, ...]`` of those (one per batch element and head; ``B`` or ``H`` may be 1).
            block_size: tokens per block, both axes, or ``(block_q, block_k)``.
            q_len: real query tokens; ``k_len`` real key tokens (``None``: same as ``q_len``).
            device: where the grid lives; ``None``: the CPU (the grid is copied there).
        """
        k_len = q_len if k_len is None else k_len
        bq, bk = (int(block_size[0]), int(block_size[1])) if isinstance(block_size, (tuple, list)) else (int(block_size),) * 2
        if min(bq, bk) < 1 or q_len < 1 or k_len < 1:
            raise ValueError(f"block_size, q_len, k_len must be >= 1, got {block_size}, {q_len}, {k_len}")
        want = (-(-q_len // bq), -(-k_len // bk))
        if blocks.dim() not in (2, 4) or tuple(blocks.shape[-2:]) != want:
            lead = "" if blocks.dim() != 4 else "[B, H] + "
            raise ValueError(f"blocks must be {lead}{want} for {q_len}x{k_len} tokens in blocks of {bq}x{bk}, "
                             f"got {tuple(blocks.shape)}")
        target = torch.device("cpu") if device is None else torch.device(device)
        grid = _Grid(blocks.detach().to(target, torch.bool).contiguous(), bq, bk, int(q_len), int(k_len))
        return cls(grid, 0, 0, int(q_len), int(k_len), int(q_len), int(k_len))

    def sub(self, q_start: int, q_len: int, k_start: int, k_len: int) -> BlockSparseMask:
        """The mask of queries ``[q_start, q_start + q_len)`` x keys ``[k_start, k_start + k_len)`` of this window.

        Offsets are relative to this window, in tokens, need not be block-aligned, and the range may
        run past this window's end: positions beyond it (or beyond the global sequence) are masked,
        which is what padded chunks need. Exact at token level.
        """
        if min(q_start, k_start) < 0 or min(q_len, k_len) < 0:
            raise ValueError(f"sub: offsets and lengths must be >= 0, got q {q_start}+{q_len}, k {k_start}+{k_len}")
        qs, ks = self.q_start + q_start, self.k_start + k_start
        q_lim = min(self.q_lim, self.q_start + self.q_len)
        k_lim = min(self.k_lim, self.k_start + self.k_len)
        return BlockSparseMask(self._grid, qs, ks, int(q_len), int(k_len), q_lim, k_lim)

    def select_heads(self, start: int, stop: int) -> BlockSparseMask:
        """The same window for heads ``[start, stop)`` only (a head group of a per-(batch, head) mask).

        A shared mask (no leading dims) or a head dim of 1 is returned as is. The sliced grid is cached
        with this grid, so every window of it asks for the slice once.
        """
        if not self.lead_shape or self.lead_shape[1] == 1:
            return self
        nh = self.lead_shape[1]
        if not 0 <= start < stop <= nh:
            raise ValueError(f"select_heads: need 0 <= start < stop <= {nh}, got {start}, {stop}")
        if (start, stop) == (0, nh):
            return self
        g = self._grid

        def build():
            return _Grid(g.blocks[:, start:stop].contiguous(), g.block_q, g.block_k, g.q_total, g.k_total)

        grid = g.cached(("heads", start, stop), build)
        return BlockSparseMask(grid, self.q_start, self.k_start, self.q_len, self.k_len, self.q_lim, self.k_lim)

    # ------------------------------------------------------------------ properties
    @property
    def block_size(self) -> int:
        """Tokens per block (square grids; see :attr:`block_shape` for rectangular ones)."""
        if self._grid.block_q != self._grid.block_k:
            raise ValueError(f"block_size: this mask's blocks are {self._grid.block_q}x{self._grid.block_k}; use block_shape")
        return self._grid.block_q

    @property
    def block_shape(self) -> tuple[int, int]:
        """``(block_q, block_k)`` in tokens."""
        return (self._grid.block_q, self._grid.block_k)

    @property
    def on_host(self) -> bool:
        """The grid lives in host memory (masks built once, e.g. radial): reading it costs no device sync."""
        return self._grid.home.type == "cpu"

    @property
    def lead_shape(self) -> tuple[int, ...]:
        """``()`` for one mask shared by every batch element and head, else ``(B, H)``."""
        return self._grid.lead

    @property
    def blocks(self) -> torch.Tensor:
        """The global block grid, bool ``[*lead, NA, NB]`` on its home device (shared: do not modify)."""
        return self._grid.blocks

    @property
    def shape(self) -> tuple[int, int]:
        """``(q_len, k_len)``: the ``S_q x S_k`` this mask applies to."""
        return (self.q_len, self.k_len)

    @property
    def global_shape(self) -> tuple[int, int]:
        return (self._grid.q_total, self._grid.k_total)

    @property
    def q_real(self) -> int:
        """Real (non-padding) query rows of the window: its leading rows before ``q_lim``."""
        return max(0, min(self.q_len, self.q_lim - self.q_start))

    def on_tiles(self, bq: int, bk: int) -> bool:
        """The window starts on the ``bq x bk`` tiles of the whole sequence (both offsets multiples of them),
        so its kernel tiles are tiles of the global tile grid: tile ``(u, w)`` is global tile
        ``(q_start / bq + u, k_start / bk + w)``."""
        return self.q_start % bq == 0 and self.k_start % bk == 0

    @property
    def key(self) -> tuple:
        """Hashable identity of this window (grid identity + offsets); used for kernel caches."""
        return (id(self._grid), self.q_start, self.k_start, self.q_len, self.k_len, self.q_lim, self.k_lim)

    def __repr__(self) -> str:
        bq, bk = self.block_shape
        block = str(bq) if bq == bk else f"{bq}x{bk}"
        lead = f", per {'x'.join(map(str, self.lead_shape))} (batch, head)" if self.lead_shape else ""
        return (f"BlockSparseMask(window q[{self.q_start}:+{self.q_len}] x k[{self.k_start}:+{self.k_len}] of "
                f"{self._grid.q_total}x{self._grid.k_total}, block {block}{lead}, density {self.density:.3f})")

    # ------------------------------------------------------------------ counting
    def _count(self, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``F(x, y)``: allowed global token pairs in ``[0, x) x [0, y)``; x, y int64 global coordinates
        already clipped to ``[0, q_total]`` / ``[0, k_total]`` (broadcastable). Returns int64 ``[*lead, ...]``."""
        prefix, padded = self._grid.tables(device)
        bq, bk = self._grid.block_q, self._grid.block_k
        qa, xr = torch.div(x, bq, rounding_mode="floor"), x % bq
        kb, yr = torch.div(y, bk, rounding_mode="floor"), y % bk
        p = prefix[..., qa, kb]
        row = prefix[..., qa + 1, kb] - p  # blocks[..., qa, :kb].sum()
        col = prefix[..., qa, kb + 1] - p  # blocks[..., :qa, kb].sum()
        return bq * bk * p + xr * bk * row + bq * yr * col + xr * yr * padded[..., qa, kb].to(torch.int64)

    def _edges(self, step: int, axis: str, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Tile edges along one axis: ``(clipped global edges [N + 1], local tile sizes [N])`` for tiles of ``step``."""
        start, length, lim = (self.q_start, self.q_len, self.q_lim) if axis == "q" else (self.k_start, self.k_len, self.k_lim)
        n = max(1, -(-length // step))
        local = torch.clamp(torch.arange(n + 1, device=device, dtype=torch.int64) * step, max=length)
        glob = torch.clamp(local + start, max=lim)  # positions past lim count as masked
        return glob, local[1:] - local[:-1]

    def _rect_counts(self, bq: int, bk: int, device, real_rows: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Allowed pairs per ``bq x bk`` tile of the window: int64 ``[*lead, NU, NV]``; and each tile's size ``[NU, NV]``
        (``real_rows``: its real query rows, those before ``q_lim``, times its keys)."""
        gx, sx = self._edges(bq, "q", device)
        gy, sy = self._edges(bk, "k", device)
        f = self._count(gx[:, None], gy[None, :], device)
        counts = f[..., 1:, 1:] - f[..., :-1, 1:] - f[..., 1:, :-1] + f[..., :-1, :-1]
        if real_rows:
            sx = gx[1:] - gx[:-1]  # global edges are clipped at q_lim: the real rows of each tile
        return counts, sx[:, None] * sy[None, :]

    def allowed_counts(self) -> torch.Tensor:
        """Allowed token pairs of the window per leading index: int64 ``[*lead]`` (0-d for a shared mask), cached."""

        def build():
            counts, _ = self._rect_counts(max(self.q_len, 1), max(self.k_len, 1), self._grid.home)
            return counts.sum((-2, -1))

        return self._grid.cached(("allowed_counts", self.key), build)

    def allowed(self) -> int:
        """Number of allowed (query, key) token pairs in the window, summed over any leading dims (cached)."""
        return self._grid.cached(("allowed", self.key), lambda: int(self.allowed_counts().sum()))

    @property
    def density(self) -> float:
        """Allowed fraction of the window's ``q_len * k_len`` token pairs (0.0 for an empty window);
        for per-(batch, head) masks, the mean over them."""
        area = self.q_len * self.k_len * math.prod(self.lead_shape)
        return self.allowed() / area if area else 0.0

    @property
    def is_empty(self) -> bool:
        """True when no token pair of the window is allowed (a ring step that can be skipped)."""
        return self.q_len == 0 or self.k_len == 0 or self.allowed() == 0

    def chunk_occupancy(self, q_chunk: int, k_chunk: int) -> torch.Tensor:
        """Which (query chunk, key chunk) pairs hold any allowed pair (for any batch element and head):
        bool ``[ceil(q_len/q_chunk), ceil(k_len/k_chunk)]`` on the CPU.

        For ring schedules: a key chunk that no query chunk downstream needs need not be sent. For a
        grid on a GPU (a predicted mask) this reads the device: a host sync (see :attr:`on_host`).
        """
        counts, _ = self._rect_counts(q_chunk, k_chunk, self._grid.home)
        occ = counts > 0
        if occ.dim() > 2:
            occ = occ.flatten(0, -3).any(0)
        return occ.cpu()

    # ------------------------------------------------------------------ kernel views
    def kernel_blocks(self, bq: int, bk: int, device: torch.device | str = "cpu", *,
                      real_rows: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Classify the window's ``bq x bk`` kernel tiles (local, starting at token 0 of the window).

        Args:
            bq, bk: the kernel's tile in tokens.
            device: where the result goes.
            real_rows: judge a tile by its real query rows only (before ``q_lim``): a tile whose real
                rows attend all its keys is full even when padding rows past the sequence's end share
                it. The caller must then give the padding rows ``out = 0``, ``lse = -inf`` itself
                (rows from :attr:`q_real` on), since a full tile runs them unmasked.

        Returns:
            ``(full, partial)``: bool ``[*lead, ceil(q_len/bq), ceil(k_len/bk)]`` on ``device``. ``full``: every
            token pair of the tile (tile clipped to ``q_len x k_len``; to its real rows with ``real_rows``)
            is allowed; ``partial``: some but not all are; neither: none. Cached per window, tile size,
            device and ``real_rows``.
        """
        device = torch.device(device)

        def build():
            counts, area = self._rect_counts(bq, bk, device, real_rows)
            full = (counts == area) & (counts > 0)
            return full, (counts > 0) & ~full

        return self._grid.cached(("tiles", self.key, bq, bk, str(device), bool(real_rows)), build)

    def token_params(self, device: torch.device | str) -> dict[str, torch.Tensor | int | tuple[int, int]]:
        """Arguments of :func:`allowed_tokens` for this window on ``device``.

        ``padded`` is the grid (bool ``[*lead, NA+1, NB+1]``, one all-False row/column appended),
        ``block_size`` an int (square blocks) or ``(block_q, block_k)``, and the window's offsets and
        limits are int64 0-d tensors, so a compiled kernel that captures them serves every window of the
        same grid and shape without recompiling. Per-(batch, head) grids also need ``b`` and ``h`` in
        :func:`allowed_tokens`.
        """
        device = torch.device(device)
        _, padded = self._grid.tables(device)
        # a fill kernel, not a host-to-device copy (which would wait for the stream on CUDA)
        t = lambda v: torch.full((), v, dtype=torch.int64, device=device)  # noqa: E731
        bq, bk = self.block_shape
        return {"padded": padded, "block_size": bq if bq == bk else (bq, bk), "q_off": t(self.q_start),
                "k_off": t(self.k_start), "q_lim": t(self.q_lim), "k_lim": t(self.k_lim)}

    def to_dense(self, dtype: torch.dtype = torch.bool, device: torch.device | str = "cpu") -> torch.Tensor:
        """The window as an ``[*lead, q_len, k_len]`` tensor — for tests and small sizes ONLY.

        ``dtype=torch.bool``: True where allowed. A float dtype: an additive mask, 0 where allowed and
        ``-inf`` elsewhere.
        """
        if self.q_len * self.k_len * math.prod(self.lead_shape) > 1 << 28:
            raise ValueError(f"to_dense: {self.q_len} x {self.k_len} is too large (tests and small sizes only)")
        q = torch.arange(self.q_len, device=device)[:, None]
        k = torch.arange(self.k_len, device=device)[None, :]
        extra = {}
        if self.lead_shape:
            nb, nh = self.lead_shape
            extra = {"b": torch.arange(nb, device=device)[:, None, None, None],
                     "h": torch.arange(nh, device=device)[None, :, None, None]}
        allowed = allowed_tokens(q, k, **self.token_params(device), **extra)
        if dtype == torch.bool:
            return allowed
        zero = torch.zeros((), dtype=dtype, device=device)
        return torch.where(allowed, zero, torch.full((), float("-inf"), dtype=dtype, device=device))


def allowed_tokens(q_idx: torch.Tensor, kv_idx: torch.Tensor, *, padded: torch.Tensor, block_size: int | tuple[int, int],
                   q_off: torch.Tensor, k_off: torch.Tensor, q_lim: torch.Tensor, k_lim: torch.Tensor,
                   b: torch.Tensor | int | None = None, h: torch.Tensor | int | None = None) -> torch.Tensor:
    """Token-level predicate of a window: allowed(q_idx, kv_idx) for *local* indices (broadcastable int tensors).

    Written with tensor ops only (no Python branching on values), so it runs inside a flex
    ``mask_mod``, eager or compiled. Keyword arguments come from :meth:`BlockSparseMask.token_params`;
    a per-(batch, head) grid (``padded`` with two leading dims) also needs the batch and head
    indices ``b`` and ``h`` (a leading dim of size 1 broadcasts).
    """
    bq, bk = block_size if isinstance(block_size, (tuple, list)) else (block_size, block_size)
    na, nb = padded.shape[-2] - 1, padded.shape[-1] - 1
    gq = q_idx + q_off
    gk = kv_idx + k_off
    a = torch.clamp(torch.div(gq, bq, rounding_mode="floor"), 0, na)
    c = torch.clamp(torch.div(gk, bk, rounding_mode="floor"), 0, nb)
    if padded.dim() == 2:
        cell = padded[a, c]
    else:
        if b is None or h is None:
            raise ValueError("allowed_tokens: a per-(batch, head) grid needs b and h")
        bi = b if padded.shape[0] > 1 else 0
        hi = h if padded.shape[1] > 1 else 0
        cell = padded[bi, hi, a, c]
    return cell & (gq < q_lim) & (gk < k_lim)
