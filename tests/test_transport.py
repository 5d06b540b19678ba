"""The SP transports (ditfleet.parallel.transport / copy_engine) on CPU.

* The copy-engine transport's logic (which rows are pulled from whom, barriers between writers and readers over
  successive calls and growing buffers, the ring's two reused pull buffers and skipped steps) on threads standing
  in for the ranks and an in-process buffer for symmetric memory; against float64 attention. CUDA streams, the
  copy engines and the cross-GPU barrier only run on GPUs (tests/gpu/test_sp_gpu.py, several GPUs).
* Bounded waits: a gloo rank that stops (SIGSTOP) or dies (SIGKILL) in the middle of a ring / Ulysses step becomes a
  PeerError on the others within ``parallel.timeout_s`` (plus the spawn slack), never a hang.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from dist_utils import _CTX, free_port, run_threads
from ditfleet.attention import reference_attention, resolve
from ditfleet.bench.common import rel_l2
from ditfleet.parallel.copy_engine import CopyEngineTransport
from ditfleet.parallel.ring import block_attend, ring_forward
from ditfleet.parallel.ring_schedule import RingSchedule
from ditfleet.parallel.transport import Group
from ditfleet.parallel.ulysses import padded_heads, ulysses_forward

WAIT_S = 60


class ThreadBuffers:
    """Symmetric memory for threads: per name one byte buffer per rank, visible to all; growing is collective."""

    def __init__(self, n: int):
        self.n = n
        self.bufs: dict[str, SharedBuffer] = {}
        self.lock = threading.Lock()
        self.barriers: list[threading.Barrier] = []

    def get(self, name: str) -> SharedBuffer:
        with self.lock:
            if name not in self.bufs:
                self.bufs[name] = SharedBuffer(self)
            return self.bufs[name]

    def abort(self) -> None:
        for b in self.barriers:
            b.abort()


class SharedBuffer:
    def __init__(self, owner: ThreadBuffers):
        self.owner, self.store, self.nbytes = owner, {}, 0
        self.bar = threading.Barrier(owner.n)
        owner.barriers.append(self.bar)
        self.barriers = 0

    def ensure(self, nbytes: int, device) -> SharedBuffer:
        if nbytes > self.nbytes:  # every rank asks for the same size (same shapes): collective, like rendezvous
            self.bar.wait(timeout=WAIT_S)
            with self.owner.lock:
                if nbytes > self.nbytes:  # NaN bytes: a row nobody wrote poisons the result
                    self.store = {r: torch.full((nbytes,), 0xFF, dtype=torch.uint8) for r in range(self.owner.n)}
                    self.grown = nbytes
            self.bar.wait(timeout=WAIT_S)
            self.nbytes = max(self.nbytes, nbytes)
        return self

    def view(self, rank: int, shape, dtype) -> torch.Tensor:
        n = 1
        for x in shape:
            n *= x
        return self.store[rank][: n * dtype.itemsize].view(dtype).view(tuple(shape))

    def barrier(self, timeout_s: float) -> None:
        self.barriers += 1
        self.bar.wait(timeout=min(timeout_s, WAIT_S))


def _sdpa():
    return resolve("torch_sdpa", site="test", device="cpu", dtype=torch.float32).backend


@pytest.mark.parametrize("u,b,s_q,s_k,heads,lse", [(2, 1, 1001, 1001, 6, True), (4, 2, 301, 157, 6, True),
                                                  (3, 1, 100, 100, 5, False)])
def test_copy_engine_ulysses_equals_float64(u, b, s_q, s_k, heads, lse):
    """Three successive calls of other shapes (the buffer grows and shrinks): each equals float64 attention."""
    d = 8
    backend = _sdpa()
    h_pad = padded_heads(heads, u)
    g = torch.Generator().manual_seed(3)
    shapes = [(s_q, s_k), (s_q // 2 + 1, s_k // 3 + 1), (s_q, s_k)]
    inputs = [tuple(torch.randn(b, s, heads, d, generator=g, dtype=torch.float64) for s in (sq, sk, sk)) for sq, sk in shapes]
    shared = ThreadBuffers(u)

    def prep(x, c):  # tokens padded at the end, heads with zeros, fp32
        return torch.nn.functional.pad(x.float(), (0, 0, 0, h_pad - heads, 0, u * c - x.shape[1]))

    def rank_main(r):
        tr = CopyEngineTransport(Group(None, list(range(u)), r, 30.0), buffers=shared.get)
        res = []
        for q, k, v in inputs:
            cq, ck = -(-q.shape[1] // u), -(-k.shape[1] // u)
            n_k = k.shape[1]

            def attend(qf, kv, want_lse, n_k=n_k):
                return backend(qf, kv[0], kv[1], kv_lens=[n_k] * b, return_lse=want_lse)

            ql = prep(q, cq)[:, r * cq:(r + 1) * cq]
            kl, vl = (prep(x, ck)[:, r * ck:(r + 1) * ck] for x in (k, v))
            res.append(ulysses_forward(ql, kl, vl, transport=tr, attend=attend, return_lse=lse))
        return res

    by_rank = run_threads(u, rank_main, shared.abort)
    for c, (q, k, v) in enumerate(inputs):
        out = torch.cat([by_rank[r][c][0] for r in range(u)], 1)[:, :q.shape[1], :heads]
        ref, ref_lse = reference_attention(q, k, v)
        assert rel_l2(out.double(), ref) <= 1e-5, c
        if lse:
            got = torch.cat([by_rank[r][c][1] for r in range(u)], 2)[:, :heads, :q.shape[1]]
            assert rel_l2(got.double(), ref_lse) <= 1e-5, c
        else:
            assert by_rank[0][c][1] is None
    # 2 barriers per exchange (free, written), 2 or 3 exchanges per call
    assert shared.bufs["ulysses"].barriers == 3 * u * 2 * (3 if lse else 2)


def test_copy_engine_ring_step_logic_on_threads():
    """The copy-engine ring's pulls from the owner, skipped steps and two reused pull buffers, against float64
    attention under two block masks and unmasked (the same ring loop as NCCL: ditfleet.parallel.ring.ring_forward)."""
    from ditfleet.attention.blockmask import BlockSparseMask
    from ditfleet.attention.radial import RadialFlex

    r, s, h, d, bs = 4, 187, 3, 16, 16
    chunk = -(-s // r)
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, s, h, d, generator=g) for _ in range(3))
    nb = -(-s // bs)
    frame = torch.arange(nb) // 3
    rnd = torch.rand(nb, nb, generator=g) < 0.3
    rnd[:, 0] = True
    masks = {"block-diagonal": BlockSparseMask.from_blocks(frame[:, None] == frame[None, :], bs, s),
             "random+sink": BlockSparseMask.from_blocks(rnd, bs, s), "dense": None}
    backend = RadialFlex(device=torch.device("cpu"), dtype=torch.float32)
    pad = lambda x: torch.nn.functional.pad(x, (0, 0, 0, 0, 0, r * chunk - s))  # noqa: E731
    qp, kp, vp = pad(q), pad(k), pad(v)
    valid = [max(0, min(chunk, s - c * chunk)) for c in range(r)]
    for name, mask in masks.items():
        sched = RingSchedule.from_mask(mask, chunk, chunk, r) if mask is not None else RingSchedule.dense(valid)
        shared = ThreadBuffers(r)

        def rank_main(rank, mask=mask, sched=sched, shared=shared):
            tr = CopyEngineTransport(Group(None, list(range(r)), rank, 30.0), buffers=shared.get)
            sl = slice(rank * chunk, (rank + 1) * chunk)
            attend = block_attend(backend, None, mask, q_start=rank * chunk, k_chunk=chunk)
            outs = []
            for _ in range(2):  # twice: the second call's chunk overwrites the first's only after every pull
                outs.append(ring_forward(qp[:, sl], torch.stack((kp[:, sl], vp[:, sl])), transport=tr, attend=attend,
                                         chunk_valid=valid, schedule=sched))
            return outs

        outs = run_threads(r, rank_main, shared.abort)
        ref, ref_lse = reference_attention(q, k, v, mask=None if mask is None else mask.to_dense())
        for call in range(2):
            out = torch.cat([o[call][0] for o in outs], 1)[:, :s]
            lse = torch.cat([o[call][1] for o in outs], 2)[..., :s]
            assert rel_l2(out, ref) <= 1e-5 and rel_l2(lse, ref_lse) <= 1e-5, (name, call)
        if name == "block-diagonal":
            assert sched.stats()["steps_skipped"] > 0


# ---------------------------------------------------------------- a peer that stops or dies
TIMEOUT_S = 3.0


def _peer_rank(rank: int, world: int, port: int, layout: str, fate: str, results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    try:
        torch.set_num_threads(1)
        from ditfleet.parallel import init_distributed, init_parallel, sequence_parallel_attention, shard_sequence

        init_distributed(backend="gloo", timeout_s=60)
        sizes = {"ring": {"ring_size": world}, "ulysses": {"ulysses_size": world},
                 "usp": {"ring_size": 2, "ulysses_size": world // 2}}[layout]
        mesh = init_parallel(**sizes, timeout_s=TIMEOUT_S)
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 203, 4, 8, generator=g) for _ in range(3))
        local = [shard_sequence(t, mesh)[0] for t in (q, k, v)]
        shard = shard_sequence(q, mesh)[1]
        backend = _sdpa()
        for it in range(3):
            if it == 2 and rank == world - 1:  # the last rank stops / dies in the middle of the third step
                os.kill(os.getpid(), signal.SIGSTOP if fate == "stop" else signal.SIGKILL)
            sequence_parallel_attention(*local, backend=backend, mesh=mesh, shard=shard)
            if it == 1:
                results.put(("step", rank, time.monotonic()))
        results.put(("ok", rank, None))
    except BaseException as e:  # noqa: BLE001 - reported to the test
        results.put(("error", rank, (type(e).__name__, str(e), time.monotonic())))


@pytest.mark.parametrize("layout,world,fate", [("ring", 2, "stop"), ("ulysses", 2, "kill"), ("usp", 4, "stop")])
def test_stopped_or_dead_peer_is_an_error_within_the_timeout(layout, world, fate):
    results = _CTX.Queue()
    port = free_port()
    procs = [_CTX.Process(target=_peer_rank, args=(r, world, port, layout, fate, results), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    try:
        errors, steps, deadline = {}, {}, time.monotonic() + 120
        while len(errors) < world - 1 and time.monotonic() < deadline:
            try:
                kind, rank, value = results.get(timeout=1)
            except Exception:  # noqa: BLE001 - queue.Empty
                continue
            if kind == "step":
                steps[rank] = value
            elif kind == "error":
                errors[rank] = value
            else:
                pytest.fail(f"rank {rank} finished although rank {world - 1} {fate}ped mid-step")
        assert len(errors) == world - 1, f"survivors did not all fail: {errors}"
        for rank, (name, msg, when) in errors.items():
            assert name == "PeerError", (rank, name, msg)
            assert "parallel.timeout_s" in msg and "did not answer" in msg, msg
            assert str(world - 1) in msg.split("did not answer")[0] or layout == "usp", msg
            # the step that hit the stopped peer ended within the timeout (+ slack for a loaded CI machine)
            assert when - steps[rank] <= TIMEOUT_S + 20, (rank, when - steps[rank])
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=10)


def _cfg_peer_rank(rank: int, world: int, port: int, results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    try:
        torch.set_num_threads(1)
        from ditfleet.parallel import cfg_exchange, gather_sequence, init_distributed, init_parallel, shard_sequence

        init_distributed(backend="gloo", timeout_s=60)  # the default group: the launcher's (long) timeout
        mesh = init_parallel(cfg_size=2, timeout_s=TIMEOUT_S)  # the cfg axis spans the world: it is the default group
        sp = init_parallel(ulysses_size=2, timeout_s=TIMEOUT_S)
        x = torch.ones(1, 8)
        cfg_exchange(x, mesh)
        local, shard = shard_sequence(torch.ones(1, 9, 2), sp)
        gather_sequence(local, sp, shard)
        results.put(("step", rank, time.monotonic()))
        if rank == 1:
            os.kill(os.getpid(), signal.SIGSTOP)
        for what, call in (("cfg", lambda: cfg_exchange(x, mesh)), ("gather", lambda: gather_sequence(local, sp, shard))):
            t0 = time.monotonic()
            try:
                call()
                results.put(("ok", rank, what))
            except BaseException as e:  # noqa: BLE001
                results.put(("error", rank, (what, type(e).__name__, str(e), time.monotonic() - t0)))
    except BaseException as e:  # noqa: BLE001
        results.put(("error", rank, ("setup", type(e).__name__, str(e), 0.0)))


def test_world_spanning_groups_are_bounded_by_parallel_timeout():
    """A mesh axis that spans the world is the default group (the launcher's timeout); its waits still end within
    parallel.timeout_s: cfg_exchange and gather_sequence against a stopped peer -> PeerError after ~TIMEOUT_S."""
    results = _CTX.Queue()
    port = free_port()
    procs = [_CTX.Process(target=_cfg_peer_rank, args=(r, 2, port, results), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    try:
        errors, deadline = [], time.monotonic() + 120
        while len(errors) < 2 and time.monotonic() < deadline:
            try:
                kind, rank, value = results.get(timeout=1)
            except Exception:  # noqa: BLE001 - queue.Empty
                continue
            if kind == "error":
                errors.append(value)
            elif kind == "ok":
                pytest.fail(f"rank {rank}: {value} finished against a stopped peer")
        assert [e[0] for e in errors] == ["cfg", "gather"], errors
        for what, name, msg, dt in errors:
            assert name == "PeerError" and "parallel.timeout_s" in msg, (what, name, msg)
            assert dt <= TIMEOUT_S + 20, (what, dt)  # not the default group's 60 s
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=10)
