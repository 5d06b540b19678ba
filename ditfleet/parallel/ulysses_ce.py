"""Ulysses over the copy engines (``ulysses_impl="ce"``): pushes into symmetric memory, flags, no kernels.

Every communication step of the NCCL paths is a kernel (NCCL's own, packing/unpacking copies, the
symmetric-memory barrier), and a kernel queued beside a running attention kernel gets no SM until
that kernel's last wave -- measured: head-group pipelining over NCCL, or over copy engines with
packing kernels and barriers on the side stream, serialized and lost. Here the transfers and the
synchronization take no SM; the only kernels besides attention are local copies:

* **in**: for each head group ``g`` and each peer ``p``, rank ``me`` pushes the rows of its
  sequence chunk for ``p``'s heads of group ``g`` straight into ``p``'s *inbox* (symmetric
  memory), at the position of chunk ``me`` in the kernel's ``[B, U*S, hg, D]`` inputs: one
  strided copy-engine copy per (tensor, batch) (:func:`~ditfleet.parallel.cuda_driver.copy_rows`
  reads rows of ``hg * D`` out of ``[S, H_pad * D]``), then a flag write in ``p``'s flags
  (``cuStreamWriteValue32``). One side stream per peer, so the transfers to different peers run
  in parallel; group 0 is issued first, each later group right after the previous kernel is queued.
* **kernel**: the caller's stream copies this rank's own rows into its inbox (SM copies, while
  group 0 travels), then per group waits for the peers' flags (``cuStreamWaitValue32``: no kernel)
  and runs the kernel on the inbox views; group ``g + 1`` arrives while group ``g`` computes.
* **out**: after kernel ``g``, per-peer side streams push the output rows of each peer's tokens
  into that peer's *outbox* ``[B, S, H_pad * D]`` at this rank's head columns (and the LSE into
  ``[B, H_pad, S]``), then flag them.
* **unpack**: an SM side stream copies this rank's own output rows of group ``g`` and, once their
  flags are up, the peers' columns of group ``g - 1`` out of the outbox into the result. Queued
  beside kernel ``g + 1``, these small copies run as its last wave frees SMs; only the last
  group's columns are copied after the last kernel.

Flags hold the call's *epoch* (1, 2, ... identical on every rank: calls are collective), so they
are never reset. While the buffer layout stays the same, no "buffer free" handshake is needed
between calls: a peer ``p`` pushes call ``e + 1`` only after its caller's stream saw all of this
rank's outputs of call ``e``, which were pushed after this rank's last kernel of call ``e`` (the
last reader of its inbox); and ``p``'s outputs of call ``e + 1`` need this rank's inputs of call
``e + 1``, pushed only after this rank's stream finished reading its outbox of call ``e``. When the
layout changes (other shapes: the new inbox may cover the old outbox, still being read), the link
synchronizes every rank first (``begin(..., layout=...)``).

A rank that fails in the middle of a call leaves its peers' streams waiting on flags that never
come (a stream wait has no timeout): as after a failed NCCL collective, the process group must be
torn down (the engine rebuilds its workers). The transport (buffers, copies, flags) is a *link*: :class:`~ditfleet.parallel.
copy_engine.CudaLink` on GPUs; the CPU tests pass a thread stand-in with the same methods.
"""

from __future__ import annotations

import torch

from .pipeline import Pipeline
from .ulysses_packed import Attend, head_groups

FLAG_GROUPS = 64  # head groups one call may use: the flags are allocated once per process group


def flag_count(size: int) -> int:
    """int32 flags a link of ``size`` ranks holds per rank: in and out per (group, source)."""
    return 2 * FLAG_GROUPS * size


def _flag_in(g: int, src: int, u: int) -> int:
    return g * u + src


def _flag_out(g: int, src: int, u: int) -> int:
    return (FLAG_GROUPS + g) * u + src


def ulysses_ce_forward(q, k, v, *, comm, attend: Attend, return_lse: bool, chunks: int, link=None):
    """The ``"ce"`` implementation of :func:`~ditfleet.parallel.ulysses.ulysses_forward` (same contract).

    Args:
        q: ``[B, S_q, H_pad, D]`` local query chunk, ``H_pad`` a multiple of ``comm.size``.
        k, v: ``[B, S_k, H_pad, D]`` local key / value chunk, q's dtype.
        comm: the group's :class:`~ditfleet.parallel.ulysses_packed.UlyssesComm` (size, rank, group).
        attend: the kernel on the gathered sequence of one head group.
        return_lse: also return the float32 LSE.
        chunks: head groups (at most ``FLAG_GROUPS``); group ``g + 1`` travels while ``g`` computes.
        link: the transport (``begin``, ``view``, ``flag``, ``copy``, ``signal``, ``wait``); ``None``:
            the group's :class:`~ditfleet.parallel.copy_engine.CudaLink` (CUDA).

    Returns:
        ``(out [B, S_q, H_pad, D] in q's dtype, lse float32 [B, H_pad, S_q] or None)``.
    """
    u, me = comm.size, comm.rank
    b, s_q, h_pad, d = q.shape
    s_k = k.shape[1]
    h = h_pad // u
    groups = head_groups(h, chunks)
    if len(groups) > FLAG_GROUPS:
        raise ValueError(f"ulysses 'ce' takes at most {FLAG_GROUPS} head groups, got {len(groups)}")
    q, k, v = (t.contiguous() for t in (q, k, v))
    dt, esz = q.dtype, q.element_size()

    # One buffer per rank: the inbox (per head group, the kernel's q [B, U*S_q, hg*D] and
    # kv [2, B, U*S_k, hg*D]), then the outbox [B, S_q, H_pad*D], then the LSE box [B, H_pad, S_q].
    in_off, off = [], 0
    for h0, h1 in groups:
        in_off.append(off)
        off += b * u * (s_q + 2 * s_k) * (h1 - h0) * d
    out_off = off
    off += b * s_q * h_pad * d
    lse_off = -(-off * esz // 16) * 4  # in float32 elements, 16-byte aligned
    nbytes = lse_off * 4 + (b * h_pad * s_q * 4 if return_lse else 0)
    if link is None:
        from .copy_engine import CudaLink

        link = CudaLink.get(comm.group, u, me, q.device)
    epoch = link.begin(nbytes, layout=(out_off, lse_off))

    def inbox(rank: int, gi: int):
        w = (groups[gi][1] - groups[gi][0]) * d
        return (link.view(rank, (b, u * s_q, w), dt, in_off[gi]),
                link.view(rank, (2, b, u * s_k, w), dt, in_off[gi] + b * u * s_q * w))

    def slots(box, bi: int, owner: int):
        """The rows of ``owner``'s chunk in an inbox, for q, k, v of batch ``bi`` (each ``[S, hg*D]``)."""
        qb, kvb = box
        return (qb[bi, owner * s_q:(owner + 1) * s_q], kvb[0, bi, owner * s_k:(owner + 1) * s_k],
                kvb[1, bi, owner * s_k:(owner + 1) * s_k])

    rows = [t.view(b, t.shape[1], h_pad * d) for t in (q, k, v)]

    def mine_for(bi: int, p: int, h0: int, h1: int):
        """My rows of q, k, v for rank ``p``'s heads ``[h0, h1)`` (each ``[S, hg*D]``, pitch ``H_pad*D``)."""
        return [x[bi][:, (p * h + h0) * d:(p * h + h1) * d] for x in rows]

    peers = [(me + i) % u for i in range(1, u)]
    n_side = max(1, len(peers))
    pin = Pipeline(q, "ulysses_ce.in", comm_streams=n_side)  # one push stream per peer: transfers run in parallel
    pout = Pipeline(q, "ulysses_ce.out", comm_streams=n_side)
    unpack = Pipeline(q, "ulysses_ce.unpack")  # SM copies of finished groups, queued behind the running kernel
    pin.keep(q, k, v)

    def push_in(gi: int) -> None:
        h0, h1 = groups[gi]
        for i, p in enumerate(peers):
            with pin.on_comm(i):
                box = inbox(p, gi)
                for bi in range(b):
                    for dst, src in zip(slots(box, bi, me), mine_for(bi, p, h0, h1)):
                        link.copy(dst, src)
                link.signal(link.flag(p, _flag_in(gi, me, u)), epoch)

    out = q.new_empty((b, s_q, h_pad, d))
    out_rows = out.view(b, s_q, h_pad * d)
    lse = torch.empty((b, h_pad, s_q), dtype=torch.float32, device=q.device) if return_lse else None
    # every rank's outbox (mine is read here, the peers' are written), viewed once per call
    obs = [link.view(p, (b, s_q, h_pad * d), dt, out_off) for p in range(u)]
    lbs = [link.view(p, (b, h_pad, s_q), torch.float32, lse_off) if return_lse else None for p in range(u)]
    ob, lb = obs[me], lbs[me]

    def unpack_group(gi: int) -> None:
        """Copy the peers' columns of head group ``gi`` out of my outbox (on the current stream)."""
        h0, h1 = groups[gi]
        for p in peers:
            link.wait(link.flag(me, _flag_out(gi, p, u)), epoch)
        for p in peers:
            cols = slice((p * h + h0) * d, (p * h + h1) * d)
            out_rows[:, :, cols].copy_(ob[:, :, cols])
            if lb is not None:
                lse[:, p * h + h0:p * h + h1].copy_(lb[:, p * h + h0:p * h + h1])

    # The order of issue matters only for the host: group 0's pushes go out first, each later group's
    # right after the previous kernel is queued (the kernel runs for milliseconds; issuing takes less).
    push_in(0)
    for gi, (h0, h1) in enumerate(groups):  # my own rows, on this GPU, while group 0 travels
        box = inbox(me, gi)
        for bi in range(b):
            for dst, src in zip(slots(box, bi, me), mine_for(bi, me, h0, h1)):
                dst.copy_(src)
    for gi, (h0, h1) in enumerate(groups):
        for p in peers:
            link.wait(link.flag(me, _flag_in(gi, p, u)), epoch)
        hg = h1 - h0
        qb, kvb = inbox(me, gi)
        o, l = attend(qb.view(b, u * s_q, hg, d), kvb.view(2, b, u * s_k, hg, d), return_lse, (h0, h1))
        o = o.contiguous().view(b, u * s_q, hg * d)
        l = l.float().contiguous() if return_lse else None
        done = pout.mark()
        for i, p in enumerate(peers):  # outputs home, behind the kernel
            with pout.on_comm(i):
                pout.comm_wait(done, i)
                pout.used_here(o, l)
                pob, plb = obs[p], lbs[p]
                cols = slice((me * h + h0) * d, (me * h + h1) * d)
                for bi in range(b):
                    link.copy(pob[bi][:, cols], o[bi, p * s_q:(p + 1) * s_q])
                    if plb is not None:
                        link.copy(plb[bi, me * h + h0:me * h + h1], l[bi, :, p * s_q:(p + 1) * s_q])
                link.signal(link.flag(p, _flag_out(gi, me, u)), epoch)
        if gi + 1 < len(groups):
            push_in(gi + 1)
        with unpack.on_comm():  # my own rows of this group, and the peers' columns of the previous one
            unpack.comm_wait(done)
            unpack.used_here(o, l)
            cols = slice((me * h + h0) * d, (me * h + h1) * d)
            out_rows[:, :, cols].copy_(o[:, me * s_q:(me + 1) * s_q])
            if l is not None:
                lse[:, me * h + h0:me * h + h1].copy_(l[:, :, me * s_q:(me + 1) * s_q])
            if gi > 0:
                unpack_group(gi - 1)
        del o, l
    unpack_group(len(groups) - 1)  # the last group's columns: the only copy after the last kernel
    pin.finish()
    pout.finish()
    unpack.finish()
    return out, lse
