"""``ditfleet bench sparge``: Sparge attention vs dense cuDNN at Wan2.1 video sizes, one device or sequence-parallel.

Cases (latent frames x token rows x token columns per frame): ``480p81`` = 21 x 30 x 52 (32,760
tokens), ``720p81`` = 21 x 45 x 80 (75,600), or any ``FxHxW``; 40 heads of 128 (Wan-14B), bf16.

Inputs (``--inputs``):

- ``random``: ``N(0, 1)`` q, k, v. Their attention is nearly uniform, so a predictor finds little
  to skip at a tight threshold (top-k skips anyway, at a large error): the worst case.
- ``structured``: q and k share a smooth, low-rank function of the token's 3D position (random
  Fourier features of a Gaussian kernel, length scales of 4, 8 or 16 tokens by head, plus
  noise), so attention is local in space and time, as in a video DiT, and neighbouring tokens
  are alike; v is random. This gives the predictor blocks worth skipping and worth keeping.

Settings (``--settings``): ``topk`` (``sparge_attn_setting.topk``, default 0.5) and ``thr`` (one
synthetic threshold setting for every head, default ``cdfthreshd 0.9, simthreshd1 0.1``).

Per case and input kind it times two dense baselines, ``sdpa_cudnn`` and FlashAttention-4 (``fa4``,
when installed; LSE requested, as ring attention calls them), and the block-sparse kernel on a mask
with every block on (its cost over dense FA4). Per setting it records: the token-level sparsity of
the predicted mask (mean over heads), the predictor's time (the fused Triton predictor on CUDA), the
block-sparse kernel's time with the mask given (what a ring step costs) and end to end (predict +
kernel, what one device / Ulysses runs), the first call (compiles), the speedups over both
baselines, and the relative L1 error and cosine similarity of the output against the cuDNN output.
Which kernel and predictor ran is recorded (``runs``; ``--kernel-impl`` forces FA4 or flex).
``spas_sage_attn`` (when installed) is timed and compared the same way (its sparsity is its own).
Output: JSON under ``benchmarks/results/`` and a table.

Predictor blocks: ``--block-q`` x ``--block-k`` tokens (default 128 x 64, SpargeAttn's).

Sequence-parallel part (``--sp``), under torchrun, one process per GPU::

    torchrun --nproc-per-node 4 -m ditfleet bench sparge --sp ring usp ulysses

Per case, input kind and setting, every rank builds the same inputs (rank 0's, broadcast) and binds
``SpargeFlex(...).for_layer(params)``. Rank 0 runs the single-device references on the whole
sequence: the bound kernel (its output, time, first call, sparsity of its predicted mask and error
against dense) and the dense kernel (its output and time). Then for each mode (``ring``: R = N;
``usp``: U = 2, R = N / 2; ``ulysses``: U = N) it times ``sequence_parallel_attention`` with the
bound layer (it predicts its own mask: Ulysses ranks on the gathered sequence of their heads, ring /
USP from all-reduced block statistics; prediction included in the time) and with the dense kernel
in the same mode (median of the slowest rank; first call = compile), the speedup dense / sparge, the
gathered output's rel L1, cosine and rel L2 against the single-device Sparge output and its rel L1
and cosine against the dense output, and for ring / USP the ring schedule of the whole sequence's
predicted mask (kernel steps and K/V transfers run / skipped; for USP the union over the heads: each
ring holds only its Ulysses heads). Rank 0 writes ``sparge_sp_<card>_<n>gpu.json`` after every
setting. ``spas_sage_attn`` (no LSE) takes no part.
"""

from __future__ import annotations

import argparse
import math
import re
import time
from pathlib import Path

import torch

from ..attention.sparge import SpargeFlex, SpargeParams, SpargeSpas, head_sparsity, predict_block_mask
from ..errors import UserError
from .attention import _free, card_slug, time_cpu
from .common import dense_sdpa_kernel, environment, rel_l2, select_device, time_cuda, write_json
from .sp_attention import _sync, sp_timed

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CASES = {"480p81": (21, 30, 52), "720p81": (21, 45, 80)}
INPUTS = ("random", "structured")
SETTINGS = ("topk", "thr")
SP_MODES = ("ring", "usp", "ulysses")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the suite's options on ``parser`` (the ``ditfleet bench sparge`` subparser)."""
    parser.add_argument("--cases", nargs="+", default=list(CASES), metavar="CASE",
                        help=f"{', '.join(CASES)} or FxHxW (latent frames x token rows x columns) (default: both)")
    parser.add_argument("--heads", type=int, default=40, help="attention heads (default: %(default)s, Wan-14B)")
    parser.add_argument("--head-dim", type=int, default=128, help="head dim D (default: %(default)s)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="q/k/v dtype (default: %(default)s)")
    parser.add_argument("--inputs", nargs="+", choices=INPUTS, default=list(INPUTS), help="input kinds (default: both)")
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS), help="settings (default: both)")
    parser.add_argument("--topk", type=float, default=0.5, help="top-k fraction of the topk setting (default: %(default)s)")
    parser.add_argument("--cdfthreshd", type=float, default=0.9, help="cdfthreshd of the thr setting (default: %(default)s)")
    parser.add_argument("--simthreshd1", type=float, default=0.1, help="simthreshd1 of the thr setting (default: %(default)s)")
    parser.add_argument("--block-q", type=int, default=128, help="predictor query block in tokens (default: %(default)s)")
    parser.add_argument("--block-k", type=int, default=64, help="predictor key block in tokens (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per kernel after the first (default: %(default)s)")
    parser.add_argument("--iters", type=int, default=5, help="timed calls per kernel (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the inputs (default: %(default)s)")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/sparge_<card-slug>.json; "
                        "with --sp sparge_sp_<card-slug>_<n>gpu.json)")
    parser.add_argument("--sp", nargs="+", default=None, choices=SP_MODES, metavar="MODE",
                        help="under torchrun: time Sparge vs dense sequence-parallel in these modes (ring: R = N, "
                             "usp: U = 2 x R = N/2, ulysses: U = N) against the single-device Sparge output, "
                             "instead of the one-device run")
    parser.add_argument("--kernel-impl", choices=("auto", "fa4", "flex"), default="auto",
                        help="block-sparse kernel of the built-in Sparge (default: %(default)s: FlashAttention-4 on sm90 "
                             "where it is installed, else flex_attention)")
    parser.add_argument("--no-all-on", action="store_true",
                        help="skip the all-blocks-on mask (the block-sparse kernel's cost over dense FA4)")
    parser.add_argument("--transport", choices=("auto", "nccl", "copy_engine"), default="auto",
                        help="--sp: parallel.transport of the meshes (default: %(default)s)")


def parse_case(name: str) -> tuple[int, int, int]:
    """``(latent frames, token rows, token columns)`` of a case name or ``FxHxW``."""
    if name in CASES:
        return CASES[name]
    m = re.fullmatch(r"(\d+)x(\d+)x(\d+)", name)
    if not m or min(int(g) for g in m.groups()) < 1:
        raise UserError(f"--cases: {name!r} is neither one of {', '.join(CASES)} nor FxHxW (e.g. 21x45x80)")
    return int(m[1]), int(m[2]), int(m[3])


def structured_qkv(grid: tuple[int, int, int], heads: int, dim: int, *, dtype: torch.dtype, device: torch.device,
                   seed: int, peak: float = 12.0, noise: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v ``[1, F*H*W, heads, dim]`` with local, smooth attention (see the module docstring).

    ``q = k = a * phi(pos) @ W_h + noise``: ``phi`` holds ``dim / 2`` random Fourier features (cos, sin)
    of the position, so ``q_i . k_j ~ a^2 exp(-|pos_i - pos_j|^2 / 2 l^2)``; ``a`` puts the largest
    logit (``a^2 / sqrt(dim)``) at ``peak``; ``W_h`` is a random orthogonal map per head; ``l`` cycles
    over 4, 8 and 16 tokens by head (the time axis: half of that, in frames).
    """
    f, h, w = grid
    g = torch.Generator(device="cpu").manual_seed(seed)
    pos = torch.stack(torch.meshgrid(torch.arange(f), torch.arange(h), torch.arange(w), indexing="ij"), -1)
    pos = pos.reshape(-1, 3).to(device, torch.float32)  # [S, 3] frame-major raster order, as Wan's tokens
    r = dim // 2
    amp = math.sqrt(peak * math.sqrt(dim))
    scales = (4.0, 8.0, 16.0)
    qs, ks = [], []
    for head in range(heads):
        ell = scales[head % len(scales)]
        omega = torch.randn(r, 3, generator=g) / torch.tensor([ell / 2, ell, ell])
        w_h = torch.linalg.qr(torch.randn(dim, dim, generator=g))[0]
        omega, w_h = omega.to(device), w_h.to(device)
        ang = pos @ omega.T  # [S, r]
        phi = torch.cat([torch.cos(ang), torch.sin(ang)], -1) / math.sqrt(r)
        base = amp * (phi @ w_h)
        gq = torch.Generator(device=device).manual_seed(seed * 1000 + 2 * head + 1)
        gk = torch.Generator(device=device).manual_seed(seed * 1000 + 2 * head + 2)
        qs.append((base + noise * torch.randn(base.shape, generator=gq, device=device)).to(dtype))
        ks.append((base + noise * torch.randn(base.shape, generator=gk, device=device)).to(dtype))
        del ang, phi, base
    q = torch.stack(qs, 1)[None]
    k = torch.stack(ks, 1)[None]
    gv = torch.Generator(device=device).manual_seed(seed + 7)
    v = torch.randn(q.shape, generator=gv, device=device, dtype=dtype)
    return q, k, v


def random_qkv(s: int, heads: int, dim: int, *, dtype: torch.dtype, device: torch.device, seed: int):
    g = torch.Generator(device=device).manual_seed(seed)
    return tuple(torch.randn(1, s, heads, dim, generator=g, device=device, dtype=dtype) for _ in range(3))


@torch.no_grad()
def compare(out: torch.Tensor, ref: torch.Tensor, chunk: int = 4096) -> dict:
    """Relative L1 error ``sum |o - r| / sum |r|`` and cosine similarity of two ``[B, S, H, D]`` outputs (float64 sums)."""
    diff = ref_abs = dot = n_o = n_r = 0.0
    for i in range(0, out.shape[1], chunk):
        o, r = out[:, i : i + chunk].float(), ref[:, i : i + chunk].float()
        diff += float((o - r).abs().sum(dtype=torch.float64))
        ref_abs += float(r.abs().sum(dtype=torch.float64))
        dot += float((o * r).sum(dtype=torch.float64))
        n_o += float((o * o).sum(dtype=torch.float64))
        n_r += float((r * r).sum(dtype=torch.float64))
    return {"rel_l1": diff / max(ref_abs, 1e-30), "cosine": dot / max(math.sqrt(n_o * n_r), 1e-30)}


def _params(setting: str, heads: int, args) -> SpargeParams:
    blocks = {"block_q": args.block_q, "block_k": args.block_k}
    if setting == "topk":
        return SpargeParams.topk_mode(heads, args.topk, **blocks)
    return SpargeParams.thresholds(heads, cdfthreshd=args.cdfthreshd, simthreshd1=args.simthreshd1, **blocks)


def _params_record(setting: str, params: SpargeParams, args) -> dict:
    if setting == "topk":
        return {"topk": args.topk, "simthreshd1": float(params.simthreshd1[0])}
    return {"cdfthreshd": args.cdfthreshd, "simthreshd1": args.simthreshd1}


def _make_inputs(kind: str, grid: tuple[int, int, int], args, device, dtype):
    """q, k, v of one input kind (see the module docstring)."""
    if kind == "structured":
        return structured_qkv(grid, args.heads, args.head_dim, dtype=dtype, device=device, seed=args.seed)
    return random_qkv(math.prod(grid), args.heads, args.head_dim, dtype=dtype, device=device, seed=args.seed)


def _fa4_dense(device, dtype):
    """FlashAttention-4 dense (the second baseline), or ``(None, why)``."""
    from ..attention.flash import FlashAttn4

    why = FlashAttn4.unavailable_reasons(device, dtype)
    return (FlashAttn4(device=device, dtype=dtype), "") if not why else (None, "; ".join(why))


def _versus(r: dict, ms: float, rec: dict, name: str) -> None:
    """Speedups of ``ms`` over the dense baselines of ``rec`` (``<name>_vs_<baseline>``)."""
    for base in ("dense", "fa4_dense"):
        if rec.get(base, {}).get("median_ms"):
            r[f"{name}_vs_{'cudnn' if base == 'dense' else 'fa4'}"] = rec[base]["median_ms"] / ms


def run_inputs(name, grid, kind, args, device, dtype, spas_ok) -> dict:
    """One case and input kind: dense baselines (cuDNN, FA4), the all-blocks-on mask, then each setting on the
    built-in kernel (and spas_sage_attn)."""
    from ..attention.blockmask import BlockSparseMask

    s = math.prod(grid)
    h = args.heads
    t0 = time.perf_counter()
    q, k, v = _make_inputs(kind, grid, args, device, dtype)
    _sync(device)
    rec: dict = {"inputs": kind, "build_s": time.perf_counter() - t0}
    timer = time_cuda if device.type == "cuda" else time_cpu
    tk = {"warmup": args.warmup, "iters": args.iters}
    dense_key, dense_cls = dense_sdpa_kernel(device, dtype)
    dense = dense_cls(device=device, dtype=dtype)
    ref = dense(q, k, v, return_lse=True)[0]
    rec["dense"] = {"kernel": dense_key, **timer(lambda: dense(q, k, v, return_lse=True), **tk)}
    fa4, why = _fa4_dense(device, dtype)
    if fa4 is not None:
        try:
            fa4(q, k, v, return_lse=True)
            rec["fa4_dense"] = {"kernel": "fa4", **timer(lambda: fa4(q, k, v, return_lse=True), **tk)}
        except Exception as e:  # noqa: BLE001 - the other baseline still stands
            rec["fa4_dense"] = {"error": f"{type(e).__name__}: {e}"[:500]}
    else:
        rec["fa4_dense"] = {"unavailable": why}
    fa4_ms = rec["fa4_dense"].get("median_ms")
    print(f"[bench sparge] {name} {kind}: S={s:,} H={h}; {dense_key} dense {rec['dense']['median_ms']:.2f} ms, fa4 dense "
          f"{_fmt(fa4_ms, '.2f')} ms", flush=True)
    be0 = SpargeFlex(device=device, dtype=dtype, impl=args.kernel_impl)
    rec["runs"] = be0.for_layer(_params("topk", h, args)).runs
    if not args.no_all_on:  # every block on: what the block-sparse kernel costs over dense
        r: dict = {}
        try:
            nq, nk = -(-s // args.block_q), -(-s // args.block_k)
            full = BlockSparseMask.from_blocks(torch.ones(1, h, nq, nk, dtype=torch.bool, device=device),
                                               (args.block_q, args.block_k), s, s, device=device)
            be = be0.for_layer(_params("topk", h, args))
            out, _ = be(q, k, v, return_lse=True, block_mask=full)
            r.update(compare(out, ref))
            del out
            r["kernel"] = timer(lambda: be(q, k, v, return_lse=True, block_mask=full), **tk)
            _versus(r, r["kernel"]["median_ms"], rec, "kernel")
            r["status"] = "ok"
            print(f"[bench sparge] {name} {kind} all blocks on: kernel {r['kernel']['median_ms']:.2f} ms "
                  f"({_fmt(r.get('kernel_vs_fa4'), '.3f')}x FA4 dense), rel L1 {r['rel_l1']:.1e}", flush=True)
        except Exception as e:  # noqa: BLE001
            r.update(status="error", error=f"{type(e).__name__}: {e}"[:2000])
            print(f"[bench sparge] {name} {kind} all blocks on: failed: {r['error'].splitlines()[0][:200]}", flush=True)
        rec["all_on"] = r
        _free(device)
    rec["settings"] = {}
    for setting in args.settings:
        params = _params(setting, h, args)
        r = {"params": _params_record(setting, params, args)}
        try:
            be = be0.for_layer(params)
            t1 = time.perf_counter()
            out, _ = be(q, k, v, return_lse=True)
            _sync(device)
            r["first_call_s"] = time.perf_counter() - t1
            mask = predict_block_mask(q, k, params)
            hs = head_sparsity(mask)
            r["sparsity"] = float(hs.mean())
            r["sparsity_per_head_min_max"] = [float(hs.min()), float(hs.max())]
            r.update(compare(out, ref))
            del out
            r["predict"] = timer(lambda: predict_block_mask(q, k, params), **tk)
            r["kernel"] = timer(lambda: be(q, k, v, return_lse=True, block_mask=mask), **tk)
            r["end_to_end"] = timer(lambda: be(q, k, v, return_lse=True), **tk)
            r["speedup_kernel"] = rec["dense"]["median_ms"] / r["kernel"]["median_ms"]
            r["speedup_end_to_end"] = rec["dense"]["median_ms"] / r["end_to_end"]["median_ms"]
            _versus(r, r["kernel"]["median_ms"], rec, "kernel")
            _versus(r, r["end_to_end"]["median_ms"], rec, "end_to_end")
            r["status"] = "ok"
            print(f"[bench sparge] {name} {kind} {setting}: sparsity {r['sparsity']:.3f}, predict "
                  f"{r['predict']['median_ms']:.2f} ms, kernel {r['kernel']['median_ms']:.2f} ms, end to end "
                  f"{r['end_to_end']['median_ms']:.2f} ms ({r['speedup_end_to_end']:.2f}x cuDNN, "
                  f"{_fmt(r.get('end_to_end_vs_fa4'), '.2f')}x FA4), rel L1 {r['rel_l1']:.4f}, cos {r['cosine']:.5f}, "
                  f"first call {r['first_call_s']:.1f} s", flush=True)
        except Exception as e:  # noqa: BLE001 - one failing kernel must not stop the others
            r.update(status="error", error=f"{type(e).__name__}: {e}"[:2000])
            print(f"[bench sparge] {name} {kind} {setting}: failed: {r['error'].splitlines()[0][:200]}", flush=True)
        _free(device)
        if spas_ok:
            r["spas_sage_attn"] = _bench_spas(q, k, v, ref, params, rec, args, device, dtype, timer)
        rec["settings"][setting] = r
    return rec


def _bench_spas(q, k, v, ref, params, rec, args, device, dtype, timer) -> dict:
    r: dict = {}
    try:
        be = SpargeSpas(device=device, dtype=dtype).for_layer(params)
        out, _ = be(q, k, v)
        r.update(compare(out, ref))
        del out
        r.update(timer(lambda: be(q, k, v), warmup=args.warmup, iters=args.iters))
        r["speedup"] = rec["dense"]["median_ms"] / r["median_ms"]
        r["status"] = "ok"
        print(f"[bench sparge]   spas_sage_attn: {r['median_ms']:.2f} ms ({r['speedup']:.2f}x), rel L1 {r['rel_l1']:.4f}",
              flush=True)
    except Exception as e:  # noqa: BLE001
        r.update(status="error", error=f"{type(e).__name__}: {e}"[:2000])
        print(f"[bench sparge]   spas_sage_attn failed: {r['error'].splitlines()[0][:200]}", flush=True)
    _free(device)
    return r


def format_results(results: list[dict]) -> str:
    lines = [f"{'case':8s} {'inputs':10s} {'setting':7s} {'sparsity':>8s} {'cuDNN ms':>8s} {'FA4 ms':>7s} {'pred ms':>7s} "
             f"{'kern ms':>7s} {'total ms':>8s} {'x cuDNN':>7s} {'x FA4':>6s} {'rel L1':>7s} {'cosine':>7s}"]
    for c in results:
        for kind in c["inputs"]:
            head = f"{c['case']:8s} {kind['inputs']:10s}"
            fa4 = kind.get("fa4_dense", {}).get("median_ms")
            on = kind.get("all_on")
            if on and on.get("status") == "ok":
                lines.append(f"{head} {'all-on':7s} {0.0:8.3f} {kind['dense']['median_ms']:8.2f} {_fmt(fa4, '7.2f'):>7s} "
                             f"{'-':>7s} {on['kernel']['median_ms']:7.2f} {on['kernel']['median_ms']:8.2f} "
                             f"{_fmt(on.get('kernel_vs_cudnn'), '6.2f'):>6s}x {_fmt(on.get('kernel_vs_fa4'), '5.3f'):>5s}x "
                             f"{on['rel_l1']:7.4f} {on['cosine']:7.5f}")
            for setting, r in kind["settings"].items():
                if r["status"] != "ok":
                    lines.append(f"{head} {setting:7s} failed: {r['error'].splitlines()[0][:60]}")
                    continue
                lines.append(f"{head} {setting:7s} {r['sparsity']:8.3f} {kind['dense']['median_ms']:8.2f} "
                             f"{_fmt(fa4, '7.2f'):>7s} {r['predict']['median_ms']:7.2f} {r['kernel']['median_ms']:7.2f} "
                             f"{r['end_to_end']['median_ms']:8.2f} {r['speedup_end_to_end']:6.2f}x "
                             f"{_fmt(r.get('end_to_end_vs_fa4'), '5.2f'):>5s}x {r['rel_l1']:7.4f} {r['cosine']:7.5f}")
            if kind.get("runs"):
                lines.append(f"{'':19s} runs: {kind['runs']}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """Run the suite; write the JSON and print the table. Returns 0 if every built-in run succeeded, else 1
    (with ``--sp``: 0 if a sequence-parallel Sparge timing succeeded)."""
    for name in ("heads", "head_dim", "iters", "block_q", "block_k"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0 or not 0 < args.topk <= 1 or not 0 <= args.cdfthreshd <= 1 or not -1 <= args.simthreshd1 <= 1:
        raise UserError("--warmup >= 0, --topk in (0, 1], --cdfthreshd in [0, 1], --simthreshd1 in [-1, 1]")
    cases = [(c, parse_case(c)) for c in args.cases]
    if getattr(args, "sp", None):
        return main_sp(args, cases)
    device = select_device(args.device)
    dtype = DTYPES[args.dtype]
    reasons = SpargeFlex.unavailable_reasons(device, dtype)
    if reasons:
        raise UserError(f"bench sparge: the built-in Sparge kernel cannot run on {device}/{args.dtype}: {'; '.join(reasons)}")
    spas_reasons = SpargeSpas.unavailable_reasons(device, dtype)
    env = environment()
    env["device"] = str(device)
    out_path = Path(args.out or f"benchmarks/results/sparge_{card_slug(env['card'])}.json")
    if spas_reasons:
        print(f"[bench sparge] spas_sage_attn: unavailable ({'; '.join(spas_reasons)})")
    results = []
    t_start = time.perf_counter()
    for name, grid in cases:
        if device.type == "cpu" and math.prod(grid) > 8192:
            print(f"[bench sparge] warning: {math.prod(grid)} tokens on CPU will be very slow")
        case = {"case": name, "grid": list(grid), "tokens": math.prod(grid), "heads": args.heads,
                "head_dim": args.head_dim, "inputs": []}
        for kind in args.inputs:
            case["inputs"].append(run_inputs(name, grid, kind, args, device, dtype, not spas_reasons))
            _free(device)
        results.append(case)
    payload = {
        "suite": "sparge",
        "environment": env,
        "config": {
            "device": str(device), "dtype": args.dtype, "batch": 1, "heads": args.heads, "head_dim": args.head_dim,
            "cases": args.cases, "inputs": args.inputs, "settings": args.settings, "topk": args.topk,
            "cdfthreshd": args.cdfthreshd, "simthreshd1": args.simthreshd1, "warmup": args.warmup, "iters": args.iters,
            "seed": args.seed, "blocks": f"query {args.block_q} x key {args.block_k} (SpargeAttn's: 128 x 64)",
            "kernel_impl": args.kernel_impl,
            "timed_calls": "dense: forward(q, k, v, return_lse=True) of sdpa_cudnn and of fa4 (FlashAttention-4); "
                           "all_on: the block-sparse kernel with every block on (its cost over dense); predict: "
                           "predict_block_mask (the fused Triton predictor on CUDA); kernel: the built-in block-sparse "
                           "kernel with the predicted mask given (a ring step); end_to_end: predict + kernel (one device "
                           "/ Ulysses); *_vs_cudnn / *_vs_fa4: dense time / this time; first_call_s includes compiles",
            "sparsity": "skipped token pairs / S^2, mean over heads (1 - density)",
            "accuracy": "rel_l1 = sum|o - o_dense| / sum|o_dense| and cosine similarity, whole output, vs the dense kernel",
            "inputs_doc": "random: N(0,1) q, k, v (near-uniform attention); structured: q, k share random Fourier "
                          "features of the 3D token position (local attention, length scales 4/8/16 tokens by head), v random",
        },
        "spas_sage_attn": "available" if not spas_reasons else spas_reasons,
        "wall_s": None,
        "results": results,
    }
    payload["wall_s"] = time.perf_counter() - t_start
    write_json(out_path, payload)
    print(format_results(results))
    print(f"[bench sparge] wrote {out_path} ({payload['wall_s']:.0f} s)")
    ok = all(r["status"] == "ok" for c in results for kind in c["inputs"] for r in kind["settings"].values())
    return 0 if ok else 1


# ---------------------------------------------------------------- sequence parallel (--sp, under torchrun)
def main_sp(args: argparse.Namespace, cases: list[tuple[str, tuple[int, int, int]]]) -> int:
    """``--sp``: set up the process group (torchrun's environment), run :func:`run_sp`, tear it down."""
    import torch.distributed as dist

    from ..parallel import init_distributed

    env = init_distributed(timeout_s=900)
    try:
        return run_sp(args, cases, env)
    finally:
        dist.barrier()
        dist.destroy_process_group()


def _sp_reference(r: dict, bound, q, k, v, dense_ref, scale, args, device):
    """Rank 0: the bound kernel on the whole sequence; fills ``r``; returns ``(output, predicted mask)`` (None on error)."""
    from .sp_attention import _err, _time

    ref = mask = None
    one = r["single_device"] = {}
    try:
        t1 = time.perf_counter()
        ref = bound(q, k, v, scale=scale)[0]
        _sync(device)
        one["first_call_s"] = round(time.perf_counter() - t1, 2)
        mask = bound.predict(q, k, scale=scale)
        hs = head_sparsity(mask)
        r["sparsity"] = 1 - mask.density
        r["sparsity_per_head_min_max"] = [float(hs.min()), float(hs.max())]
        if dense_ref is not None:
            one["vs_dense"] = compare(ref, dense_ref)
        one["ms"] = round(_time(lambda: bound(q, k, v, scale=scale), args, device), 3)
    except Exception as e:  # noqa: BLE001 - the SP modes still run; their comparisons are left out
        one["error"] = _err(e)
    return ref, mask


def run_sp(args: argparse.Namespace, cases: list[tuple[str, tuple[int, int, int]]], env) -> int:
    """Sparge vs dense under sequence parallelism on an initialised process group; 0 if a Sparge timing succeeded."""
    import torch.distributed as dist

    from ..parallel import SeqShard, gather_sequence, sequence_parallel_attention, shard_sequence, sp_schedule
    from ..parallel.shard import tile_align
    from .sp_attention import MeshCache, _err, _mode_sizes, _time

    device, rank, world = env.device, env.rank, env.world_size
    dtype = DTYPES[args.dtype]
    reasons = SpargeFlex.unavailable_reasons(device, dtype)
    if reasons:
        raise UserError(f"bench sparge --sp: the built-in Sparge kernel cannot run on {device}/{args.dtype}: "
                        f"{'; '.join(reasons)}")
    dense_key, dense_cls = dense_sdpa_kernel(device, dtype)
    dense = dense_cls(device=device, dtype=dtype)
    t_start = time.perf_counter()
    report = {"suite": "sparge-sp", "environment": {**environment(world), "device": str(device)},
              "config": {"dtype": args.dtype, "batch": 1, "heads": args.heads, "head_dim": args.head_dim,
                         "cases": args.cases, "inputs": args.inputs, "settings": args.settings, "modes": args.sp,
                         "topk": args.topk, "cdfthreshd": args.cdfthreshd, "simthreshd1": args.simthreshd1,
                         "blocks": [args.block_q, args.block_k], "warmup": args.warmup, "iters": args.iters,
                         "seed": args.seed, "dense_kernel": dense_key, "transport": args.transport,
                         "timed_call": "sequence_parallel_attention(q, k, v) on the local shards with the bound Sparge "
                                       "layer (mask prediction included: Ulysses ranks on their heads' whole sequence, "
                                       "ring / USP from all-reduced block statistics) or the dense kernel; median of "
                                       "the slowest rank; first_call_s includes the flex compile",
                         "single_device": "rank 0, whole sequence: the bound layer (predict + kernel) and the dense kernel",
                         "sparsity": "skipped token pairs / S^2 of the single-device predicted mask, mean over heads",
                         "accuracy": "gathered SP output vs the single-device Sparge output (rel_l1, cosine, rel_l2) "
                                     "and vs the single-device dense output (rel_l1, cosine)",
                         "schedule": "ring steps (kernel calls) and K/V transfers the mask would let the ring skip, run / "
                                     "skipped (the forward itself runs every real step: a predicted mask is never read "
                                     "back to the host), "
                                     "from the single-device mask (USP: union over heads)"},
              "results": []}
    out_path = Path(args.out or f"benchmarks/results/sparge_sp_{card_slug(report['environment']['card'])}_{world}gpu.json")

    def save():
        if rank == 0:
            report["elapsed_s"] = round(time.perf_counter() - t_start, 1)
            write_json(out_path, report)

    meshes = MeshCache()
    ok_any = False
    for name, grid in cases:
        s, h, d = math.prod(grid), args.heads, args.head_dim
        scale = d ** -0.5
        case = {"case": name, "grid": list(grid), "tokens": s, "heads": h, "head_dim": d, "inputs": []}
        report["results"].append(case)
        for kind in args.inputs:
            t0 = time.perf_counter()
            q, k, v = _make_inputs(kind, grid, args, device, dtype)
            for t in (q, k, v):  # identical inputs everywhere, whatever the RNG of each card does
                dist.broadcast(t, src=0)
            rec = {"inputs": kind, "build_s": round(time.perf_counter() - t0, 2), "dense": {"kernel": dense_key, "modes": {}},
                   "settings": {}}
            case["inputs"].append(rec)
            dense_ref = None
            with torch.no_grad():
                if rank == 0:
                    try:
                        dense_ref = dense(q, k, v, scale=scale)[0]
                        rec["dense"]["single_device_ms"] = round(_time(lambda: dense(q, k, v, scale=scale), args, device), 3)
                    except Exception as e:  # noqa: BLE001 - comparisons against dense are left out
                        rec["dense"]["single_device_error"] = _err(e)
                for setting in args.settings:
                    params = _params(setting, h, args)
                    bound = SpargeFlex(device=device, dtype=dtype).for_layer(params)
                    r = rec["settings"][setting] = {"params": _params_record(setting, params, args), "modes": {}}
                    ref, mask = _sp_reference(r, bound, q, k, v, dense_ref, scale, args, device) if rank == 0 else (None, None)
                    _free(device)
                    for mode in args.sp:
                        sizes = _mode_sizes(mode, world)
                        if isinstance(sizes, str):
                            r["modes"][mode] = {"skipped": sizes}
                            continue
                        u, rr = sizes
                        mesh = meshes.get(u, rr, transport=args.transport)
                        align = tile_align(mesh, [bound])  # as a model's SeqParallel: the kernel's tiles under a ring
                        shard = SeqShard.for_length(s, mesh, align=align)
                        local = [shard_sequence(t, mesh, align=align)[0] for t in (q, k, v)]
                        m = r["modes"][mode] = {"ulysses": u, "ring": rr, "align": align, "chunk": shard.chunk}
                        if rr > 1 and mask is not None:
                            m["schedule"] = sp_schedule(mask, shard.chunk, shard.chunk, u, rr, exact=True).stats()

                        def call(backend):
                            return sequence_parallel_attention(*local, backend=backend, mesh=mesh, shard=shard, scale=scale)

                        dense_sp = rec["dense"]["modes"].get(mode)
                        if dense_sp is None:  # once per input kind and mode: it does not depend on the setting
                            dense_sp = rec["dense"]["modes"][mode] = {}
                            sp_timed(dense_sp, lambda: call(dense), args, device)
                            _free(device)
                        m["dense_ms"] = dense_sp.get("ms")
                        sp = m["sparge"] = {}

                        def check(res, sp=sp, mesh=mesh, shard=shard, ref=ref, dense_ref=dense_ref):
                            full = gather_sequence(res[0], mesh, shard)
                            if rank == 0:
                                sp["finite"] = bool(torch.isfinite(full).all())
                                if ref is not None:
                                    sp["vs_single_device"] = {**compare(full, ref), "rel_l2": rel_l2(full, ref)}
                                if dense_ref is not None:
                                    sp["vs_dense"] = compare(full, dense_ref)

                        if sp_timed(sp, lambda: call(bound), args, device, on_first=check):
                            ok_any = True
                            if m["dense_ms"]:
                                sp["speedup"] = round(m["dense_ms"] / sp["ms"], 3)
                            if r.get("single_device", {}).get("ms"):  # rank 0 only
                                sp["speedup_vs_single_device"] = round(r["single_device"]["ms"] / sp["ms"], 3)
                        if rank == 0:
                            print(_sp_line(name, kind, setting, mode, m, r), flush=True)
                        local.clear()
                        _free(device)
                    ref = mask = bound = None
                    _free(device)
                    save()
            q = k = v = dense_ref = None
            _free(device)
    save()
    if rank == 0:
        print(format_sp_results(report["results"]))
        print(f"[bench sparge --sp] wrote {out_path} ({report['elapsed_s']} s)")
    return 0 if ok_any else 1


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _sp_line(name, kind, setting, mode, m, r) -> str:
    sp, vs = m["sparge"], m["sparge"].get("vs_single_device", {})
    line = (f"[bench sparge --sp] {name} {kind} {setting} {mode} (U{m['ulysses']} x R{m['ring']}): dense "
            f"{_fmt(m['dense_ms'], '.2f')} ms, sparge {_fmt(sp.get('ms'), '.2f')} ms ({_fmt(sp.get('speedup'), '.2f')}x), "
            f"first call {_fmt(sp.get('first_call_s'), '.1f')} s, sparsity {_fmt(r.get('sparsity'), '.3f')}, rel L2 vs "
            f"1 device {_fmt(vs.get('rel_l2'), '.1e')}, rel L1 vs dense {_fmt(sp.get('vs_dense', {}).get('rel_l1'), '.4f')}")
    if "schedule" in m:
        line += f", ring steps {m['schedule']['steps']}/{m['schedule']['ring_size'] ** 2}"
    return line + (f", error {sp['error']}" if "error" in sp else "")


def format_sp_results(results: list[dict]) -> str:
    lines = [f"{'case':8s} {'inputs':10s} {'setting':7s} {'mode':8s} {'UxR':5s} {'sparsity':>8s} {'dense ms':>9s} "
             f"{'sparge ms':>9s} {'speedup':>7s} {'rel L2 1d':>9s} {'rel L1 dn':>9s} {'cos dn':>7s} {'steps':>5s}"]
    for c in results:
        for kind in c["inputs"]:
            for setting, r in kind["settings"].items():
                one = r["single_device"]
                head = f"{c['case']:8s} {kind['inputs']:10s} {setting:7s}"
                lines.append(f"{head} {'1 device':8s} {'':5s} {_fmt(r.get('sparsity'), '8.3f'):>8s} "
                             f"{_fmt(kind['dense'].get('single_device_ms'), '9.2f'):>9s} {_fmt(one.get('ms'), '9.2f'):>9s} "
                             f"{'':7s} {'':9s} {_fmt(one.get('vs_dense', {}).get('rel_l1'), '9.4f'):>9s} "
                             f"{_fmt(one.get('vs_dense', {}).get('cosine'), '7.5f'):>7s}"
                             + (f"  failed: {one['error'][:60]}" if "error" in one else ""))
                for mode, m in r["modes"].items():
                    if "skipped" in m:
                        lines.append(f"{head} {mode:8s} skipped: {m['skipped'][:60]}")
                        continue
                    sp = m["sparge"]
                    steps = f"{m['schedule']['steps']}/{m['schedule']['ring_size'] ** 2}" if "schedule" in m else ""
                    if "error" in sp:
                        lines.append(f"{head} {mode:8s} {m['ulysses']}x{m['ring']:<3d} failed: {sp['error'][:60]}")
                        continue
                    lines.append(f"{head} {mode:8s} {m['ulysses']}x{m['ring']:<3d} {_fmt(r.get('sparsity'), '8.3f'):>8s} "
                                 f"{_fmt(m['dense_ms'], '9.2f'):>9s} {sp['ms']:9.2f} {_fmt(sp.get('speedup'), '6.2f'):>6s}x "
                                 f"{_fmt(sp.get('vs_single_device', {}).get('rel_l2'), '9.1e'):>9s} "
                                 f"{_fmt(sp.get('vs_dense', {}).get('rel_l1'), '9.4f'):>9s} "
                                 f"{_fmt(sp.get('vs_dense', {}).get('cosine'), '7.5f'):>7s} {steps:>5s}")
    return "\n".join(lines)
