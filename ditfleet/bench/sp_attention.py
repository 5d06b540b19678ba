"""``ditfleet bench sp-attention``: sequence-parallel attention vs one GPU, side by side with yunchang.

Run under torchrun, one process per GPU::

    torchrun --nproc-per-node 4 -m ditfleet bench sp-attention            # S=75600, H=40, D=128, bf16

For each kernel (default ``sdpa_cudnn``, plus ``fa4`` when it can run) it measures, in one run:

* the one-GPU time of the kernel on the full sequence (rank 0, same inputs);
* ditfleet's ``sequence_parallel_attention`` for each mode (``ulysses``: U = N; ``ring``: R = N;
  ``usp``: U = 2, R = N / 2, from 4 GPUs) and each ``--ulysses-chunks`` value, its speedup over
  one GPU and its rel L2 against the one-GPU output (gathered);
* a breakdown of the same shapes, piece by piece: communication alone (all-to-alls, ring
  rotation), the kernel alone on the per-GPU shapes, and the LSE merges; so a missed target can
  be told apart into comm, kernel efficiency and overhead;
* yunchang's ``LongContextAttention`` on the same local shards (when yunchang imports; else why
  not), with its own one-GPU kernel time.

Times are the median over iterations of the slowest rank. Rank 0 writes the JSON after every
mode (a later failure keeps earlier numbers) and prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from ..attention.base import AttentionBackend
from ..parallel import (
    RingComm,
    UlyssesComm,
    gather_sequence,
    init_distributed,
    init_parallel,
    merge_attention_,
    sequence_parallel_attention,
    shard_sequence,
)
from ..parallel.ulysses import pad_heads, padded_heads
from .attention import card_slug, kernel_availability, make_inputs
from .common import environment, rel_l2, time_cuda, write_json

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Speedup targets at 4 GPUs vs one GPU (issue 3); yunchang measured 3.81x / 3.51x.
TARGETS_4GPU = {"ulysses": 3.9, "ring": 3.75}
YUNCHANG_TYPES = {"sdpa_cudnn": ["torch_cudnn", "torch_flash"], "sdpa_flash": ["torch_flash"],
                  "sdpa_efficient": ["torch_efficient"], "fa2": ["fa"], "fa3": ["fa3"]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the suite's options (the ``ditfleet bench sp-attention`` subparser)."""
    parser.add_argument("--seq-len", type=int, default=75600, help="global sequence length S (default: %(default)s)")
    parser.add_argument("--heads", type=int, default=40, help="attention heads H (default: %(default)s)")
    parser.add_argument("--head-dim", type=int, default=128, help="head dim D (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=1, help="batch B (default: %(default)s)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="q/k/v dtype (default: %(default)s)")
    parser.add_argument("--kernels", nargs="+", default=None, metavar="KEY",
                        help="kernel keys (default: sdpa_cudnn, plus fa4 when it can run; sdpa_cpu_flash on CPU)")
    parser.add_argument("--modes", nargs="+", default=["ulysses", "ring", "usp"], choices=["ulysses", "ring", "usp"])
    parser.add_argument("--ulysses-chunks", type=int, nargs="+", default=[1, 2], metavar="G",
                        help="head groups pipelined against the all-to-alls, each timed (default: %(default)s)")
    parser.add_argument("--yunchang-attn-types", nargs="+", default=None, metavar="TYPE",
                        help="yunchang AttnType values to run (default: the kernel's match; for sdpa_cudnn "
                             "torch_cudnn and torch_flash, because yunchang 0.6.4's torch_cudnn returns a zero LSE, "
                             "so its ring merge is wrong)")
    parser.add_argument("--no-yunchang", action="store_true", help="skip yunchang")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls (default: %(default)s)")
    parser.add_argument("--iters", type=int, default=10, help="timed calls (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None,
                        help="JSON path (default: benchmarks/results/sp_attention_<card>_<n>gpu.json)")


# ---------------------------------------------------------------- timing helpers
def _time(fn, args, device) -> float:
    """Median ms of ``fn`` on this rank (CUDA events on GPU, wall clock on CPU)."""
    if device.type == "cuda":
        return time_cuda(fn, warmup=args.warmup, iters=args.iters)["median_ms"]
    for _ in range(args.warmup):
        fn()
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _slowest(ms: float, device) -> float:
    """The largest value over all ranks (a collective)."""
    t = torch.tensor([ms], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _all_ok(ok: bool, device) -> bool:
    t = torch.tensor([0 if ok else 1], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item()) == 0


def _mode_sizes(mode: str, world: int) -> tuple[int, int] | str:
    """``(ulysses, ring)`` of a mode on ``world`` GPUs, or why it does not run."""
    if mode == "ulysses":
        return world, 1
    if mode == "ring":
        return 1, world
    if world < 4 or world % 2:
        return f"usp needs an even world of at least 4 GPUs (have {world})"
    return 2, world // 2


# ---------------------------------------------------------------- breakdown
def _breakdown(mesh, backend: AttentionBackend, q_l, k_l, v_l, shard, scale, args, device) -> dict:
    """Each piece of one SP attention call alone, on the same shapes (ms, slowest rank)."""
    u, r = mesh.ulysses_size, mesh.ring_size
    b, _, num_heads, _ = q_l.shape
    parts: dict[str, float] = {}
    q, kv = q_l, torch.stack((k_l, v_l))
    if u > 1:
        comm = UlyssesComm(mesh.group("ulysses"), u)
        h_pad = padded_heads(num_heads, u)
        tensors = tuple(pad_heads(t, h_pad) for t in (q_l, k_l, v_l))
        parts["a2a_in_with_pack"] = _time(lambda: comm.scatter_heads(tensors, 0, h_pad // u)[1].wait(), args, device)
        recv, work, meta = comm.scatter_heads(tensors, 0, h_pad // u)
        work.wait()
        parts["unpack"] = _time(lambda: comm.unpack(recv, meta), args, device)
        q, kv = comm.unpack(recv, meta)
        parts["a2a_out_with_copies"] = _time(
            lambda: [w.wait() for w in comm.gather_heads(torch.empty_like(q), None)[2]], args, device)
    n_valid = shard.chunk_valid(0, u)
    lens = None if n_valid == kv.shape[2] else [n_valid] * b
    if r == 1:
        parts["kernel"] = _time(lambda: backend(q, kv[0], kv[1], scale=scale, kv_lens=lens), args, device)
    else:
        ring = RingComm.from_mesh(mesh)
        nxt = torch.empty_like(kv)
        parts["ring_rotation"] = _time(lambda: [ring.wait(ring.start(kv, nxt)) for _ in range(r - 1)], args, device)
        parts["kernel_all_blocks"] = r * _time(lambda: backend(q, kv[0], kv[1], scale=scale, return_lse=True),
                                               args, device)
        o, l = backend(q, kv[0], kv[1], scale=scale, return_lse=True)
        acc, acc_lse = o.float(), l.clone()
        parts["lse_merges"] = (r - 1) * _time(lambda: merge_attention_(acc, acc_lse, o, l), args, device)
    return {k: round(_slowest(v, device), 3) for k, v in parts.items()}


# ---------------------------------------------------------------- yunchang
def _yunchang_single(attn_type: str, q, k, v, scale, args, device) -> dict:
    from yunchang.kernels import AttnType, select_flash_attn_impl

    fn = select_flash_attn_impl(AttnType.from_string(attn_type), stage="fwd-only")
    return {"single_gpu_ms": round(_time(lambda: fn(q, k, v, dropout_p=0.0, softmax_scale=scale, causal=False),
                                         args, device), 3)}


def _yunchang_mode(attn_type, u, r, env, mesh, shard, q_l, k_l, v_l, scale, ref, args, device) -> dict:
    import yunchang
    from yunchang import LongContextAttention, set_seq_parallel_pg
    from yunchang.kernels import AttnType

    set_seq_parallel_pg(u, r, env.rank, env.world_size, use_ulysses_low=True)
    try:
        attn = LongContextAttention(ring_impl_type="basic", attn_type=AttnType.from_string(attn_type))
    except TypeError:  # older yunchang: no attn_type argument
        attn = LongContextAttention(ring_impl_type="basic")

    def fn():
        return attn(q_l, k_l, v_l, dropout_p=0.0, softmax_scale=scale, causal=False)

    res = {"version": getattr(yunchang, "__version__", "?"), "attn_type": attn_type}
    res["ms"] = round(_slowest(_time(fn, args, device), device), 3)
    out = gather_sequence(fn(), mesh, shard)
    if ref is not None:
        res["rel_l2_vs_1gpu"] = rel_l2(out, ref)
    return res


# ---------------------------------------------------------------- main
def _default_kernels(device) -> list[str]:
    if device.type != "cuda":
        return ["sdpa_cpu_flash"]
    keys = ["sdpa_cudnn"]
    runnable, _ = kernel_availability(["fa4"], device, torch.bfloat16, 128)
    return keys + list(runnable)


def _err(e: BaseException) -> str:
    """One line: the exception's type and the first line of its message, at most 300 characters."""
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}"[:300]


def main(args) -> int:
    env = init_distributed(timeout_s=900)
    device, rank, world = env.device, env.rank, env.world_size
    dtype = DTYPES[args.dtype]
    b, s, h, d = args.batch, args.seq_len, args.heads, args.head_dim
    scale = d**-0.5
    report = {
        "suite": "sp-attention",
        "environment": environment(world),
        "shape": {"batch": b, "seq_len": s, "heads": h, "head_dim": d, "dtype": args.dtype},
        "targets_4gpu_speedup": TARGETS_4GPU,
        "kernels": {},
    }
    out_path = Path(args.out or f"benchmarks/results/sp_attention_{card_slug(report['environment']['card'])}_{world}gpu.json")
    keys = args.kernels or _default_kernels(device)
    runnable, unavailable = kernel_availability(keys, device, dtype, d)
    for key, reasons in unavailable.items():
        report["kernels"][key] = {"skipped": reasons}
    q, k, v = make_inputs(b, s, h, d, dtype, device, args.seed)
    for t in (q, k, v):  # identical inputs everywhere, whatever the RNG of each card does
        dist.broadcast(t, src=0)

    def save():
        if rank == 0:
            write_json(out_path, report)

    for key, cls in runnable.items():
        backend = cls(device=device, dtype=dtype)
        kres = report["kernels"][key] = {"description": cls.description, "modes": {}}
        ref = None
        if rank == 0:
            ref = backend(q, k, v, scale=scale)[0]
            kres["single_gpu_ms"] = round(_time(lambda: backend(q, k, v, scale=scale), args, device), 3)
        yc_types = args.yunchang_attn_types or YUNCHANG_TYPES.get(key)
        yc = kres["yunchang"] = {}
        if args.no_yunchang:
            yc["skipped"] = "--no-yunchang"
        elif not yc_types:
            yc["skipped"] = f"no yunchang attention type matches kernel {key}"
        else:
            try:
                import yunchang  # noqa: F401
            except Exception as e:  # noqa: BLE001
                yc["skipped"] = f"yunchang does not import: {_err(e)}"
            for t in yc_types if "skipped" not in yc and rank == 0 else []:
                try:
                    yc[t] = _yunchang_single(t, q, k, v, scale, args, device)
                except Exception as e:  # noqa: BLE001
                    yc[t] = {"single_gpu_error": _err(e)}
        dist.barrier()
        base_ms = _slowest(kres.get("single_gpu_ms", 0.0), device)
        yc_base = {t: _slowest(yc.get(t, {}).get("single_gpu_ms", 0.0), device) or base_ms for t in yc_types or []}
        for mode in args.modes:
            sizes = _mode_sizes(mode, world)
            if isinstance(sizes, str):
                kres["modes"][mode] = {"skipped": sizes}
                continue
            u, r = sizes
            mres = kres["modes"][mode] = {"ulysses": u, "ring": r, "ditfleet": {}}
            target = TARGETS_4GPU.get(mode) if world == 4 else None
            mesh = init_parallel(ulysses_size=u, ring_size=r)
            q_l, shard = shard_sequence(q, mesh)
            k_l, _ = shard_sequence(k, mesh)
            v_l, _ = shard_sequence(v, mesh)
            for chunks in (args.ulysses_chunks if u > 1 else [1]):
                entry = mres["ditfleet"][f"ulysses_chunks={chunks}"] = {}

                def fn(chunks=chunks):
                    return sequence_parallel_attention(q_l, k_l, v_l, backend=backend, mesh=mesh, shard=shard,
                                                       scale=scale, ulysses_chunks=chunks)

                try:
                    ms = _slowest(_time(fn, args, device), device)
                    out = gather_sequence(fn()[0], mesh, shard)
                    entry.update(ms=round(ms, 3), speedup=round(base_ms / ms, 3) if base_ms else None)
                    if ref is not None:
                        entry["rel_l2_vs_1gpu"] = rel_l2(out, ref)
                    if target is not None:
                        entry.update(target=target, target_met=bool(base_ms / ms >= target))
                    del out
                except Exception as e:  # noqa: BLE001 - recorded, the other measurements go on
                    entry["error"] = _err(e)
                    if rank == 0:
                        traceback.print_exc()
            try:
                mres["breakdown_ms"] = _breakdown(mesh, backend, q_l, k_l, v_l, shard, scale, args, device)
            except Exception as e:  # noqa: BLE001
                mres["breakdown_error"] = _err(e)
            save()
            if "skipped" in yc:
                mres["yunchang"] = {"skipped": yc["skipped"]}
            elif s % world or h % u:
                mres["yunchang"] = {"skipped": f"yunchang needs S % {world} == 0 and H % {u} == 0 (no padding)"}
            else:
                mres["yunchang"] = {}
                for t in yc_types:
                    res, ok = {}, True
                    try:
                        res = _yunchang_mode(t, u, r, env, mesh, shard, q_l, k_l, v_l, scale, ref, args, device)
                        res["speedup_vs_own_1gpu"] = round(yc_base[t] / res["ms"], 3) if yc_base[t] else None
                        if target is not None:
                            res.update(target=target, target_met=bool(res["speedup_vs_own_1gpu"] >= target))
                    except Exception as e:  # noqa: BLE001 - a yunchang failure never loses ditfleet's numbers
                        res, ok = {"error": _err(e)}, False
                    if not _all_ok(ok, device) and ok:
                        res["error"] = "failed on another rank"
                    mres["yunchang"][t] = res
                    save()
            save()
            del q_l, k_l, v_l
        if device.type == "cuda":
            torch.cuda.empty_cache()
    save()
    if rank == 0:
        _print_table(report, world, out_path)
    dist.barrier()
    dist.destroy_process_group()
    return 0


def _print_table(report: dict, world: int, path: Path) -> None:
    env, shape = report["environment"], report["shape"]
    print(f"sp-attention on {world} x {env['card']}: S={shape['seq_len']} H={shape['heads']} D={shape['head_dim']} "
          f"{shape['dtype']}  (median ms, slowest rank)")
    rows = [("kernel", "mode", "impl", "ms", "speedup", "rel L2", "target")]
    for key, kres in report["kernels"].items():
        if "skipped" in kres:
            rows.append((key, "-", "skipped", "; ".join(kres["skipped"])[:60], "", "", ""))
            continue
        rows.append((key, "1 GPU", "kernel", f"{kres.get('single_gpu_ms', float('nan')):.2f}", "1.00", "", ""))
        for mode, mres in kres["modes"].items():
            if "skipped" in mres:
                rows.append((key, mode, "skipped", mres["skipped"][:60], "", "", ""))
                continue
            yc = mres.get("yunchang", {})
            yc_rows = [("yunchang", yc)] if "skipped" in yc else [(f"yunchang {t}", e) for t, e in yc.items()]
            for impl, e in [(f"ditfleet {i}", e) for i, e in mres["ditfleet"].items()] + yc_rows:
                name = impl
                if "ms" not in e:
                    rows.append((key, mode, name, (e.get("error") or e.get("skipped") or "?")[:60], "", "", ""))
                    continue
                sp = e.get("speedup", e.get("speedup_vs_own_1gpu"))
                tgt = "" if e.get("target") is None else f">={e['target']} {'ok' if e['target_met'] else 'MISSED'}"
                err = e.get("rel_l2_vs_1gpu")
                rows.append((key, mode, name, f"{e['ms']:.2f}", f"{sp:.2f}" if sp else "", f"{err:.1e}" if err is not None else "", tgt))
            if "breakdown_ms" in mres:
                rows.append((key, mode, "breakdown", ", ".join(f"{k} {v:.2f}" for k, v in mres["breakdown_ms"].items()), "", "", ""))
    widths = [min(40, max(len(str(row[i])) for row in rows)) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    print(f"wrote {path}")


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m ditfleet.bench.sp_attention")
    add_arguments(_parser)
    raise SystemExit(main(_parser.parse_args()))
