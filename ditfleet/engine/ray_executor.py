"""The Ray launcher: one worker actor per rank in a placement group, NCCL (GPU) or gloo (CPU) between them.

Start-up runs as timed stages (recorded in every run report as ``engine.startup_s``):

1. ``ray_init``: join the cluster (``ray.address``, else ``RAY_ADDRESS``) or start a local one for
   the run (dashboard off, or on 127.0.0.1 with ``ray.dashboard: true``).
2. ``placement_group``: one bundle per rank (``{"GPU": 1, "CPU": c}``, or CPU-only bundles),
   STRICT_PACK when one node holds them all, else PACK (``ray.placement_strategy``).
3. ``ranks``: one actor per bundle; ranks ordered by node (the driver's node first) then GPU id,
   so Ulysses groups (neighbouring ranks) share a node.
4. ``env``: per node, ``CUDA_VISIBLE_DEVICES`` = the GPUs of all ranks there (so NCCL sees its
   peers) and ``LOCAL_RANK``; rank 0's node IP and a free port there seed the rendezvous.
5. ``device``, 6. ``process_group`` (timeout ``ray.init_timeout_s``), 7. ``load`` (the model, and the
   sparge thresholds from the object store: ``ray.put`` once by the driver, never read by workers).

Faults: every wait is bounded. A worker that dies (killed, OOM, NCCL error raised) fails the call
at once (Ray reports the actor's death); a worker that hangs fails it after
``ray.request_timeout_s`` without progress. Either way the executor raises ``WorkerFailure`` and
the engine tears the group down (actors killed, placement group removed, processes gone) and
rebuilds it for a retry. Errors the user caused come back as themselves (no retry).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections import defaultdict

from ..errors import ConfigError, UserError
from .executor import PEER_FAILURES, EngineError, Executor, WorkerError, WorkerFailure, timed

log = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_S = 10.0
PROCESS_EXIT_WAIT_S = 15.0
#: After a survivor reports a peer's failure, how long to wait for the dead rank's own error (the root cause).
PEER_DEATH_GRACE_S = 5.0


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _gpu_key(gpu_ids) -> tuple:
    ids = list(gpu_ids or [])
    return tuple((0, int(g)) if str(g).isdigit() else (1, str(g)) for g in ids)


def ray_init_kwargs(rc, *, world_size: int) -> dict:
    """Keyword arguments of ``ray.init`` for the ``ray`` config block (dashboard off or on loopback).

    ``address`` null and no ``RAY_ADDRESS``: ``"local"`` (a new cluster for this run, never a
    stray one found on the machine), with enough CPUs for ``world_size`` CPU workers.
    """
    kwargs: dict = {"logging_level": logging.WARNING, "log_to_driver": True}
    address = rc.address or os.environ.get("RAY_ADDRESS") or None
    if address is not None:
        kwargs["address"] = address
        return kwargs
    kwargs["address"] = "local"
    kwargs["include_dashboard"] = bool(rc.dashboard)
    if rc.dashboard:
        kwargs["dashboard_host"] = rc.dashboard_host or "127.0.0.1"
    kwargs["num_cpus"] = max(os.cpu_count() or 1, world_size * rc.num_cpus_per_worker)
    return kwargs


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return not os.path.isdir("/proc")  # no /proc: kill(0) succeeded


class RayExecutor(Executor):
    """Worker actors in a Ray placement group (see the module doc for the stages and fault handling)."""

    launcher = "ray"

    def __init__(self, cfg):
        super().__init__(cfg)
        try:
            import ray  # noqa: F401
        except ImportError:
            raise UserError("launcher 'ray' needs Ray: pip install 'ditfleet[ray]' (or 'ray[default]')") from None
        self.rc = cfg.ray
        self.actors: list = []
        self.pg = None
        self.use_gpu: bool | None = None
        self.strategy: str | None = None
        self._owns_ray = False
        self._state_ref = None
        self._driver_ip: str | None = None
        self._loose: list = []  # calls abandoned after a failure: settled at tear-down (no "unhandled error" noise)

    # ---- start-up ------------------------------------------------------------------------------------
    def start(self, attention_state: dict | None) -> dict[str, float]:
        import ray

        stages: dict[str, float] = {}
        with timed(stages, "ray_init"):
            self._init_ray()
        if attention_state is not None and self._state_ref is None:
            self._state_ref = ray.put(attention_state)  # once, in the object store: rebuilt groups get the same object
        init_t, req_t = self.rc.init_timeout_s, self.rc.request_timeout_s
        try:
            with timed(stages, "placement_group"):
                self._place()
            with timed(stages, "ranks"):
                self._spawn()
            with timed(stages, "env"):
                rank_kwargs = self._rank_env()
                port = self.collective_rpc("free_port", ranks=[0], timeout=init_t)[0]
            with timed(stages, "device"):
                devices = self.collective_rpc("init_device", rank_kwargs=rank_kwargs, timeout=init_t)
            backend = "nccl" if all(d["device"].startswith("cuda") for d in devices) else "gloo"
            with timed(stages, "process_group"):
                self.collective_rpc("init_process_group", self.infos[0]["node_ip"], port, backend=backend,
                                    timeout_s=init_t, timeout=init_t + 30)
            with timed(stages, "load"):
                self.collective_rpc("load_model", self._state_ref, timeout=max(req_t, init_t))
            self.infos = self.collective_rpc("report", timeout=init_t)
        except BaseException:
            self.abort()
            raise
        self.alive = True
        log.info("ray: %d worker(s) ready (%s, %s, %s): %s", self.world_size, "GPU" if self.use_gpu else "CPU",
                 self.strategy, backend, ", ".join(f"rank {i['rank']} pid {i['pid']}@{i['node_ip']}" for i in self.infos))
        return stages

    def _init_ray(self) -> None:
        import ray

        if ray.is_initialized():
            return
        kwargs = ray_init_kwargs(self.rc, world_size=self.world_size)
        ray.init(**kwargs)
        self._owns_ray = kwargs["address"] == "local"
        where = "a local cluster for this run" if self._owns_ray else f"the cluster at {kwargs['address']}"
        dash = f"dashboard on {kwargs.get('dashboard_host')}" if kwargs.get("include_dashboard") else "dashboard off"
        log.info("ray: joined %s (%s)", where, dash if self._owns_ray else "its own dashboard settings")

    def _place(self) -> None:
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group

        n, cpus = self.world_size, self.rc.num_cpus_per_worker
        total = ray.cluster_resources()
        self.use_gpu = self.cfg.device == "cuda" or (self.cfg.device == "auto" and total.get("GPU", 0) >= 1)
        bundle = {"CPU": cpus, "GPU": 1} if self.use_gpu else {"CPU": cpus}
        need = {k: v * n for k, v in bundle.items()}
        short = {k: total.get(k, 0) for k in need if total.get(k, 0) < need[k]}
        if short:
            have = ", ".join(f"{v:g} {k}" for k, v in short.items())
            raise ConfigError("parallel", f"{n} Ray worker(s) need {', '.join(f'{v:g} {k}' for k, v in need.items())}, "
                                          f"but the cluster has {have} in all; lower parallel.seq_p_size / cfg_p_size "
                                          "(or ray.num_cpus_per_worker), or add nodes")
        strategy = self.rc.placement_strategy
        if strategy == "auto":
            fits = any(node.get("Alive") and all(node.get("Resources", {}).get(k, 0) >= v for k, v in need.items())
                       for node in ray.nodes())
            strategy = "STRICT_PACK" if fits else "PACK"
        self.strategy = strategy
        self.pg = placement_group([dict(bundle) for _ in range(n)], strategy=strategy,
                                  name=f"ditfleet-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        ready, _ = ray.wait([self.pg.ready()], timeout=self.rc.init_timeout_s)
        if not ready:
            pg, self.pg = self.pg, None
            remove_placement_group(pg)
            raise EngineError(f"Ray could not place {n} x {bundle} ({strategy}) within ray.init_timeout_s="
                              f"{self.rc.init_timeout_s:g} s; available now: {ray.available_resources()} "
                              "(other jobs may hold the resources)")

    def _spawn(self) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from .worker import Worker

        remote = ray.remote(Worker)
        self.actors = [
            remote.options(
                num_cpus=self.rc.num_cpus_per_worker, num_gpus=1 if self.use_gpu else 0, max_restarts=0,
                max_task_retries=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=self.pg,
                                                                     placement_group_bundle_index=i),
            ).remote(self.cfg)
            for i in range(self.world_size)
        ]
        infos = self.collective_rpc("report", timeout=self.rc.init_timeout_s)
        self._driver_ip = ray.util.get_node_ip_address()
        order = sorted(range(self.world_size), key=lambda i: (infos[i]["node_ip"] != self._driver_ip,
                                                              infos[i]["node_ip"], _gpu_key(infos[i]["gpu_ids"]), i))
        self.actors = [self.actors[i] for i in order]
        self.infos = [infos[i] for i in order]

    def _rank_env(self) -> list[dict]:
        by_node: dict[str, list[int]] = defaultdict(list)
        for r, info in enumerate(self.infos):
            by_node[info["node_ip"]].append(r)
        passthrough = {k: v for k, v in os.environ.items() if k.startswith("DITFLEET_")}
        out = []
        for r, info in enumerate(self.infos):
            peers = by_node[info["node_ip"]]
            env = dict(passthrough)
            if self.use_gpu:
                if len(info["gpu_ids"]) != 1:
                    raise EngineError(f"rank {r} was given GPU ids {info['gpu_ids']}; expected exactly one")
                ids = sorted({g for p in peers for g in self.infos[p]["gpu_ids"]}, key=lambda g: _gpu_key([g]))
                env["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
                local = ids.index(info["gpu_ids"][0])
            else:
                local = peers.index(r)
            out.append({"rank": r, "world_size": self.world_size, "local_rank": local, "env": env,
                        "num_threads": None if self.use_gpu else self.rc.num_cpus_per_worker})
        return out

    # ---- calls -----------------------------------------------------------------------------------------
    def put(self, value):
        import ray

        return ray.put(value)

    def _failure(self, e: BaseException, rank: int, what: str) -> BaseException:
        """The exception the engine sees for a failed call: the user error itself; a WorkerFailure (retried) for a
        death, a hang, or a peer's failure seen by a survivor; a WorkerError (not retried) for any other exception
        a worker raised (out of memory at this size, a CUDA error: the same request would fail again)."""
        from ray import exceptions as rex

        info = self.infos[rank] if rank < len(self.infos) else {}
        who = f"rank {rank}" + (f" (pid {info['pid']} on {info['node_ip']})" if info.get("pid") else "")
        if isinstance(e, rex.RayTaskError):
            cause = getattr(e, "cause", None)
            if isinstance(cause, UserError):
                return cause
            if isinstance(cause, rex.RayActorError):
                return WorkerFailure(f"{who} died during {what} (killed, out of memory, or crashed): {_first_line(cause)}")
            if cause is not None and not isinstance(cause, rex.RayError):
                msg = f"{who} failed in {what}: {type(cause).__name__}: {_first_line(cause)}"
                if type(cause).__name__ in PEER_FAILURES:  # a peer died or stalled: the group is broken, retry
                    failure = WorkerFailure(msg)
                    failure.seen_by_peer = True
                    return failure
                return WorkerError(msg + " (deterministic: not retried)")
        if isinstance(e, rex.GetTimeoutError):
            return WorkerFailure(f"{who} did not answer {what} in time")
        if isinstance(e, rex.RayActorError):
            return WorkerFailure(f"{who} died during {what} (killed, out of memory, or crashed): {_first_line(e)}")
        if isinstance(e, rex.RayError):
            return WorkerFailure(f"{who}: {what} failed: {type(e).__name__}: {_first_line(e)}")
        return e

    def _rpc(self, method, args, kwargs, ranks, rank_kwargs, timeout) -> list:
        import ray

        if not self.actors:
            raise WorkerFailure(f"{method}: the worker group is not running")
        refs = {}
        for r in ranks:
            kw = {**kwargs, **(rank_kwargs[r] if rank_kwargs else {})}
            refs[r] = getattr(self.actors[r], method).remote(*args, **kw)
        timeout = timeout if timeout is not None else self.rc.request_timeout_s
        out = [None] * self.world_size
        pending = {ref: r for r, ref in refs.items()}
        deadline = time.monotonic() + timeout
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                self._loose.extend(pending)
                ranks_left = sorted(pending.values())
                raise WorkerFailure(f"rank(s) {ranks_left} did not answer {method} within {timeout:g} s (hung worker?)")
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=min(left, 1.0))
            for ref in ready:
                r = pending.pop(ref)
                try:
                    out[r] = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - classified: user error or worker failure
                    failure = self._root_cause(self._failure(e, r, method), {q: ref for ref, q in pending.items()},
                                               method)
                    self._loose.extend(pending)
                    self._settle(1.0)
                    raise failure from None
        return out

    def _stream(self, method, args, kwargs, ranks, on_event, idle_timeout) -> list:
        import ray

        if not self.actors:
            raise WorkerFailure(f"{method}: the worker group is not running")
        idle = idle_timeout if idle_timeout is not None else self.rc.request_timeout_s
        pending = {}
        for r in ranks:
            gen = getattr(self.actors[r], method).options(num_returns="streaming").remote(*args, **kwargs)
            pending[id(gen)] = (r, gen)
        out = [None] * self.world_size
        deadline = time.monotonic() + idle
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                self._loose.extend(g for _, g in pending.values())
                ranks_left = sorted(r for r, _ in pending.values())
                raise WorkerFailure(f"no progress from rank(s) {ranks_left} in {method} for {idle:g} s "
                                    "(ray.request_timeout_s): hung worker")
            ready, _ = ray.wait([g for _, g in pending.values()], num_returns=1, timeout=min(left, 1.0))
            for gen in ready:
                r = pending[id(gen)][0]
                try:
                    ref = next(gen)
                except StopIteration:
                    del pending[id(gen)]
                    continue
                except Exception as e:  # noqa: BLE001
                    others = {q: g for q, g in pending.values() if q != r}
                    failure = self._root_cause(self._failure(e, r, method), others, method)
                    self._loose.extend(g for _, g in pending.values())
                    raise failure from None
                try:
                    kind, payload = ray.get(ref, timeout=idle)
                except Exception as e:  # noqa: BLE001
                    others = {q: g for q, g in pending.values() if q != r}
                    failure = self._root_cause(self._failure(e, r, method), others, method)
                    self._loose.extend(g for _, g in pending.values())
                    raise failure from None
                deadline = time.monotonic() + idle
                if kind == "result":
                    out[r] = payload
                elif on_event is not None:
                    on_event(r, kind, payload)
        return out

    def _root_cause(self, failure: BaseException, others: dict, method: str) -> BaseException:
        """A survivor's collective fails (``PeerError``: connection reset) about when its peer dies, and Ray may
        tell the survivor's error first. Wait up to :data:`PEER_DEATH_GRACE_S` on the other ranks' calls
        (``others``: rank -> object ref or streaming generator) for a death; report the death as the failure, with
        what the survivor saw appended. Anything else (a user error, a death, a hang) is returned unchanged."""
        import ray
        from ray import exceptions as rex

        if not getattr(failure, "seen_by_peer", False):
            return failure
        others = dict(others)
        deadline = time.monotonic() + PEER_DEATH_GRACE_S
        while others and time.monotonic() < deadline:
            ready, _ = ray.wait(list(others.values()), num_returns=1,
                                timeout=max(0.0, min(1.0, deadline - time.monotonic())))
            for item in ready:
                r = next(q for q, it in others.items() if it is item)
                try:
                    if hasattr(item, "completed"):  # a streaming generator: its next item or its error
                        ray.get(next(item), timeout=0.1)
                        continue
                    ray.get(item, timeout=0.1)
                except StopIteration:
                    pass
                except Exception as e:  # noqa: BLE001 - classified below
                    died = isinstance(e, rex.RayActorError) or isinstance(getattr(e, "cause", None), rex.RayActorError)
                    if died:
                        return WorkerFailure(f"{self._failure(e, r, method)}; then {failure}")
                del others[r]
        return failure

    # ---- tear-down -------------------------------------------------------------------------------------
    def _settle(self, timeout: float) -> None:
        """Collect the outcome of abandoned calls that finish within ``timeout`` (their errors are known already)."""
        import ray

        deadline = time.monotonic() + timeout
        keep = []
        for item in self._loose:
            try:
                if hasattr(item, "completed"):  # a streaming generator: drain what is there
                    while ray.wait([item], timeout=max(0.0, deadline - time.monotonic()))[0]:
                        ray.get(next(item), timeout=0.1)
                elif ray.wait([item], timeout=max(0.0, deadline - time.monotonic()))[0]:
                    ray.get(item, timeout=0.1)
                else:
                    keep.append(item)
            except StopIteration:
                pass
            except Exception:  # noqa: BLE001 - the failure was reported by the call that saw it first
                pass
        self._loose = keep

    def worker_pids(self) -> list[int]:
        """Process ids of the current workers (rank order)."""
        return [int(i["pid"]) for i in self.infos if i.get("pid")]

    def _teardown(self, graceful: bool) -> None:
        import ray

        self.alive = False
        if not ray.is_initialized():
            self.actors, self.pg = [], None
            return
        from ray.util.placement_group import remove_placement_group

        if graceful and self.actors:
            refs = [a.shutdown.remote() for a in self.actors]
            ray.wait(refs, num_returns=len(refs), timeout=GRACEFUL_SHUTDOWN_S)
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - already dead
                pass
        if self.pg is not None:
            try:
                remove_placement_group(self.pg)
            except Exception:  # noqa: BLE001 - already removed
                pass
        local = [int(i["pid"]) for i in self.infos if i.get("pid") and i.get("node_ip") == self._driver_ip]
        deadline = time.monotonic() + PROCESS_EXIT_WAIT_S
        while any(_pid_alive(p) for p in local) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = [p for p in local if _pid_alive(p)]
        if left:
            log.warning("ray: worker process(es) %s still exiting after %.0f s", left, PROCESS_EXIT_WAIT_S)
        self._settle(2.0)  # the killed actors' calls fail now: consume them
        self._loose = []
        self.actors, self.pg = [], None

    def abort(self) -> None:
        """Kill every actor and remove the placement group (Ray stays up for a rebuild)."""
        self._teardown(graceful=False)

    def shutdown(self, graceful: bool = True) -> None:
        """Tear the group down, free the sparge object, and stop Ray if this executor started it."""
        import ray

        self._teardown(graceful)
        self._state_ref = None
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
        self._owns_ray = False
