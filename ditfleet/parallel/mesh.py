"""The process world and its mesh: cfg x ring x ulysses, ulysses innermost.

``init_distributed`` creates the one default process group of a run (NCCL on ``cuda:LOCAL_RANK``
when CUDA is available, else gloo on CPU) from torchrun's environment. ``init_parallel`` lays a
``torch.distributed.DeviceMesh`` of shape ``(cfg, ring, ulysses)`` over it; every sub-group
(Ulysses, ring, cfg, and the flattened sequence-parallel group) comes from that mesh.

Ulysses is innermost so that a Ulysses group is a run of neighbouring ranks (one NVLink
island); the sequence-parallel (SP) rank of a process is ``ring_rank * ulysses_size + ulysses_rank``
and equals the index of the sequence chunk it holds.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..errors import ConfigError

MESH_AXES = ("cfg", "ring", "ulysses")


@dataclass(frozen=True)
class DistEnv:
    """Who this process is in the world.

    Attributes:
        rank: global rank.
        world_size: number of processes.
        local_rank: rank on this host (``LOCAL_RANK``); picks the CUDA device.
        device: ``cuda:LOCAL_RANK`` under NCCL, ``cpu`` under gloo.
        backend: ``"nccl"`` or ``"gloo"``.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str


def _env_int(name: str, default: int | None) -> int:
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            raise ConfigError(None, f"environment variable {name} is not set (launch with torchrun or set it)")
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(None, f"environment variable {name}={raw!r} is not an integer") from None


def init_distributed(*, backend: str | None = None, timeout_s: float = 1800.0) -> DistEnv:
    """Create the default process group once (later calls return the existing one).

    Reads torchrun's ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``.
    Without ``WORLD_SIZE`` the process is a world of one (an in-memory store, no network).
    The CUDA device is ``cuda:LOCAL_RANK``, never the global rank (which exceeds the host's GPU
    count on every node but the first).

    Args:
        backend: ``"nccl"`` or ``"gloo"``; ``None`` picks NCCL when CUDA is available, else gloo.
        timeout_s: collective timeout of the group.

    Returns:
        The :class:`DistEnv` of this process.
    """
    cuda = torch.cuda.is_available()
    if dist.is_initialized():
        backend = str(dist.get_backend())
        rank, world = dist.get_rank(), dist.get_world_size()
        nccl = "nccl" in backend
        local = _env_int("LOCAL_RANK", torch.cuda.current_device() if nccl else 0)
        device = torch.device("cuda", local) if nccl else torch.device("cpu")
        return DistEnv(rank, world, local, device, backend)
    backend = backend or ("nccl" if cuda else "gloo")
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0 if world == 1 else None)
    local = _env_int("LOCAL_RANK", 0 if world == 1 else None)
    if not 0 <= rank < world:
        raise ConfigError(None, f"RANK={rank} is outside WORLD_SIZE={world}")
    device = torch.device("cpu")
    if backend == "nccl":
        if not cuda:
            raise ConfigError(None, "backend nccl needs CUDA, but torch.cuda.is_available() is False")
        if local >= torch.cuda.device_count():
            raise ConfigError(
                None, f"LOCAL_RANK={local} but this host has {torch.cuda.device_count()} visible GPU(s); "
                "start at most that many processes per node"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    if world == 1 and "MASTER_ADDR" not in os.environ:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout,
                                device_id=device if backend == "nccl" else None)
    else:
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world, timeout=timeout,
                                device_id=device if backend == "nccl" else None)
    return DistEnv(rank, world, local, device, backend)


@dataclass(frozen=True)
class ParallelMesh:
    """Sizes of the cfg x ring x ulysses mesh (checked on construction) and its process groups.

    Build it with :func:`init_parallel`; constructing it directly (no ``device_mesh``) gives a
    size-only record, enough for validation and for a world of one.

    Attributes:
        cfg_size: 1 (conditional and unconditional as one batch) or 2 (one half per cfg rank).
        ring_size: ring-attention degree.
        ulysses_size: Ulysses degree (innermost axis: neighbouring ranks).
        world_size: number of processes; must equal the product of the three sizes.
        device_mesh: the ``DeviceMesh`` with axes ``("cfg", "ring", "ulysses")``, or ``None``.
        sp_group: the flattened ring x ulysses (sequence-parallel) process group of this rank.
        transport: how SP data moves, resolved when the mesh was built: ``"nccl"`` (``torch.distributed``:
            NCCL on GPUs, gloo on CPU) or ``"copy_engine"`` (:mod:`ditfleet.parallel.copy_engine`).
        transport_reason: why (``parallel.transport`` as configured, or what ``auto`` decided).
        timeout_s: the mesh groups' timeout (``parallel.timeout_s``): the longest any wait on a peer may take.
    """

    cfg_size: int = 1
    ring_size: int = 1
    ulysses_size: int = 1
    world_size: int = 1
    device_mesh: object | None = field(default=None, compare=False, repr=False)
    sp_group: object | None = field(default=None, compare=False, repr=False)
    transport: str = "nccl"
    transport_reason: str = field(default="default", compare=False)
    timeout_s: float = 300.0

    def __post_init__(self) -> None:
        sizes = {"cfg_size": self.cfg_size, "ring_size": self.ring_size, "ulysses_size": self.ulysses_size}
        desc = " x ".join(f"{k} {v}" for k, v in sizes.items())
        for name, value in sizes.items():
            if not isinstance(value, int) or value < 1:
                raise ConfigError("parallel", f"{name} must be an integer >= 1, got {value!r} ({desc})")
        if self.cfg_size not in (1, 2):
            raise ConfigError("parallel", f"cfg_size must be 1 or 2 (conditional / unconditional halves), got {self.cfg_size}")
        product = self.cfg_size * self.ring_size * self.ulysses_size
        if product != self.world_size:
            raise ConfigError(
                "parallel",
                f"{desc} = {product}, but the world has {self.world_size} process(es); "
                f"the product of the sizes must equal the world size",
            )
        if self.transport not in ("nccl", "copy_engine"):
            raise ConfigError("parallel.transport", f"a built mesh runs 'nccl' or 'copy_engine', got {self.transport!r}")
        if not isinstance(self.timeout_s, (int, float)) or not self.timeout_s > 0:
            raise ConfigError("parallel.timeout_s", f"must be a number of seconds > 0, got {self.timeout_s!r}")
        if self.device_mesh is not None and tuple(self.device_mesh.mesh_dim_names) != MESH_AXES:
            raise ValueError(f"device mesh axes must be {MESH_AXES}, got {self.device_mesh.mesh_dim_names}")
        object.__setattr__(self, "_cache", {})

    def __getstate__(self):  # a copy starts with an empty cache (it holds process groups)
        return {**self.__dict__, "_cache": {}}

    def cached(self, key, make):
        """``make()`` the first time per ``key``, then the same object: this process's coordinates, groups
        and what is built on them never change for a mesh, and asking the ``DeviceMesh`` again costs
        tens of microseconds of host time per question -- on every attention call, before its first kernel."""
        cache = self._cache
        if key not in cache:
            cache[key] = make()
        return cache[key]

    # ---- sizes -------------------------------------------------------------------------
    @property
    def sp_size(self) -> int:
        """Sequence-parallel degree: ``ring_size * ulysses_size``."""
        return self.ring_size * self.ulysses_size

    # ---- this process's coordinates -------------------------------------------------------
    def _local(self, axis: str) -> int:
        if self.device_mesh is None:
            return 0
        return self.cached(("rank", axis), lambda: self.device_mesh.get_local_rank(axis))

    @property
    def cfg_rank(self) -> int:
        return self._local("cfg")

    @property
    def ring_rank(self) -> int:
        return self._local("ring")

    @property
    def ulysses_rank(self) -> int:
        return self._local("ulysses")

    @property
    def sp_rank(self) -> int:
        """Index of the sequence chunk this process holds: ``ring_rank * ulysses_size + ulysses_rank``."""
        return self.ring_rank * self.ulysses_size + self.ulysses_rank

    # ---- groups ----------------------------------------------------------------------------
    def _need_mesh(self, what: str):
        if self.device_mesh is None:
            raise RuntimeError(f"{what} needs a mesh built by ditfleet.parallel.init_parallel (this one has sizes only)")
        return self.device_mesh

    def group(self, axis: str):
        """Process group of mesh ``axis`` (``"cfg"``, ``"ring"``, ``"ulysses"`` or ``"sp"``) holding this rank."""
        if axis == "sp":
            self._need_mesh("the sp group")
            return self.sp_group
        mesh = self._need_mesh(f"the {axis} group")
        return self.cached(("group", axis), lambda: mesh.get_group(axis))

    def axis_ranks(self, axis: str) -> list[int]:
        """Global ranks of this process's group along ``axis``, in axis order."""
        return list(self.cached(("ranks", axis), lambda: tuple(self._axis_ranks(axis))))

    def peers(self, axis: str) -> list[int]:
        """Global ranks of this process's ``axis`` group other than this process (whom a wait on that group waits for)."""
        me = dist.get_rank()
        return [r for r in self.axis_ranks(axis) if r != me]

    def _axis_ranks(self, axis: str) -> list[int]:
        mesh = self._need_mesh(f"ranks of {axis}").mesh
        c, r, u = self.cfg_rank, self.ring_rank, self.ulysses_rank
        if axis == "cfg":
            return mesh[:, r, u].tolist()
        if axis == "ring":
            return mesh[c, :, u].tolist()
        if axis == "ulysses":
            return mesh[c, r, :].tolist()
        if axis == "sp":
            return mesh[c].flatten().tolist()
        raise ValueError(f"unknown mesh axis {axis!r}; axes: {MESH_AXES + ('sp',)}")

    def describe(self) -> str:
        return f"cfg {self.cfg_size} x ring {self.ring_size} x ulysses {self.ulysses_size} = {self.world_size}"


def _set_pg_timeout(timeout: datetime.timedelta, group) -> None:
    """Set ``group``'s timeout. torch has no public call for a group made by ``init_device_mesh`` (it takes no
    timeout), so this uses ``distributed_c10d._set_pg_timeout``; where that is missing the group keeps torch's
    default and a warning says so."""
    from torch.distributed import distributed_c10d

    setter = getattr(distributed_c10d, "_set_pg_timeout", None)
    if setter is None:  # pragma: no cover - depends on the torch build
        import warnings

        warnings.warn("this torch has no _set_pg_timeout: parallel.timeout_s does not apply to the mesh groups",
                      RuntimeWarning, stacklevel=3)
        return
    setter(timeout, group)


def init_parallel(
    *,
    ulysses_size: int = 1,
    ring_size: int = 1,
    cfg_size: int = 1,
    transport: str = "auto",
    timeout_s: float = 300.0,
) -> ParallelMesh:
    """Build the cfg x ring x ulysses mesh over the default process group (created if needed).

    Args:
        ulysses_size: Ulysses degree (all-to-all over neighbouring ranks).
        ring_size: ring degree.
        cfg_size: 1 or 2.
        transport: ``parallel.transport``: ``"auto"`` (= ``"nccl"``), ``"nccl"`` or ``"copy_engine"``
            (checked here, once: :func:`~ditfleet.parallel.transport.resolve_transport`).
        timeout_s: ``parallel.timeout_s``: the timeout of every mesh group (the Ulysses, ring, cfg and
            sequence-parallel groups), so a wait on a stopped or dead peer ends within it.

    Returns:
        A :class:`ParallelMesh` holding the ``DeviceMesh``, its sub-groups and the resolved transport.

    Raises:
        ConfigError: the product of the sizes differs from the world size (message names all sizes), an
            unknown transport, ``copy_engine`` where it cannot run, or a timeout <= 0.
    """
    env = init_distributed()
    # Validate before any group is created, so a bad config fails identically on every rank.
    ParallelMesh(cfg_size, ring_size, ulysses_size, env.world_size, timeout_s=timeout_s)
    from torch.distributed.device_mesh import init_device_mesh

    from .transport import Group, resolve_transport

    device_type = "cuda" if env.device.type == "cuda" else "cpu"
    mesh = init_device_mesh(device_type, (cfg_size, ring_size, ulysses_size), mesh_dim_names=MESH_AXES)
    try:
        sp_group = mesh["ring", "ulysses"]._flatten("sp").get_group()
    except (AttributeError, NotImplementedError, RuntimeError):  # older/newer torch without _flatten
        sp_group = None
        for c in range(cfg_size):
            ranks = mesh.mesh[c].flatten().tolist()
            g = dist.new_group(ranks)
            if env.rank in ranks:
                sp_group = g
    sized = ParallelMesh(cfg_size, ring_size, ulysses_size, env.world_size, mesh, sp_group, timeout_s=timeout_s)
    # DeviceMesh gives its groups torch's default timeout (10-30 min), not the default group's: set ours. A mesh
    # axis that spans the world *is* the default group; its timeout (the launcher's, which also bounds the waits
    # between requests while rank 0 decodes) is left alone -- the transports bound their own waits.
    timeout = datetime.timedelta(seconds=timeout_s)
    default = dist.distributed_c10d._get_default_group()
    for axis in (*MESH_AXES, "sp"):
        group = sized.group(axis)
        if group is not None and group is not default and dist.get_world_size(group) > 1:
            _set_pg_timeout(timeout, group)
    groups = [Group(sized.group(a), sized.axis_ranks(a), getattr(sized, f"{a}_rank"), timeout_s)
              for a in ("ulysses", "ring") if getattr(sized, f"{a}_size") > 1]
    resolved, why = resolve_transport(transport, groups, env.device)
    return ParallelMesh(cfg_size, ring_size, ulysses_size, env.world_size, mesh, sp_group, transport=resolved,
                        transport_reason=why, timeout_s=timeout_s)
