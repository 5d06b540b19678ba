"""Shared pieces of the benchmark suites: timing with CUDA events, the environment record, JSON output."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import socket
import statistics
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import UserError

KERNEL_PACKAGES = (
    "torch",
    "triton",
    "flash-attn",
    "flash-attn-3",
    "flash-attn-4",
    "nvidia-cutlass-dsl",
    "sageattention",
    "spas-sage-attn",
    "yunchang",
    "ray",
)


def time_cuda(fn: Callable[[], object], *, warmup: int = 3, iters: int = 10) -> dict:
    """Time ``fn`` on the current CUDA device with events, after ``warmup`` untimed calls.

    Returns:
        ``{"median_ms", "min_ms", "max_ms", "iters", "times_ms"}``; the median is the number to quote.
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return {
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "max_ms": max(times),
        "iters": iters,
        "times_ms": times,
    }


def rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``||x - ref|| / ||ref||`` computed in float64."""
    x, ref = x.double(), ref.double()
    return float((x - ref).norm() / ref.norm())


def git_commit(repo: Path | None = None) -> str:
    """``HEAD``'s hash, with ``-dirty`` when tracked files differ; else the sender's stamp; else ``"unknown"``.

    A copy of the tree sent to a GPU host has no ``.git`` or a stale one (seen: the lent host's copy
    carried an older ``.git``, and git answered ``<old hash>-dirty``). ``benchmarks/gpu_plan.sh``
    therefore runs with git pointed at nothing (``GIT_DIR``), so the stamp ``.commit`` written by the
    sender (``git rev-parse HEAD``, carried with the tree) is what gets recorded.
    """
    repo = repo or Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "-uno"], capture_output=True, text=True)
        return head + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        stamp = repo / ".commit"
        return stamp.read_text().strip() if stamp.is_file() else "unknown"


def short_commit(commit: str) -> str:
    """A result file's commit tag: the 7-character hash (``-dirty`` kept), or the stamp as it is (``unknown``)."""
    head, dirty = (commit[:-6], "-dirty") if commit.endswith("-dirty") else (commit, "")
    return (head[:7] if all(c in "0123456789abcdef" for c in head) and len(head) >= 7 else head) + dirty


def package_versions() -> dict[str, str]:
    """Installed versions of the kernel-relevant packages (absent ones are left out)."""
    out = {}
    for name in KERNEL_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def environment(world_size: int = 1) -> dict:
    """Who measured: card, GPU count, world size, software versions, commit, host and time."""
    cuda = torch.cuda.is_available()
    return {
        "card": torch.cuda.get_device_name(0) if cuda else "cpu",
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "world_size": world_size,
        "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if cuda else None,
        "cuda": torch.version.cuda,
        "packages": package_versions(),
        "commit": git_commit(),
        "host": socket.gethostname(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def write_json(path: str | os.PathLike, payload: dict) -> Path:
    """Write ``payload`` as indented JSON atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def select_device(spec: str | None) -> torch.device:
    """The device a command runs on: ``spec`` (``cuda``, ``cuda:N``, ``cpu``) or CUDA when available.

    A CUDA device is made current (``cuda`` alone means the current one). Raises UserError for a
    malformed spec or a CUDA request on a machine without a visible GPU.
    """
    try:
        device = torch.device(spec or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise UserError(f"--device: {e}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA GPU is visible (torch.cuda.is_available() is False)")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise UserError(f"--device must be cuda, cuda:N or cpu, got {spec!r}")
    return device


def dense_sdpa_kernel(device: torch.device, dtype: torch.dtype):
    """``(key, class)`` of the kernel ``torch_sdpa`` resolves to here: the dense baseline of the sparse benches."""
    from ..attention.registry import torch_sdpa_kernel

    try:
        return torch_sdpa_kernel(device, dtype)
    except RuntimeError as e:
        raise UserError(str(e)) from None
