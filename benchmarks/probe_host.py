"""Probe: the host time of a Ulysses ``ce`` call, step by step (no CUDA events, no profiler in the timings).

A call's first kernel can start only once every rank has issued its group-0 pushes and its own
kernel launch, so host time before the first kernel is on the critical path. This probe measures:

* ``ops_us``: the host time of each kind of step, one at a time, with the GPU kept busy (a sleep
  kernel) so only the enqueue is timed: a prepared 2-D push into a peer's inbox (and its ctypes
  part alone), a flag write / wait, an SM copy of the own rows, a ``Pipeline``, the attention kernel
  launch for one head group and for all of a rank's heads (through the backend and the bare aten op);
* ``host_timeline_us``: one steady-state default call with host timestamps after each flag write /
  wait and around each kernel launch (a link wrapper that only reads ``time.perf_counter``);
* ``call_host_us``: the whole call's host issue time, the library entry point vs the ``ce`` function;
* ``cprofile_rank<r>.txt``: ``cProfile`` of a few whole calls (tottime order).

    torchrun --nproc-per-node 4 benchmarks/probe_host.py OUTDIR
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

import ditfleet.parallel.ulysses_ce as uce
from ditfleet.attention.registry import torch_sdpa_kernel
from ditfleet.parallel import init_distributed, init_parallel, sequence_parallel_attention, shard_sequence
from ditfleet.parallel.copy_engine import CudaLink
from ditfleet.parallel.cuda_driver import _driver
from ditfleet.parallel.pipeline import Pipeline
from ditfleet.parallel.ulysses import UlyssesComm, default_chunks
from probe_ulysses import LinkProxy  # benchmarks/ is the script's directory: on sys.path

aten = torch.ops.aten


class HostLink(LinkProxy):
    """A :class:`CudaLink` whose ``begin``, flag writes and waits append ``(label, perf_counter)`` to ``marks``."""

    def begun(self) -> None:
        self.marks.append(("begin done", time.perf_counter()))

    def signalled(self, flag, stream) -> None:
        self.marks.append(("signal", time.perf_counter()))

    def waited(self, flag, stream) -> None:
        self.marks.append(("wait", time.perf_counter()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--seq-len", type=int, default=75600)
    ap.add_argument("--heads", type=int, default=40)
    ap.add_argument("--n", type=int, default=20, help="calls per timed batch of one op")
    ap.add_argument("--reps", type=int, default=7, help="timed batches per op (median)")
    args = ap.parse_args()
    env = init_distributed()
    dev, rank, world = env.device, env.rank, env.world_size
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _, cls = torch_sdpa_kernel(dev, torch.bfloat16)
    backend = cls(device=dev, dtype=torch.bfloat16)
    s, h, d = args.seq_len, args.heads, 128
    gen = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(1, s, h, d, generator=gen, device=dev, dtype=torch.bfloat16) for _ in range(3))
    mesh = init_parallel(ulysses_size=world)
    comm = UlyssesComm.from_mesh(mesh)
    (ql, shard), (kl, _), (vl, _) = (shard_sequence(t, mesh) for t in (q, k, v))
    scale = d ** -0.5
    hr = h // world
    chunks = default_chunks("ce", hr)
    link = CudaLink.get(comm.group, world, rank, dev)

    def sp():
        return sequence_parallel_attention(ql, kl, vl, backend=backend, mesh=mesh, shard=shard, scale=scale)

    def attend(q_full, kv, want_lse, heads):
        return backend(q_full, kv[0], kv[1], scale=scale, return_lse=want_lse)

    def ce(lk=link):
        return uce.ulysses_ce_forward(ql, kl, vl, comm=comm, attend=attend, return_lse=False, chunks=chunks, link=lk)

    for _ in range(5):
        sp()
        ce()
    torch.cuda.synchronize()
    dist.barrier()
    (plan,) = [p for key, p in link.memo.items() if key[1] == ql.shape[1]]
    hs = [Pipeline(ql, "ulysses_ce.peers", comm_streams=world - 1).comm_handle(i) for i in range(world - 1)]
    caller = torch.cuda.current_stream().cuda_stream
    res: dict = {"world": world, "groups": uce.head_groups(hr, chunks)}

    def host_us(fn, n=args.n):
        vals = []
        for _ in range(args.reps):
            torch.cuda._sleep(200_000_000)  # the GPU stays busy: only the enqueue is timed
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            vals.append((time.perf_counter() - t0) / n * 1e6)
            torch.cuda.synchronize()
        return round(statistics.median(vals), 2)

    op, which = plan.push[0][0][1][0]
    flag_out = plan.push[0][0][0]
    flag_in = plan.wait_in[0][0]
    drv = _driver()
    ops: dict = {}
    src = (ql, kl, vl)[which]
    ops["push Copy2D (peer inbox)"] = host_us(lambda: op(src, hs[0]))
    ops["push ctypes cuMemcpy2DAsync only"] = host_us(lambda: op._fn(op._ref, hs[0]))
    real = op._fn
    op._fn = lambda *_a: 0
    ops["push Copy2D python only"] = host_us(lambda: op(src, hs[0]))
    op._fn = real
    ops["signal (write_flag, peer)"] = host_us(lambda: link.signal(flag_out, link.epoch, hs[0]))
    ops["wait (wait_flag)"] = host_us(lambda: link.wait(flag_in, link.epoch, caller))
    ptr = flag_in.data_ptr()
    ops["wait ctypes cuStreamWaitValue32 only"] = host_us(lambda: drv.wait(caller, ptr, link.epoch, 0))
    ops["event create + record"] = host_us(lambda: torch.cuda.Event().record())
    ops["Pipeline(3 comm streams) + finish"] = host_us(lambda: Pipeline(ql, "ulysses_ce.peers", comm_streams=world - 1).finish())
    ops["UlyssesComm.from_mesh"] = host_us(lambda: UlyssesComm.from_mesh(mesh))
    ops["mesh.ulysses_rank"] = host_us(lambda: mesh.ulysses_rank)
    rows = ql.view(1, ql.shape[1], h * d)
    g0 = res["groups"][0]
    w0 = (g0[1] - g0[0]) * d
    own0 = plan.kernel_in[0][0].view(1, -1, w0)[0, rank * ql.shape[1]:(rank + 1) * ql.shape[1]]  # [S, w0]
    col0 = (rank * hr + g0[0]) * d
    if plan.own_all is not None:
        mine = slice(rank * hr * d, (rank + 1) * hr * d)
        dst = plan.own_all[0]
        ops["own rows copy_ (one tensor, all groups)"] = host_us(
            lambda: dst.copy_(rows[:, :, mine].view(1, rows.shape[1], len(res["groups"]), -1).permute(2, 0, 1, 3)), n=5)
    ops["own rows copy_ (one tensor, group 0)"] = host_us(lambda: own0.copy_(rows[0, :, col0:col0 + w0]), n=5)
    own_ce = link.copier(own0, col0, h * d, rows.numel())
    ops["own rows Copy2D (one tensor, group 0)"] = host_us(lambda: own_ce(ql, caller), n=5)
    flat = torch.empty_like(ql)
    ops["copy_ contiguous (q-sized)"] = host_us(lambda: flat.copy_(ql), n=5)
    ops["empty (q-sized)"] = host_us(lambda: torch.empty_like(ql))
    qb, kvb = plan.kernel_in[0]
    ops["attend 1 group (backend)"] = host_us(lambda: backend(qb, kvb[0], kvb[1], scale=scale), n=5)
    ops["attend 1 group (aten cudnn op)"] = host_us(lambda: aten._scaled_dot_product_cudnn_attention(
        qb.transpose(1, 2), kvb[0].transpose(1, 2), kvb[1].transpose(1, 2), None, False, 0.0, False, False,
        scale=scale), n=5)
    ops["attend 1 group (aten cudnn .default)"] = host_us(lambda: aten._scaled_dot_product_cudnn_attention.default(
        qb.transpose(1, 2), kvb[0].transpose(1, 2), kvb[1].transpose(1, 2), None, False, 0.0, False, False,
        scale=scale), n=5)
    share = [t[:, :, :hr].contiguous() for t in (q, k, v)]
    ops["attend all my heads (backend)"] = host_us(lambda: backend(*share, scale=scale), n=2)
    res["ops_us"] = ops
    torch.cuda.synchronize()
    dist.barrier()

    # whole calls: host issue time with the GPU idle at the start (as in the bench), and a host timeline
    def call_us(fn):
        vals = []
        for _ in range(args.reps):
            dist.barrier()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            vals.append((time.perf_counter() - t0) * 1e6)
            torch.cuda.synchronize()
        return round(statistics.median(vals), 1)

    res["call_host_us"] = {"sequence_parallel_attention (default)": call_us(sp), "ulysses_ce_forward": call_us(ce)}
    hl = HostLink(link)

    def traced_attend(q_full, kv, want_lse, heads):
        hl.marks.append((f"attend {heads} in", time.perf_counter()))
        r = attend(q_full, kv, want_lse, heads)
        hl.marks.append((f"attend {heads} out", time.perf_counter()))
        return r

    timelines = []
    for _ in range(args.reps):
        dist.barrier()
        torch.cuda.synchronize()
        hl.marks.clear()
        t0 = time.perf_counter()
        uce.ulysses_ce_forward(ql, kl, vl, comm=comm, attend=traced_attend, return_lse=False, chunks=chunks, link=hl)
        hl.marks.append(("return", time.perf_counter()))
        timelines.append([(lab, (t - t0) * 1e6) for lab, t in hl.marks])
        torch.cuda.synchronize()
    res["host_timeline_us"] = [(lab, round(statistics.median(tl[i][1] for tl in timelines), 1))
                               for i, (lab, _) in enumerate(timelines[0])]

    prof = cProfile.Profile()
    for _ in range(5):
        dist.barrier()
        torch.cuda.synchronize()
        prof.enable()
        sp()
        prof.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(40)
    (out / f"cprofile_rank{rank}.txt").write_text(text.getvalue())

    allres = [None] * world
    dist.all_gather_object(allres, res)
    if rank == 0:
        (out / "probe_host.json").write_text(json.dumps({"world": world, "ranks": allres}, indent=1))
        for name in allres[0]["ops_us"]:
            print(f"{name:42s} us per call, ranks: {[r['ops_us'][name] for r in allres]}")
        for name in allres[0]["call_host_us"]:
            print(f"{name:42s} host us, ranks: {[r['call_host_us'][name] for r in allres]}")
        for r, rr in enumerate(allres):
            print(f"rank {r} host timeline (us):", " | ".join(f"{lab} {t}" for lab, t in rr["host_timeline_us"]))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
