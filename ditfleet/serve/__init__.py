"""``ditfleet serve``: one loaded engine behind an HTTP job API, with a durable SQLite queue.

::

    ditfleet serve [CONFIG] [--host 127.0.0.1] [--port 8000] [--launcher local|torchrun|ray]
                   [--token T | --token-file F] [--data-dir DIR] [--max-body-mb N]

The engine starts once (local, torchrun ranks or Ray actors) and runs the queued jobs one after another
(:mod:`.worker`); the jobs live in ``DIR/jobs.db`` (:mod:`.queue`), their videos in ``DIR/outputs/``; the
routes are in :mod:`.app`. FastAPI, uvicorn and python-multipart are optional dependencies
(``pip install 'ditfleet[serve]'``), imported only here.
"""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

from ..errors import UserError

log = logging.getLogger(__name__)

DEFAULT_DATA_DIR = "ditfleet-serve"


def is_loopback(host: str) -> bool:
    """Whether ``host`` only listens on this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token(token: str | None, token_file: str | None) -> str | None:
    """The bearer token from ``--token`` or ``--token-file`` (its first line). Raises UserError."""
    if token is not None and token_file is not None:
        raise UserError("--token and --token-file both given; give one")
    if token_file is not None:
        try:
            token = Path(token_file).read_text(encoding="utf-8").strip().splitlines()[0].strip()
        except (OSError, UnicodeDecodeError, IndexError) as e:
            raise UserError(f"--token-file {token_file!r}: cannot be read as a one-line token ({e})") from None
    if token is not None and len(token) < 8:
        raise UserError("--token: must be at least 8 characters")
    return token


def add_arguments(p) -> None:
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1; any other "
                   "needs --token or --token-file)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--launcher", choices=["local", "torchrun", "ray"], help="how the engine runs (default: the config's, or torchrun when started by torchrun with several "
                        "processes)")
    p.add_argument("--token", help="bearer token every request but /healthz must send (Authorization: Bearer T)")
    p.add_argument("--token-file", help="file whose first line is the token (keeps it out of the process list)")
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help=f"the job database and outputs (default ./{DEFAULT_DATA_DIR})")
    p.add_argument("--max-body-mb", type=float, default=16.0, help="largest request body, an image upload included "
                   "(default 16 MiB)")


def main(args) -> int:
    """Run the server until interrupted (the body of ``ditfleet serve``)."""
    try:
        import fastapi  # noqa: F401
        import multipart  # noqa: F401  (python-multipart: image uploads)
        import uvicorn
    except ImportError as e:
        raise UserError(f"ditfleet serve needs FastAPI, uvicorn and python-multipart ({e}): "
                        "pip install 'ditfleet[serve]'") from None
    from ..cli import _load
    from ..engine import Engine
    from .app import ServeState, create_app
    from .queue import JobStore
    from .worker import JobRunner, follow

    token = read_token(args.token, args.token_file)
    if not is_loopback(args.host) and token is None:
        raise UserError(f"--host {args.host}: listening beyond this machine needs --token or --token-file")
    if not 0 < args.port < 65536:
        raise UserError(f"--port: must be in 1..65535, got {args.port}")
    if args.max_body_mb <= 0:
        raise UserError(f"--max-body-mb: must be > 0, got {args.max_body_mb}")
    launcher = args.launcher
    if launcher is None:
        from ..engine.torchrun import torchrun_env

        trun = torchrun_env()
        if trun is not None and trun["world_size"] > 1:
            launcher = "torchrun"  # `torchrun --nproc-per-node N -m ditfleet serve ...`, as generate
    if launcher:
        args.overrides = [*args.overrides, f"launcher={launcher}"]
    cfg, source = _load(args)
    data_dir = Path(args.data_dir).absolute()
    try:
        (data_dir / "outputs").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--data-dir {str(data_dir)!r}: cannot be created ({e.strerror})") from None
    engine = Engine.start(cfg)
    try:
        if not engine.is_driver:  # torchrun ranks > 0 run what rank 0 broadcasts
            follow(engine)
            return 0
        store = JobStore(data_dir / "jobs.db")
        requeued = store.recover()
        if requeued:
            log.info("re-queued %d job(s) a previous server left running: %s", len(requeued), ", ".join(requeued))
        runner = JobRunner(engine, store)
        state = ServeState(engine=engine, store=store, runner=runner, data_dir=data_dir, token=token,
                           max_body_bytes=int(args.max_body_mb * (1 << 20)))
        runner.start()
        counts = store.counts()
        log.info("serving %s (%s) on http://%s:%d; data in %s; %d queued, %d done", source, engine.executor.launcher,
                 args.host, args.port, data_dir, counts["queued"], counts["done"])
        server = uvicorn.Server(uvicorn.Config(create_app(state), host=args.host, port=args.port,
                                               log_level="warning", access_log=False))
        try:
            server.run()
        finally:
            runner.stop()
            store.close()
    finally:
        engine.shutdown()
    return 0
