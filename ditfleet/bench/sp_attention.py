"""``ditfleet bench sp-attention``: sequence-parallel attention vs one GPU, on each transport, vs yunchang.

Run under torchrun, one process per GPU::

    torchrun --nproc-per-node 4 -m ditfleet bench sp-attention            # S=75600, H=40, D=128, bf16

For each kernel (default ``sdpa_cudnn``, plus ``fa4`` when it can run) it measures, in one run:

* the one-GPU time of the kernel on the full sequence (rank 0, same inputs), once at the start of
  the run (``single_gpu_ms``, with the reference output) and again in each mode's rounds (the mode's
  ``single_gpu``: its speedups are computed from that one);
* ditfleet's ``sequence_parallel_attention`` for each mode (``ulysses``: U = N; ``ring``: R = N;
  ``usp``: U = 2, R = N / 2, from 4 GPUs) on each ``--transports`` entry (``parallel.transport``:
  ``nccl``, ``copy_engine`` where it can run; one mesh per transport), each with its speedup over one
  GPU and its rel L2 against the one-GPU output (gathered); the transport ``auto`` resolves to is
  marked ``is_default`` and the fastest one is named in the mode's ``best``;
* a breakdown of the same shapes, piece by piece: communication alone (the all-to-all, the ring
  rotation), the kernel alone on the per-GPU shapes, and the LSE merges (torch and fused); so a missed
  target can be told apart into comm, kernel efficiency and overhead;
* kernel diagnostics (``diagnostics_ms``): the kernel alone at the ring's shapes with and without
  the LSE, with 1, 2 and all key chunks, and split into head groups; and at the Ulysses shape
  split into head groups, to see what the LSE, short keys and small head groups cost;
* yunchang's ``LongContextAttention`` on the same local shards (when yunchang imports; else why
  not), with its own one-GPU kernel time.

Times are the median over iterations of the slowest rank. Everything a mode compares (its one-GPU
baseline, every variant, yunchang's one-GPU kernel and its sequence-parallel call) is timed in the
same ``--rounds`` rounds, the order reversed every other round, so that the GPUs' slow drift over a
run weighs on all of them alike; each reports the median of its rounds. Rank 0 writes the JSON
after every round (a later failure keeps earlier numbers) and prints a table with every variant,
the mode's one-GPU rows and the winner.
"""

from __future__ import annotations

import argparse
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..attention.base import AttentionBackend
from ..parallel import (
    RingSchedule,
    gather_sequence,
    init_distributed,
    init_parallel,
    merge_attention_,
    sequence_parallel_attention,
    shard_sequence,
)
from ..parallel.copy_engine import ce_unavailable
from ..parallel.merge import merge_step
from ..parallel.transport import transport_for
from ..parallel.ulysses import pad_heads, padded_heads
from .attention import _free, card_slug, kernel_availability, make_inputs
from .common import environment, rel_l2, time_cuda, write_json

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Speedup targets at 4 GPUs vs one GPU (issue 3); yunchang measured 3.81x / 3.51x.
TARGETS_4GPU = {"ulysses": 3.9, "ring": 3.75}
YUNCHANG_TYPES = {"sdpa_cudnn": ["torch_cudnn", "torch_flash"], "sdpa_flash": ["torch_flash"],
                  "sdpa_efficient": ["torch_efficient"], "fa2": ["fa"], "fa3": ["fa3"]}
# What the kernel's ``single_gpu_ms`` is (its label in the JSON): the speedups use each mode's own.
START_OF_RUN = "start of run (the reference output); speedups use each mode's single_gpu, timed in its rounds"
BENCH_TRANSPORTS = ("nccl", "copy_engine")


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
    parser.add_argument("--transports", nargs="+", default=list(BENCH_TRANSPORTS), choices=BENCH_TRANSPORTS,
                        help="parallel.transport values to time, one mesh each (default: %(default)s; copy_engine "
                             "is skipped where it cannot run, with the reason)")
    parser.add_argument("--no-diagnostics", action="store_true", help="skip the kernel-alone diagnostics")
    parser.add_argument("--yunchang-attn-types", nargs="+", default=None, metavar="TYPE",
                        help="yunchang AttnType values to run (default: the kernel's match; for sdpa_cudnn "
                             "torch_cudnn and torch_flash, because yunchang 0.6.4's torch_cudnn returns a zero LSE, "
                             "so its ring merge is wrong)")
    parser.add_argument("--no-yunchang", action="store_true", help="skip yunchang")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls (default: %(default)s)")
    parser.add_argument("--iters", type=int, default=10, help="timed calls (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="time everything a mode compares this many times, in turn, the order reversed every other "
                             "round: the one-GPU baseline (rank 0), every variant, yunchang's one-GPU kernel and its "
                             "sequence-parallel call (slow drift of the GPUs' clocks then weighs on all alike); each "
                             "reports the median of its rounds and lists them, and the mode's speedups use its "
                             "one-GPU medians (default: %(default)s)")
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


class MeshCache:
    """The benches' meshes: one :class:`~ditfleet.parallel.ParallelMesh` per (Ulysses size, ring size, transport),
    built on first use (a collective: every rank asks for the same meshes in the same order)."""

    def __init__(self):
        self._meshes: dict = {}

    def get(self, ulysses: int, ring: int, **opts):
        key = (ulysses, ring, tuple(sorted(opts.items())))
        if key not in self._meshes:
            self._meshes[key] = init_parallel(ulysses_size=ulysses, ring_size=ring, **opts)
        return self._meshes[key]


def _mode_sizes(mode: str, world: int) -> tuple[int, int] | str:
    """``(ulysses, ring)`` of a mode on ``world`` GPUs, or why it does not run."""
    if mode == "ulysses":
        return world, 1
    if mode == "ring":
        return 1, world
    if world < 4 or world % 2:
        return f"usp needs an even world of at least 4 GPUs (have {world})"
    return 2, world // 2


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sp_timed(entry: dict, fn, args, device, on_first=None) -> bool:
    """First call and median of ``fn`` (slowest rank) into ``entry``; an error on any rank is recorded. True if ok.

    ``on_first(result)``: runs on the first call's result before the timing (gather and compare).
    """
    ok = True
    try:
        dist.barrier()
        t1 = time.perf_counter()
        res = fn()
        _sync(device)
        entry["first_call_s"] = round(_slowest(time.perf_counter() - t1, device), 2)
        if on_first is not None:
            on_first(res)
        del res
        _free(device)
        entry["ms"] = round(_slowest(_time(fn, args, device), device), 3)
    except Exception as e:  # noqa: BLE001 - one failing kernel must not stop the others
        entry["error"], ok = _err(e), False
    if not _all_ok(ok, device) and ok:
        entry["error"], ok = "failed on another rank", False
    return ok


# ---------------------------------------------------------------- breakdown
def _breakdown(mesh, backend: AttentionBackend, q_l, k_l, v_l, shard, scale, args, device) -> dict:
    """Each piece of one SP attention call alone, on the same shapes, on ``mesh``'s transport (ms, slowest rank)."""
    u, r = mesh.ulysses_size, mesh.ring_size
    b, _, num_heads, d = q_l.shape
    parts: dict[str, float] = {}
    q, kv = q_l, torch.stack((k_l, v_l))
    if u > 1:
        t = transport_for(mesh, "ulysses")
        h = padded_heads(num_heads, u) // u
        n = b * (q_l.shape[1] + 2 * k_l.shape[1]) * h * d

        def a2a():
            t.all_to_all(t.send_buffer((u, n), q_l.dtype, device), "bench")

        parts["all_to_all_qkv"] = _time(a2a, args, device)
        q = pad_heads(q_l, h * u)[:, :, :h].repeat(1, u, 1, 1)  # the kernel's shapes: the group's sequence, h heads
        kv = pad_heads(kv.flatten(0, 1), h * u)[:, :, :h].unflatten(0, (2, b)).repeat(1, 1, u, 1, 1)
    n_valid = shard.chunk_valid(0, u)
    lens = None if n_valid == kv.shape[2] else [n_valid] * b
    if r == 1:
        parts["kernel"] = _time(lambda: backend(q, kv[0], kv[1], scale=scale, kv_lens=lens), args, device)
    else:
        ring = transport_for(mesh, "ring")
        sched = RingSchedule.dense([1] * r)

        def rotation():
            ring.ring_begin(kv.clone(), sched)
            for step in range(r):
                ring.ring_prefetch(step)
                if step:
                    ring.ring_chunk(step)
                ring.ring_advance(step)
            ring.ring_end()

        parts["ring_rotation"] = _time(rotation, args, device)
        parts["kernel_all_blocks"] = r * _time(lambda: backend(q, kv[0], kv[1], scale=scale, return_lse=True),
                                               args, device)
        o, l = backend(q, kv[0], kv[1], scale=scale, return_lse=True)
        acc, acc_lse = o.float(), l.clone()
        parts["lse_merges"] = (r - 1) * _time(lambda: merge_attention_(acc, acc_lse, o, l), args, device)
        # The fused merge as the ring uses it: in place on a float32 running state.
        parts["lse_merges_fused"] = (r - 1) * _time(lambda: merge_step(acc, acc_lse, o, l), args, device)
    return {k: round(_slowest(v, device), 3) for k, v in parts.items()}


# ---------------------------------------------------------------- kernel diagnostics
def _diagnostics(backend: AttentionBackend, q, k, v, world: int, scale, args, device) -> dict:
    """The kernel alone (ms, slowest rank) at the per-GPU shapes of ring and Ulysses on ``world`` GPUs.

    Ring shapes (``n = S / R`` queries, all H heads): keys ``n`` with and without the LSE (one
    ring block), ``2n`` keys with the LSE, all ``S`` keys with and without the LSE (what one call over
    the whole key sequence would cost), and all keys split into 5 head groups.
    Ulysses shapes (all S queries and keys, ``H / U`` heads): one call, and the same heads split
    into 2, 5 and 10 groups. Totals over all the calls of one attention, so they compare directly.
    """
    b, s, h, d = q.shape
    n = -(-s // world)
    res: dict[str, float] = {}

    def timed(name, calls):
        res[name] = _time(lambda: [backend(*c, scale=scale, return_lse=lse) for *c, lse in calls], args, device)

    def groups(qq, kk, vv, g):
        bounds = [round(i * qq.shape[2] / g) for i in range(g + 1)]
        return [(qq[:, :, a:z].contiguous(), kk[:, :, a:z].contiguous(), vv[:, :, a:z].contiguous(), False)
                for a, z in zip(bounds, bounds[1:]) if z > a]

    q_n, k_n, v_n = (t[:, :n].contiguous() for t in (q, k, v))
    for lse in (True, False):
        timed(f"ring_block q{n} k{n} lse={int(lse)} x{world}", [(q_n, k_n, v_n, lse)] * world)
    timed(f"ring_2blocks q{n} k{2 * n} lse=1 x{world // 2}", [(q_n, k[:, : 2 * n], v[:, : 2 * n], True)] * (world // 2))
    for lse in (False, True):
        timed(f"all_keys q{n} k{s} lse={int(lse)}", [(q_n, k, v, lse)])
    timed(f"all_keys q{n} k{s} lse=0 5groups", groups(q_n, k, v, 5))
    hu = -(-h // world)
    qu, ku, vu = (t[:, :, :hu].contiguous() for t in (q, k, v))
    timed(f"ulysses q{s} k{s} h{hu}", [(qu, ku, vu, False)])
    for g in (2, 5, 10):
        if g <= hu:
            timed(f"ulysses q{s} k{s} h{hu} {g}groups", groups(qu, ku, vu, g))
    return {k: round(_slowest(v, device), 3) for k, v in res.items()}


# ---------------------------------------------------------------- yunchang
def _yunchang_record(args, key: str, yc_types) -> dict:
    """The kernel's yunchang record: why it is skipped (``--no-yunchang``, no matching type, does not import), or
    the attn types each mode times."""
    if args.no_yunchang:
        return {"skipped": "--no-yunchang"}
    if not yc_types:
        return {"skipped": f"no yunchang attention type matches kernel {key}"}
    try:
        import yunchang  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return {"skipped": f"yunchang does not import: {_err(e)}"}
    return {"attn_types": list(yc_types)}


def _yunchang_skip(yc: dict, s: int, h: int, world: int, u: int) -> str | None:
    """Why yunchang does not run a mode (``yc``: the kernel's yunchang record), or None."""
    if "skipped" in yc:
        return yc["skipped"]
    if s % world or h % u:
        return f"yunchang needs S % {world} == 0 and H % {u} == 0 (no padding)"
    return None


def _yunchang_single_fn(attn_type: str, q, k, v, scale) -> Callable:
    """yunchang's one-GPU kernel of ``attn_type`` on the full sequence."""
    from yunchang.kernels import AttnType, select_flash_attn_impl

    fn = select_flash_attn_impl(AttnType.from_string(attn_type), stage="fwd-only")
    return lambda: fn(q, k, v, dropout_p=0.0, softmax_scale=scale, causal=False)


def _yunchang_sp_fn(attn_type: str, u: int, r: int, env, q_l, k_l, v_l, scale) -> Callable:
    """yunchang's ``LongContextAttention`` (U = ``u``, R = ``r``) on the local shards (builds its groups: a collective)."""
    from yunchang import LongContextAttention, set_seq_parallel_pg
    from yunchang.kernels import AttnType

    set_seq_parallel_pg(u, r, env.rank, env.world_size, use_ulysses_low=True)
    try:
        attn = LongContextAttention(ring_impl_type="basic", attn_type=AttnType.from_string(attn_type))
    except TypeError:  # older yunchang: no attn_type argument
        attn = LongContextAttention(ring_impl_type="basic")
    return lambda: attn(q_l, k_l, v_l, dropout_p=0.0, softmax_scale=scale, causal=False)


def _yunchang_plan(mres: dict, yc_types, u, r, env, mesh, shard, qkv, qkv_l, scale, ref, device) -> list:
    """Per yunchang attn type, into ``mres["yunchang"][type]``: its one-GPU kernel (rank 0, prefix ``single_gpu_``)
    and its sequence-parallel call. A type whose setup fails on any rank records why and is not timed."""
    import yunchang

    plan = []
    for t in yc_types:
        res = mres["yunchang"][t] = {"version": getattr(yunchang, "__version__", "?"), "attn_type": t}
        ok, fn = _guarded(res, "single_gpu_error", lambda t=t: _yunchang_single_fn(t, *qkv, scale), device, env.rank)
        if ok:
            plan.append(_Timed(res, fn, prefix="single_gpu_", solo=True))
        ok, fn = _guarded(res, "error", lambda t=t: _yunchang_sp_fn(t, u, r, env, *qkv_l, scale), device, env.rank)
        if ok:
            plan.append(_Timed(res, fn, check=_compare(mesh, shard, ref, lambda out: out)))
    return plan


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


@dataclass
class _Timed:
    """One thing a mode's rounds time: ``fn``, its numbers into ``entry`` as ``<prefix>rounds_ms``, ``<prefix>ms``
    (their median) or ``<prefix>error``. ``solo``: a one-GPU baseline, timed on rank 0 alone. ``check(fn, entry)``:
    after the first round's timing (gather the output, compare it against one GPU)."""

    entry: dict
    fn: Callable
    prefix: str = ""
    solo: bool = False
    check: Callable | None = None

    @property
    def failed(self) -> bool:
        return self.prefix + "error" in self.entry


def _guarded(entry: dict, key: str, call: Callable, device, rank: int) -> tuple[bool, object]:
    """``(ok, call())``; an error on any rank is recorded as ``entry[key]`` on every rank (so all go on alike)."""
    ok, res = True, None
    try:
        res = call()
    except Exception as e:  # noqa: BLE001 - recorded, the other measurements go on
        entry[key], ok = _err(e), False
        if rank == 0:
            traceback.print_exc()
    if not _all_ok(ok, device):
        entry.setdefault(key, "failed on another rank")
        ok = False
    return ok, res


def _time_round(item: _Timed, args, device, rank: int, first: bool) -> None:
    """One round of ``item``: its time appended to its ``rounds_ms`` (slowest rank; a solo item's is rank 0's, the
    other ranks wait in the error agreement), then on the ``first`` round its check."""
    key = item.prefix + "error"
    ok, ms = _guarded(item.entry, key, lambda: _time(item.fn, args, device) if rank == 0 or not item.solo else 0.0,
                      device, rank)
    if not ok:
        return
    rounds = item.entry.setdefault(item.prefix + "rounds_ms", [])
    rounds.append(round(_slowest(ms, device), 3))
    item.entry[item.prefix + "ms"] = round(statistics.median(rounds), 3)
    if first and item.check is not None:
        _guarded(item.entry, key, lambda: item.check(item.fn, item.entry), device, rank)


def _run_rounds(plan: list[_Timed], args, device, rank: int, after_round: Callable) -> None:
    """Every item of ``plan`` once per round, ``--rounds`` rounds, the order reversed every other round; an item that
    failed (on any rank: all ranks agree) is skipped from then on. ``after_round()`` after each round."""
    for rnd in range(max(1, args.rounds)):
        for item in plan if rnd % 2 == 0 else plan[::-1]:
            if not item.failed:
                _time_round(item, args, device, rank, first=rnd == 0)
        after_round()


def _compare(mesh, shard, ref, output: Callable) -> Callable:
    """A check for :class:`_Timed`: one call, ``output(result)`` gathered over ``mesh``, its rel L2 vs ``ref``."""

    def check(fn, entry):
        out = gather_sequence(output(fn()), mesh, shard)
        if ref is not None:
            entry["rel_l2_vs_1gpu"] = rel_l2(out, ref)

    return check


def _speedups(mres: dict, target) -> None:
    """Each timed entry of a mode against the mode's one-GPU medians: ditfleet's against the kernel's
    (``speedup``), yunchang's against its own kernel's (``speedup_vs_own_1gpu``; the kernel's when that failed,
    said in ``speedup_base``); with ``target``, whether it is met."""
    base = mres["single_gpu"].get("ms")
    yc = mres.get("yunchang", {})
    entries = [(e, "speedup", base) for e in mres["ditfleet"].values()]
    entries += [(e, "speedup_vs_own_1gpu", e.get("single_gpu_ms") or base) for t, e in yc.items() if t != "skipped"]
    for e, name, b in entries:
        if "ms" not in e:
            continue
        e[name] = round(b / e["ms"], 3) if b else None
        if name != "speedup" and not e.get("single_gpu_ms"):
            e["speedup_base"] = "ditfleet's kernel, one GPU (yunchang's own failed)"
        if target is not None and b:
            e.update(target=target, target_met=bool(b / e["ms"] >= target))


def _ditfleet_plan(mres: dict, mode: str, u: int, r: int, meshes: MeshCache, backend, qkv_l, shard, scale, ref,
                   args, device) -> tuple[list, str]:
    """The mode's transports, each recorded in ``mres["ditfleet"]`` (skipped ones say why), and the default's name."""
    plan, default_name = [], None
    for name in args.transports:
        entry = mres["ditfleet"][name] = {"transport": name}
        if name == "copy_engine" and ce_unavailable(device):
            entry["skipped"] = ce_unavailable(device)
            continue
        try:
            vmesh = meshes.get(u, r, transport=name)
        except Exception as e:  # noqa: BLE001 - e.g. copy_engine refused at mesh build (a ConfigError naming why)
            entry["error"] = f"mesh with transport {name}: {_err(e)}"
            continue
        if vmesh.transport == meshes.get(u, r).transport and default_name is None:
            entry["is_default"], default_name = True, name

        def fn(vmesh=vmesh):
            return sequence_parallel_attention(*qkv_l, backend=backend, mesh=vmesh, shard=shard, scale=scale)

        plan.append(_Timed(entry, fn, check=_compare(vmesh, shard, ref, lambda out: out[0])))
    return plan, default_name or "auto (not timed)"


def main(args) -> int:
    """Entry point under torchrun: set up the process group, run the suite, tear it down."""
    env = init_distributed(timeout_s=900)
    rc = run(args, env)
    dist.barrier()
    dist.destroy_process_group()
    return rc


def run(args, env) -> int:
    """The suite on an initialised process group (``env``: :class:`~ditfleet.parallel.DistEnv`)."""
    t_start = time.perf_counter()
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
            report["elapsed_s"] = round(time.perf_counter() - t_start, 1)
            write_json(out_path, report)

    meshes = MeshCache()

    for key, cls in runnable.items():
        backend = cls(device=device, dtype=dtype)
        kres = report["kernels"][key] = {"description": cls.description, "modes": {}}
        ref = None
        if rank == 0:
            ref = backend(q, k, v, scale=scale)[0]
            kres["single_gpu_ms"] = round(_time(lambda: backend(q, k, v, scale=scale), args, device), 3)
        kres["single_gpu_ms_is"] = START_OF_RUN
        yc_types = args.yunchang_attn_types or YUNCHANG_TYPES.get(key)
        kres["yunchang"] = yc = _yunchang_record(args, key, yc_types)
        dist.barrier()
        if not args.no_diagnostics:
            try:
                kres["diagnostics_ms"] = _diagnostics(backend, q, k, v, world, scale, args, device)
            except Exception as e:  # noqa: BLE001
                kres["diagnostics_error"] = _err(e)
            save()
        for mode in args.modes:
            sizes = _mode_sizes(mode, world)
            if isinstance(sizes, str):
                kres["modes"][mode] = {"skipped": sizes}
                continue
            u, r = sizes
            mres = kres["modes"][mode] = {"ulysses": u, "ring": r, "single_gpu": {}, "ditfleet": {}}
            target = TARGETS_4GPU.get(mode) if world == 4 else None
            mesh = meshes.get(u, r)
            q_l, shard = shard_sequence(q, mesh)
            k_l, _ = shard_sequence(k, mesh)
            v_l, _ = shard_sequence(v, mesh)
            plan = [_Timed(mres["single_gpu"], lambda backend=backend: backend(q, k, v, scale=scale), solo=True)]
            ours, default_name = _ditfleet_plan(mres, mode, u, r, meshes, backend, (q_l, k_l, v_l), shard, scale, ref,
                                                args, device)
            plan += ours
            why = _yunchang_skip(yc, s, h, world, u)
            mres["yunchang"] = {"skipped": why} if why else {}
            if not why:  # a yunchang failure is recorded in its entry and never loses ditfleet's numbers
                plan += _yunchang_plan(mres, yc_types, u, r, env, mesh, shard, (q, k, v), (q_l, k_l, v_l), scale, ref,
                                       device)

            def after_round(mres=mres, target=target):
                _speedups(mres, target)
                save()

            _run_rounds(plan, args, device, rank, after_round)
            del plan, ours
            timed = {n: e for n, e in mres["ditfleet"].items() if "ms" in e and "error" not in e}
            if timed:
                best = min(timed, key=lambda n: timed[n]["ms"])
                mres["best"] = {"variant": best, "ms": timed[best]["ms"], "speedup": timed[best].get("speedup")}
            mres["default_variant"] = default_name
            try:
                mres["breakdown_ms"] = _breakdown(mesh, backend, q_l, k_l, v_l, shard, scale, args, device)
            except Exception as e:  # noqa: BLE001
                mres["breakdown_error"] = _err(e)
                if rank == 0:
                    traceback.print_exc()
            save()
            del q_l, k_l, v_l
        if device.type == "cuda":
            torch.cuda.empty_cache()
    save()
    if rank == 0:
        _print_table(report, world, out_path)
    return 0


def _row(key: str, mode: str, name: str, e: dict, prefix: str = "", speedup: str | None = "speedup") -> tuple:
    """A table row of one timed entry: its ``<prefix>ms`` and the speedup under key ``speedup`` (None: a one-GPU
    baseline, 1.00)."""
    if prefix + "ms" not in e:
        return key, mode, name, (e.get(prefix + "error") or e.get("skipped") or "?")[:60], "", "", ""
    if speedup is None:
        sp = "1.00"
    else:
        sp = f"{e[speedup]:.2f}" if e.get(speedup) else ""
        sp += " (vs kernel)" if sp and "speedup_base" in e else ""
    tgt = "" if e.get("target") is None or prefix else f">={e['target']} {'ok' if e['target_met'] else 'MISSED'}"
    err = None if prefix else e.get("rel_l2_vs_1gpu")
    return key, mode, name, f"{e[prefix + 'ms']:.2f}", sp, f"{err:.1e}" if err is not None else "", tgt


def _mode_rows(key: str, mode: str, mres: dict) -> list[tuple]:
    """A mode's rows: its one-GPU median, every variant, yunchang's one-GPU median and run per type, the breakdown."""
    best = mres.get("best", {}).get("variant")
    rows = [_row(key, mode, "1 GPU kernel", mres.get("single_gpu", {}), speedup=None)]
    rows += [_row(key, mode, ("* " if e.get("is_default") else "") + f"ditfleet {i}" + ("  <==" if i == best else ""), e)
             for i, e in mres["ditfleet"].items()]
    yc = mres.get("yunchang", {})
    if "skipped" in yc:
        rows.append((key, mode, "yunchang", yc["skipped"][:60], "", "", ""))
    for t, e in yc.items() if "skipped" not in yc else []:
        rows += [_row(key, mode, f"yunchang {t} 1 GPU", e, prefix="single_gpu_", speedup=None),
                 _row(key, mode, f"yunchang {t}", e, speedup="speedup_vs_own_1gpu")]
    if "breakdown_ms" in mres:
        rows.append((key, mode, "breakdown", ", ".join(f"{k} {v:.2f}" for k, v in mres["breakdown_ms"].items()), "", "", ""))
    return rows


def _print_table(report: dict, world: int, path: Path) -> None:
    env, shape = report["environment"], report["shape"]
    print(f"sp-attention on {world} x {env['card']}: S={shape['seq_len']} H={shape['heads']} D={shape['head_dim']} "
          f"{shape['dtype']}  (median ms, slowest rank; speedups vs the mode's 1 GPU rows, timed in the same rounds; "
          "* = code default, <== fastest of the mode)")
    rows = [("kernel", "mode", "impl", "ms", "speedup", "rel L2", "target")]
    winners = []
    for key, kres in report["kernels"].items():
        if "skipped" in kres:
            rows.append((key, "-", "skipped", "; ".join(kres["skipped"])[:60], "", "", ""))
            continue
        rows.append((key, "1 GPU", "kernel, start of run", f"{kres.get('single_gpu_ms', float('nan')):.2f}", "", "", ""))
        for mode, mres in kres["modes"].items():
            if "skipped" in mres:
                rows.append((key, mode, "skipped", mres["skipped"][:60], "", "", ""))
                continue
            rows += _mode_rows(key, mode, mres)
            best = mres.get("best", {}).get("variant")
            if best:
                e = mres["ditfleet"][best]
                winners.append(f"{key} {mode}: {best} {e['ms']:.2f} ms ({e.get('speedup') or 0:.2f}x"
                               + (f", target {e['target']} {'ok' if e['target_met'] else 'MISSED'}" if e.get("target") else "")
                               + f"); default is {mres.get('default_variant')}")
        if "diagnostics_ms" in kres:
            for name, ms in kres["diagnostics_ms"].items():
                rows.append((key, "diag", name, f"{ms:.2f}", "", "", ""))
    widths = [min(44, max(len(str(row[i])) for row in rows)) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    print("winners:")
    for line in winners:
        print("  " + line)
    print(f"wrote {path} ({report.get('elapsed_s', '?')} s)")


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m ditfleet.bench.sp_attention")
    add_arguments(_parser)
    raise SystemExit(main(_parser.parse_args()))
