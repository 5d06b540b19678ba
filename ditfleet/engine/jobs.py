"""Many requests, one model load: ``ditfleet generate --jobs jobs.jsonl``.

One JSON object per line; blank lines and lines starting with ``#`` are skipped::

    {"prompt": "a cat surfing", "seed": 1, "output": "out/cat.mp4"}
    {"prompt": "a dog", "frames": 33, "size": "832x480", "output": "out/dog.npy"}
    {"prompt": "the cat jumps", "image": "cat.png", "output": "out/cat_i2v/"}

Keys: ``prompt`` (required), ``negative_prompt``, ``image`` (I2V), ``seed``, ``frames`` (4n+1),
``size`` (``"WIDTHxHEIGHT"`` or ``"WIDTH*HEIGHT"``, as the official ``--size``) or ``height`` and
``width``, ``output`` (``.mp4``, ``.npy`` or a folder; default ``<output folder>/<jobs file
name>-<line>.mp4``). Missing keys take the config's values.

The whole file is parsed and every job checked (fields, output suffix, image) before the first
one runs; a malformed or invalid line is reported with its line number and skipped, a job that
fails while running is reported with its reason, and the others go on. A summary ends the run.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from .errors import JobsFileError
from .request import GenerateRequest

log = logging.getLogger(__name__)

JOB_KEYS = ("prompt", "negative_prompt", "image", "seed", "frames", "size", "height", "width", "output")
_TYPES = {"prompt": str, "negative_prompt": (str, type(None)), "image": (str, type(None)), "seed": int, "frames": int,
          "size": (str, list), "height": int, "width": int, "output": str}
_TYPE_NAMES = {"prompt": "a string", "negative_prompt": "a string or null", "image": "a string (path) or null",
               "seed": "an integer", "frames": "an integer", "size": "\"WIDTHxHEIGHT\" or [WIDTH, HEIGHT]",
               "height": "an integer", "width": "an integer", "output": "a string (path)"}


@dataclass
class Job:
    """One line of a jobs file: its request, or why it cannot run."""

    line: int
    label: str
    request: GenerateRequest | None = None
    error: str | None = None


@dataclass
class JobOutcome:
    line: int
    label: str
    ok: bool
    output: str | None = None
    seconds: float = 0.0
    error: str | None = None


@dataclass
class JobsSummary:
    """Outcome of every job, in file order."""

    path: str
    outcomes: list[JobOutcome] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> int:
        return sum(o.ok for o in self.outcomes)

    @property
    def failed(self) -> int:
        return sum(not o.ok for o in self.outcomes)

    def format(self) -> str:
        lines = [f"jobs {self.path}: {self.ok} ok, {self.failed} failed, {len(self.outcomes)} total ({self.seconds:.1f} s)"]
        for o in self.outcomes:
            if o.ok:
                lines.append(f"  ok      {o.label}  {o.output}  ({o.seconds:.1f} s)")
            else:
                lines.append(f"  FAILED  {o.label}  {o.error}")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"path": self.path, "ok": self.ok, "failed": self.failed, "seconds": self.seconds,
                "jobs": [o.__dict__ for o in self.outcomes]}


def parse_size(value) -> tuple[int, int]:
    """``"832x480"`` / ``"832*480"`` / ``[832, 480]`` -> ``(height, width)``. Raises ValueError."""
    if isinstance(value, list):
        if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ValueError(f"expected [WIDTH, HEIGHT] integers, got {json.dumps(value)}")
        w, h = value
        return h, w
    m = re.fullmatch(r"\s*(\d+)\s*[x*X×]\s*(\d+)\s*", value)
    if not m:
        raise ValueError(f"expected \"WIDTHxHEIGHT\" (e.g. \"832x480\"), got {value!r}")
    return int(m.group(2)), int(m.group(1))


def _parse_line(text: str, label: str) -> dict:
    """The request fields of one line. Raises ValueError with the reason."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON at column {e.colno}: {e.msg}") from None
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object {{\"prompt\": ...}}, got {type(data).__name__}")
    fields: dict = {}
    for key, value in data.items():
        if key not in JOB_KEYS:
            close = difflib.get_close_matches(key, JOB_KEYS, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(JOB_KEYS)}"
            raise ValueError(f"unknown key {key!r}; {hint}")
        if not isinstance(value, _TYPES[key]) or isinstance(value, bool):
            raise ValueError(f"{key}: expected {_TYPE_NAMES[key]}, got {json.dumps(value)}")
        fields[key] = value
    if "prompt" not in fields:
        raise ValueError("missing \"prompt\"")
    if "size" in fields:
        if "height" in fields or "width" in fields:
            raise ValueError("give either size or height/width, not both")
        try:
            fields["height"], fields["width"] = parse_size(fields.pop("size"))
        except ValueError as e:
            raise ValueError(f"size: {e}") from None
    return fields


def parse_jobs(path: str | os.PathLike, base: GenerateRequest) -> list[Job]:
    """Parse a jobs file into one :class:`Job` per non-blank, non-comment line.

    Args:
        path: the ``.jsonl`` file.
        base: the config's request; a line's keys replace its fields.

    Raises:
        JobsFileError: the file is missing, unreadable or holds no job (a bad line is a failed
            :class:`Job`, not an exception).
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise JobsFileError(f"jobs file {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise JobsFileError(f"jobs file {str(path)!r} is a folder; expected a .jsonl file (one JSON object per line)") from None
    except UnicodeDecodeError as e:
        raise JobsFileError(f"jobs file {str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise JobsFileError(f"jobs file {str(path)!r} cannot be read ({e.strerror})") from None
    out_dir = Path(base.output).parent
    jobs: list[Job] = []
    outputs: dict[str, int] = {}
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        label = f"{p.name}:{n}"
        try:
            fields = _parse_line(line, label)
        except ValueError as e:
            jobs.append(Job(n, label, error=f"line {n}: {e}"))
            continue
        fields.setdefault("output", str(out_dir / f"{p.stem}-{n}.mp4"))
        key = os.path.normpath(os.path.abspath(fields["output"]))
        if key in outputs:
            jobs.append(Job(n, label, error=f"line {n}: output {fields['output']!r} is also written by line {outputs[key]}"))
            continue
        outputs[key] = n
        jobs.append(Job(n, label, request=base.replace(**fields, label=label)))
    if not jobs:
        raise JobsFileError(f"jobs file {str(path)!r} holds no job; expected one JSON object per line, e.g. "
                            '{"prompt": "a cat surfing", "seed": 1, "output": "out/cat.mp4"}')
    return jobs


def check_jobs(jobs: list[Job], cfg, geometry, *, check_files: bool = True) -> None:
    """Check every job before the model loads (fields, size against the model and this device, and with
    ``check_files`` its output path and I2V image); a job that fails gets its ``error`` (line number first)."""
    from .preflight import check_request
    from .video import check_output

    device = cfg.torch_device()
    for job in jobs:
        if job.error is not None:
            continue
        try:
            if geometry is not None:
                check_request(job.request, geometry, cfg, device=device, files=check_files,
                              keys=("frames", "height", "width"))
            else:  # a Ray driver without the model: fields here, the size on rank 0
                job.request.validate(cfg.task)
            if check_files:
                check_output(job.request.output, overwrite=job.request.overwrite)
        except UserError as e:
            job.error = f"line {job.line}: {str(e).removeprefix(job.label + ': ')}"


def run_jobs(engine, jobs: list[Job], *, path: str = "jobs", quiet: bool = False) -> JobsSummary:
    """Check every job, then run the valid ones on the started ``engine`` (an :class:`~.engine.Engine`); report each
    failure and go on."""
    t0 = time.perf_counter()
    for job in jobs:
        if job.error is None:
            try:
                engine.check(job.request)
            except UserError as e:
                job.error = f"line {job.line}: {str(e).removeprefix(job.label + ': ')}"
    bad = [j for j in jobs if j.error]
    for j in bad:
        log.error("%s", j.error)
    log.info("%d job(s) in %s: %d to run, %d invalid", len(jobs), path, len(jobs) - len(bad), len(bad))
    summary = JobsSummary(path=str(path))
    for job in jobs:
        if job.error is not None:
            summary.outcomes.append(JobOutcome(job.line, job.label, False, error=job.error))
            continue
        t = time.perf_counter()
        try:
            result = engine.generate(job.request, quiet=quiet)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - one failed job must not stop the batch; its reason is reported
            reason = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
            log.error("%s failed: %s", job.label, reason)
            log.debug("traceback of %s", job.label, exc_info=True)
            summary.outcomes.append(JobOutcome(job.line, job.label, False, seconds=time.perf_counter() - t, error=reason))
            continue
        summary.outcomes.append(JobOutcome(job.line, job.label, True, output=str(result.output),
                                           seconds=time.perf_counter() - t))
    summary.seconds = time.perf_counter() - t0
    return summary
