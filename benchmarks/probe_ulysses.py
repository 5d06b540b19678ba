"""Probe: the per-rank timeline of Ulysses ``ce`` calls in steady state, without the profiler.

Every call of a traced variant records CUDA events on the streams it uses: before and after each
attention kernel (compute stream), after each flag write (the push streams: the moment a group's
transfer to a peer is complete) and after each flag wait of the unpack stream, plus the host time
at which each was issued. The medians over the timed calls say where a call's time goes: before the
first kernel, between kernels (waiting for data), in the kernels, after the last one. The
reference kernels (the whole sequence on one GPU; each rank's share, as one kernel or per head
group, on all GPUs at once) are timed in the same interleaved rounds, and ``nvidia-smi`` logs SM
clock, power and temperature beside the run (``smi.csv``). Not part of the test suite.

    torchrun --nproc-per-node 4 benchmarks/probe_ulysses.py OUTDIR [--groups 1 5 1,3,3,3 ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch.distributed as dist

import ditfleet.parallel.ulysses_ce as uce
from ditfleet.attention.registry import torch_sdpa_kernel
from ditfleet.parallel import init_distributed, init_parallel, sequence_parallel_attention, shard_sequence
from ditfleet.parallel.copy_engine import CudaLink
from ditfleet.parallel.ulysses import UlyssesComm, ulysses_forward


class LinkProxy:
    """A :class:`CudaLink` stand-in that passes every call through and tells the hooks :meth:`begun`,
    :meth:`signalled` and :meth:`waited` (no-ops here) after a ``begin``, a flag write and a flag wait."""

    def __init__(self, link: CudaLink):
        self.link = link
        self.marks: list = []

    @property
    def memo(self):
        return self.link.memo

    def begin(self, nbytes, layout=None):
        epoch = self.link.begin(nbytes, layout=layout)
        self.begun()
        return epoch

    def view(self, *a, **kw):
        return self.link.view(*a, **kw)

    def flag(self, rank, index):
        return self.link.flag(rank, index)

    def copier(self, *a):
        return self.link.copier(*a)

    def signal(self, flag, value, stream=None):
        self.link.signal(flag, value, stream)
        self.signalled(flag, stream)

    def wait(self, flag, value, stream=None):
        self.link.wait(flag, value, stream)
        self.waited(flag, stream)

    def begun(self) -> None:
        pass

    def signalled(self, flag, stream) -> None:
        pass

    def waited(self, flag, stream) -> None:
        pass


class TracingLink(LinkProxy):
    """A :class:`CudaLink` that records an event after every flag write and wait (see the docstring)."""

    def __init__(self, link: CudaLink, u: int, me: int):
        super().__init__(link)
        self.u, self.me = u, me

    def _label(self, flag) -> str:
        for r, base in enumerate(self.link._bases[2]):
            idx = (flag.data_ptr() - base.data_ptr()) // 4
            if 0 <= idx < base.numel():
                kind, rest = ("in", idx) if idx < uce.FLAG_GROUPS * self.u else ("out", idx - uce.FLAG_GROUPS * self.u)
                g, src = divmod(rest, self.u)
                return f"{kind} g{g} {src}->{r}"
        return "?"

    def mark(self, label: str, stream: int | None = None) -> None:
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(None if stream is None else torch.cuda.ExternalStream(stream))
        self.marks.append((label, ev, time.perf_counter()))

    def signalled(self, flag, stream) -> None:
        self.mark("sent " + self._label(flag), stream)

    def waited(self, flag, stream) -> None:
        label = self._label(flag)
        if label.startswith("out"):
            self.mark("got " + label, stream)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--seq-len", type=int, default=75600)
    ap.add_argument("--heads", type=int, default=40)
    ap.add_argument("--groups", nargs="+", default=["1", "2", "3", "4", "5"],
                    help="head groups of the traced ce variants: a count (near-equal groups) or sizes")
    ap.add_argument("--plain", nargs="*", type=int, default=[0, 1, 5],
                    help="head groups of untraced sequence_parallel_attention ce calls (0: the defaults)")
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    env = init_distributed()
    dev, rank, world = env.device, env.rank, env.world_size
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    smi = None
    if rank == 0:
        smi = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,index,clocks.sm,power.draw,temperature.gpu,"
                                "clocks_event_reasons.active", "--format=csv,noheader", "-lms", "100"],
                               stdout=open(out / "smi.csv", "w"), stderr=subprocess.STDOUT)
    _, cls = torch_sdpa_kernel(dev, torch.bfloat16)
    backend = cls(device=dev, dtype=torch.bfloat16)
    s, h, d = args.seq_len, args.heads, 128
    gen = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(1, s, h, d, generator=gen, device=dev, dtype=torch.bfloat16) for _ in range(3))
    mesh = init_parallel(ulysses_size=world)
    comm = UlyssesComm.from_mesh(mesh)
    ql, kl, vl = (shard_sequence(t, mesh)[0] for t in (q, k, v))
    hr = h // world
    share = [torch.randn(1, s, hr, d, generator=gen, device=dev, dtype=torch.bfloat16) for _ in range(3)]
    link = TracingLink(CudaLink.get(comm.group, world, rank, dev), world, rank)
    scale = d ** -0.5

    def groups_of(spec: str):
        sizes = [int(x) for x in spec.split(",")]
        if len(sizes) == 1:
            return uce.head_groups(hr, sizes[0])
        assert sum(sizes) == hr, (spec, hr)
        bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        return [(bounds[i], bounds[i + 1]) for i in range(len(sizes))]

    orig_groups = uce.head_groups

    def ce_call(spec: str, trace: bool, comm_only: bool = False):
        gl = groups_of(spec)
        uce.head_groups = lambda _h, _c: gl

        def attend(q_full, kv, want_lse, heads):
            if comm_only:
                return q_full, None
            if trace:
                link.mark(f"k{heads[0]}-{heads[1]} start")
            r = backend(q_full, kv[0], kv[1], scale=scale, return_lse=want_lse)
            if trace:
                link.mark(f"k{heads[0]}-{heads[1]} end")
            return r

        try:
            return uce.ulysses_ce_forward(ql, kl, vl, comm=comm, attend=attend, return_lse=False, chunks=len(gl),
                                          link=link)
        finally:
            uce.head_groups = orig_groups

    split = {n: [[t[:, :, h0:h1].contiguous() for t in share] for h0, h1 in orig_groups(hr, n)] for n in (1, 5, 10)}

    def kernels(n):  # each group's q, k, v contiguous, as in the inbox
        for qq, kk, vv in split[n]:
            backend(qq, kk, vv, scale=scale)

    plan = {"1gpu": None, "kernel share": lambda: kernels(1), "kernel share x5": lambda: kernels(5),
            "kernel share x10": lambda: kernels(10),
            "p2p g1": lambda: ulysses_forward(ql, kl, vl, comm=comm, attend=lambda qf, kv, wl, hh: backend(
                qf, kv[0], kv[1], scale=scale, return_lse=wl), return_lse=False, chunks=1, impl="p2p"),
            "ce 1 comm only": lambda: ce_call("1", False, comm_only=True),
            "ce 5 comm only": lambda: ce_call("5", False, comm_only=True)}
    shard = shard_sequence(q, mesh)[1]
    for g in args.plain:  # the library path as users call it, untraced (g 0: the defaults)
        kw = {"ulysses_impl": "ce", "ulysses_chunks": g} if g else {}
        plan[f"sp ce g{g}" if g else "sp default"] = (lambda kw=kw: sequence_parallel_attention(
            ql, kl, vl, backend=backend, mesh=mesh, shard=shard, scale=scale, **kw))
    for spec in args.groups:
        plan[f"ce {spec}"] = spec
    times: dict[str, list] = {n: [] for n in plan}
    traces: dict[str, list] = {n: [] for n in plan}
    wall: dict[str, list] = {n: [] for n in plan}

    def one(name, spec):
        link.marks.clear()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        if name == "1gpu":
            backend(q, k, v, scale=scale)
        elif isinstance(spec, str):
            ce_call(spec, True)
        else:
            spec()
        end.record()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        tr = {lab: (round(start.elapsed_time(ev), 3), round((th - t0) * 1e3, 3)) for lab, ev, th in link.marks}
        tr["host issue"] = (None, round((t1 - t0) * 1e3, 3))
        return start.elapsed_time(end), tr

    for rnd in range(args.rounds):
        order = list(plan.items()) if rnd % 2 == 0 else list(plan.items())[::-1]
        for name, spec in order:
            dist.barrier()
            torch.cuda.synchronize()
            if name == "1gpu" and rank != 0:
                dist.barrier()
                continue
            w0 = time.time()
            for _ in range(3):
                one(name, spec)
            for _ in range(args.iters):
                ms, tr = one(name, spec)
                times[name].append(ms)
                traces[name].append(tr)
            wall[name].append((w0, time.time()))
            if name == "1gpu":
                dist.barrier()
        if rank == 0:
            print(f"round {rnd} done", flush=True)

    res = {}
    for name in plan:
        if not times[name]:
            continue
        labels = traces[name][0].keys()
        med = {lab: [statistics.median([t[lab][0] for t in traces[name] if lab in t and t[lab][0] is not None])
                     if traces[name][0][lab][0] is not None else None,
                     statistics.median([t[lab][1] for t in traces[name] if lab in t])] for lab in labels}
        res[name] = {"median_ms": round(statistics.median(times[name]), 3),
                     "rounds_median_ms": [round(statistics.median(times[name][i * args.iters:(i + 1) * args.iters]), 3)
                                          for i in range(args.rounds)],
                     "timeline_ms [gpu, host]": med, "wall": wall[name]}
    allres = [None] * world
    dist.all_gather_object(allres, res)
    if rank == 0:
        smi.terminate()
        (out / "probe_ulysses.json").write_text(json.dumps({"world": world, "ranks": allres}, indent=1))
        for name in plan:
            row = [r[name]["median_ms"] if name in r else None for r in allres]
            rounds = [r[name]["rounds_median_ms"] for r in allres if name in r]
            print(f"{name:20s} per rank {row}  rounds(r0) {rounds[0]}")
        for name in plan:
            if name.startswith("ce") and "comm" not in name:
                print(f"--- {name}: per rank, first kernel start and last kernel end (gpu ms / host ms), sum of kernels")
                for r, rr in enumerate(allres):
                    tl = rr[name]["timeline_ms [gpu, host]"]
                    ks = [lab for lab in tl if lab.startswith("k")]
                    busy = sum(tl[e][0] - tl[b][0] for b, e in zip(ks[::2], ks[1::2]))
                    print(f" rank {r}: {ks[0]} {tl[ks[0]][0]}/{tl[ks[0]][1]}  {ks[-1]} {tl[ks[-1]][0]}/{tl[ks[-1]][1]}"
                          f"  kernels {busy:.3f}  call {rr[name]['median_ms']}  host issue {tl['host issue'][1]}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
