"""Run under torchrun by tests/gpu/test_sp_gpu.py: block-sparse ring / USP attention (masks that leave ring
steps empty) on the copy-engine and the NCCL transports, against float64 masked
attention on one GPU. Writes ``{label: rel L2}`` and the schedules as JSON to argv[1] (rank 0)."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from ditfleet.attention.blockmask import BlockSparseMask
from ditfleet.attention.radial import RadialFlex
from ditfleet.attention.reference import reference_attention
from ditfleet.parallel import gather_sequence, init_distributed, init_parallel, sequence_parallel_attention, shard_sequence
from ditfleet.parallel.ring_schedule import sp_schedule

S, H, D, BS = 1001, 6, 64, 64


def masks(world: int) -> dict[str, BlockSparseMask]:
    nb = -(-S // BS)
    frame = torch.arange(nb) * BS // 256  # 256-token "frames": block diagonal, most ring steps empty
    diag = frame[:, None] == frame[None, :]
    # a block that straddles a chunk boundary touches two chunks as query and as key, which links them:
    # such blocks keep no keys and are nobody's key (their rows are keyless: out 0, lse -inf)
    chunk = -(-S // world)
    cut = [i for i in range(nb) if any(i * BS < c * chunk < (i + 1) * BS for c in range(1, world))]
    diag[cut, :] = False
    diag[:, cut] = False
    g = torch.Generator().manual_seed(0)
    rnd = torch.rand(nb, nb, generator=g) < 0.25
    rnd[:, 0] = True  # a sink column: every row keeps a key
    return {"block-diagonal": BlockSparseMask.from_blocks(diag, BS, S),
            "random+sink": BlockSparseMask.from_blocks(rnd, BS, S)}


def main() -> None:
    env = init_distributed()
    dev, world = env.device, env.world_size
    g = torch.Generator(device=dev).manual_seed(1)
    q, k, v = (torch.randn(1, S, H, D, generator=g, device=dev) for _ in range(3))
    for t in (q, k, v):
        dist.broadcast(t, src=0)
    meshes = {f"ring{world} {t}": init_parallel(ring_size=world, transport=t) for t in ("nccl", "copy_engine")}
    if world >= 4:
        meshes.update({f"usp2x2 {t}": init_parallel(ulysses_size=2, ring_size=world // 2, transport=t)
                       for t in ("nccl", "copy_engine")})
    backend = RadialFlex(device=dev, dtype=torch.float32)
    res: dict = {"errors": {}, "schedules": {}}
    for mname, mask in masks(world).items():
        ref, ref_lse = (reference_attention(q, k, v, mask=mask.to_dense(device=dev)) if env.rank == 0
                        else (None, None))
        for name, mesh in meshes.items():
            (q_l, shard), (k_l, _), (v_l, _) = (shard_sequence(t, mesh) for t in (q, k, v))
            res["schedules"][f"{mname} {name}"] = sp_schedule(mask, shard.chunk, shard.chunk, mesh.ulysses_size,
                                                              mesh.ring_size).stats()
            out, lse = sequence_parallel_attention(q_l, k_l, v_l, backend=backend, mesh=mesh, shard=shard,
                                                   return_lse=True, block_mask=mask)
            out, lse = gather_sequence(out, mesh, shard), gather_sequence(lse, mesh, shard, dim=2)
            if env.rank == 0:
                fin = torch.isfinite(ref_lse)
                err = float((out.double() - ref).norm() / ref.norm())
                lse_err = float((lse.double()[fin] - ref_lse[fin]).norm() / ref_lse[fin].norm())
                res["errors"][f"{mname} {name}"] = max(err, lse_err)
    if env.rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(res, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
