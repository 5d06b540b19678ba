"""Sequence-parallel transfers on the GPUs' copy engines: Ulysses ``"ce"`` and ring ``"pull"``.

NCCL moves data with kernels, and those kernels take SMs from the attention kernel they are meant
to hide behind (measured: every NCCL overlap variant of Ulysses was slower than none, and the
rotating ring's kernel runs ~10 % slower while K/V travel). Here one side of every transfer is
*symmetric memory* (``torch.distributed._symmetric_memory``: every peer's buffer mapped into each
process through CUDA IPC; NVLink multicast is never used) -- the ring's outgoing chunks, Ulysses'
inboxes and outboxes -- and data moves between a peer's buffer and a local one by
``cudaMemcpyAsync`` / ``cuMemcpy2DAsync``, which the driver runs on copy engines: no SM is taken. The ring orders its accesses with the symmetric-memory barrier (a one-block kernel on
the issuing stream that waits for every peer's matching barrier); Ulysses with int32 flags written
and awaited by stream memory operations (:class:`CudaLink`, :mod:`ditfleet.parallel.cuda_driver`).

* Ulysses ``"ce"`` (:mod:`ditfleet.parallel.ulysses_ce`): the owner pushes each head group's rows
  into every peer's symmetric inbox by strided copy-engine copies and raises a flag there; no
  kernel, no barrier on any side stream.
* Ring ``"pull"``: each rank copies its K/V chunk into its symmetric buffer once; at step ``s`` a
  rank computes on key chunk ``(r - s) mod R`` and has already pulled the next one directly from
  its owner (chunks nobody needs under a mask are never pulled); partial results merge by LSE as
  in the rotating ring. The order of steps and merges, and therefore the result, is the rotating
  ring's; only the transport differs (one hop from the owner instead of R - 1 neighbour hops).

CUDA only (symmetric memory needs CUDA IPC); on other devices these implementations raise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from .pipeline import Pipeline

BARRIER_TIMEOUT_MS = 600_000  # a peer that never arrives is a hang: fail instead, after 10 minutes


def ce_unavailable(device: torch.device) -> str | None:
    """Why the copy-engine paths cannot run on ``device`` (``None``: they can)."""
    if device.type != "cuda":
        return f"copy-engine transfers need CUDA symmetric memory (device is {device.type})"
    try:
        import torch.distributed._symmetric_memory  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the torch build
        return f"torch.distributed._symmetric_memory is not available ({e})"
    return None


def _require_ce(device: torch.device) -> None:
    reason = ce_unavailable(device)
    if reason:
        raise NotImplementedError(f"ulysses_impl 'ce' / ring_impl 'pull': {reason}; use 'p2p' / 'rotate'")


_USABLE: dict[tuple[int, str], bool] = {}


def _quiesce(group, device: torch.device) -> None:
    """Every rank of ``group`` has finished all its queued work on ``device`` (host sync, barrier, host sync)."""
    import torch.distributed as dist

    torch.cuda.synchronize(device)
    dist.barrier(group=group, device_ids=[device.index if device.index is not None else torch.cuda.current_device()])
    torch.cuda.synchronize(device)


def _group_key(group) -> tuple[int, str]:
    # the object and its name: torch reuses group names after destroy_process_group
    return (id(group), group.group_name)


def _device_id(index: int) -> str:
    """The same string in every process for the same GPU: its PCI location, plus its UUID when torch gives
    a printable one (a MIG slice shares its GPU's PCI location)."""
    import re

    props = torch.cuda.get_device_properties(index)
    pci = ":".join(str(getattr(props, n, "?")) for n in ("pci_domain_id", "pci_bus_id", "pci_device_id"))
    uuid = str(getattr(props, "uuid", ""))
    if not re.fullmatch(r"(GPU-|MIG-)?[0-9a-fA-F-]{32,40}", uuid):
        uuid = ""
    return f"{pci}|{uuid}"


def ce_usable(group, device: torch.device) -> bool:
    """True when the copy-engine paths can serve ``group`` here: CUDA, symmetric memory, every rank of the
    group on this machine (same boot id and host name: CUDA IPC does not cross nodes), and every rank's
    GPU visible to this process with peer access (no PCIe box without P2P, no MIG slice). Every rank must
    agree, so the verdicts are exchanged too. Two collectives the first time per group (every rank of the
    group calls this together: it runs where ring attention starts), then cached."""
    if ce_unavailable(device):
        return False
    key = _group_key(group)
    if key not in _USABLE:
        import socket

        import torch.distributed as dist

        try:
            boot = open("/proc/sys/kernel/random/boot_id").read().strip()
        except OSError:
            boot = ""
        me = device.index if device.index is not None else torch.cuda.current_device()
        n = dist.get_world_size(group)
        infos = [None] * n
        try:
            dev_id = _device_id(me)
        except Exception:  # noqa: BLE001
            dev_id = None
        dist.all_gather_object(infos, (socket.gethostname(), boot, dev_id), group=group)
        try:
            local = {_device_id(i): i for i in range(torch.cuda.device_count())}
            ok = len({(h, b) for h, b, _ in infos}) == 1
            for _, _, dev_id in infos:
                j = local.get(dev_id)
                ok = ok and j is not None and (j == me or torch.cuda.can_device_access_peer(me, j))
        except Exception:  # noqa: BLE001 - any doubt means NCCL; the verdicts below keep every rank in step
            ok = False
        verdicts = [None] * n
        dist.all_gather_object(verdicts, bool(ok), group=group)
        _USABLE[key] = all(verdicts)
    return _USABLE[key]


def release_all() -> None:
    """Free every symmetric buffer and forget every group (call before ``destroy_process_group``)."""
    for b in SymmBuffer._all.values():
        b.handle = None
        b.storage = None
        b.nbytes = 0
    SymmBuffer._all.clear()
    CudaLink._all.clear()
    _USABLE.clear()


class SymmBuffer:
    """A symmetric-memory byte buffer of one process group, grown on demand (a collective: every rank asks
    for the same size, because every rank runs the same shapes).

    Args:
        group: the process group (Ulysses or ring group).
        name: a role name; one buffer per (group, name).
    """

    _all: dict[tuple[int, str, str], SymmBuffer] = {}

    def __init__(self, group, name: str):
        self.group, self.name = group, name
        self.nbytes = 0
        self.storage: torch.Tensor | None = None
        self.handle = None

    @classmethod
    def get(cls, group, name: str) -> SymmBuffer:
        key = (*_group_key(group), name)
        if key not in cls._all:
            cls._all[key] = cls(group, name)
        return cls._all[key]

    def ensure(self, nbytes: int, device: torch.device) -> SymmBuffer:
        if nbytes <= self.nbytes:
            return self
        import torch.distributed._symmetric_memory as symm_mem

        reason = ce_unavailable(device)
        if reason:
            raise NotImplementedError(reason)
        enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
        if enable is not None:
            enable(self.group.group_name)
        if self.handle is not None:  # growing: no rank may still read or write the old buffers
            _quiesce(self.group, device)
        self.handle = None
        self.storage = None
        self.storage = symm_mem.empty(nbytes, dtype=torch.uint8, device=device)
        self.handle = symm_mem.rendezvous(self.storage, self.group)
        self.nbytes = nbytes
        return self

    def view(self, rank: int, shape: Sequence[int], dtype: torch.dtype, offset: int = 0) -> torch.Tensor:
        """``rank``'s buffer (this process's own when ``rank`` is its group rank) as a ``shape`` tensor of
        ``dtype`` starting ``offset`` elements in; on this process's device."""
        return self.handle.get_buffer(rank, list(shape), dtype, offset)

    def barrier(self) -> None:
        """Every rank of the group reaches its matching barrier (on the current stream) before work after it runs."""
        self.handle.barrier(channel=0, timeout_ms=BARRIER_TIMEOUT_MS)


# ---------------------------------------------------------------- the link of Ulysses "ce"
class CudaLink:
    """The transport of :func:`~ditfleet.parallel.ulysses_ce.ulysses_ce_forward` on one process group: a
    symmetric data buffer, symmetric int32 flags, copy-engine copies and stream flag operations
    (:mod:`ditfleet.parallel.cuda_driver`). One per group, kept until :func:`release_all`.

    Args:
        group: the Ulysses process group; ``size`` its size, ``rank`` this process's index in it.
        device: this process's CUDA device.
    """

    _all: dict[tuple[int, str], CudaLink] = {}

    def __init__(self, group, size: int, rank: int, device: torch.device):
        self.group, self.size, self.rank, self.device = group, size, rank, device
        self.data = SymmBuffer.get(group, "ulysses_ce.data")
        self.flags = SymmBuffer.get(group, "ulysses_ce.flags")
        self.epoch = 0
        self.layout = None
        self._bases: tuple = (None, [], [])  # (data handle, per-rank byte views, per-rank flag views)
        self.memo: dict = {}  # the caller's per-shape plans (views of these buffers): emptied when they move

    @classmethod
    def get(cls, group, size: int, rank: int, device: torch.device) -> CudaLink:
        _require_ce(device)
        key = _group_key(group)
        if key not in cls._all:
            cls._all[key] = cls(group, size, rank, device)
        return cls._all[key]

    def begin(self, nbytes: int, layout=None) -> int:
        """Buffers of at least ``nbytes`` on every rank (collective when they grow); this call's epoch.

        ``layout``: where the regions start; when it differs from the last call's, every rank's work so
        far completes before anyone goes on (a host sync and a barrier: only when shapes change).
        """
        if self.layout is not None and layout != self.layout:
            _quiesce(self.group, self.device)
        self.layout = layout
        if self.flags.handle is None:  # first call: zeroed flags on every rank before anyone writes one
            from .ulysses_ce import flag_count

            self.flags.ensure(flag_count(self.size) * 4, self.device)
            self.flags.view(self.rank, (flag_count(self.size),), torch.int32).zero_()
            _quiesce(self.group, self.device)
            self.epoch = 0
        self.data.ensure(nbytes, self.device)
        if self._bases[0] is not self.data.handle:  # every rank's buffers as flat views, made once per allocation
            self.memo.clear()
            n = self.data.nbytes
            self._bases = (self.data.handle, [self.data.view(r, (n,), torch.uint8) for r in range(self.size)],
                           [self.flags.view(r, (self.flags.nbytes // 4,), torch.int32) for r in range(self.size)])
        self.epoch += 1
        return self.epoch

    def view(self, rank: int, shape: Sequence[int], dtype: torch.dtype, offset: int = 0) -> torch.Tensor:
        esz = dtype.itemsize
        return self._bases[1][rank][offset * esz:(offset + math.prod(shape)) * esz].view(dtype).view(shape)

    def flag(self, rank: int, index: int) -> torch.Tensor:
        return self._bases[2][rank][index:index + 1]

    @staticmethod
    def copier(dst: torch.Tensor, offset: int, pitch: int, src_numel: int):
        """A prepared copy into ``dst`` of the rows at ``offset``, ``pitch`` apart, of sources of ``src_numel``
        elements (:class:`~ditfleet.parallel.cuda_driver.Copy2D`): ``copier(...)(src, stream)``."""
        from .cuda_driver import Copy2D

        return Copy2D(dst, offset, pitch, src_numel)

    @staticmethod
    def signal(flag: torch.Tensor, value: int, stream: int | None = None) -> None:
        from .cuda_driver import write_flag

        write_flag(flag, value, stream)

    @staticmethod
    def wait(flag: torch.Tensor, value: int, stream: int | None = None) -> None:
        from .cuda_driver import wait_flag

        wait_flag(flag, value, stream)


# ---------------------------------------------------------------- ring over copy engines
# attend(q, k, v, n_valid, chunk_index) -> (out, lse); merge(out, lse, block_out, block_lse, last) -> (out, lse)
BlockAttend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, int], tuple[torch.Tensor, torch.Tensor]]


def ring_pull_forward(q, k, v, *, comm, attend: BlockAttend, chunk_valid: Sequence[int], computes: Callable[[int, int], bool],
                      merge, buffer=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``"pull"`` ring: the rotating ring's steps and merges, each key chunk pulled from its owner.

    Args:
        q: ``[B, S_q, H, D]`` local queries; ``k``, ``v``: ``[B, S_k, H, D]`` the local key chunk.
        comm: the ring's :class:`~ditfleet.parallel.ring.RingComm` (group rank ``i`` owns chunk ``i``).
        attend: block kernel, called with the chunk's valid keys and its index.
        chunk_valid: valid keys per chunk index (0: all padding, never pulled or computed).
        computes: ``computes(rank, step)``: the schedule (identical on every rank).
        merge: ``merge(out, lse, block_out, block_lse, last)`` -> the running ``(out, lse)``.
        buffer: the ring's shared buffer (``view(rank, shape, dtype)``, ``barrier()``); ``None``: this
            group's :class:`SymmBuffer` (CUDA). Tests pass an in-process stand-in to check the step logic on CPU.

    Returns:
        ``(out, lse)`` as :func:`~ditfleet.parallel.ring.ring_forward`.
    """
    size, rank = comm.size, comm.rank
    b, s_k, h, d = k.shape
    shape = (2, b, s_k, h, d)
    if buffer is None:
        _require_ce(q.device)
        buffer = SymmBuffer.get(comm.group, "ring.kv").ensure(math.prod(shape) * k.element_size(), k.device)
    buf = buffer
    pipe = Pipeline(q, "ring_pull")
    pipe.keep(q, k, v)
    with pipe.on_comm():
        buf.barrier()  # every peer is done pulling my previous chunk
        mine = buf.view(rank, shape, k.dtype)
        mine[0].copy_(k)
        mine[1].copy_(v)
        buf.barrier()  # every chunk is in place

    # Two pull buffers, reused in turn: the pull for the j-th remote step waits (on the comm stream)
    # until the kernel of remote step j - 2, which read the same buffer, is done.
    bufs = [None, None]
    freed = [None, None]

    def pull(j: int, step: int):
        c = (rank - step) % size
        slot = j % 2
        with pipe.on_comm():
            pipe.comm_wait(freed[slot])
            if bufs[slot] is None:
                bufs[slot] = k.new_empty(shape)
            bufs[slot].copy_(buf.view(c, shape, k.dtype))  # one contiguous copy-engine transfer from the owner
            return bufs[slot], pipe.mark()

    steps = [st for st in range(size) if computes(rank, st)]
    remote = [st for st in steps if st != 0]  # step 0 is the local chunk
    pulled = {remote[0]: pull(0, remote[0])} if remote else {}
    out = lse = None
    for i, st in enumerate(steps):
        later = [x for x in remote if x > st]
        if later and later[0] not in pulled:  # the next pull overlaps this step's kernel
            pulled[later[0]] = pull(remote.index(later[0]), later[0])
        c = (rank - st) % size
        held, ready = pulled.pop(st) if st else (None, None)
        kk, vv = (k, v) if held is None else (held[0], held[1])
        with pipe.on_compute(0, after=ready):
            pipe.used_here(held)
            block_out, block_lse = attend(q, kk, vv, chunk_valid[c], c)
            if out is None:  # the first block's result is the running state as is
                out, lse = block_out, block_lse.float()
            else:
                out, lse = merge(out, lse, block_out, block_lse, i == len(steps) - 1)
            if held is not None:
                freed[remote.index(st) % 2] = pipe.mark()
        del held, kk, vv
    pipe.finish()
    if out is None:
        return q.new_zeros(q.shape), torch.full((b, h, q.shape[1]), float("-inf"), dtype=torch.float32, device=q.device)
    return out.to(q.dtype), lse
