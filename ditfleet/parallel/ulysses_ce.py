"""Ulysses over the copy engines (``ulysses_impl="ce"``): pushes into symmetric memory, flags, no kernels.

Every communication step of the NCCL paths is a kernel (NCCL's own, packing/unpacking copies, the
symmetric-memory barrier), and a kernel queued beside a running attention kernel gets no SM until
that kernel's last wave -- measured: head-group pipelining over NCCL, or over copy engines with
packing kernels and barriers on the side stream, serialized and lost. Here the transfers and the
synchronization take no SM; the only kernels besides attention are local copies:

* **in**: for each head group ``g`` and each peer ``p``, rank ``me`` pushes the rows of its
  sequence chunk for ``p``'s heads of group ``g`` straight into ``p``'s *inbox*
  (symmetric memory), at the position of chunk ``me`` in the kernel's ``[B, U*S, hg, D]`` inputs:
  one strided copy-engine copy per (tensor, batch) (:class:`~ditfleet.parallel.cuda_driver.Copy2D`
  reads rows of ``hg * D`` out of ``[S, H_pad * D]``), then a flag write in ``p``'s flags
  (``cuStreamWriteValue32``). One side stream per peer, so the transfers run in parallel; group 0
  is issued before anything else, each later group right after the previous kernel is queued.
* **kernel**: the caller's stream copies this rank's own rows of every group into its inbox (SM
  copies, while group 0 travels), then per group waits for the peers' flags
  (``cuStreamWaitValue32``: no kernel) and runs the kernel on the inbox views; group ``g + 1``
  arrives while group ``g`` computes.
* **out**: after kernel ``g``, the same per-peer streams (behind group ``g + 1``'s inputs) push the
  output rows of each peer's tokens into that peer's *outbox* ``[B, S, H_pad * D]`` at this rank's
  head columns (and the LSE into ``[B, H_pad, S]``), then flag them.
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

Host time matters: a call's first kernel can start only once every rank has *issued* its group-0
pushes, and issuing them tensor op by tensor op (views, slices, a driver struct per copy) cost
~0.16 ms per destination, ~1.5 ms before the first kernel (measured on 4 x H100,
``benchmarks/probe_ulysses.py``). Everything that depends only on the call's shapes -- views of
every rank's buffers, flags, prepared copies -- is therefore built once per shape (:class:`_Plan`,
kept in ``link.memo``), and a call only patches source addresses into prepared copies.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from .pipeline import Pipeline
from .ulysses_packed import Attend, head_groups

FLAG_GROUPS = 64  # head groups one call may use: the flags are allocated once per process group
MAX_PLANS = 32  # call shapes whose plans a link keeps


def flag_count(size: int) -> int:
    """int32 flags a link of ``size`` ranks holds per rank: in and out per (group, source)."""
    return 2 * FLAG_GROUPS * size


def _flag_in(g: int, src: int, u: int) -> int:
    return g * u + src


def _flag_out(g: int, src: int, u: int) -> int:
    return (FLAG_GROUPS + g) * u + src


@lru_cache(maxsize=64)
def _layout(b: int, u: int, s_q: int, s_k: int, h_pad: int, d: int, esz: int, groups: tuple, lse: bool):
    """Element offsets in one rank's buffer: per head group the inbox (the kernel's q ``[B, U*S_q, hg*D]``
    and kv ``[2, B, U*S_k, hg*D]``), then the outbox ``[B, S_q, H_pad*D]``, then the LSE box
    ``[B, H_pad, S_q]`` (float32 elements, 16-byte aligned). Returns ``(in_offsets, out_off, lse_off, nbytes)``."""
    in_off, off = [], 0
    for h0, h1 in groups:
        in_off.append(off)
        off += b * u * (s_q + 2 * s_k) * (h1 - h0) * d
    out_off = off
    off += b * s_q * h_pad * d
    lse_off = -(-off * esz // 16) * 4
    return tuple(in_off), out_off, lse_off, lse_off * 4 + (b * h_pad * s_q * 4 if lse else 0)


class _Plan:
    """Everything about one call shape that does not depend on the call's tensors, built once per shape
    (and again when the link's buffers move): the views of every rank's inbox and outbox, the flags,
    and a prepared copy (``link.copier``) per destination from its place (offset, pitch) in this rank's
    q, k, v or outputs. A call then costs a few microseconds of host time per copy.
    """

    def __init__(self, link, u: int, me: int, b: int, s_q: int, s_k: int, h_pad: int, d: int, dt, groups, lse: bool):
        h = h_pad // u
        in_off, out_off, lse_off, _ = _layout(b, u, s_q, s_k, h_pad, d, dt.itemsize, tuple(groups), lse)
        self.peers = [(me + i) % u for i in range(1, u)]
        self.kernel_in, self.wait_in, self.push, self.own, self.out_push, self.wait_out, self.unpack = ([] for _ in range(7))
        w_row = h_pad * d  # elements per token row of q, k, v and of the outbox
        # Equal groups lie equally spaced in the inbox: my own rows of all groups are then one strided
        # view per tensor ([G, B, S, hg*D]), filled by one copy each; unequal groups, per group and batch.
        sizes = {h1 - h0 for h0, h1 in groups}
        self.own_all = None
        if len(sizes) == 1:
            w = sizes.pop() * d
            span = b * u * (s_q + 2 * s_k) * w  # one group's inbox
            base = link.view(me, (len(groups) * span,), dt, in_off[0])

            def rows_of(offset: int, s: int):
                return base.as_strided((len(groups), b, s, w), (span, u * s * w, w, 1), base.storage_offset() + offset)

            self.own_all = (rows_of(me * s_q * w, s_q), rows_of(b * u * s_q * w + me * s_k * w, s_k),
                            rows_of(b * u * s_q * w + b * u * s_k * w + me * s_k * w, s_k))
        obs = [link.view(p, (b, s_q, w_row), dt, out_off) for p in range(u)]
        lbs = [link.view(p, (b, h_pad, s_q), torch.float32, lse_off) if lse else None for p in range(u)]
        for gi, (h0, h1) in enumerate(groups):
            hg = h1 - h0
            w = hg * d

            def inbox(rank: int):
                return (link.view(rank, (b, u * s_q, w), dt, in_off[gi]),
                        link.view(rank, (2, b, u * s_k, w), dt, in_off[gi] + b * u * s_q * w))

            qb, kvb = inbox(me)
            self.kernel_in.append((qb.view(b, u * s_q, hg, d), kvb.view(2, b, u * s_k, hg, d)))
            self.wait_in.append([link.flag(me, _flag_in(gi, p, u)) for p in self.peers])
            if self.own_all is None:  # my own rows of q, k, v for my heads (SM copies): (dst, which, bi, col)
                self.own.append([(dst, j, bi, (me * h + h0) * d) for bi in range(b)
                                 for j, dst in enumerate((qb[bi, me * s_q:(me + 1) * s_q], kvb[0, bi, me * s_k:(me + 1) * s_k],
                                                          kvb[1, bi, me * s_k:(me + 1) * s_k]))])
            pushes = []
            n_q, n_kv = b * s_q * w_row, b * s_k * w_row  # elements of this rank's q and of its k, v
            for t in self.peers:  # my rows of q, k, v for t's heads [h0, h1) -> my chunk's rows of t's inbox
                tq, tkv = inbox(t)
                col = (t * h + h0) * d
                ops = []
                for bi in range(b):
                    ops.append((link.copier(tq[bi, me * s_q:(me + 1) * s_q], bi * s_q * w_row + col, w_row, n_q), 0))
                    for j in (1, 2):
                        ops.append((link.copier(tkv[j - 1, bi, me * s_k:(me + 1) * s_k], bi * s_k * w_row + col, w_row,
                                                n_kv), j))
                pushes.append((link.flag(t, _flag_in(gi, me, u)), ops))
            self.push.append(pushes)
            cols = slice((me * h + h0) * d, (me * h + h1) * d)
            outs = []
            for p in self.peers:  # the output rows of p's tokens -> my head columns of p's outbox (and LSE rows)
                ops = []
                for bi in range(b):
                    ops.append((link.copier(obs[p][bi][:, cols], (bi * u * s_q + p * s_q) * w, w, b * u * s_q * w), 0))
                    if lse:
                        ops.append((link.copier(lbs[p][bi, me * h + h0:me * h + h1], bi * hg * u * s_q + p * s_q, u * s_q,
                                                b * hg * u * s_q), 1))
                outs.append((link.flag(p, _flag_out(gi, me, u)), ops))
            self.out_push.append(outs)
            self.wait_out.append([link.flag(me, _flag_out(gi, p, u)) for p in self.peers])
            self.unpack.append([((p * h + h0) * d, (p * h + h1) * d, p * h + h0, p * h + h1,
                                 obs[me][:, :, (p * h + h0) * d:(p * h + h1) * d],
                                 lbs[me][:, p * h + h0:p * h + h1] if lse else None) for p in self.peers])


def ulysses_ce_forward(q, k, v, *, comm, attend: Attend, return_lse: bool, chunks: int, link=None):
    """The ``"ce"`` implementation of :func:`~ditfleet.parallel.ulysses.ulysses_forward` (same contract).

    Args:
        q: ``[B, S_q, H_pad, D]`` local query chunk, ``H_pad`` a multiple of ``comm.size``.
        k, v: ``[B, S_k, H_pad, D]`` local key / value chunk, q's dtype.
        comm: the group's :class:`~ditfleet.parallel.ulysses_packed.UlyssesComm` (size, rank, group).
        attend: the kernel on the gathered sequence of one head group.
        return_lse: also return the float32 LSE.
        chunks: head groups (at most ``FLAG_GROUPS``); group ``g + 1`` travels while ``g`` computes.
        link: the transport (``begin``, ``memo``, ``view``, ``flag``, ``copier``, ``signal``, ``wait``);
            ``None``: the group's :class:`~ditfleet.parallel.copy_engine.CudaLink` (CUDA).

    Returns:
        ``(out [B, S_q, H_pad, D] in q's dtype, lse float32 [B, H_pad, S_q] or None)``.
    """
    u, me = comm.size, comm.rank
    b, s_q, h_pad, d = q.shape
    s_k = k.shape[1]
    h = h_pad // u
    groups = tuple(head_groups(h, chunks))
    if len(groups) > FLAG_GROUPS:
        raise ValueError(f"ulysses 'ce' takes at most {FLAG_GROUPS} head groups, got {len(groups)}")
    q, k, v = (t.contiguous() for t in (q, k, v))
    dt = q.dtype
    _, out_off, lse_off, nbytes = _layout(b, u, s_q, s_k, h_pad, d, q.element_size(), groups, return_lse)
    if link is None:
        from .copy_engine import CudaLink

        link = CudaLink.get(comm.group, u, me, q.device)
    epoch = link.begin(nbytes, layout=(out_off, lse_off))
    key = (b, s_q, s_k, h_pad, d, dt, groups, return_lse)
    plan = link.memo.get(key)
    if plan is None:
        if len(link.memo) >= MAX_PLANS:  # many shapes (a server changing resolutions): start over
            link.memo.clear()
        plan = link.memo[key] = _Plan(link, u, me, b, s_q, s_k, h_pad, d, dt, groups, return_lse)

    # One stream per peer carries both directions: group g + 1's inputs are queued on it before group
    # g's outputs (which wait for kernel g), so a push never sits behind a wait for a kernel that
    # has not finished. (Measured with separate in and out streams: some inputs held back until the
    # previous kernel ended, then 0.3-0.6 ms gaps between kernels.) Group 0 goes out before anything
    # else is issued.
    pipe = Pipeline(q, "ulysses_ce.peers", comm_streams=max(1, u - 1))
    hs = [pipe.comm_handle(i) for i in range(u - 1)]
    srcs = (q, k, v)

    def push_in(gi: int) -> None:
        for i, (flag, ops) in enumerate(plan.push[gi]):
            for op, which in ops:
                op(srcs[which], hs[i])
            link.signal(flag, epoch, hs[i])

    push_in(0)
    pipe.keep(q, k, v)
    # My own rows of every group, by SM copies on the caller's stream while group 0 travels. (Not
    # by copy engine: a 2-D copy within one GPU runs as a kernel, which gets no SM behind a running
    # attention kernel and holds up the copies queued behind it on the same engine -- measured.)
    rows = [t.view(b, t.shape[1], h_pad * d) for t in srcs]
    if plan.own_all is not None:
        mine = slice(me * h * d, (me + 1) * h * d)
        for dst, x in zip(plan.own_all, rows):
            dst.copy_(x[:, :, mine].view(b, x.shape[1], len(groups), -1).permute(2, 0, 1, 3))
    else:
        for gi, (h0, h1) in enumerate(groups):
            w = (h1 - h0) * d
            for dst, which, bi, col in plan.own[gi]:
                dst.copy_(rows[which][bi, :, col:col + w])
    caller = pipe.caller_handle()
    out = lse = out_rows = unpack = None

    def unpack_group(gi: int) -> None:
        """Copy the peers' columns of head group ``gi`` out of my outbox (on the current stream)."""
        for flag in plan.wait_out[gi]:
            link.wait(flag, epoch)
        for c0, c1, l0, l1, ob_cols, lb_rows in plan.unpack[gi]:
            out_rows[:, :, c0:c1].copy_(ob_cols)
            if lb_rows is not None:
                lse[:, l0:l1].copy_(lb_rows)

    for gi, (h0, h1) in enumerate(groups):
        for flag in plan.wait_in[gi]:
            link.wait(flag, epoch, caller)
        qb, kvb = plan.kernel_in[gi]
        o, l = attend(qb, kvb, return_lse, (h0, h1))
        o = o.contiguous().view(b, u * s_q, (h1 - h0) * d)
        l = l.float().contiguous() if return_lse else None
        if gi + 1 < len(groups):
            push_in(gi + 1)
        if unpack is None:  # made after the first kernel is queued: their set-up is off the critical path
            unpack = Pipeline(q, "ulysses_ce.unpack")  # SM copies of finished groups, behind the running kernel
            out = q.new_empty((b, s_q, h_pad, d))
            out_rows = out.view(b, s_q, h_pad * d)
            lse = torch.empty((b, h_pad, s_q), dtype=torch.float32, device=q.device) if return_lse else None
        done = pipe.mark()
        outs = (o, l)
        for i, (flag, ops) in enumerate(plan.out_push[gi]):  # outputs home, behind the kernel
            pipe.comm_wait(done, i)
            pipe.used_on_comm(i, o, l)
            for op, which in ops:
                op(outs[which], hs[i])
            link.signal(flag, epoch, hs[i])
        with unpack.on_comm():  # my own rows of this group, and the peers' columns of the previous one
            unpack.comm_wait(done)
            unpack.used_here(o, l)
            out_rows[:, :, (me * h + h0) * d:(me * h + h1) * d].copy_(o[:, me * s_q:(me + 1) * s_q])
            if l is not None:
                lse[:, me * h + h0:me * h + h1].copy_(l[:, :, me * s_q:(me + 1) * s_q])
            if gi > 0:
                unpack_group(gi - 1)
        del o, l, outs
    unpack_group(len(groups) - 1)  # the last group's columns: the only copy after the last kernel
    pipe.finish()
    unpack.finish()
    return out, lse
