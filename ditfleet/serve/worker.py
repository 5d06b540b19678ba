"""The one thread that runs jobs on the loaded engine, oldest first.

Cancel: a DELETE marks the running job; the engine's progress callback (called after every denoising
step) sees the mark and raises :class:`JobCancelled`, which unwinds ``Engine.generate`` before the
video writer opens (denoising happens before decoding), so nothing is written. A cancel that arrives
while the video is decoded takes effect when it is committed: the output and its report are removed
and the job is ``cancelled``. Under torchrun (SPMD) every rank must run the same steps, so a running
job is never stopped part-way there: it finishes and is then removed the same way.

Stop (server shutdown): the running job is interrupted at its next step and left ``queued``, so the next
start runs it again; a SIGKILL leaves it ``running``, which :meth:`~.queue.JobStore.recover` re-queues.

Failures: a user error (the request, the image) or an out-of-memory error is deterministic and
fails the job at once; the engine retries only worker death or hang (Ray, ``ray.max_retries``) and
raises ``EngineError`` when those retries are spent. Either way the job is ``failed`` with the reason
and the next job runs.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from pathlib import Path

from ..errors import UserError
from ..engine.request import GenerateRequest
from .queue import Job, JobStore

log = logging.getLogger(__name__)

#: Under torchrun, rank 0 broadcasts an idle message this often so the other ranks' waits stay far below the
#: process group's collective timeout.
IDLE_BROADCAST_S = 60.0


class JobCancelled(Exception):
    """Raised by the progress callback at a step boundary: the job's cancel was asked."""


class ServerStopping(Exception):
    """Raised by the progress callback at a step boundary: the server shuts down (the job is queued again)."""


def request_of(job: Job) -> GenerateRequest:
    """The :class:`GenerateRequest` a stored job describes."""
    import dataclasses

    known = {f.name for f in dataclasses.fields(GenerateRequest)}
    fields = {k: v for k, v in job.request.items() if k in known}  # a row stored by an older ditfleet
    if isinstance(fields.get("guide_scale"), list):
        fields["guide_scale"] = tuple(fields["guide_scale"])
    return GenerateRequest(**fields)


def remove_output(path: str | os.PathLike | None) -> None:
    """Remove an output and its JSON report (a cancelled job leaves nothing)."""
    if not path:
        return
    from ..engine.video import report_path

    p = Path(path)
    for f in (p, report_path(p)):
        try:
            f.unlink()
        except FileNotFoundError:
            pass


class Stats:
    """What ``/metrics`` reports about the worker (process lifetime; the job counts live in the store)."""

    def __init__(self):
        self.steps = 0
        self.step_times: deque[float] = deque(maxlen=64)
        self.current: str | None = None
        self.current_started: float | None = None

    def step(self) -> None:
        self.steps += 1
        self.step_times.append(time.monotonic())

    def steps_per_s(self) -> float:
        """Steps per second over the last steps (0 when the last step is over 60 s old)."""
        t = self.step_times
        if len(t) < 2 or time.monotonic() - t[-1] > 60.0:
            return 0.0
        return (len(t) - 1) / max(t[-1] - t[0], 1e-9)

    def step_s(self) -> float | None:
        """Seconds per step over the last steps (for ETAs)."""
        t = self.step_times
        return (t[-1] - t[0]) / (len(t) - 1) if len(t) >= 2 else None


class JobRunner:
    """Runs the store's jobs one after another on ``engine`` in a daemon thread (:meth:`start`, :meth:`stop`)."""

    def __init__(self, engine, store: JobStore):
        self.engine, self.store = engine, store
        self.stats = Stats()
        self.spmd = bool(getattr(engine.executor, "spmd", False))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="ditfleet-serve-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Interrupt the running job at its next step (it stays queued) and end the thread."""
        self._stop.set()
        with self.store.wakeup:
            self.store.wakeup.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        if self.spmd:
            self.engine.executor.share(("stop", None))

    def _loop(self) -> None:
        last_share = time.monotonic()
        try:
            while not self._stop.is_set():
                job = self.store.claim(timeout=1.0)
                if job is None:
                    if self.spmd and time.monotonic() - last_share > IDLE_BROADCAST_S:
                        self.engine.executor.share(("idle", None))
                        last_share = time.monotonic()
                    continue
                self.run(job)
                last_share = time.monotonic()
        except BaseException as e:  # the thread's death is reported by /healthz (503)
            self.error = e
            log.exception("the serve worker stopped")

    def run(self, job: Job) -> None:
        """Run one claimed job to a final state (or back to ``queued`` when the server stops)."""
        req = request_of(job)
        stats, store = self.stats, self.store
        stats.current, stats.current_started = job.id, time.time()
        log.info("%s: running (attempt %d): %d frames %dx%d, %d steps", job.id, job.attempts, req.frames, req.width,
                 req.height, req.steps)

        def progress(i: int, n: int) -> None:
            stats.step()
            cancel = store.progress(job.id, i + 1, n)
            if self.spmd:  # every rank must run the same steps; a cancel takes effect after the job
                return
            if self._stop.is_set():
                raise ServerStopping()
            if cancel:
                raise JobCancelled()

        try:
            if self.spmd:
                self.engine.executor.share(("job", req))
            result = self.engine.generate(req, quiet=True, progress=progress)
        except JobCancelled:
            remove_output(req.output)
            store.finish(job.id, "cancelled")
            store.bump("jobs_cancelled")
            log.info("%s: cancelled at step %d", job.id, store.get(job.id).step)
            return
        except ServerStopping:
            store.recover()
            log.info("%s: interrupted by the server's shutdown; queued again", job.id)
            return
        except UserError as e:  # deterministic: not retried
            self._failed(job, str(e), "deterministic")
            return
        except Exception as e:  # noqa: BLE001 - one failed job must not stop the server; its reason is stored
            from ..engine.executor import EngineError, WorkerError

            if isinstance(e, WorkerError):  # a worker's own error (Ray / torchrun ranks): not retried
                self._failed(job, str(e), "deterministic")
            elif isinstance(e, EngineError):
                self._failed(job, str(e), "engine")
            elif "out of memory" in str(e).lower() or type(e).__name__ == "OutOfMemoryError":
                self._failed(job, f"out of memory at {req.frames} frames {req.width}x{req.height}: {e}", "deterministic")
            else:
                log.debug("traceback of %s", job.id, exc_info=True)
                self._failed(job, f"{type(e).__name__}: {e}", "error")
            return
        finally:
            stats.current, stats.current_started = None, None
        if store.get(job.id).cancel_requested:  # asked while decoding, or under torchrun
            remove_output(result.output)
            store.finish(job.id, "cancelled")
            store.bump("jobs_cancelled")
            log.info("%s: cancelled (after its last step); output removed", job.id)
            return
        store.finish(job.id, "done", output=str(result.output), report=str(result.report_path))
        store.bump("jobs_done")
        store.bump("video_seconds_total", result.timings.get("total_s", 0.0))
        log.info("%s: done: %s", job.id, result.output)

    def _failed(self, job: Job, reason: str, kind: str) -> None:
        self.store.finish(job.id, "failed", error=reason)
        self.store.bump("jobs_failed")
        self.store.bump(f"jobs_failed_{kind}")
        log.error("%s: failed: %s", job.id, reason)


def follow(engine) -> None:
    """Ranks > 0 under torchrun: run whatever rank 0's worker broadcasts, until it says stop."""
    while True:
        kind, req = engine.executor.share(None)
        if kind == "stop":
            return
        if kind == "job":
            try:
                engine.generate(req, quiet=True)
            except Exception as e:  # noqa: BLE001 - rank 0 records the failure; keep following
                log.warning("rank follower: %s: %s", type(e).__name__, e)
