"""The HTTP routes of ``ditfleet serve`` (FastAPI), over a started engine, its job store and worker.

Endpoints (``Authorization: Bearer <token>`` on every one but ``/healthz`` when the server has a token)::

    POST   /v1/videos               JSON body, or multipart: "request" (that JSON) + "image" (a file)  -> 202 job
    GET    /v1/videos               the last 100 jobs, newest first
    GET    /v1/videos/{id}          state, step progress, ETA, error
    GET    /v1/videos/{id}/content  the mp4 (409 until done)
    GET    /v1/videos/{id}/report   the run report (JSON; 409 until done)
    DELETE /v1/videos/{id}          cancel (queued: at once; running: at the next step)
    GET    /healthz                 200 while the worker runs (503 when it died)
    GET    /metrics                 Prometheus text: queue depth, jobs by state, steps/s, failures, retries

Errors are ``{"error": {"field": ..., "message": ...}}`` with a 4xx status: 400 a bad field, 401 a bad or
missing token, 404 an unknown job, 409 not possible in the job's state, 413 a body over the limit, 415
a content type other than JSON / multipart.
"""


import dataclasses
import hmac
import json
import logging
import time
from pathlib import Path

from ..errors import UserError
from .api import ApiError, check_config_keys, from_user_error, parse_body
from .queue import Job, JobStore, new_id
from .worker import JobRunner

log = logging.getLogger(__name__)

#: Upload suffixes kept for a multipart image (anything else is stored as .img and must still decode).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclasses.dataclass
class ServeState:
    """What the routes share.

    Attributes:
        engine: the started :class:`~ditfleet.engine.Engine`.
        store: the :class:`~.queue.JobStore`.
        runner: the :class:`~.worker.JobRunner`.
        data_dir: the server's folder (``jobs.db``, ``outputs/``, ``uploads/``).
        token: the bearer token, or ``None`` (only allowed on a loopback host).
        max_body_bytes: the largest request body accepted (an upload included).
    """

    engine: object
    store: JobStore
    runner: JobRunner
    data_dir: Path
    token: str | None = None
    max_body_bytes: int = 16 << 20
    started: float = dataclasses.field(default_factory=time.time)
    rejected: int = 0


class BodyLimit:
    """ASGI middleware: 413 for a body over ``limit`` bytes, by its Content-Length or counted as it streams (the
    body is read here, bounded, before the route sees it)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                return await _send_json(send, 413, _too_large(self.limit))
        chunks, seen, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":  # the client went away
                return
            chunks.append(msg.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.limit:
                return await _send_json(send, 413, _too_large(self.limit))
            more = msg.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _too_large(limit: int) -> dict:
    return ApiError(413, "body", f"body: larger than the server's limit of {limit} bytes (--max-body-mb)").body()


async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def job_view(state: ServeState, job: Job) -> dict:
    """A job as the API shows it."""
    now = time.time()
    view = {"id": job.id, "object": "video", "state": job.state, "created_at": job.created,
            "started_at": job.started, "finished_at": job.finished, "attempts": job.attempts,
            "progress": {"step": job.step, "steps": job.steps or job.request.get("steps"),
                         "fraction": (job.step / job.steps) if job.steps else 0.0},
            "request": {k: v for k, v in job.request.items() if k not in ("output", "label", "overwrite")},
            "error": job.error, "cancel_requested": job.cancel_requested,
            "content_url": f"/v1/videos/{job.id}/content" if job.state == "done" else None,
            "report_url": f"/v1/videos/{job.id}/report" if job.state == "done" else None}
    step_s = state.runner.stats.step_s()
    if job.state == "running" and step_s is not None and job.steps:
        view["eta_s"] = round(step_s * (job.steps - job.step), 3)
    elif job.state == "queued":
        view["position"] = state.store.position(job)
    if job.state in ("running",) and job.started:
        view["elapsed_s"] = round(now - job.started, 3)
    return view


def metrics_text(state: ServeState) -> str:
    """Prometheus text exposition of the server."""
    counts = state.store.counts()
    c = state.store.counters()
    stats = state.runner.stats
    engine = state.engine
    lines = []

    def metric(name: str, kind: str, help_text: str, samples) -> None:
        lines.append(f"# HELP ditfleet_{name} {help_text}")
        lines.append(f"# TYPE ditfleet_{name} {kind}")
        for labels, value in samples:
            lab = "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""
            lines.append(f"ditfleet_{name}{lab} {float(value):g}")

    metric("queue_depth", "gauge", "Jobs waiting to run.", [({}, counts["queued"])])
    metric("jobs", "gauge", "Jobs in the store by state.", [({"state": s}, n) for s, n in counts.items()])
    metric("jobs_done_total", "counter", "Jobs finished with a video.", [({}, c.get("jobs_done", 0))])
    metric("jobs_failed_total", "counter", "Jobs failed, by kind (deterministic: user error or out of memory, not "
           "retried; engine: worker death/hang after the retries; error: anything else).",
           [({"kind": k}, c.get(f"jobs_failed_{k}", 0)) for k in ("deterministic", "engine", "error")])
    metric("jobs_cancelled_total", "counter", "Jobs cancelled.", [({}, c.get("jobs_cancelled", 0))])
    metric("requests_rejected_total", "counter", "Requests refused with a 4xx (this process).", [({}, state.rejected)])
    metric("steps_total", "counter", "Denoising steps run (this process).", [({}, stats.steps)])
    metric("steps_per_second", "gauge", "Denoising steps per second over the last steps (0 when idle).",
           [({}, stats.steps_per_s())])
    metric("engine_retries_total", "counter", "Requests re-run after a worker death or hang (Ray; this process).",
           [({}, getattr(engine, "retried", 0))])
    metric("engine_startups_total", "counter", "Times the worker group was (re)built (this process).",
           [({}, getattr(engine, "startups", 0))])
    metric("worker_up", "gauge", "1 while the job worker thread runs.", [({}, int(state.runner.alive))])
    metric("uptime_seconds", "gauge", "Seconds since the server started.", [({}, time.time() - state.started)])
    return "\n".join(lines) + "\n"


def create_app(state: ServeState):
    """The FastAPI application (wrapped in the body-size limit) for ``state``."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="ditfleet serve", version="1", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        state.rejected += 1
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        state.rejected += 1
        field = "path" if e.status_code == 404 else "method" if e.status_code == 405 else "request"
        return JSONResponse(ApiError(e.status_code, field, f"{field}: {e.detail}").body(), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e):
        state.rejected += 1
        return JSONResponse(ApiError(400, "request", f"request: {e.errors()}").body(), status_code=400)

    def auth(request) -> None:
        if state.token is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, value = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), state.token.encode()):
            raise ApiError(401, "authorization", "authorization: missing or wrong bearer token "
                                                 "(send 'Authorization: Bearer <token>')")

    def find(job_id: str) -> Job:
        job = state.store.get(job_id)
        if job is None:
            raise ApiError(404, "id", f"id: no job {job_id!r} on this server")
        return job

    @app.get("/healthz")
    async def healthz():
        ok = state.runner.alive
        body = {"status": "ok" if ok else "worker stopped", "launcher": state.engine.executor.launcher,
                "world_size": state.engine.executor.world_size, "jobs": state.store.counts(),
                "running": state.runner.stats.current,
                "workers": [{k: w.get(k) for k in ("rank", "pid", "node_ip", "device")} for w in state.engine.workers]}
        if not ok and state.runner.error is not None:
            body["error"] = f"{type(state.runner.error).__name__}: {state.runner.error}"
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics(request: Request):
        auth(request)
        return PlainTextResponse(metrics_text(state), media_type="text/plain; version=0.0.4")

    @app.post("/v1/videos", status_code=202)
    async def submit(request: Request):
        auth(request)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        job_id = new_id()
        upload: Path | None = None
        if ctype == "application/json":
            raw = await request.body()
            data = _json(raw, "body")
        elif ctype == "multipart/form-data":
            form = await request.form(max_part_size=state.max_body_bytes)
            if "request" not in form:
                raise ApiError(400, "request", "request: a multipart body needs a 'request' part (the JSON request)")
            part = form["request"]
            data = _json(part if isinstance(part, str) else await part.read(), "request")
            image = form.get("image")
            if image is not None and not isinstance(image, str):
                if isinstance(data, dict) and data.get("image") is not None:
                    raise ApiError(400, "image", "image: give a path in the request or upload a file, not both")
                suffix = Path(image.filename or "").suffix.lower()
                upload = state.data_dir / "uploads" / f"{job_id}{suffix if suffix in IMAGE_SUFFIXES else '.img'}"
                upload.parent.mkdir(parents=True, exist_ok=True)
                upload.write_bytes(await image.read())
        else:
            raise ApiError(415, "content-type", f"content-type: {ctype or 'none'} is not accepted; send "
                                                "application/json or multipart/form-data")
        try:
            job = _accept(state, data, job_id, upload)
        except BaseException:
            if upload is not None:
                upload.unlink(missing_ok=True)
            raise
        return JSONResponse(job_view(state, job), status_code=202)

    @app.get("/v1/videos")
    async def list_jobs(request: Request):
        auth(request)
        return {"object": "list", "data": [job_view(state, j) for j in state.store.list()]}

    @app.get("/v1/videos/{job_id}")
    async def get_job(job_id: str, request: Request):
        auth(request)
        return job_view(state, find(job_id))

    def committed(job: Job, what: str) -> Path:
        if job.state != "done":
            raise ApiError(409, "id", f"id: job {job.id} is {job.state}; its {what} is served once it is done")
        path = Path(job.output if what == "content" else job.report)
        if not path.is_file():
            raise ApiError(409, "id", f"id: job {job.id}'s {what} file is gone from the server ({path.name})")
        return path

    @app.get("/v1/videos/{job_id}/content")
    async def content(job_id: str, request: Request):
        auth(request)
        path = committed(find(job_id), "content")
        return FileResponse(path, media_type="video/mp4", filename=f"{job_id}.mp4")

    @app.get("/v1/videos/{job_id}/report")
    async def report(job_id: str, request: Request):
        auth(request)
        path = committed(find(job_id), "report")
        return JSONResponse(json.loads(path.read_text()))

    @app.delete("/v1/videos/{job_id}")
    async def cancel(job_id: str, request: Request):
        auth(request)
        job = find(job_id)
        if job.state in ("done", "failed", "cancelled"):
            raise ApiError(409, "id", f"id: job {job_id} is already {job.state}; nothing to cancel")
        return JSONResponse(job_view(state, state.store.cancel(job_id)), status_code=202)

    return BodyLimit(app, state.max_body_bytes)


def _json(raw, field: str):
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, field, f"{field}: not valid JSON ({e})") from None


def _accept(state: ServeState, data, job_id: str, upload: Path | None) -> Job:
    """Validate a request with the CLI's checks and store it as a queued job."""
    from ..engine.pipeline import load_image, request_from_config

    engine = state.engine
    cfg = engine.cfg
    fields, config = parse_body(data, cfg)
    try:
        if upload is not None:
            load_image(upload)  # not an image: 400 now, not a failed job later
            fields["image"] = str(upload)
        check_config_keys(config, cfg)
        output = state.data_dir / "outputs" / f"{job_id}.mp4"
        req = request_from_config(cfg, **fields, output=str(output), overwrite=True)
        check_request(engine, req)
    except UserError as e:
        raise from_user_error(e) from None
    stored = dataclasses.asdict(req)
    stored["label"] = job_id
    return state.store.add(stored, job_id=job_id)


def check_request(engine, req) -> None:
    """:meth:`Engine.check` on the driver. Under torchrun its collective half (sharing the verdict with the other
    ranks) must not run outside the worker thread, so only the driver's checks run here -- the same functions."""
    if not engine.executor.spmd:
        engine.check(req)
        return
    from ..engine.pipeline import load_image
    from ..engine.preflight import check_request as check, driver_geometry
    from ..engine.video import check_output

    geom = driver_geometry(engine.cfg)
    if geom:
        check(req, geom, engine.cfg, device=engine.cfg.torch_device(), files=False)
    else:
        req.validate(engine.cfg.task)
    check_output(req.output, overwrite=req.overwrite)
    if engine.cfg.task == "i2v":
        load_image(req.image)
