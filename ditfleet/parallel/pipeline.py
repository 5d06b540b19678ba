"""Plumbing shared by the pipelined sequence-parallel paths: side streams and one grouped P2P exchange.

The pipelines (Ulysses over P2P, ring by all-gather) split attention into head groups so that
group ``g + 1``'s communication runs while the kernel computes group ``g``:

* packing copies and NCCL calls are issued on a per-role side stream (the *comm stream*,
  high priority); NCCL runs on its own internal stream, which waits for the comm stream at
  each call, and the comm stream waits for NCCL before any copy that reads received data;
* kernels run on the caller's stream, or alternate between it and a second compute stream
  (``compute_streams=2``: the tail of one group's kernel overlaps the start of the next);
* streams are ordered by events; an event is always recorded before any stream waits on it.

Memory safety (the caching allocator reuses a freed block in the order of the stream it was
allocated on, so cross-stream use must be declared): a buffer used on a stream other than the
one it was allocated on is passed to :meth:`Pipeline.used_here` on the using stream
(``record_stream``), so it is not reused before that stream's work queued by the time it is
freed is done; buffers used only by the comm stream and NCCL need nothing (the comm stream
waits for NCCL before any later work, and the process group holds its tensors until then).
Per-group buffers are therefore freed as the pipeline goes (memory stays about two head groups
deep). The caller's tensors (inputs, the output) are held by :meth:`Pipeline.keep`, and
:meth:`Pipeline.finish` makes the caller's stream wait for every side stream. On CPU (gloo)
streams and events are no-ops and communication is synchronous.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.distributed as dist

_SIDE_STREAMS: dict[tuple[int, str], torch.cuda.Stream] = {}


def side_stream(device: torch.device, name: str, priority: int = 0) -> torch.cuda.Stream:
    """The process-wide side stream ``name`` of a CUDA ``device`` (created once, then reused)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (index, name)
    stream = _SIDE_STREAMS.get(key)
    if stream is None:
        stream = _SIDE_STREAMS[key] = torch.cuda.Stream(device=torch.device("cuda", index), priority=priority)
    return stream


def _record(stream: torch.cuda.Stream, tensors) -> None:
    """``record_stream`` of every CUDA tensor in ``tensors`` (``None`` entries skipped) on ``stream``."""
    for t in tensors:
        if t is not None and t.is_cuda:
            t.record_stream(stream)


class Pipeline:
    """Streams, events and buffer lifetimes of one pipelined call (see the module docstring).

    Args:
        like: a tensor of the call (its device decides CUDA or CPU behaviour).
        role: names the side streams (``"ulysses"``, ``"ring"``); nested pipelines use different roles.
        compute_streams: 1 (kernels on the caller's stream) or 2 (alternate with a side compute stream).
        comm_streams: side streams for communication (``on_comm(i)``; e.g. one per peer).
    """

    def __init__(self, like: torch.Tensor, role: str, compute_streams: int = 1, comm_streams: int = 1):
        if compute_streams not in (1, 2):
            raise ValueError(f"compute_streams must be 1 or 2, got {compute_streams}")
        if comm_streams < 1:
            raise ValueError(f"comm_streams must be >= 1, got {comm_streams}")
        self.cuda = like.is_cuda
        self._keep: list = []
        if self.cuda:
            dev = like.device
            self.caller = torch.cuda.current_stream(dev)
            self.comms = [side_stream(dev, f"{role}.comm" + (f"{i}" if i else ""), priority=-1) for i in range(comm_streams)]
            self.comm = self.comms[0]
            self.compute = [self.caller] + [side_stream(dev, f"{role}.compute{i}") for i in range(1, compute_streams)]
            start = torch.cuda.Event()  # one event for every side stream (wait_stream would record one each)
            start.record(self.caller)
            for s in (*self.comms, *self.compute[1:]):
                s.wait_event(start)

    def keep(self, *tensors) -> None:
        """Hold references until :meth:`finish` (``None`` entries are ignored)."""
        self._keep.extend(t for t in tensors if t is not None)

    def used_here(self, *tensors) -> None:
        """Declare that the current stream uses ``tensors`` (allocated on another stream): ``record_stream``."""
        if self.cuda:
            _record(torch.cuda.current_stream(), tensors)

    def used_on_comm(self, index: int, *tensors) -> None:
        """Declare that comm stream ``index`` uses ``tensors`` (``record_stream``; no-op on CPU)."""
        if self.cuda:
            _record(self.comms[index], tensors)

    def comm_handle(self, index: int = 0) -> int | None:
        """Raw handle of comm stream ``index`` (for driver calls; ``None`` on CPU)."""
        return self.comms[index].cuda_stream if self.cuda else None

    def caller_handle(self) -> int | None:
        """Raw handle of the caller's stream (``None`` on CPU)."""
        return self.caller.cuda_stream if self.cuda else None

    def on_comm(self, index: int = 0):
        """Context: make comm stream ``index`` current (no-op on CPU)."""
        return torch.cuda.stream(self.comms[index]) if self.cuda else contextlib.nullcontext()

    def comm_wait(self, event, index: int = 0) -> None:
        """Comm stream ``index`` waits for ``event`` (recorded earlier on another stream)."""
        if event is not None:
            self.comms[index].wait_event(event)

    def mark(self):
        """Record an event on the current stream (``None`` on CPU)."""
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    @contextlib.contextmanager
    def on_compute(self, index: int, after=None):
        """Context: the compute stream of group ``index`` is current and has waited for ``after``."""
        if not self.cuda:
            yield
            return
        stream = self.compute[index % len(self.compute)]
        if after is not None:
            stream.wait_event(after)
        with torch.cuda.stream(stream):
            yield

    def finish(self) -> None:
        """The caller's stream waits for every side stream; then the buffers are released."""
        if self.cuda:
            for s in (*self.comms, *self.compute[1:]):
                self.caller.wait_stream(s)
        self._keep.clear()


# ---------------------------------------------------------------- one grouped P2P exchange
def exchange(
    sends: Sequence[tuple[torch.Tensor, int, int]], recvs: Sequence[tuple[torch.Tensor, int, int]], group
) -> None:
    """Run sends and receives as one grouped batch (one NCCL launch) and wait for them on the current stream.

    Args:
        sends: ``(tensor, peer, tag)``: contiguous tensors to send to global rank ``peer``.
        recvs: ``(tensor, peer, tag)``: contiguous tensors to fill from global rank ``peer``; for
            each pair of ranks, tensors of one tag are matched in the order they are listed.
        group: the process group of all peers.

    On NCCL the wait is a stream dependency (no host sync); on gloo it blocks until done.
    """
    ops = [dist.P2POp(dist.isend, t, peer, group, tag) for t, peer, tag in sends]
    ops += [dist.P2POp(dist.irecv, t, peer, group, tag) for t, peer, tag in recvs]
    for work in dist.batch_isend_irecv(ops) if ops else []:
        work.wait()


def recv_slot(dst: torch.Tensor, post: list) -> torch.Tensor:
    """Where to receive into ``dst``: ``dst`` itself when contiguous, else a staging buffer copied after.

    The staging copy ``(dst, tmp)`` is appended to ``post``; run :func:`finish_recv` after the exchange.
    """
    if dst.is_contiguous():
        return dst
    tmp = torch.empty(dst.shape, dtype=dst.dtype, device=dst.device)
    post.append((dst, tmp))
    return tmp


def finish_recv(post: list) -> None:
    """Copy staged receives into their destinations (on the current stream)."""
    for dst, tmp in post:
        dst.copy_(tmp)
