"""Executors: how the driver reaches its workers (one per rank), through an explicit list of methods.

The chain is vLLM's: the driver (:class:`~ditfleet.engine.engine.Engine`) -> an executor -> one
:class:`~ditfleet.engine.worker.Worker` per rank -> the :class:`~ditfleet.engine.runner.ModelRunner`.
Every executor has the same interface; the engine never knows which one it holds:

* :class:`LocalExecutor`: one worker in this process (CPU or one GPU); the test double of the others.
* :class:`~ditfleet.engine.torchrun.TorchrunExecutor`: every torchrun process runs the engine
  (SPMD); each reaches its own worker, and rank 0 is the driver (reads files, writes the output).
* :class:`~ditfleet.engine.ray_executor.RayExecutor`: worker actors in a placement group.

Workers are called only through :meth:`Executor.collective_rpc` (plain methods) and
:meth:`Executor.collective_stream` (generator methods: progress events, then a result), which
refuse any name not in :data:`WORKER_METHODS`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ..errors import ConfigError

log = logging.getLogger(__name__)

#: The only worker methods an executor calls.
WORKER_METHODS = (
    "report", "free_port", "init_device", "init_process_group", "load_model", "encode", "execute", "decode", "shutdown",
)
#: Of those, the generator methods (yield ``(kind, payload)`` events, the last one ``("result", value)``).
STREAM_METHODS = ("execute", "decode")

#: ``on_event(rank, kind, payload)``: ``("step", (i, n))`` from denoising, ``("chunk", uint8 frames)`` from decoding.
EventCallback = Callable[[int, str, Any], None]


class EngineError(RuntimeError):
    """A request or the engine's start-up failed for a reason that is not the user's input: a worker died
    (killed, out of memory, NCCL error) or hung, and retries are exhausted. The CLI prints its one-line
    message and exits with status 1 (user errors exit 2)."""


class WorkerFailure(Exception):
    """A worker died or hung, or a peer did (a collective that failed on a survivor): the worker group is broken
    (internal; the engine tears the group down and retries, or raises :class:`EngineError`)."""


class WorkerError(EngineError):
    """A worker raised an error that is neither the user's nor a death / hang (out of memory at this size, a
    CUDA error, a bug): the same request would fail the same way, so it is not retried -- it fails at once,
    and the worker group, which is still whole, keeps serving."""


#: Exceptions a surviving rank raises when a peer died or stalled: retried like the death itself.
PEER_FAILURES = ("PeerError", "DistBackendError", "DistNetworkError", "DistStoreError")


def check_method(method: str, *, stream: bool) -> None:
    """Refuse a method that is not in :data:`WORKER_METHODS` (or a stream/plain mismatch)."""
    if method not in WORKER_METHODS:
        raise ValueError(f"{method!r} is not a worker method; callable: {', '.join(WORKER_METHODS)}")
    if stream != (method in STREAM_METHODS):
        kind = "collective_stream" if method in STREAM_METHODS else "collective_rpc"
        raise ValueError(f"worker method {method!r} must be called with {kind}")


@contextmanager
def timed(stages: dict[str, float], name: str):
    """Time a start-up stage into ``stages[name]`` and log it."""
    t = time.perf_counter()
    try:
        yield
    finally:
        stages[name] = time.perf_counter() - t
        log.info("start-up: %-15s %.2f s", name, stages[name])


def drain(gen: Iterator, rank: int, on_event: EventCallback | None) -> Any:
    """Run a worker generator to its ``("result", value)``, passing the other events to ``on_event``."""
    result = None
    for kind, payload in gen:
        if kind == "result":
            result = payload
        elif on_event is not None:
            on_event(rank, kind, payload)
    return result


class Executor:
    """The interface every executor implements.

    Attributes:
        cfg: the run config.
        world_size: ranks in the group.
        rank: this process's rank (0 except under torchrun).
        spmd: True when every process runs the engine (torchrun).
        alive: the worker group is up and usable.
        infos: ``report()`` of every rank after start-up.
    """

    launcher = "?"
    spmd = False

    def __init__(self, cfg):
        self.cfg = cfg
        self.world_size = cfg.parallel.world_size
        self.rank = 0
        self.alive = False
        self.infos: list[dict] = []

    @property
    def is_driver(self) -> bool:
        """This process reads the inputs and writes the output (always, except torchrun ranks > 0)."""
        return self.rank == 0

    # ---- life cycle --------------------------------------------------------------------------------
    def start(self, attention_state: dict | None) -> dict[str, float]:
        """Bring the worker group up and load the model (``attention_state``: the per-layer attention state, by
        kind, every worker receives: ``{"sparge": thresholds}``, or ``None``).

        Returns:
            Seconds per start-up stage.
        """
        raise NotImplementedError

    def abort(self) -> None:
        """Tear a broken group down at once (no graceful calls into workers that may hang)."""
        self.shutdown(graceful=False)

    def shutdown(self, graceful: bool = True) -> None:
        """Release every worker and resource; safe to call twice."""
        raise NotImplementedError

    # ---- calls -----------------------------------------------------------------------------------------
    def collective_rpc(self, method: str, *args, ranks: Sequence[int] | None = None,
                       rank_kwargs: Sequence[dict] | None = None, timeout: float | None = None, **kwargs) -> list:
        """Call a plain worker method on ``ranks`` (default all) and wait for every answer.

        Args:
            method: a name in :data:`WORKER_METHODS` (others raise ``ValueError``).
            args, kwargs: passed to every rank; ``rank_kwargs[r]`` adds rank ``r``'s own keywords.
            timeout: seconds to wait (Ray); a worker that does not answer is a failure.

        Returns:
            One value per rank of the world (``None`` for ranks not called, or not local under torchrun).
        """
        check_method(method, stream=False)
        return self._rpc(method, args, kwargs, self._ranks(ranks), rank_kwargs, timeout)

    def collective_stream(self, method: str, *args, ranks: Sequence[int] | None = None,
                          on_event: EventCallback | None = None, idle_timeout: float | None = None, **kwargs) -> list:
        """Call a generator worker method on ``ranks`` and pass its events to ``on_event`` as they come.

        ``idle_timeout``: seconds without any event from any rank after which the group is declared
        hung (Ray). Returns one result per rank of the world, as :meth:`collective_rpc`.
        """
        check_method(method, stream=True)
        return self._stream(method, args, kwargs, self._ranks(ranks), on_event, idle_timeout)

    def put(self, value: Any) -> Any:
        """A handle to ``value`` that every worker can receive as an argument (Ray: the object store, once)."""
        return value

    def share(self, value: Any) -> Any:
        """Rank 0's ``value`` on every process (torchrun: a ``torch.distributed`` broadcast; else itself)."""
        return value

    # ---- for subclasses ---------------------------------------------------------------------------
    def _ranks(self, ranks: Sequence[int] | None) -> list[int]:
        out = list(range(self.world_size)) if ranks is None else list(ranks)
        bad = [r for r in out if not 0 <= r < self.world_size]
        if bad:
            raise ValueError(f"rank(s) {bad} outside a world of {self.world_size}")
        return out

    def _rpc(self, method, args, kwargs, ranks, rank_kwargs, timeout) -> list:
        raise NotImplementedError

    def _stream(self, method, args, kwargs, ranks, on_event, idle_timeout) -> list:
        raise NotImplementedError


class LocalExecutor(Executor):
    """One worker in this process: a world of one, CPU or one GPU, no process group."""

    launcher = "local"

    def __init__(self, cfg):
        super().__init__(cfg)
        if self.world_size != 1:
            raise ConfigError("launcher", f"'local' runs one process, but the parallel degrees need {self.world_size}; "
                                          "use torchrun or ray")
        from .worker import Worker

        self.worker = Worker(cfg)

    def start(self, attention_state: dict | None) -> dict[str, float]:
        stages: dict[str, float] = {}
        with timed(stages, "device"):
            self.collective_rpc("init_device", rank=0, world_size=1, local_rank=0)
        with timed(stages, "load"):
            self.collective_rpc("load_model", attention_state)
        self.infos = self.collective_rpc("report")
        self.alive = True
        return stages

    def shutdown(self, graceful: bool = True) -> None:
        if self.alive:
            self.worker.shutdown()
        self.alive = False

    def _rpc(self, method, args, kwargs, ranks, rank_kwargs, timeout) -> list:
        if 0 not in ranks:
            return [None]
        kw = {**kwargs, **(rank_kwargs[0] if rank_kwargs else {})}
        return [getattr(self.worker, method)(*args, **kw)]

    def _stream(self, method, args, kwargs, ranks, on_event, idle_timeout) -> list:
        if 0 not in ranks:
            return [None]
        return [drain(getattr(self.worker, method)(*args, **kwargs), 0, on_event)]


def make_executor(cfg) -> Executor:
    """The executor of ``cfg.launcher``."""
    if cfg.launcher == "local":
        return LocalExecutor(cfg)
    if cfg.launcher == "torchrun":
        from .torchrun import TorchrunExecutor

        return TorchrunExecutor(cfg)
    if cfg.launcher == "ray":
        from .ray_executor import RayExecutor

        return RayExecutor(cfg)
    raise ConfigError("launcher", f"{cfg.launcher!r} is not valid; valid: local, torchrun, ray")
