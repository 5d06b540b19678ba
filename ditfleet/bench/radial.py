"""``ditfleet bench radial``: radial (block-sparse) attention vs dense cuDNN at Wan2.1 video sizes.

Cases (latent frames x tokens per frame): ``480p81`` = 21 x 1560 (32,760 tokens), ``720p81`` =
21 x 3600 (75,600), ``720p241`` = 61 x 3600 (219,600; run with 10 heads by default, one
Ulysses-4 rank's share of Wan-14B's 40), or any ``FxT``. For each case it records the mask's
density and build time, the dense baseline (``sdpa_cudnn``; the first torch SDPA kernel that
runs on CPU), and for every radial kernel that runs here (``radial_flex``, ``radial_fa4``): the
first-call time (compile + mask conversion), the median forward time (LSE requested, as ring
attention calls it, for the dense baseline too), the speedup over dense, and the accuracy on ``--ref-rows``
sampled query rows against an fp32 reference that applies the same token-level mask to those
rows only (no ``S x S`` tensor anywhere). Output: JSON under ``benchmarks/results/`` and a table.

Sequence-parallel part (``--sp``), under torchrun, one process per GPU::

    torchrun --nproc-per-node 4 -m ditfleet bench radial --sp ring usp

For each case (all with ``--heads`` or 40 heads: 720p241 is the whole of Wan-14B's 40 heads over 4
GPUs) and mode (``ring``: R = N; ``usp``: U = 2, R = N / 2; ``ulysses``: U = N), it times
``sequence_parallel_attention`` with the dense baseline kernel and with each radial kernel (default:
the best one that runs, ``radial_fa4`` else ``radial_flex``) given the global mask (median of the
slowest rank; first call = compile), the speedup radial / dense in the same mode, the ring schedule
(kernel steps and K/V transfers run / skipped) and the accuracy of the gathered output on sampled rows
against the fp32 masked reference. Rank 0 writes ``radial_sp_<card>_<n>gpu.json`` after every mode.
"""

from __future__ import annotations

import argparse
import functools
import re
import time
from pathlib import Path

import torch

from ..attention.blockmask import BlockSparseMask, allowed_tokens
from ..attention.radial import RadialFA4, RadialFlex, radial_block_mask
from ..errors import UserError
from .attention import _exact_fp32, _free, card_slug, make_inputs, sample_rows, time_cpu
from .common import dense_sdpa_kernel, environment, rel_l2, select_device, time_cuda, write_json
from .sp_attention import _sync, sp_timed

SP_MODES = ("ring", "usp", "ulysses")
SP_KERNEL_PREFERENCE = ("radial_fa4", "radial_flex")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CASES = {"480p81": (21, 1560), "720p81": (21, 3600), "720p241": (61, 3600)}
LONG_CASE_HEADS = {"720p241": 10}  # one Ulysses-4 rank of Wan-14B's 40 heads
KERNELS = {"radial_flex": RadialFlex, "radial_fa4": RadialFA4}
TARGETS = {"720p81": "radial >= 3x faster than cuDNN dense (decay 0.2)", "720p241": ">= 5.5x"}
REF_SCORE_BUDGET = 1 << 28  # fp32 scores per reference chunk (1 GiB)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the suite's options on ``parser`` (the ``ditfleet bench radial`` subparser)."""
    parser.add_argument("--cases", nargs="+", default=list(CASES), metavar="CASE",
                        help=f"{', '.join(CASES)} or FxT (latent frames x tokens per frame) (default: all three)")
    parser.add_argument("--heads", type=int, default=None,
                        help="attention heads for every case (default: 40; 10 for 720p241, one Ulysses-4 rank)")
    parser.add_argument("--head-dim", type=int, default=128, help="head dim D (default: %(default)s)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="q/k/v dtype (default: %(default)s)")
    parser.add_argument("--decay-factor", type=float, default=0.2, help="radial decay factor (default: %(default)s)")
    parser.add_argument("--block-size", type=int, default=128, help="radial mask block size (default: %(default)s)")
    parser.add_argument("--kernels", nargs="+", default=None, metavar="KEY",
                        help=f"radial kernels to run (default: every available one of {', '.join(KERNELS)})")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per kernel after the first (default: %(default)s)")
    parser.add_argument("--iters", type=int, default=5, help="timed calls per kernel (default: %(default)s)")
    parser.add_argument("--ref-rows", type=int, default=256, help="query rows checked against fp32 (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of inputs and sampled rows (default: %(default)s)")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/radial_<card-slug>.json; "
                        "with --sp radial_sp_<card-slug>_<n>gpu.json)")
    parser.add_argument("--sp", nargs="+", default=None, choices=SP_MODES, metavar="MODE",
                        help="under torchrun: time radial vs dense sequence-parallel in these modes (ring: R = N, "
                             "usp: U = 2 x R = N/2, ulysses: U = N) instead of the one-device run; every case then "
                             "runs with --heads or 40 heads, and --kernels defaults to the best radial kernel")
    parser.add_argument("--transport", choices=("auto", "nccl", "copy_engine"), default="auto",
                        help="--sp: parallel.transport of the meshes (default: %(default)s)")


def parse_case(name: str) -> tuple[int, int]:
    """``(latent frames, tokens per frame)`` of a case name (``720p81``) or ``FxT`` (``21x3600``)."""
    if name in CASES:
        return CASES[name]
    m = re.fullmatch(r"(\d+)x(\d+)", name)
    if not m or min(int(m[1]), int(m[2])) < 1:
        raise UserError(f"--cases: {name!r} is neither one of {', '.join(CASES)} nor FxT (e.g. 21x3600)")
    return int(m[1]), int(m[2])


def masked_reference_rows(q, k, v, rows: torch.Tensor, mask: BlockSparseMask, scale: float):
    """Exact fp32 attention of query ``rows`` (int64 ``[R]``) over the keys ``mask`` allows.

    Returns ``(out float32 [B, R, H, D], lse float32 [B, H, R])``; only ``[B, H, r, S]`` scores per chunk.
    """
    b, s, h, _ = k.shape
    chunk = max(1, min(1024, REF_SCORE_BUDGET // (b * h * s)))
    params = mask.token_params(q.device)
    keys = torch.arange(s, device=q.device)[None, :]
    kt, vv = k.transpose(1, 2).float(), v.transpose(1, 2).float()
    outs, lses = [], []
    with _exact_fp32(), torch.no_grad():
        for i in range(0, rows.numel(), chunk):
            r = rows[i : i + chunk]
            sc = torch.matmul(q[:, r].transpose(1, 2).float(), kt.transpose(-1, -2)) * scale
            sc = sc.masked_fill(~allowed_tokens(r[:, None], keys, **params), float("-inf"))
            lse = torch.logsumexp(sc, -1)
            outs.append(torch.matmul(torch.exp(sc - lse[..., None]), vv).transpose(1, 2))
            lses.append(lse)
    return torch.cat(outs, 1), torch.cat(lses, -1)


def _timer(device):
    return time_cuda if device.type == "cuda" else time_cpu


def run_case(name, frames, tpf, heads, args, device, dtype, kernels) -> dict:
    """Measure one case; returns its JSON record."""
    t0 = time.perf_counter()
    mask = radial_block_mask(frames, tpf, args.decay_factor, args.block_size)
    rec = {"case": name, "frames": frames, "tokens_per_frame": tpf, "tokens": frames * tpf, "heads": heads,
           "head_dim": args.head_dim, "density": mask.density, "block_density": float(mask.blocks.float().mean()),
           "mask_build_s": time.perf_counter() - t0}
    s, d = frames * tpf, args.head_dim
    scale = d ** -0.5
    q, k, v = make_inputs(1, s, heads, d, dtype, device, args.seed)
    rows = sample_rows(s, args.ref_rows, args.seed, device)
    ref_out, ref_lse = masked_reference_rows(q, k, v, rows, mask, scale)
    timer = _timer(device)

    dense_key, dense_cls = dense_sdpa_kernel(device, dtype)
    dense = dense_cls(device=device, dtype=dtype)
    with torch.no_grad():
        rec["dense"] = {"kernel": dense_key,
                        **timer(lambda: dense(q, k, v, return_lse=True), warmup=args.warmup, iters=args.iters)}
    _free(device)
    print(f"[bench radial] {name}: S={s:,} H={heads} density {rec['density']:.3f}; "
          f"{dense_key} dense {rec['dense']['median_ms']:.2f} ms", flush=True)

    rec["kernels"] = {}
    for key, cls in kernels.items():
        r: dict = {"description": cls.description}
        try:
            backend = cls(device=device, dtype=dtype)
            with torch.no_grad():
                t1 = time.perf_counter()
                out, lse = backend(q, k, v, block_mask=mask, return_lse=True)
                _sync(device)
                r["first_call_s"] = time.perf_counter() - t1
                r["finite"] = bool(torch.isfinite(out).all())
                r["rel_l2"] = rel_l2(out[:, rows], ref_out)
                r["lse_max_abs_err"] = float((lse[:, :, rows].double() - ref_lse.double()).abs().max())
                del out, lse
                r.update(timer(lambda: backend(q, k, v, block_mask=mask, return_lse=True),
                               warmup=args.warmup, iters=args.iters))
            r["speedup"] = rec["dense"]["median_ms"] / r["median_ms"]
            r["status"] = "ok"
            print(f"[bench radial] {name}: {key} {r['median_ms']:.2f} ms ({r['speedup']:.2f}x dense), "
                  f"first call {r['first_call_s']:.1f} s, rel L2 {r['rel_l2']:.2e}", flush=True)
        except Exception as e:  # noqa: BLE001 - one failing kernel must not stop the others
            r.update(status="error", error=f"{type(e).__name__}: {e}"[:2000])
            print(f"[bench radial] {name}: {key} failed: {r['error'].splitlines()[0][:200]}", flush=True)
        rec["kernels"][key] = r
        _free(device)
    return rec  # q, k, v go with this frame; the caller frees the cache before the next case


def format_results(results: list[dict]) -> str:
    lines = [f"{'case':10s} {'tokens':>8s} {'H':>3s} {'density':>7s} {'dense ms':>9s}  kernel        ms      speedup  rel L2"]
    for c in results:
        head = f"{c['case']:10s} {c['tokens']:8d} {c['heads']:3d} {c['density']:7.3f} {c['dense']['median_ms']:9.2f}"
        for key, r in c["kernels"].items():
            tail = (f"{r['median_ms']:9.2f}  {r['speedup']:6.2f}x  {r['rel_l2']:.1e}" if r["status"] == "ok"
                    else "failed: " + r["error"].splitlines()[0][:50])
            lines.append(f"{head}  {key:12s} {tail}")
            head = " " * len(head)
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """Run the suite; write the JSON and print the table. Returns 0 if any radial kernel ran, else 1."""
    for name in ("head_dim", "iters", "ref_rows", "block_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.heads is not None and args.heads < 1:
        raise UserError(f"--heads must be >= 1, got {args.heads}")
    if args.warmup < 0 or not args.decay_factor > 0:
        raise UserError("--warmup must be >= 0 and --decay-factor > 0")
    cases = [(c, *parse_case(c)) for c in args.cases]
    unknown = [k for k in args.kernels or [] if k not in KERNELS]
    if unknown:
        raise UserError(f"--kernels: unknown {', '.join(unknown)}; known: {', '.join(KERNELS)}")
    if getattr(args, "sp", None):
        return main_sp(args, cases)
    device = select_device(args.device)
    dtype = DTYPES[args.dtype]
    env = environment()
    env["device"] = str(device)
    out_path = Path(args.out or f"benchmarks/results/radial_{card_slug(env['card'])}.json")

    kernels, unavailable = {}, {}
    for key in args.kernels or KERNELS:
        reasons = KERNELS[key].unavailable_reasons(device, dtype)
        if reasons:
            unavailable[key] = reasons
            print(f"[bench radial] {key}: unavailable ({'; '.join(reasons)})")
        else:
            kernels[key] = KERNELS[key]

    results = []
    for name, frames, tpf in cases:
        heads = args.heads or LONG_CASE_HEADS.get(name, 40)
        if device.type == "cpu" and frames * tpf > 8192:
            print(f"[bench radial] warning: {frames * tpf} tokens on CPU will be very slow")
        results.append(run_case(name, frames, tpf, heads, args, device, dtype, kernels))
        _free(device)

    payload = {
        "suite": "radial",
        "environment": env,
        "config": {
            "device": str(device), "dtype": args.dtype, "batch": 1, "head_dim": args.head_dim,
            "decay_factor": args.decay_factor, "block_size": args.block_size, "cases": args.cases,
            "heads": args.heads or "40; 10 for 720p241 (one Ulysses-4 rank)", "warmup": args.warmup,
            "iters": args.iters, "ref_rows": args.ref_rows, "seed": args.seed,
            "timed_call": "forward(q, k, v[, block_mask], return_lse=True) (as ring attention calls it; one "
                          "compiled graph per case); first_call_s includes compile and mask conversion",
            "reference": "fp32, sampled query rows, same token-level mask",
            "density": "allowed token pairs / S^2 (token level)",
            "scope": "one device; ring / usp measurements come with the sequence-parallel composition",
        },
        "targets": TARGETS,
        "unavailable": unavailable,
        "results": results,
    }
    write_json(out_path, payload)
    print(format_results(results))
    print(f"[bench radial] wrote {out_path}")
    return 0 if any(r["status"] == "ok" for c in results for r in c["kernels"].values()) else 1


# ---------------------------------------------------------------- sequence parallel (--sp, under torchrun)
def main_sp(args: argparse.Namespace, cases: list[tuple[str, int, int]]) -> int:
    """``--sp``: set up the process group (torchrun's environment), run :func:`run_sp`, tear it down."""
    import torch.distributed as dist

    from ..parallel import init_distributed

    env = init_distributed(timeout_s=900)
    try:
        return run_sp(args, cases, env)
    finally:
        dist.barrier()
        dist.destroy_process_group()


def _sp_kernels(args, device, dtype) -> tuple[dict, dict]:
    """The radial kernels of the SP run: ``--kernels``, else the first of :data:`SP_KERNEL_PREFERENCE` that runs."""
    runnable, unavailable = {}, {}
    for key in args.kernels or SP_KERNEL_PREFERENCE:
        reasons = KERNELS[key].unavailable_reasons(device, dtype)
        if reasons:
            unavailable[key] = reasons
        elif args.kernels or not runnable:
            runnable[key] = KERNELS[key]
    return runnable, unavailable


def run_sp(args: argparse.Namespace, cases: list[tuple[str, int, int]], env) -> int:
    """Radial vs dense under sequence parallelism on an initialised process group; returns 0 if a radial kernel ran."""
    import torch.distributed as dist

    from ..parallel import SeqShard, gather_sequence, sequence_parallel_attention, shard_sequence, sp_schedule
    from ..parallel.shard import tile_align
    from .sp_attention import MeshCache, _all_ok, _err, _mode_sizes, _slowest, _time

    device, rank, world = env.device, env.rank, env.world_size
    dtype = DTYPES[args.dtype]
    kernels, unavailable = _sp_kernels(args, device, dtype)
    dense_key, dense_cls = dense_sdpa_kernel(device, dtype)
    dense = dense_cls(device=device, dtype=dtype)
    t_start = time.perf_counter()
    report = {"suite": "radial-sp", "environment": {**environment(world), "device": str(device)},
              "config": {"dtype": args.dtype, "batch": 1, "head_dim": args.head_dim, "decay_factor": args.decay_factor,
                         "block_size": args.block_size, "modes": args.sp, "transport": args.transport,
                         "warmup": args.warmup, "iters": args.iters, "ref_rows": args.ref_rows, "seed": args.seed,
                         "dense_kernel": dense_key,
                         "timed_call": "sequence_parallel_attention(q, k, v[, block_mask]) on the local shards; median "
                                       "of the slowest rank; first_call_s includes compile and mask conversion",
                         "schedule": "ring steps (kernel calls) and K/V transfers over the whole ring, run / skipped"},
              "targets": TARGETS, "unavailable": unavailable, "results": []}
    out_path = Path(args.out or f"benchmarks/results/radial_sp_{card_slug(report['environment']['card'])}_{world}gpu.json")

    def save():
        if rank == 0:
            report["elapsed_s"] = round(time.perf_counter() - t_start, 1)
            write_json(out_path, report)

    meshes = MeshCache()
    ok_any = False
    for name, frames, tpf in cases:
        heads, s, d = args.heads or 40, frames * tpf, args.head_dim
        scale = d ** -0.5
        mask = radial_block_mask(frames, tpf, args.decay_factor, args.block_size)
        rec = {"case": name, "frames": frames, "tokens_per_frame": tpf, "tokens": s, "heads": heads, "head_dim": d,
               "density": mask.density, "modes": {}}
        report["results"].append(rec)
        q, k, v = make_inputs(1, s, heads, d, dtype, device, args.seed)
        for t in (q, k, v):  # identical inputs everywhere, whatever the RNG of each card does
            dist.broadcast(t, src=0)
        rows = sample_rows(s, args.ref_rows, args.seed, device)
        ref = masked_reference_rows(q, k, v, rows, mask, scale) if rank == 0 else None
        for mode in args.sp:
            sizes = _mode_sizes(mode, world)
            if isinstance(sizes, str):
                rec["modes"][mode] = {"skipped": sizes}
                continue
            u, r = sizes
            mesh = meshes.get(u, r, transport=args.transport)
            local = [shard_sequence(t, mesh)[0] for t in (q, k, v)]
            shard = SeqShard.for_length(s, mesh)
            m = rec["modes"][mode] = {"ulysses": u, "ring": r}
            if r > 1:
                m["schedule"] = sp_schedule(mask, shard.chunk, shard.chunk, u, r).stats()

            def call(backend, block_mask):
                return sequence_parallel_attention(*local, backend=backend, mesh=mesh, shard=shard, scale=scale, block_mask=block_mask)

            with torch.no_grad():
                try:
                    m["dense"] = {"kernel": dense_key, "ms": round(_slowest(_time(lambda: call(dense, None), args, device),
                                                                            device), 3)}
                except Exception as e:  # noqa: BLE001 - recorded; the radial kernels still run
                    m["dense"] = {"kernel": dense_key, "error": _err(e)}
                _all_ok(True, device)
                for key, cls in kernels.items():
                    kr = m.setdefault("kernels", {})[key] = {"description": cls.description}
                    built = functools.cache(lambda cls=cls: cls(device=device, dtype=dtype))  # in the first, guarded call

                    @functools.cache
                    def layout(built=built, mesh=mesh):
                        """The shards a model gives this kernel: chunks aligned to its tiles under a ring (as SeqParallel)."""
                        align = tile_align(mesh, [built()])
                        return [shard_sequence(t, mesh, align=align)[0] for t in (q, k, v)], \
                            SeqShard.for_length(s, mesh, align=align), align

                    def run_kernel(built=built, layout=layout, mesh=mesh):
                        loc, sh, _ = layout()
                        return sequence_parallel_attention(*loc, backend=built(), mesh=mesh, shard=sh, scale=scale,
                                                           block_mask=mask)

                    def check(res, kr=kr, mesh=mesh, layout=layout):
                        _, sh, align = layout()
                        kr["align"], kr["chunk"] = align, sh.chunk
                        full = gather_sequence(res[0], mesh, sh)
                        if ref is not None:
                            kr["rel_l2"] = rel_l2(full[:, rows], ref[0])
                            kr["finite"] = bool(torch.isfinite(full).all())

                    if sp_timed(kr, run_kernel, args, device, on_first=check) and "ms" in m["dense"]:
                        kr["speedup"] = round(m["dense"]["ms"] / kr["ms"], 3)
                    ok_any |= "ms" in kr
                    if rank == 0:
                        print(f"[bench radial --sp] {name} {mode} (U{u} x R{r}): {dense_key} "
                              f"{m['dense'].get('ms', float('nan')):.2f} ms, {key} {kr.get('ms', float('nan')):.2f} ms "
                              f"({kr.get('speedup', 0):.2f}x), first call {kr.get('first_call_s', float('nan')):.1f} s, "
                              f"rel L2 {kr.get('rel_l2', float('nan')):.1e}, schedule {m.get('schedule')}"
                              + (f", error {kr['error']}" if "error" in kr else ""), flush=True)
                    _free(device)
            local.clear()
            save()
        del q, k, v
        _free(device)
    save()
    if rank == 0:
        print(f"[bench radial --sp] wrote {out_path} ({report['elapsed_s']} s)")
    return 0 if ok_any else 1
