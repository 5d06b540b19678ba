"""``Engine``: start the workers once, generate many videos, shut down.

Python API::

    from ditfleet.engine import Engine
    with Engine.start("configs/wan_t2v_1.3b.json", launcher="ray") as engine:   # or a RunConfig / dict
        for prompt in prompts:
            result = engine.generate(prompt=prompt, output=f"out/{i}.mp4")      # or generate(GenerateRequest)
            result.output, result.report_path, result.latents

One request, as data (whatever the launcher):

1. the driver checks the request and reads its files (output path, I2V image);
2. rank 0 encodes it (text, image); the :class:`~.request.EncodedRequest` reaches every rank
   (Ray object store; ``torch.distributed`` broadcast under torchrun);
3. every rank denoises (sequence parallel over the mesh, CFG batched or split; the same noise
   from the seed everywhere); rank 0's step events drive the driver's progress bar;
4. rank 0 decodes, streaming frame chunks to the driver, which writes the video atomically and
   its JSON report (with ``engine``: launcher, attempts, start-up stages, workers, sparge checksum).

Failures: a worker that dies or hangs (Ray) fails the attempt within ``ray.request_timeout_s``;
the group is torn down and rebuilt, and the request retried up to ``ray.max_retries`` times,
then :class:`~.executor.EngineError` (CLI: exit 1, one line). User errors raise at once (exit 2).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from ..errors import UserError
from .executor import EngineError, Executor, WorkerError, WorkerFailure, make_executor
from .pipeline import GenerateResult, _Progress, load_image, request_from_config
from .request import GenerateRequest
from .sparge_weights import load_for_run
from .video import VideoWriter, check_output, file_stamp, report_path, write_json_atomic
from .worker import portable_error

log = logging.getLogger(__name__)

def as_config(cfg=None, *, launcher: str | None = None, overrides=()):
    """A validated RunConfig from a RunConfig, a JSON path, a dict, or ``None`` (the tiny default)."""
    from ..config import RunConfig, load_config
    from ..defaults import TINY_DEFAULT

    extra = [*overrides, *([f"launcher={launcher}"] if launcher else [])]
    if isinstance(cfg, RunConfig):
        return load_config(None, extra, data=cfg.to_dict()) if extra else cfg
    if cfg is None:
        return load_config(None, extra, data=TINY_DEFAULT)
    if isinstance(cfg, dict):
        return load_config(None, extra, data=cfg)
    return load_config(Path(cfg), extra)


class Engine:
    """A started worker group (local, torchrun or Ray) serving requests; build it with :meth:`start`.

    Attributes:
        cfg: the run config.
        executor: the :class:`~.executor.Executor`.
        startup_s: seconds per start-up stage of the current worker group.
        startups: how many times the group was (re)built.
        retried: how many times a request was re-run after a worker failure.
        sparge_info: path, checksum and shape of the sparge thresholds (empty without).
    """

    def __init__(self, cfg, executor: Executor, *, attention_state: dict | None = None, sparge_info: dict | None = None):
        self.cfg, self.executor = cfg, executor
        self._attention_state, self.sparge_info = attention_state, dict(sparge_info or {})
        self.startup_s: dict[str, float] = {}
        self.startups = 0
        self.retried = 0  # requests re-run after a WorkerFailure (worker death / hang); ditfleet serve's /metrics
        self.deterministic_failures = 0  # requests failed by a WorkerError, not retried (ditfleet serve's /metrics)
        self._geometry = None
        self._closed = False

    # ---- life cycle ----------------------------------------------------------------------------------
    @classmethod
    def start(cls, cfg=None, *, launcher: str | None = None, overrides=()) -> Engine:
        """Validate the config, load the sparge thresholds (driver only), start the workers, load the model.

        Args:
            cfg: a :class:`~ditfleet.config.RunConfig`, a JSON config path, a dict, or ``None`` (tiny default).
            launcher: ``"local"``, ``"torchrun"`` or ``"ray"`` (default: the config's).
            overrides: ``key=value`` strings, as ``--set``.

        Raises:
            UserError: bad config, model folder, or sparge checkpoint (nothing left running).
            EngineError: the workers could not start (retries exhausted, or Ray could not place them).
        """
        cfg = as_config(cfg, launcher=launcher, overrides=overrides)
        executor = make_executor(cfg)
        state, info = load_for_run(cfg) if executor.is_driver else (None, {})
        engine = cls(cfg, executor, attention_state=None if state is None else {"sparge": state}, sparge_info=info)
        try:
            engine._start()
        except BaseException:
            executor.shutdown(graceful=False)
            raise
        return engine

    @property
    def retries(self) -> int:
        """Retries after a worker failure (Ray only; torchrun restarts belong to torchrun)."""
        return self.cfg.ray.max_retries if self.executor.launcher == "ray" else 0

    @property
    def is_driver(self) -> bool:
        """This process writes outputs (always, except torchrun ranks > 0)."""
        return self.executor.is_driver

    @property
    def pipeline(self):
        """The components of a local engine (its rank-0 :class:`~.pipeline.Pipeline`: encoders, runner, VAE).

        Raises:
            RuntimeError: the engine's workers live in other processes (torchrun ranks, Ray actors).
        """
        worker = getattr(self.executor, "worker", None)
        if self.executor.launcher != "local" or worker is None or worker.pipe is None:
            raise RuntimeError(f"engine.pipeline is the components of a local engine; this one's launcher is "
                               f"{self.executor.launcher} (its workers hold them)")
        return worker.pipe

    @property
    def workers(self) -> list[dict]:
        """``report()`` of every rank: rank, pid, node IP, GPU ids, device, sparge checksum."""
        return list(self.executor.infos)

    def _start(self) -> None:
        for attempt in range(self.retries + 1):
            try:
                self.startup_s = self.executor.start(self._attention_state)
                break
            except WorkerFailure as e:
                self.executor.abort()
                if attempt == self.retries:
                    raise EngineError(f"the workers could not start: {e}") from None
                log.warning("start-up failed (%s); retrying (%d of %d)", e, attempt + 1, self.retries)
        self.startups += 1
        want = self.sparge_info.get("sha256")
        if want is not None:
            got = {i["rank"]: i.get("sparge_sha256") for i in self.executor.infos}
            bad = [r for r, sha in got.items() if sha != want]
            if bad:
                raise EngineError(f"rank(s) {bad} received sparge thresholds that differ from {self.sparge_info['path']}")
        excl = sum(v for k, v in self.startup_s.items() if k != "load")
        log.info("engine: %s, %d rank(s), started in %.2f s (%.2f s without loading the model)", self.executor.launcher,
                 self.executor.world_size, sum(self.startup_s.values()), excl)

    def shutdown(self, graceful: bool = True) -> None:
        """Stop every worker and release GPUs and Ray resources (and Ray itself if the engine started it)."""
        if self._closed:
            return
        self._closed = True
        self.executor.shutdown(graceful=graceful)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.shutdown(graceful=exc_type is None)

    # ---- requests ------------------------------------------------------------------------------------
    def check(self, req: GenerateRequest):
        """Validate ``req`` and read its files on the driver (output path, I2V image); the same error on every rank.

        Returns:
            The I2V reference as a PIL image on the driver, else ``None``.
        """
        ex = self.executor
        err, image = None, None
        if ex.is_driver:
            try:
                from .preflight import check_request, driver_geometry

                if self._geometry is None:
                    self._geometry = driver_geometry(self.cfg) or False
                device = self.cfg.torch_device() if ex.launcher != "ray" else None  # a Ray driver may have no GPU
                if self._geometry:
                    check_request(req, self._geometry, self.cfg, device=device, files=False)
                else:  # a Ray driver without the model: rank 0 checks the size (Pipeline.check)
                    req.validate(self.cfg.task)
                check_output(req.output, overwrite=req.overwrite)
                if self.cfg.task == "i2v":
                    image = load_image(req.image)
            except UserError as e:
                err = portable_error(e) if ex.spmd else e
        if ex.spmd:
            err = ex.share(err)
        if err is not None:
            raise err
        return image

    def generate(self, request: GenerateRequest | None = None, *, decode: bool = True, quiet: bool = False,
                 progress=None, **overrides) -> GenerateResult:
        """Run one request on the worker group.

        Args:
            request: the request; ``None`` builds one from the config and ``overrides`` (``prompt=...``,
                ``seed=...``, ``output=...``: fields of :class:`GenerateRequest`).
            decode: False stops after denoising (``result.latents`` only, nothing written).
            quiet: no progress bar.
            progress: called on the driver with ``(step index, steps)`` after each denoising step.

        Returns:
            The result on the driver; under torchrun, ranks > 0 get one with ``output`` None.

        Raises:
            UserError: an invalid request (nothing runs, nothing is written).
            EngineError: workers failed on every attempt.
        """
        if self._closed:
            raise RuntimeError("this Engine was shut down")
        if request is None:
            request = request_from_config(self.cfg, **overrides)
        elif overrides:
            request = request.replace(**{k: v for k, v in overrides.items() if v is not None})
        image = self.check(request)
        t0 = time.perf_counter()
        last: WorkerFailure | None = None
        for attempt in range(1, self.retries + 2):
            try:
                if not self.executor.alive:
                    self._start()
                return self._run(request, image, decode=decode, quiet=quiet, progress=progress, attempt=attempt, t0=t0)
            except WorkerError:
                # Not retried (the same request would fail again). Its peers may still wait in a collective of the
                # failed step, so a group of several ranks is torn down and rebuilt by the next request.
                self.deterministic_failures += 1
                if self.executor.world_size > 1:
                    self.executor.abort()
                raise
            except WorkerFailure as e:
                last = e
                self.executor.abort()
                if attempt <= self.retries:
                    self.retried += 1
                    log.warning("%s: %s; rebuilding the worker group and retrying (%d of %d)", request.label, e,
                                attempt, self.retries)
        raise EngineError(f"{request.label}: failed after {self.retries + 1} attempt(s) "
                          f"(ray.max_retries={self.retries}); last failure: {last}")

    def _run(self, req: GenerateRequest, image, *, decode: bool, quiet: bool, progress, attempt: int, t0: float):
        ex = self.executor
        idle = self.cfg.ray.request_timeout_s
        enc, err = None, None
        if ex.is_driver:
            try:
                enc = ex.collective_rpc("encode", req, image, ranks=[0], timeout=idle)[0]
            except UserError as e:
                if not ex.spmd:
                    raise
                err = portable_error(e)
        if ex.spmd:
            enc, err = ex.share((enc, err))
        if err is not None:
            raise err
        handle = ex.put(enc)
        bar = _Progress(req.steps, req.label if req.label != "request" else "denoise", quiet or not ex.is_driver)

        def on_step(rank: int, kind: str, payload) -> None:
            if kind == "step":
                bar(*payload)
                if progress is not None:
                    progress(*payload)

        try:
            results = ex.collective_stream("execute", handle, on_event=on_step, idle_timeout=idle)
        finally:
            bar.close()
        if not ex.is_driver:
            return GenerateResult(None, None, {}, torch.empty(0), 0, {})
        r0 = results[0]
        latents, timings, report = r0["latents"], dict(r0["timings"]), dict(r0["report"])
        if not decode:
            timings["total_s"] = time.perf_counter() - t0
            report.update(timings_s=timings, engine=self._engine_report(attempt))
            return GenerateResult(None, None, report, latents, 0, timings)
        t2 = time.perf_counter()
        lat_frames = latents.shape[2]
        log.info("%sdecoding %d latent frames into %d frames %dx%d", "" if req.label == "request" else req.label + ": ",
                 lat_frames, req.frames, req.width, req.height)
        dbar = _Progress(lat_frames, "decode", quiet, unit="latent frame")

        def on_chunk(rank: int, kind: str, chunk) -> None:
            writer.write(chunk)
            dbar(0, lat_frames)

        try:
            with VideoWriter(req.output, req.frames, req.height, req.width, fps=req.fps, overwrite=req.overwrite) as writer:
                done = ex.collective_stream("decode", ranks=[0], on_event=on_chunk, idle_timeout=idle)[0]
                output = writer.commit()
        finally:
            dbar.close()
        timings["decode_write_s"] = time.perf_counter() - t2
        timings["total_s"] = time.perf_counter() - t0
        report.update(output=str(output), output_file=file_stamp(output) if output.is_file() else None,
                      frames=writer.written, timings_s=timings, engine=self._engine_report(attempt))
        if done and "peak_memory" in done:
            report["peak_memory"] = done["peak_memory"]
        try:
            rpath = write_json_atomic(report_path(output), report)
        except OSError as e:
            raise UserError(f"report {report_path(output)}: cannot be written ({e.strerror})") from None
        log.info("wrote %s (%d frames %dx%d) and %s in %.1f s", output, writer.written, req.width, req.height,
                 rpath.name, timings["total_s"])
        return GenerateResult(output, rpath, report, latents, writer.written, timings)

    def _engine_report(self, attempt: int) -> dict:
        keys = ("rank", "pid", "hostname", "node_ip", "gpu_ids", "device", "backend", "transport", "sparge_sha256",
                "sparge_bound")
        first = self.executor.infos[0] if self.executor.infos else {}
        par = self.cfg.parallel
        return {
            "launcher": self.executor.launcher,
            "world_size": self.executor.world_size,
            "attempts": attempt,
            "startups": self.startups,
            "startup_s": dict(self.startup_s),
            "startup_excl_load_s": sum(v for k, v in self.startup_s.items() if k != "load"),
            "placement_strategy": getattr(self.executor, "strategy", None),
            "parallel": {"transport": first.get("transport"), "transport_reason": first.get("transport_reason"),
                         "transport_configured": par.transport, "timeout_s": par.timeout_s},
            "workers": [{k: i.get(k) for k in keys} for i in self.executor.infos],
            "sparge": self.sparge_info or None,
        }
