"""The durable job store of ``ditfleet serve``: one SQLite database (WAL) beside the outputs.

Every accepted job is a row before the client hears ``202``; a server killed at any moment (SIGKILL
included) and started again on the same folder finds every job: ``done`` / ``failed`` / ``cancelled``
ones as they were, ``queued`` ones in their order, and the one that was ``running`` queued again at
the front (it re-runs from the start; its output is only ever visible once the engine committed it).

States::

    queued -> running -> done | failed | cancelled
    queued -> cancelled                              (DELETE before it starts)
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field

STATES = ("queued", "running", "done", "failed", "cancelled")
FINAL = ("done", "failed", "cancelled")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    state TEXT NOT NULL,
    request TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    step INTEGER NOT NULL DEFAULT 0,
    steps INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    output TEXT,
    report TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, seq);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value REAL NOT NULL);
"""


@dataclass
class Job:
    """One row of the store.

    Attributes:
        id: the job id (``vid_`` + 24 hex digits).
        seq: the submission order (the queue runs jobs by it).
        state: one of :data:`STATES`.
        request: the request fields as accepted (JSON-able; ``output`` is the server's path).
        created, started, finished: UNIX times (``None`` until reached).
        step, steps: denoising progress of the current (or last) attempt.
        attempts: how many times a worker started it (a re-run after a restart counts).
        cancel_requested: a DELETE arrived while it ran.
        error: why it failed.
        output: the committed output path (``done`` only).
        report: path of the committed JSON report (``done`` only).
    """

    id: str
    seq: int
    state: str
    request: dict
    created: float
    started: float | None = None
    finished: float | None = None
    step: int = 0
    steps: int = 0
    attempts: int = 0
    cancel_requested: bool = False
    error: str | None = None
    output: str | None = None
    report: str | None = None
    extra: dict = field(default_factory=dict)


def _row(r: sqlite3.Row) -> Job:
    return Job(id=r["id"], seq=r["seq"], state=r["state"], request=json.loads(r["request"]), created=r["created"],
               started=r["started"], finished=r["finished"], step=r["step"], steps=r["steps"], attempts=r["attempts"],
               cancel_requested=bool(r["cancel_requested"]), error=r["error"], output=r["output"], report=r["report"])


class JobStore:
    """Thread-safe access to the jobs database (one connection, one lock; every write commits at once).

    Args:
        path: the database file (created with its folder's WAL files beside it).
    """

    def __init__(self, path):
        self.path = str(path)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30.0)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # an accepted job survives a crash of the machine, too
        self._db.executescript(_SCHEMA)
        self.wakeup = threading.Condition(self._lock)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- start-up -------------------------------------------------------------------------------
    def recover(self) -> list[str]:
        """Re-queue the jobs a killed server left ``running`` (they re-run from the start); a running job whose
        cancel had been asked is ``cancelled`` instead. Returns the re-queued ids."""
        with self._lock:
            rows = self._db.execute("SELECT id, cancel_requested FROM jobs WHERE state='running'").fetchall()
            now = time.time()
            self._db.execute("BEGIN IMMEDIATE")
            requeued = []
            for r in rows:
                if r["cancel_requested"]:
                    self._db.execute("UPDATE jobs SET state='cancelled', finished=? WHERE id=?", (now, r["id"]))
                else:
                    self._db.execute("UPDATE jobs SET state='queued', step=0, started=NULL WHERE id=?", (r["id"],))
                    requeued.append(r["id"])
            self._db.execute("COMMIT")
            return requeued

    # ---- jobs -----------------------------------------------------------------------------------
    def add(self, request: dict, job_id: str | None = None) -> Job:
        """Store a new ``queued`` job (committed before this returns) and wake the worker."""
        job_id = job_id or new_id()
        with self._lock:
            self._db.execute("INSERT INTO jobs (id, state, request, created, steps) VALUES (?, 'queued', ?, ?, ?)",
                             (job_id, json.dumps(request), time.time(), int(request.get("steps") or 0)))
            self.wakeup.notify_all()
            return self.get(job_id)

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            r = self._db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return _row(r) if r is not None else None

    def list(self, state: str | None = None, limit: int = 100) -> list[Job]:
        with self._lock:
            if state is None:
                rows = self._db.execute("SELECT * FROM jobs ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
            else:
                rows = self._db.execute("SELECT * FROM jobs WHERE state=? ORDER BY seq LIMIT ?", (state, limit)).fetchall()
        return [_row(r) for r in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state").fetchall()
        out = {s: 0 for s in STATES}
        out.update({r["state"]: r["n"] for r in rows})
        return out

    def claim(self, timeout: float | None = None) -> Job | None:
        """The oldest ``queued`` job, now ``running`` (attempts + 1); waits up to ``timeout`` s for one (``None``: none)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while True:
                r = self._db.execute("SELECT id FROM jobs WHERE state='queued' ORDER BY seq LIMIT 1").fetchone()
                if r is not None:
                    self._db.execute("UPDATE jobs SET state='running', started=?, step=0, attempts=attempts+1 "
                                     "WHERE id=? AND state='queued'", (time.time(), r["id"]))
                    return self.get(r["id"])
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self.wakeup.wait(left)

    def progress(self, job_id: str, step: int, steps: int) -> bool:
        """Record a finished step; returns whether a cancel was asked."""
        with self._lock:
            self._db.execute("UPDATE jobs SET step=?, steps=? WHERE id=?", (step, steps, job_id))
            r = self._db.execute("SELECT cancel_requested FROM jobs WHERE id=?", (job_id,)).fetchone()
        return bool(r and r["cancel_requested"])

    def finish(self, job_id: str, state: str, *, error: str | None = None, output: str | None = None,
               report: str | None = None) -> None:
        """Move a running job to a final state (``done`` with its committed output and report)."""
        if state not in FINAL:
            raise ValueError(f"{state!r} is not a final state")
        with self._lock:
            self._db.execute("UPDATE jobs SET state=?, finished=?, error=?, output=?, report=? WHERE id=?",
                             (state, time.time(), error, output, report, job_id))

    def cancel(self, job_id: str) -> Job | None:
        """Cancel: a queued job at once, a running one at its next step (``cancel_requested``). Returns the job."""
        with self._lock:
            job = self.get(job_id)
            if job is None:
                return None
            if job.state == "queued":
                self._db.execute("UPDATE jobs SET state='cancelled', finished=? WHERE id=? AND state='queued'",
                                 (time.time(), job_id))
            elif job.state == "running":
                self._db.execute("UPDATE jobs SET cancel_requested=1 WHERE id=?", (job_id,))
            return self.get(job_id)

    def position(self, job: Job) -> int:
        """Jobs ahead of a queued ``job`` (the running one included)."""
        with self._lock:
            r = self._db.execute("SELECT COUNT(*) AS n FROM jobs WHERE state IN ('queued', 'running') AND seq < ?",
                                 (job.seq,)).fetchone()
        return int(r["n"])

    # ---- counters (survive restarts, for /metrics) ------------------------------------------------
    def bump(self, name: str, by: float = 1.0) -> None:
        with self._lock:
            self._db.execute("INSERT INTO counters (name, value) VALUES (?, ?) "
                             "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value", (name, by))

    def counters(self) -> dict[str, float]:
        with self._lock:
            return {r["name"]: r["value"] for r in self._db.execute("SELECT name, value FROM counters").fetchall()}


def new_id() -> str:
    return "vid_" + uuid.uuid4().hex[:24]
