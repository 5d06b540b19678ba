"""How sequence-parallel data moves between ranks: the two transfers SP attention needs, behind one interface.

* Ulysses needs an **all-to-all** of ``[U, N]`` buffers (row ``j`` goes to rank ``j`` of the group).
* The ring needs, at each step, the **next key chunk** while the kernel runs on the current one.

:class:`NcclTransport` does both with ``torch.distributed`` (NCCL on GPUs, gloo on CPU):
``all_to_all_single`` and a ``batch_isend_irecv`` rotation to the next rank.
:class:`~ditfleet.parallel.copy_engine.CopyEngineTransport` does both over CUDA symmetric memory and
the copy engines. The loops of Ulysses (:mod:`ditfleet.parallel.ulysses`) and of the ring
(:mod:`ditfleet.parallel.ring`) are written once, against this interface.

Which transport a mesh uses is decided when it is built (``parallel.transport``, :func:`resolve_transport`):
``nccl``, ``copy_engine`` (checked then: every rank of each group on one host, peer access, symmetric
memory), or ``auto`` = ``nccl``. ``auto`` would pick the copy engine only if ``ditfleet bench step`` showed
it faster for a whole denoising step; the attention-only gain measured on 4 x H100 (~5 %, commit 85e48fd)
is inside that bench's run-to-run spread, and no whole-step run across GPUs has been made yet.

Every wait on a peer is bounded by ``parallel.timeout_s``: the transports, the gathers and the cfg exchange
wait through :func:`bounded`. On gloo (CPU) the host waits at most that long -- also on a mesh axis that spans
the world, which *is* the default group and keeps the launcher's timeout -- and a wait that runs out, or a
peer whose connection closes, raises :class:`PeerError` naming the transfer and the peers. On NCCL the host
does not wait (the work is queued on the GPU) and the process group's watchdog aborts the process, naming
the collective, after the group's timeout: ``parallel.timeout_s`` for the mesh's own groups, the launcher's
(``ray.init_timeout_s``, torchrun's) for an axis that spans the world. The copy engine's barriers take
``parallel.timeout_s``.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Sequence

import torch
import torch.distributed as dist

TRANSPORTS = ("auto", "nccl", "copy_engine")
TRANSPORT_KEY = "parallel.transport"
TIMEOUT_KEY = "parallel.timeout_s"


class PeerError(RuntimeError):
    """A peer rank did not take part in a transfer in time (stopped, died, or stuck elsewhere)."""


@contextlib.contextmanager
def peer_wait(what: str, peers: Sequence[int], timeout_s: float):
    """Turn a failed or timed-out wait on ``peers`` (global ranks) inside the block into one :class:`PeerError`."""
    try:
        yield
    except PeerError:
        raise
    except RuntimeError as e:  # DistBackendError / gloo timeouts and closed connections are RuntimeErrors
        if isinstance(e, torch.OutOfMemoryError):  # this rank's own failure, not a peer's
            raise
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise PeerError(
            f"{what}: rank(s) {', '.join(map(str, dict.fromkeys(peers)))} did not answer within {timeout_s:g} s ({TIMEOUT_KEY}) or "
            f"left the group; a peer process stopped, died or is stuck ({type(e).__name__}: {first})"
        ) from e


def bounded(work, like: torch.Tensor, timeout_s: float) -> None:
    """Wait for an async ``torch.distributed`` ``work``: on CUDA the caller's stream waits (the host does not;
    the group's watchdog bounds it), elsewhere the host waits at most ``timeout_s`` (gloo's P2P and a
    world-spanning group would otherwise wait their own, longer, timeout)."""
    if like.is_cuda:
        work.wait()
    else:
        work.wait(datetime.timedelta(seconds=timeout_s))


class Group:
    """One process group of the mesh as the transports see it.

    Args:
        group: the ``torch.distributed`` process group.
        ranks: its global ranks in group order.
        rank: this process's index in ``ranks``.
        timeout_s: the group's timeout (``parallel.timeout_s``).
    """

    def __init__(self, group, ranks: Sequence[int], rank: int, timeout_s: float):
        self.group, self.ranks, self.rank, self.timeout_s = group, list(ranks), rank, timeout_s
        self.size = len(self.ranks)

    def peers(self) -> list[int]:
        return [r for i, r in enumerate(self.ranks) if i != self.rank]


class NcclTransport:
    """``torch.distributed`` transfers on one group: NCCL on GPUs, gloo on CPU (see the module docstring)."""

    name = "nccl"

    def __init__(self, group: Group):
        self.g = group
        self._ready = False

    # ---- Ulysses
    def send_buffer(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A ``[U, N]`` buffer to pack what each rank gets into (row ``j`` for rank ``j``)."""
        return torch.empty(tuple(shape), dtype=dtype, device=device)

    def all_to_all(self, send: torch.Tensor, what: str) -> torch.Tensor:
        """Row ``j`` of ``send`` ``[U, N]`` goes to rank ``j``; returns ``recv`` ``[U, N]``, row ``i`` from rank ``i``."""
        recv = torch.empty_like(send)
        with peer_wait(what, self.g.peers(), self.g.timeout_s):
            self._wait(dist.all_to_all_single(recv, send, group=self.g.group, async_op=True), send)
        return recv

    def _wait(self, work, like: torch.Tensor) -> None:
        bounded(work, like, self.g.timeout_s)

    # ---- ring
    def ring_begin(self, kv: torch.Tensor, schedule) -> None:
        """Start a ring over ``kv`` ``[2, B, S_k, H, D]`` (this rank's chunk; reused as a receive buffer)."""
        self._bring_up(kv)
        self.sched, self.cur, self.reqs = schedule, kv, []
        self.nxt = torch.empty_like(kv) if self.g.size > 1 else None

    def ring_prefetch(self, step: int) -> None:
        """Start moving the chunk step ``step + 1`` needs (chunk ``c`` goes from rank ``c + step`` to the next)."""
        size, rank = self.g.size, self.g.rank
        if step + 1 >= size:
            return
        held = (rank - step) % size
        ops = []
        if self.sched.sends(held, step):
            ops.append(dist.P2POp(dist.isend, self.cur, self.g.ranks[(rank + 1) % size], self.g.group))
        if self.sched.sends((held - 1) % size, step):
            ops.append(dist.P2POp(dist.irecv, self.nxt, self.g.ranks[(rank - 1) % size], self.g.group))
        self.reqs = dist.batch_isend_irecv(ops) if ops else []

    def ring_chunk(self, step: int) -> torch.Tensor:
        """The ``[2, B, S_k, H, D]`` chunk this rank holds at ``step``."""
        return self.cur

    def ring_advance(self, step: int) -> None:
        """After step ``step``'s kernel is queued: wait for the prefetch (bounded), the received chunk becomes current."""
        size, rank = self.g.size, self.g.rank
        with peer_wait(f"ring step {step}", [self.g.ranks[(rank - 1) % size], self.g.ranks[(rank + 1) % size]],
                       self.g.timeout_s):
            for req in self.reqs:
                self._wait(req, self.cur)
        self.reqs = []
        if step + 1 < size:
            self.cur, self.nxt = self.nxt, self.cur

    def ring_end(self) -> None:
        self.cur = self.nxt = self.sched = None

    def _bring_up(self, like: torch.Tensor) -> None:
        """Once per group on NCCL: one all-reduce with every rank before the first P2P batch (NCCL wants every
        rank of a group in its first ``batch_isend_irecv``; a ring that skips transfers may leave one out)."""
        if not self._ready and self.g.size > 1 and like.is_cuda:
            dist.all_reduce(torch.zeros(1, device=like.device), group=self.g.group)
        self._ready = True


def resolve_transport(name: str, groups: Sequence[Group], device: torch.device) -> tuple[str, str]:
    """The transport a mesh uses, decided once when it is built: ``(resolved name, why)``.

    Args:
        name: ``parallel.transport``: ``"auto"``, ``"nccl"`` or ``"copy_engine"``.
        groups: the mesh groups the transports serve (Ulysses, ring) of size > 1; every rank of each
            must call this together (the copy-engine check exchanges verdicts).
        device: this process's device.

    Raises:
        ConfigError: (``parallel.transport``) an unknown name, or ``copy_engine`` where it cannot run.
    """
    from ..errors import ConfigError

    if name not in TRANSPORTS:
        raise ConfigError(TRANSPORT_KEY, f"unknown transport {name!r}; valid: {', '.join(TRANSPORTS)}")
    if name == "auto":
        return "nccl", "auto: NCCL (no whole-step bench has shown the copy engine faster)"
    if name == "nccl" or not groups:
        return name, "configured" if groups else "configured (no sequence-parallel group)"
    from .copy_engine import ce_unavailable, ce_usable

    reason = ce_unavailable(device)
    if reason is None:
        bad = [g for g in groups if not ce_usable(g.group, device)]
        if bad:
            reason = (f"the group of ranks {bad[0].ranks} is not on one host with peer access between its GPUs "
                      f"(CUDA IPC / symmetric memory cannot reach every rank)")
    reasons = [None] * dist.get_world_size()
    dist.all_gather_object(reasons, reason)  # every rank of the world takes the same decision
    reason = next((f"rank {i}: {r}" for i, r in enumerate(reasons) if r), None)
    if reason:
        raise ConfigError(TRANSPORT_KEY, f"copy_engine cannot run here ({reason}); use nccl or auto")
    return name, "configured"


def transport_for(mesh, axis: str):
    """The transport of ``mesh``'s ``axis`` group (``"ulysses"`` or ``"ring"``), made once per mesh."""

    def make():
        group = Group(mesh.group(axis), mesh.axis_ranks(axis), getattr(mesh, f"{axis}_rank"), mesh.timeout_s)
        if mesh.transport == "copy_engine":
            from .copy_engine import CopyEngineTransport

            return CopyEngineTransport(group)
        return NcclTransport(group)

    return mesh.cached(("transport", axis), make)
