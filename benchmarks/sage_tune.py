"""Tune ditfleet's Triton SageAttention2 kernel on one GPU in one call: build, check, time, probe.

Run on the device (``python3 benchmarks/sage_tune.py --out $OUT``). Steps:

1. Compile every variant in a pool of processes (Triton's on-disk cache is shared), both argument
   specialisations (S a multiple of 16 or not), so the timed process only loads kernels.
2. Accuracy of every variant at odd sizes (B=2, S=1001, H=6) against the fp32 reference, and of the two
   P.V modes at S=4096 on random N(0,1) and video-like inputs (cosine, rel L1, rel L2, LSE error).
3. Time (CUDA events, median) cuDNN SDPA and every variant at S=32760 (B=1, H=40, D=128, bf16), the
   quantisation passes included; the quantisation alone and the attention kernel alone for the base
   configs; probes that leave one stage out (edited copies of the kernel: no exp2; no P.V (no V load, no
   P cast, no dot); QK only; int->float conversion instead of the magic-number accumulator; no key
   permutation, i.e. Triton's register shuffles to the FP8 operand layout); the kernel of 33df121 at
   32760 and 32768 (``.sage_old/``, when carried); D=64 variants.
4. The fastest variants of each P.V mode and cuDNN again at S=75600.

Writes ``sage_tune.json`` under ``--out`` and prints a table last. FLOPs: ``4 * B * H * S^2 * D``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROBE_DIR = Path(os.environ.get("SAGE_PROBE_DIR", tempfile.gettempdir())) / "sage_probes"
KERNEL_SRC = REPO / "ditfleet/attention/sage_triton.py"
OLD_SRC = REPO / ".sage_old/sage_triton_33df121.py"

BASE16 = dict(pv_fp8=False, block_m=64, block_n=128, num_warps=4, num_stages=2, tma=True, defer=False)
BASE8 = dict(BASE16, pv_fp8=True)
VARIANTS = {
    # FP8 P.V (SageAttention2)
    "fp8_m64n128w4s2": dict(BASE8),
    "fp8_m64n128w4s3": dict(BASE8, num_stages=3),
    "fp8_m64n128w4s2_defer": dict(BASE8, defer=True),
    "fp8_m64n128w4s3_defer": dict(BASE8, num_stages=3, defer=True),
    "fp8_m64n128w4s2_ptr": dict(BASE8, tma=False),
    "fp8_m64n64w4s2": dict(BASE8, block_n=64),
    "fp8_m64n64w4s3": dict(BASE8, block_n=64, num_stages=3),
    "fp8_m64n64w4s2_defer": dict(BASE8, block_n=64, defer=True),
    "fp8_m128n128w8s2": dict(BASE8, block_m=128, num_warps=8),
    "fp8_m128n128w8s3_ptr": dict(BASE8, block_m=128, num_warps=8, num_stages=3, tma=False),
    "fp8_m128n128w8s3_defer": dict(BASE8, block_m=128, num_warps=8, num_stages=3, defer=True),
    "fp8_m64n128w4s2_qg16": dict(BASE8, q_group=16),
    # 16-bit P.V
    "b16_m64n128w4s2": dict(BASE16),
    "b16_m128n128w8s3": dict(BASE16, block_m=128, num_warps=8, num_stages=3),
    # probes of the FP8 base (edited kernel copies; results are not attention, timings only)
    "fp8_probe_noexp": dict(BASE8, probe="noexp"),
    "fp8_probe_nopv": dict(BASE8, probe="nopv"),
    "fp8_probe_qkonly": dict(BASE8, probe="qkonly"),
    "fp8_probe_shuffle": dict(BASE8, probe="shuffle"),
    # D = 64
    "d64_fp8_m64n128w4s2": dict(BASE8, d=64),
    "d64_fp8_m64n128w4s3": dict(BASE8, num_stages=3, d=64),
    "d64_fp8_m64n64w4s3": dict(BASE8, block_n=64, num_stages=3, d=64),
    "d64_fp8_m64n128w4s3_defer": dict(BASE8, num_stages=3, defer=True, d=64),
    "d64_b16_m64n128w4s2": dict(BASE16, d=64),
}

_MAGIC_DOT = ("        s = tl.dot(q, tl.trans(k), acc=tl.full([BLOCK_M, BLOCK_N], _MAGIC_I, tl.int32), out_dtype=tl.int32)\n"
              "        return s.to(tl.float32, bitcast=True)\n")
_EXP = "        p = tl.math.exp2(s * c[:, None] - bias[:, None])\n"
_PV8 = "        return tl.dot(p8, tl.trans(vt))\n"
_PERM = ("        p8 = tl.reshape(tl.permute(tl.reshape(p8, [p8.shape[0], BLOCK_N // 32, 2, 2, 4, 2]), (0, 1, 2, 4, 3, 5)),\n"
         "                        [p8.shape[0], BLOCK_N])\n")
PROBES = {  # name -> [(old, new)] edits of sage_triton.py
    "i2f": [(_MAGIC_DOT, "        return tl.dot(q, tl.trans(k)).to(tl.float32)\n")],
    "noexp": [(_EXP, "        p = s * c[:, None] - bias[:, None]\n")],
    "nopv": [(_PV8, "        return tl.zeros([p8.shape[0], D], tl.float32)\n")],  # no V load, no P cast, no dot
    "qkonly": [(_EXP, "        p = s * c[:, None] - bias[:, None]\n"), (_PV8, "        return tl.zeros([p8.shape[0], D], tl.float32)\n")],
    "shuffle": [(_PERM, "")],  # no key permutation: Triton's register shuffles to the FP8 A-operand layout
}


def module_from(src: Path, name: str, edits=()):
    """Import a copy of ``src`` (relative imports made absolute, ``edits`` applied) as module ``name``."""
    text = src.read_text().replace("from .base import", "from ditfleet.attention.base import")
    for old, new in edits:
        if old not in text:
            raise RuntimeError(f"probe edit not found in {src.name}: {old.strip()[:60]}")
        text = text.replace(old, new)
    PROBE_DIR.mkdir(parents=True, exist_ok=True)
    path = PROBE_DIR / f"{name}.py"
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    if str(PROBE_DIR) not in sys.path:
        sys.path.insert(0, str(PROBE_DIR))
    return importlib.import_module(name)


def variant_fn(name: str, return_lse: bool = False):
    """``fn(q, k, v) -> (out, lse)`` of one variant, quantisation included."""
    from ditfleet.attention import sage_triton as st

    cfg = dict(VARIANTS[name])
    cfg.pop("d", None)
    probe = cfg.pop("probe", None)
    kernel = module_from(KERNEL_SRC, f"sage_probe_{probe}", PROBES[probe])._attn_kernel if probe else None
    launch = {key: cfg.pop(key) for key in ("num_warps", "num_stages", "tma", "defer")}

    def fn(q, k, v):
        qz = st.sage_quantize(q, k, v, return_lse=return_lse, **cfg)
        return st.sage_attend(qz, kernel=kernel, **launch)

    return fn


def old_fn(q, k, v):
    return module_from(OLD_SRC, "sage_old_33df121").sage_attention_triton(q, k, v)


def _warm(jobs):
    """Pool worker: run each ``(variant, S, D)`` once on uninitialised inputs so Triton compiles it."""
    import torch

    done = []
    for name, s, d in jobs:
        t0 = time.time()
        try:
            q, k, v = (torch.empty(1, s, 40, d, device="cuda", dtype=torch.bfloat16).normal_() for _ in range(3))
            fn = old_fn if name == "old" else variant_fn(name, return_lse=False)
            fn(q, k, v)
            if name != "old" and not VARIANTS[name].get("probe"):
                variant_fn(name, return_lse=True)(q[:, :1001], k[:, :1001], v[:, :1001])
            torch.cuda.synchronize()
            done.append((name, s, round(time.time() - t0, 1), None))
        except Exception as e:  # noqa: BLE001 - reported, the timed pass skips it
            done.append((name, s, round(time.time() - t0, 1), f"{type(e).__name__}: {e}"[:400]))
    return done


def time_ms(fn, iters: int, warmup: int = 1) -> dict:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return {"median_ms": statistics.median(ts), "min_ms": min(ts), "max_ms": max(ts), "times_ms": ts}


def accuracy(out, lse, ref_out, ref_lse) -> dict:
    o, r = out.double(), ref_out.double()
    d = o - r
    rec = {"rel_l2": float(d.norm() / r.norm()), "rel_l1": float(d.abs().sum() / r.abs().sum()),
           "cos": float((o * r).sum() / (o.norm() * r.norm())), "finite": bool(out.isfinite().all())}
    if lse is not None:
        rec["lse_max_abs"] = float((lse.double() - ref_lse.double()).abs().max())
    return rec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument("--variants", nargs="*", default=None, help="subset of variant names (default: all)")
    ap.add_argument("--top", type=int, default=2, help="variants per P.V mode timed at the long length")
    ap.add_argument("--seq", type=int, nargs=2, default=[32760, 75600])
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    import torch

    from ditfleet.attention import reference_attention
    from ditfleet.attention.sdpa import SdpaCudnn
    from ditfleet.bench.attention import make_inputs
    from ditfleet.bench.common import environment

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = args.variants or list(VARIANTS)
    s1, s2 = args.seq
    res = {"environment": environment(), "variants": {n: VARIANTS[n] for n in names}, "compile": [], "accuracy": {},
           "time": {}, "notes": []}
    t_start = time.time()

    # 1. compile in a pool (S=s1 and S=s2 specialise differently when one is a multiple of 16)
    jobs = [(n, s, VARIANTS[n].get("d", 128)) for n in names for s in (s1, s2)]
    if OLD_SRC.is_file():
        jobs += [("old", s1, 128), ("old", s1 + 8, 128)]
    import multiprocessing as mp

    chunks = [jobs[i::args.workers] for i in range(args.workers)]
    with mp.get_context("spawn").Pool(args.workers) as pool:
        for part in pool.map(_warm, [c for c in chunks if c]):
            res["compile"].extend(part)
    bad = {n for n, _, _, err in res["compile"] if err}
    print(f"[tune] compiled {len(jobs)} jobs in {time.time() - t_start:.0f}s; failed: {sorted(bad)}", flush=True)
    for n, s, t, err in res["compile"]:
        if err:
            print(f"[tune]   {n} S={s}: {err}", flush=True)

    # 2. accuracy: odd sizes for every variant, S=4096 random and video-like for the base configs
    torch.set_float32_matmul_precision("highest")
    for d in (128, 64):
        q, k, v = make_inputs(2, 1001, 6, d, torch.bfloat16, torch.device("cuda"), seed=1)
        ro, rl = reference_attention(q, k, v, dtype=torch.float32)
        for n in names:
            if n in bad or VARIANTS[n].get("probe") or VARIANTS[n].get("d", 128) != d:
                continue
            o, lse = variant_fn(n, return_lse=True)(q, k, v)
            res["accuracy"][f"{n}/S1001_H6_randn"] = accuracy(o, lse, ro, rl)
    for kind in ("randn", "video"):
        q, k, v = make_inputs(1, 4096, 8, 128, torch.bfloat16, torch.device("cuda"), seed=2, kind=kind)
        ro, rl = reference_attention(q, k, v, dtype=torch.float32)
        for n in ("b16_m64n128w4s2", "fp8_m64n128w4s2", "fp8_m64n128w4s2_defer", "fp8_m64n128w4s2_qg16"):
            if n in names and n not in bad:
                o, lse = variant_fn(n, return_lse=True)(q, k, v)
                res["accuracy"][f"{n}/S4096_H8_{kind}"] = accuracy(o, lse, ro, rl)
    print(f"[tune] accuracy done at {time.time() - t_start:.0f}s", flush=True)

    # 3. timing at s1
    def flops(s, d=128, h=40):
        return 4.0 * h * s * s * d

    def record(key, fn, s, d=128, iters=args.iters):
        try:
            t = time_ms(fn, iters)
        except Exception as e:  # noqa: BLE001
            res["time"][key] = {"error": f"{type(e).__name__}: {e}"[:400]}
            print(f"[tune] {key}: {res['time'][key]['error']}", flush=True)
            return None
        t["tops"] = flops(s, d) / (t["median_ms"] * 1e-3) / 1e12
        res["time"][key] = t
        print(f"[tune] {key:42s} {t['median_ms']:8.2f} ms  {t['tops']:6.0f} TOPS-eq", flush=True)
        return t["median_ms"]

    cudnn = SdpaCudnn(device=torch.device("cuda"), dtype=torch.bfloat16)
    for d in (128, 64):
        q, k, v = make_inputs(1, s1, 40, d, torch.bfloat16, torch.device("cuda"), seed=3)
        record(f"cudnn/S{s1}/D{d}", lambda: cudnn(q, k, v), s1, d)
        for n in names:
            if n not in bad and VARIANTS[n].get("d", 128) == d:
                fn = variant_fn(n)
                record(f"{n}/S{s1}", lambda: fn(q, k, v), s1, d)
        if d == 128:
            from ditfleet.attention import sage_triton as st

            for base in ("b16_m64n128w4s2", "fp8_m64n128w4s2"):
                cfg = dict(VARIANTS[base])
                launch = {key: cfg.pop(key) for key in ("num_warps", "num_stages", "tma", "defer")}
                record(f"{base}/S{s1}/quant_only", lambda: st.sage_quantize(q, k, v, **cfg), s1)
                qz = st.sage_quantize(q, k, v, **cfg)
                record(f"{base}/S{s1}/kernel_only", lambda: st.sage_attend(qz, **launch), s1)
                del qz
            if OLD_SRC.is_file() and "old" not in bad:
                record(f"old_33df121/S{s1}", lambda: old_fn(q, k, v), s1)
                q2, k2, v2 = make_inputs(1, s1 + 8, 40, d, torch.bfloat16, torch.device("cuda"), seed=3)
                record(f"old_33df121/S{s1 + 8}", lambda: old_fn(q2, k2, v2), s1 + 8)
                del q2, k2, v2
            record(f"cudnn/S{s1}/D{d}/again", lambda: cudnn(q, k, v), s1, d)
        del q, k, v
        torch.cuda.empty_cache()
    print(f"[tune] S={s1} timing done at {time.time() - t_start:.0f}s", flush=True)

    # 4. the fastest per P.V mode at s2
    best = {}
    for n in names:
        t = res["time"].get(f"{n}/S{s1}", {})
        if "median_ms" in t and not VARIANTS[n].get("probe") and VARIANTS[n].get("d", 128) == 128:
            best.setdefault(VARIANTS[n]["pv_fp8"], []).append((t["median_ms"], n))
    q, k, v = make_inputs(1, s2, 40, 128, torch.bfloat16, torch.device("cuda"), seed=4)
    record(f"cudnn/S{s2}/D128", lambda: cudnn(q, k, v), s2, iters=3)
    for mode in best:
        for _, n in sorted(best[mode])[: args.top]:
            fn = variant_fn(n)
            record(f"{n}/S{s2}", lambda: fn(q, k, v), s2, iters=3)
    del q, k, v
    res["wall_s"] = time.time() - t_start
    (out_dir / "sage_tune.json").write_text(json.dumps(res, indent=1, default=str))

    print("\n== accuracy (vs fp32) ==")
    for key, a in res["accuracy"].items():
        print(f"{key:48s} cos {a['cos']:.5f} relL1 {a['rel_l1']:.4f} relL2 {a['rel_l2']:.4f} "
              f"lse {a.get('lse_max_abs', math.nan):.4f}")
    print("== time ==")
    ref = {k.split("/")[1] + k.split("/")[2]: v["median_ms"] for k, v in res["time"].items()
           if k.startswith("cudnn/") and "median_ms" in v and not k.endswith("again")}
    for key, t in res["time"].items():
        if "median_ms" in t:
            parts = key.split("/")
            d = "D64" if key.startswith("d64") else "D128"
            c = ref.get(parts[1] + d) if parts[0] != "cudnn" else None
            print(f"{key:48s} {t['median_ms']:8.2f} ms {t['tops']:6.0f} TOPS" + (f"  {c / t['median_ms']:.2f}x cuDNN" if c else ""))
    print(f"[tune] wall {res['wall_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
