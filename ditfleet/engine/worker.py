"""One rank of a run: device, process group, model, and the per-request work.

A :class:`Worker` is plain Python: it runs in-process (:class:`~.executor.LocalExecutor`), in each
torchrun process (:class:`~.torchrun.TorchrunExecutor`), or wrapped as a Ray actor
(:class:`~.ray_executor.RayExecutor`). Executors call only the methods named in
:data:`~.executor.WORKER_METHODS`, in this order at start-up::

    report()                      pid, node IP, GPU ids (before any CUDA call), sparge checksum
    free_port()                   rank 0 only: a free TCP port for the process-group rendezvous
    init_device(rank=..., ...)    environment (CUDA_VISIBLE_DEVICES, LOCAL_RANK), device, threads
    init_process_group(addr, port)  NCCL on GPU, gloo on CPU; the cfg x ring x ulysses mesh
    load_model(attention_state)   rank 0: the whole pipeline (encoders, DiT, VAE); others: the DiT

and per request::

    encode(request, image)        rank 0: text / image features (an EncodedRequest, CPU tensors)
    execute(encoded)              every rank: the denoising loop; yields ("step", (i, n)) on rank 0,
                                  then ("result", {latents, timings, report}) on rank 0 / None elsewhere
    decode()                      rank 0: yields ("chunk", uint8 [n, H, W, 3]) frames, then ("result", ...)

Errors the user caused (:class:`~ditfleet.errors.UserError`) leave a worker as
:class:`RemoteUserError`, which pickles across processes with its message intact.
"""

from __future__ import annotations

import functools
import inspect
import os
import socket
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch

from ..errors import UserError


class RemoteUserError(UserError):
    """A user error raised in a worker, carried to the driver (picklable; ``kind`` is the original class name)."""

    def __init__(self, message: str, kind: str = "UserError"):
        super().__init__(message)
        self.kind = kind

    def __reduce__(self):
        return (RemoteUserError, (str(self), self.kind))


def portable_error(e: UserError) -> RemoteUserError:
    """``e`` as a :class:`RemoteUserError` (same message) that survives pickling."""
    return e if isinstance(e, RemoteUserError) else RemoteUserError(str(e), type(e).__name__)


def _portable(fn):
    """Re-raise user errors of a worker method (plain or generator) as :class:`RemoteUserError`."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def gen(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except UserError as e:
                raise portable_error(e) from None

        return gen

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            raise portable_error(e) from None

    return call


def _ray_context() -> tuple[str | None, list[str]]:
    """(node IP, GPU ids) when this process is connected to Ray, else (None, [])."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None, []
    try:
        return ray.util.get_node_ip_address(), [str(g) for g in ray.get_gpu_ids()]
    except Exception:  # noqa: BLE001 - a driver process has no GPU ids; never fail a report for it
        return ray.util.get_node_ip_address(), []


def _host_ip() -> str:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


#: Kinds of per-layer attention state an engine hands its workers at start-up (see :meth:`Worker.load_model`).
ATTENTION_STATE_KINDS = ("sparge",)


class Worker:
    """One rank: holds its device, process group, model, and the state of the current request.

    Args:
        cfg: the validated :class:`~ditfleet.config.RunConfig` (identical on every rank).
    """

    def __init__(self, cfg):
        self.cfg = cfg
        self.rank, self.world_size, self.local_rank = 0, 1, 0
        self.device: torch.device | None = None
        self.backend: str | None = None
        self._owns_group = False
        self.mesh = None
        self.pipe = None  # rank 0: the whole Pipeline
        self.runner = None
        self.sparge: dict | None = None
        self.sparge_sha256: str | None = None
        self.sparge_bound: str | None = None  # what the DiT's blocks were bound to (Sparge self-attention)
        self._req = self._enc = self._latents = None
        self._timings: dict = {}

    # ---- start-up -------------------------------------------------------------------------------------
    @_portable
    def report(self) -> dict:
        """Who and where this worker is (safe before :meth:`init_device`: touches no CUDA)."""
        node_ip, gpu_ids = _ray_context()
        return {
            "rank": self.rank, "world_size": self.world_size, "local_rank": self.local_rank, "pid": os.getpid(),
            "hostname": socket.gethostname(), "node_ip": node_ip or _host_ip(), "gpu_ids": gpu_ids,
            "device": str(self.device) if self.device is not None else None, "backend": self.backend,
            "sparge_sha256": self.sparge_sha256, "sparge_tensors": len(self.sparge) if self.sparge else 0,
            "sparge_bound": self.sparge_bound,
            "transport": self.mesh.transport if self.mesh is not None else None,
            "transport_reason": self.mesh.transport_reason if self.mesh is not None else None,
        }

    def free_port(self) -> int:
        """A TCP port nothing listens on now, on this node (the rendezvous port when this is rank 0)."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    @_portable
    def init_device(self, *, rank: int, world_size: int, local_rank: int, env: dict | None = None,
                    num_threads: int | None = None) -> dict:
        """Take rank ``rank`` of ``world_size``; set ``env`` (before CUDA starts), pick and set the device.

        The device is ``cuda:local_rank`` when the config's device is ``cuda`` (or ``auto`` with a
        visible GPU), else the CPU (``num_threads`` torch threads).
        """
        os.environ.update({k: str(v) for k, v in (env or {}).items()})
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        want = self.cfg.device
        cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
        if cuda:
            if not torch.cuda.is_available():
                raise UserError("device: 'cuda' but this worker sees no CUDA GPU")
            self.device = torch.device("cuda", local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
            if num_threads:
                torch.set_num_threads(int(num_threads))
        return {"device": str(self.device)}

    @_portable
    def init_process_group(self, master_addr: str | None = None, master_port: int | None = None, *,
                           backend: str | None = None, timeout_s: float = 300.0) -> dict:
        """Join the default process group (NCCL on GPU, gloo on CPU) and build the parallel mesh.

        ``master_addr``/``master_port``: rank 0's node and port (Ray); ``None`` uses the environment
        torchrun set. A world of one creates no group.
        """
        if self.world_size == 1:
            return {"backend": None}
        from ..parallel import init_distributed, init_parallel

        if master_addr is not None:
            os.environ.update(MASTER_ADDR=str(master_addr), MASTER_PORT=str(master_port), RANK=str(self.rank),
                              WORLD_SIZE=str(self.world_size), LOCAL_RANK=str(self.local_rank))
        import torch.distributed as dist

        self.backend = backend or ("nccl" if self.device.type == "cuda" else "gloo")
        self._owns_group = not dist.is_initialized()
        env = init_distributed(backend=self.backend, timeout_s=timeout_s)
        if env.rank != self.rank or env.world_size != self.world_size:
            raise RuntimeError(f"process group rank {env.rank}/{env.world_size} != worker rank {self.rank}/{self.world_size}")
        par = self.cfg.parallel
        self.mesh = init_parallel(ulysses_size=par.ulysses_degree, ring_size=par.ring_degree, cfg_size=par.cfg_p_size,
                                  transport=par.transport, timeout_s=par.timeout_s)
        return {"backend": self.backend, "mesh": self.mesh.describe(), "transport": self.mesh.transport}

    @_portable
    def load_model(self, attention_state: dict | None = None) -> dict:
        """Load the model once: rank 0 the whole pipeline, the other ranks the DiT only.

        ``attention_state``: the per-layer attention state the driver loaded, by kind (never read from a file
        here; :data:`ATTENTION_STATE_KINDS`): ``{"sparge": thresholds}`` is kept, checksummed for :meth:`report`,
        and bound to the DiT's blocks when self-attention is Sparge.
        """
        from .pipeline import Pipeline, load_runner
        from .sparge_weights import sparge_checksum

        state = dict(attention_state or {})
        unknown = sorted(set(state) - set(ATTENTION_STATE_KINDS))
        if unknown:
            raise RuntimeError(f"load_model: attention state of unknown kind(s) {unknown}; known: {ATTENTION_STATE_KINDS}")
        sparge_state = state.get("sparge")
        t = time.perf_counter()
        kw = dict(mesh=self.mesh, device=self.device, sparge_state=sparge_state, read_sparge_file=False)
        if self.rank == 0:
            self.pipe = Pipeline.from_config(self.cfg, **kw)
            self.runner = self.pipe.runner
        else:
            self.runner = load_runner(self.cfg, **kw)
        self.sparge = sparge_state
        self.sparge_sha256 = sparge_checksum(sparge_state)
        bound = [dit.policy.describe() for dit in self.runner.denoisers if dit.policy is not None and dit.policy.kind == "sparge"]
        self.sparge_bound = "; ".join(bound) or None  # every expert's Sparge binding
        return {"load_s": time.perf_counter() - t, "sparge_sha256": self.sparge_sha256, "sparge_bound": self.sparge_bound}

    # ---- one request --------------------------------------------------------------------------------
    def _need_pipeline(self, what: str):
        if self.pipe is None:
            raise RuntimeError(f"{what} runs on rank 0 (this is rank {self.rank})")
        return self.pipe

    @_portable
    def encode(self, req, image=None):
        """Rank 0: check ``req`` and encode it; ``image`` is the I2V reference already read by the driver.

        Returns:
            The :class:`~ditfleet.engine.request.EncodedRequest` on the CPU (broadcast by the executor).
        """
        pipe = self._need_pipeline("encode")
        pipe.check(req, files=False)
        timings: dict = {}
        enc = pipe.encode(req, timings, image=image)
        self._req, self._timings = req, timings
        return enc.to("cpu")

    @_portable
    def execute(self, enc) -> Iterator[tuple[str, Any]]:
        """Every rank: the denoising loop on identical inputs (same noise from the seed everywhere).

        Yields:
            ``("step", (i, n))`` after each step (rank 0 only), then ``("result", value)``: rank 0's
            ``{"latents": float32 CPU [1, z, F', h, w] (the latents decoded), "timings": ..., "report": ...}``,
            ``None`` elsewhere.
        """
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        t = time.perf_counter()
        x = None
        for i, n, x in self.runner.denoise_iter(enc):
            if self.rank == 0:
                yield "step", (i, n)
        if cuda:
            torch.cuda.synchronize(self.device)
        if self.rank != 0:
            yield "result", None
            return
        latents = x.float().cpu()
        self._latents, self._enc = latents, enc  # the sampler's: decode_stream puts a TI2V first frame in place itself
        result_latents = self.pipe.final_latents(latents, enc)  # what is decoded (TI2V-5B i2v: the image's first frame)
        timings = dict(self._timings)
        timings["denoise_s"] = time.perf_counter() - t
        timings["denoise_step_s"] = timings["denoise_s"] / max(1, enc.steps)
        report = self.pipe.report(self._req, enc, timings, None, 0) if self._req is not None else {}
        if self._req is not None:
            report["step_cache"] = self.runner.cache_report()  # computed vs skipped steps per CFG branch
        yield "result", {"latents": result_latents, "timings": timings, "report": report}

    @_portable
    def decode(self) -> Iterator[tuple[str, Any]]:
        """Rank 0: decode the last latents, streamed.

        Yields:
            ``("chunk", uint8 [n, H, W, 3])`` per latent frame, then ``("result", {"peak_memory": ...})``.
        """
        from .pipeline import _peak_memory

        pipe = self._need_pipeline("decode")
        if self._latents is None:
            raise RuntimeError("decode before execute")
        for chunk in pipe.decode_stream(self._latents, self._enc):
            yield "chunk", chunk
        yield "result", {"peak_memory": _peak_memory(self.device)}

    def shutdown(self, sync: bool = True, timeout_s: float = 1800.0) -> None:
        """Leave the process group and drop the model (frees GPU memory); the process may then exit.

        ``sync``: first wait until every rank is here (a barrier, at most ``timeout_s``), so that no rank tears
        its group down while a peer still talks to it (rank 0 decodes and writes after the others are done:
        a rank that destroyed its gloo group and exited then could abort in gloo's threads under load). A
        failed run passes ``sync=False``: its peers may never arrive.
        """
        import datetime

        import torch.distributed as dist

        from ..parallel.copy_engine import release_all

        self.pipe = self.runner = self.mesh = None
        self._req = self._enc = self._latents = None
        release_all()  # symmetric buffers of the copy-engine ring belong to this group
        if self._owns_group and dist.is_available() and dist.is_initialized():
            if sync and self.world_size > 1:
                try:
                    if self.backend == "gloo":
                        dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_s))
                    else:
                        dist.barrier()
                except Exception:  # noqa: BLE001 - a peer gone or late: tear down anyway, the process exits
                    pass
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - a broken group cannot be left cleanly; the process exits anyway
                pass
        self._owns_group = False
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.empty_cache()
