"""Spawn N gloo ranks on CPU and run a module-level function in each; failures surface in pytest.

Ranks start from a forkserver that has imported torch once (spawning N fresh interpreters on a
2-core CI machine costs seconds each). Each rank gets torchrun's environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT on a free 127.0.0.1 port) and creates its process group with
``ditfleet.parallel.init_distributed``, the same path a torchrun launch takes.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
import traceback
from collections.abc import Callable

import torch.multiprocessing as mp

_CTX = mp.get_context("forkserver")
_CTX.set_forkserver_preload(["torch", "torch.distributed", "ditfleet.parallel", "ditfleet.attention"])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn: Callable, rank: int, world_size: int, port: int, args: tuple, results) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    try:
        import torch
        import torch.distributed as dist

        from ditfleet.parallel import init_distributed

        torch.set_num_threads(1)
        init_distributed(backend="gloo", timeout_s=120)
        try:
            value = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        results.put(("ok", rank, value))
    except BaseException as exc:  # every failure, assertion included, goes to the parent
        results.put(("error", rank, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        raise SystemExit(1) from None


def run_distributed(fn: Callable, world_size: int, *args, timeout: float = 240.0) -> list:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` gloo processes; return each rank's value.

    Raises:
        AssertionError: a rank raised (its traceback is in the message), a rank died without a
            report, or the ranks did not finish within ``timeout`` seconds.
    """
    port = free_port()
    results = _CTX.Queue()
    procs = [_CTX.Process(target=_worker, args=(fn, r, world_size, port, args, results)) for r in range(world_size)]
    for p in procs:
        p.start()
    values: dict[int, object] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(values) + len(errors) < world_size:
            if errors:  # one rank failed: the others may wait forever in a collective
                break
            try:
                kind, rank, payload = results.get(timeout=0.5)
            except queue.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0) and i not in errors]
                for i in dead:
                    errors[i] = f"rank {i} exited with code {procs[i].exitcode} without a report"
                if time.monotonic() > deadline:
                    raise AssertionError(f"distributed test {fn.__name__} timed out after {timeout:.0f}s "
                                         f"({len(values)}/{world_size} ranks finished)") from None
                continue
            (values if kind == "ok" else errors)[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
    if errors:
        first = min(errors)
        raise AssertionError(f"{fn.__name__} failed on rank(s) {sorted(errors)}; rank {first}:\n{errors[first]}")
    return [values[r] for r in range(world_size)]


def run_threads(n: int, fn: Callable[[int], object], abort: Callable[[], None] = lambda: None) -> list:
    """Run ``fn(rank)`` for ranks ``0..n-1`` on ``n`` threads of this process (ranks that share in-process
    stand-ins for symmetric memory) and return the results by rank. The first error calls ``abort()``
    (to release ranks blocked on the failed one) and is raised once every thread has ended."""
    results, errors = [None] * n, []

    def main(rank: int) -> None:
        try:
            results[rank] = fn(rank)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)
            abort()

    threads = [threading.Thread(target=main, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def dit_under_two_rank_meshes(model, inputs: dict) -> list[tuple[str, float, float]]:
    """Inside a 2-rank world: ``model(**inputs)`` under Ulysses 2 and under ring 2 against the same call without a
    mesh; per mesh ``(name, rel L2 vs the single-process output, float64 sum of the output)`` (the sums must agree
    across ranks: every rank returns the whole output)."""
    import torch

    from ditfleet.bench.common import rel_l2
    from ditfleet.parallel import init_parallel

    meshes = {"ulysses": init_parallel(ulysses_size=2, ring_size=1), "ring": init_parallel(ulysses_size=1, ring_size=2)}
    out = []
    with torch.no_grad():
        ref = model(**inputs)
        for name, mesh in meshes.items():
            model.set_parallel(mesh)
            got = model(**inputs)
            out.append((name, rel_l2(got, ref), float(got.double().sum())))
    return out
