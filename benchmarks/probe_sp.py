"""Probe: where the time of one sequence-parallel attention call goes, as a CUDA timeline.

Run under torchrun (one process per GPU); writes, on rank 0, a Chrome trace per variant
(torch.profiler: kernels, memcpys and their streams) and a JSON of medians. Used to study the
copy-engine transports (parallel/copy_engine.py, parallel/ulysses_ce.py) against the NCCL ones, and
the copy engines' bandwidth for strided 2-D pushes of the row widths Ulysses "ce" uses; not part of the
test suite.

    torchrun --nproc-per-node 4 benchmarks/probe_sp.py OUTDIR [--variants ...]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from ditfleet.attention.registry import torch_sdpa_kernel
from ditfleet.bench.common import time_cuda
from ditfleet.parallel import init_distributed, init_parallel, sequence_parallel_attention, shard_sequence
from ditfleet.parallel.copy_engine import SymmBuffer
from ditfleet.parallel.ulysses import UlyssesComm, ulysses_forward

VARIANTS = {
    "ulysses p2p g1": ("ulysses", {"ulysses_impl": "p2p"}),
    "ulysses ce g1": ("ulysses", {"ulysses_impl": "ce", "ulysses_chunks": 1}),
    "ulysses ce g5": ("ulysses", {"ulysses_impl": "ce", "ulysses_chunks": 5}),
    "ulysses ce g10": ("ulysses", {"ulysses_impl": "ce", "ulysses_chunks": 10}),
    "ring rotate": ("ring", {"ring_impl": "rotate"}),
    "ring pull": ("ring", {"ring_impl": "pull"}),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--seq-len", type=int, default=75600)
    ap.add_argument("--heads", type=int, default=40)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    env = init_distributed()
    dev, rank = env.device, env.rank
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _, cls = torch_sdpa_kernel(dev, torch.bfloat16)
    backend = cls(device=dev, dtype=torch.bfloat16)
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(1, args.seq_len, args.heads, 128, generator=g, device=dev, dtype=torch.bfloat16) for _ in range(3))
    meshes = {"ulysses": init_parallel(ulysses_size=env.world_size), "ring": init_parallel(ring_size=env.world_size)}
    res: dict = {}
    for name in args.variants:
        mode, kw = VARIANTS[name]
        mesh = meshes[mode]
        local = [shard_sequence(t, mesh)[0] for t in (q, k, v)]
        shard = shard_sequence(q, mesh)[1]

        def fn():
            return sequence_parallel_attention(*local, backend=backend, mesh=mesh, shard=shard, **kw)

        res[name] = time_cuda(fn, warmup=2, iters=args.iters)["median_ms"]
        if "ce" in name:  # the transport alone: the attend callback returns its input
            comm = UlyssesComm.from_mesh(mesh)
            chunks = kw.get("ulysses_chunks", 1)
            res[name + " comm only"] = time_cuda(lambda: ulysses_forward(
                *local, comm=comm, attend=lambda q_g, kv_g, _l, _h: (q_g, None), return_lse=False, chunks=chunks,
                impl="ce"), warmup=2, iters=args.iters)["median_ms"]
        dist.barrier()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        if rank == 0:
            prof.export_chrome_trace(str(out / f"trace_{name.replace(' ', '_')}.json"))
        dist.barrier()
    # copy-engine bandwidth: one 96 MB pull from each peer, serial on one stream
    ring = meshes["ring"]
    buf = SymmBuffer.get(ring.group("ring"), "probe").ensure(18900 * 10240, dev)
    dst = torch.empty(96 << 20, dtype=torch.uint8, device=dev)
    peers = [p for p in range(env.world_size) if p != rank]

    def pull_all():
        for p in peers:
            dst.copy_(buf.view(p, (96 << 20,), torch.uint8))

    ms = time_cuda(pull_all, warmup=2, iters=args.iters)["median_ms"]
    res[f"ce pull GB/s ({len(peers)} x 96 MiB, one stream)"] = len(peers) * (96 << 20) / (ms * 1e-3) / 1e9
    # strided 2-D pushes (cuMemcpy2DAsync) into every peer, rows of `width` bytes out of 10240-byte rows
    from ditfleet.parallel.cuda_driver import Copy2D

    src = torch.empty(18900 * 10240, dtype=torch.uint8, device=dev).view(18900, 10240)
    dist.barrier()
    for width in (256, 512, 1024, 2560, 10240):
        def push_all(width=width):
            for p in peers:
                dst = buf.view(p, (18900 * width,), torch.uint8).view(18900, width)
                Copy2D(dst, 0, 10240, src.numel())(src)  # the first `width` bytes of each 10240-byte row

        ms = time_cuda(push_all, warmup=2, iters=args.iters)["median_ms"]
        res[f"ce 2-D push GB/s, rows of {width} B ({len(peers)} peers x 18900 rows, one stream)"] = (
            len(peers) * 18900 * width / (ms * 1e-3) / 1e9)
        dist.barrier()
    t = torch.tensor([0.0], device=dev)
    dist.all_reduce(t)
    if rank == 0:
        (out / "probe.json").write_text(json.dumps({"world": env.world_size, "pid": os.getpid(), **res}, indent=1))
        print(json.dumps(res, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
