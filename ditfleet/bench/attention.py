"""``ditfleet bench attention``: each attention kernel at Wan2.1 sequence lengths.

For every requested kernel and sequence length S it measures the median time of one dense
self-attention forward (``[B, S, H, D]`` q, k, v; no LSE requested; a quantising kernel's
quantisation passes are part of the call), the TFLOP/s that implies (``4 * B * H * S^2 * D``
FLOPs; "TOPS-equivalent" for INT8/FP8 kernels), the relative L2 and L1 errors and the cosine
similarity of the output against an fp32 reference and, for kernels that return it, the largest
absolute LSE error. The fp32 reference is exact
(every key), but only for ``--ref-rows`` query rows drawn at fixed random positions: a full
fp32 reference at 75,600 tokens x 40 heads would cost more than all the kernels together.

Every kernel sees the same inputs (fixed seed; ``--inputs randn``: N(0, 1) in the benchmark dtype,
``--inputs video``: keys with a large shared mean and outlier channels, see :func:`make_inputs`). A kernel
that raises is recorded with its error and the others still run. Output: JSON (environment,
config, per-type resolution, results) plus a PNG bar chart next to it when matplotlib is
installed, and a table on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import math
import re
import statistics
import time
from pathlib import Path

import torch

from ..attention import attention_flops, reference_attention
from ..attention import registry
from ..errors import UserError
from .common import environment, select_device, time_cuda, write_json

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_SEQ_LENS = (32760, 75600)  # Wan2.1 14B 480p / 720p, 81 frames
REF_SCORE_BUDGET = 1 << 28  # fp32 scores per reference chunk (1 GiB)
GIB = float(1 << 30)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the suite's options on ``parser`` (the ``ditfleet bench attention`` subparser)."""
    parser.add_argument("--seq-lens", type=int, nargs="+", default=list(DEFAULT_SEQ_LENS), metavar="S",
                        help="sequence lengths (self-attention, S_q = S_k) (default: %(default)s)")
    parser.add_argument("--heads", type=int, default=40, help="attention heads H (default: %(default)s)")
    parser.add_argument("--head-dim", type=int, default=128, help="head dim D (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=1, help="batch B (default: %(default)s)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="q/k/v dtype (default: %(default)s)")
    parser.add_argument("--kernels", nargs="+", default=None, metavar="KEY",
                        help="kernel keys to run (default: every available dense kernel; radial kernels: ditfleet bench radial)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per kernel (default: %(default)s)")
    parser.add_argument("--iters", type=int, default=10, help="timed calls per kernel (default: %(default)s)")
    parser.add_argument("--ref-rows", type=int, default=1024,
                        help="query rows, at fixed random positions, checked against the exact fp32 reference "
                             "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the inputs and the sampled rows (default: %(default)s)")
    parser.add_argument("--inputs", choices=INPUT_KINDS, default="randn",
                        help="input statistics: randn = N(0, 1); video = shared key mean + outlier channels "
                             "(default: %(default)s)")
    parser.add_argument("--device", default=None,
                        help="cuda, cuda:N or cpu (default: cuda if available, else cpu; on cpu pass small sizes)")
    parser.add_argument("--out", default=None,
                        help="JSON path (default: benchmarks/results/attention_<card-slug>.json); the PNG goes next to it")


def card_slug(name: str) -> str:
    """Short file-name form of a card name: ``"NVIDIA H100 80GB HBM3"`` -> ``"h100"``, ``"cpu"`` -> ``"cpu"``."""
    words = re.sub(r"[^a-z0-9]+", " ", name.lower()).split()
    words = [w for w in words if w not in ("nvidia", "geforce", "tesla")]
    for w in words:  # first model-like token: h100, a100, l40s, b200, gh200, ...
        if re.fullmatch(r"[a-z]{1,3}\d{2,4}[a-z]?", w):
            return w
    return "-".join(words) or "unknown"


def kernel_availability(keys: list[str], device: torch.device, dtype: torch.dtype, head_dim: int):
    """Split kernel keys into runnable classes and reasons for the rest.

    Returns:
        ``(runnable, unavailable)``: ``{key: backend class}`` in ``keys`` order, and
        ``{key: [reason, ...]}`` (a failed import of the kernel's module is a reason too).
    """
    runnable, unavailable = {}, {}
    for key in keys:
        try:
            cls = registry.kernel_class(key)
        except Exception as e:  # noqa: BLE001 - a broken optional module is a reason, not a crash
            unavailable[key] = [f"cannot import {registry.KERNELS[key].split(':')[0]}: {type(e).__name__}: {e}"]
            continue
        reasons = list(cls.unavailable_reasons(device, dtype))
        if head_dim > cls.caps.max_head_dim:
            reasons.append(f"head dim {head_dim} > supported {cls.caps.max_head_dim}")
        if reasons:
            unavailable[key] = reasons
        else:
            runnable[key] = cls
    return runnable, unavailable


def resolve_types(device: torch.device, dtype: torch.dtype) -> dict[str, dict]:
    """Which kernel each user-facing type of ``registry.ATTN_TYPES`` resolves to for self-attention here.

    Returns:
        ``{type: Resolution.as_dict()}``, or ``{type: {"error": message}}`` where none can run.
    """
    types = {}
    level = registry.log.level
    registry.log.setLevel(logging.ERROR)  # fallbacks are recorded here, not warned about
    try:
        for name in registry.ATTN_TYPES:
            try:
                res = registry.resolve(name, site="self_attn_1_type", device=device, dtype=dtype, strict=False)
                types[name] = res.as_dict()
            except Exception as e:  # noqa: BLE001 - recorded in the report
                types[name] = {"error": f"{type(e).__name__}: {e}"}
    finally:
        registry.log.setLevel(level)
    return types


INPUT_KINDS = ("randn", "video")


def make_inputs(b: int, s: int, h: int, d: int, dtype: torch.dtype, device: torch.device, seed: int,
                kind: str = "randn"):
    """q, k, v, each ``[b, s, h, d]`` in ``dtype`` on ``device``; same seed and kind -> same tensors.

    ``kind="randn"``: independent N(0, 1). ``kind="video"``: the statistics that make quantised attention
    hard in video DiTs: keys share a large per-(head, channel) mean (N(0, 4^2), the same for every token),
    ``max(1, d // 32)`` outlier channels are 4x larger in q and k (peaky scores), and values share a
    per-(head, channel) mean N(0, 1).
    """
    if kind not in INPUT_KINDS:
        raise ValueError(f"unknown input kind {kind!r}; known: {', '.join(INPUT_KINDS)}")
    g = torch.Generator(device=device).manual_seed(seed)
    if kind == "randn":
        return tuple(torch.randn(b, s, h, d, generator=g, device=device, dtype=dtype) for _ in range(3))
    q, k, v = (torch.randn(b, s, h, d, generator=g, device=device) for _ in range(3))
    n_out = max(1, d // 32)
    q[..., :n_out] *= 4
    k[..., :n_out] *= 4
    k += 4 * torch.randn(h, d, generator=g, device=device)
    v += torch.randn(h, d, generator=g, device=device)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def sample_rows(s: int, n: int, seed: int, device: torch.device) -> torch.Tensor:
    """``min(n, s)`` distinct, sorted query positions in ``[0, s)``: int64 ``[R]`` on ``device``."""
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randperm(s, generator=g)[: min(n, s)].sort().values.to(device)


@contextlib.contextmanager
def _exact_fp32():
    """No TF32 in float32 matmuls (the reference must be fp32, not 10-bit mantissa)."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def reference_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor):
    """Exact fp32 attention of the query rows ``rows`` over all keys.

    Args:
        q, k, v: ``[B, S, H, D]`` (any float dtype; upcast to float32).
        rows: int64 ``[R]`` query positions.

    Returns:
        ``(out, lse)``: float32 ``[B, R, H, D]`` and float32 ``[B, H, R]``.
    """
    b, s, h, _ = k.shape
    chunk = max(1, min(4096, REF_SCORE_BUDGET // (b * h * s)))
    with _exact_fp32(), torch.no_grad():
        return reference_attention(q[:, rows], k, v, dtype=torch.float32, chunk=chunk)


def time_cpu(fn, *, warmup: int = 3, iters: int = 10) -> dict:
    """Wall-clock timing with ``time.perf_counter``; same keys as :func:`~ditfleet.bench.common.time_cuda`."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "iters": iters, "times_ms": times}


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _free(device: torch.device) -> None:
    """Drop garbage and cached CUDA blocks between kernels (a sticky CUDA error is left to the next kernel)."""
    gc.collect()
    if device.type == "cuda":
        with contextlib.suppress(RuntimeError):
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()


def bench_kernel(cls, q, k, v, rows, ref_out, ref_lse, *, warmup: int, iters: int) -> dict:
    """Accuracy on the sampled rows, then timing, of one kernel class on ``q, k, v`` (``[B, S, H, D]``).

    ``ref_out`` (float32 ``[B, R, H, D]``) and ``ref_lse`` (float32 ``[B, H, R]``) are the reference at
    ``rows``. Returns the result record; exceptions propagate (the caller records them).
    """
    device = q.device
    backend = cls(device=device, dtype=q.dtype)
    rec: dict = {"checked_rows": int(rows.numel())}
    with torch.no_grad():
        out, lse = backend(q, k, v, return_lse=cls.caps.lse)
        rec["finite"] = bool(torch.isfinite(out).all())
        rec.update(output_errors(out[:, rows], ref_out))
        rec["lse_max_abs_err"] = (_finite(float((lse[:, :, rows].double() - ref_lse.double()).abs().max()))
                                  if lse is not None else None)
        del out, lse
        timer = time_cuda if device.type == "cuda" else time_cpu
        timing = timer(lambda: backend(q, k, v), warmup=warmup, iters=iters)
    b, s, h, d = q.shape
    rec.update(timing)
    rec["tflops"] = attention_flops(b, s, s, h, d) / (timing["median_ms"] * 1e-3) / 1e12
    return rec


def output_errors(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """``rel_l2``, ``rel_l1`` (``sum |out - ref| / sum |ref|``) and ``cosine`` of ``out`` against ``ref``, in float64
    (``None`` where not finite)."""
    o, r = out.double(), ref.double()
    d = o - r
    return {"rel_l2": _finite(float(d.norm() / r.norm())), "rel_l1": _finite(float(d.abs().sum() / r.abs().sum())),
            "cosine": _finite(float((o * r).sum() / (o.norm() * r.norm())))}


def plot(results: list[dict], path: Path, title: str) -> str | None:
    """Grouped bar chart of median ms per kernel (one bar per S) at ``path``; returns a note if skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: no PNG written"
    ok = [r for r in results if r["status"] == "ok"]
    if not ok:
        return "no successful runs: no PNG written"
    kernels = list(dict.fromkeys(r["kernel"] for r in ok))
    seqs = sorted({r["seq_len"] for r in ok})
    width = 0.8 / len(seqs)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(kernels) + 2), 4.5))
    for j, s in enumerate(seqs):
        ms = {r["kernel"]: r["median_ms"] for r in ok if r["seq_len"] == s}
        xs = [i + (j - (len(seqs) - 1) / 2) * width for i, kk in enumerate(kernels) if kk in ms]
        bars = ax.bar(xs, [ms[kk] for kk in kernels if kk in ms], width, label=f"S = {s:,}")
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(kernels)), kernels, rotation=20, ha="right")
    ax.set_ylabel("median ms per forward")
    ax.set_title(title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def _fmt(x: float) -> str:
    return f"{x:.1f}" if x >= 10 else f"{x:.3g}"


def _rel(x: float | None) -> str:
    return "nan" if x is None else f"{x:.2e}"


def format_results(results: list[dict]) -> str:
    """Aligned table: kernel, S, ms, TFLOP/s, speed-up over the first kernel at that S, rel L2, rel L1,
    cosine, LSE max abs error (or the error of a failed run)."""
    head = ("kernel", "S", "ms", "TFLOP/s", "speed-up", "rel L2", "rel L1", "cosine", "LSE err")
    rows = [head]
    first: dict[int, float] = {}
    for r in results:
        if r["status"] == "ok":
            base = first.setdefault(r["seq_len"], r["median_ms"])
            cos = r.get("cosine")
            lse = r.get("lse_max_abs_err")
            rows.append((r["kernel"], str(r["seq_len"]), f"{r['median_ms']:.2f}", _fmt(r["tflops"]),
                         f"{base / r['median_ms']:.2f}x", _rel(r["rel_l2"]), _rel(r.get("rel_l1")),
                         "nan" if cos is None else f"{cos:.6f}", "-" if lse is None else f"{lse:.1e}"))
        else:
            rows.append((r["kernel"], str(r["seq_len"]), "failed", "", "", r["error"].splitlines()[0][:60], "", "", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) if 1 <= i <= 4 else c.ljust(w) for i, (c, w) in
                               enumerate(zip(row, widths))).rstrip() for row in rows)


def _check_args(args) -> tuple[torch.device, torch.dtype]:
    for name in ("heads", "head_dim", "batch", "iters", "ref_rows"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise UserError(f"--warmup must be >= 0, got {args.warmup}")
    if not args.seq_lens or min(args.seq_lens) < 1:
        raise UserError(f"--seq-lens must be positive integers, got {args.seq_lens}")
    unknown = [k for k in args.kernels or [] if k not in registry.KERNELS]
    if unknown:
        raise UserError(f"--kernels: unknown kernel {', '.join(unknown)}; known: {', '.join(registry.KERNELS)}")
    return select_device(args.device), DTYPES[args.dtype]


def main(args: argparse.Namespace) -> int:
    """Run the suite; write JSON (+ PNG) and print the table. Returns 0 if any kernel ran, else 1."""
    device, dtype = _check_args(args)
    b, h, d = args.batch, args.heads, args.head_dim
    env = environment()
    env["device"] = str(device)
    if device.type == "cuda":
        env["card"] = torch.cuda.get_device_name(device)
    out_path = Path(args.out or f"benchmarks/results/attention_{card_slug(env['card'])}.json")

    runnable, unavailable = kernel_availability(list(args.kernels or registry.dense_kernel_keys()), device, dtype, d)
    for key, reasons in unavailable.items():
        print(f"[bench attention] {key}: unavailable ({'; '.join(reasons)})")
    if device.type == "cpu" and max(args.seq_lens) > 8192:
        print(f"[bench attention] warning: S up to {max(args.seq_lens)} on CPU will be very slow; pass --seq-lens")

    results: list[dict] = []
    for s in args.seq_lens:
        q, k, v = make_inputs(b, s, h, d, dtype, device, args.seed, kind=args.inputs)
        rows = sample_rows(s, args.ref_rows, args.seed, device)
        ref_out, ref_lse = reference_rows(q, k, v, rows)
        _free(device)
        for key, cls in runnable.items():
            rec = {"kernel": key, "description": cls.description, "seq_len": s}
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            try:
                rec.update(bench_kernel(cls, q, k, v, rows, ref_out, ref_lse, warmup=args.warmup, iters=args.iters))
                rec["status"] = "ok"
            except Exception as e:  # noqa: BLE001 - one failing kernel must not stop the others
                rec.update(status="error", error=f"{type(e).__name__}: {e}"[:2000])
            if device.type == "cuda":
                with contextlib.suppress(RuntimeError):
                    rec["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / GIB
            results.append(rec)
            _free(device)
            msg = (f"{rec['median_ms']:.2f} ms, {_fmt(rec['tflops'])} TFLOP/s, rel L2 {_rel(rec['rel_l2'])}, "
                   f"rel L1 {_rel(rec['rel_l1'])}, cosine {rec['cosine']}, LSE err {rec['lse_max_abs_err']}"
                   if rec["status"] == "ok" else rec["error"].splitlines()[0][:200])
            print(f"[bench attention] {key} S={s}: {msg}", flush=True)
        del q, k, v, ref_out, ref_lse
        _free(device)

    title = f"attention fwd, {env['card']}, B={b} H={h} D={d} {args.dtype}"
    png = out_path.with_suffix(".png")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        note = plot(results, png, title)
    except Exception as e:  # noqa: BLE001 - a plotting problem must not lose the measurements
        note = f"plot failed: {type(e).__name__}: {e}"
    payload = {
        "suite": "attention",
        "environment": env,
        "config": {
            "device": str(device), "dtype": args.dtype, "batch": b, "heads": h, "head_dim": d,
            "seq_lens": list(args.seq_lens), "warmup": args.warmup, "iters": args.iters,
            "ref_rows": args.ref_rows, "ref_dtype": "float32", "seed": args.seed,
            "kernels": list(args.kernels) if args.kernels else "all available",
            "flops": "4*B*H*S^2*D per forward", "timed_call": "forward(q, k, v), no LSE",
            "inputs": f"{args.inputs} (make_inputs), same tensors for every kernel",
            "speed_up": "first kernel's median ms at that S over this kernel's",
            "peak_mem_gib": "max_memory_allocated over the kernel's calls, q/k/v included (CUDA only)",
        },
        "unavailable": unavailable,
        "types": resolve_types(device, dtype),
        "results": results,
        "plot": None if note else png.name,
        "plot_note": note,
    }
    write_json(out_path, payload)
    print(format_results(results))
    print(f"[bench attention] wrote {out_path}" + (f" ({note})" if note else f" and {png}"))
    return 0 if any(r["status"] == "ok" for r in results) else 1
