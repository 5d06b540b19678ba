"""Device checks of Sparge on FlashAttention-4 that ``ditfleet bench sparge`` does not make (one H200 run).

- the fused Triton predictor vs the torch one on the same bf16 inputs: time and block flips, at the
  bench's sizes (structured inputs, 40 heads of 128, top-k 0.5 and cdfthreshd 0.9 / simthreshd1 0.1);
- host syncs: ``torch.cuda.set_sync_debug_mode("warn")`` around the predictor and around the FA4
  block-sparse call (each separately), counting the warnings each raises.

Usage: ``python3 benchmarks/sparge_fa4_check.py OUT.json [CASE ...]`` (cases as ``bench sparge``).
"""

from __future__ import annotations

import json
import sys
import time
import warnings

import torch

from ditfleet.attention.sparge import SpargeFlex, SpargeParams, predict_block_mask
from ditfleet.bench.common import environment, time_cuda
from ditfleet.bench.sparge import parse_case, structured_qkv


def syncs(fn) -> tuple[int, list[str]]:
    """Host syncs ``fn`` makes (sync debug mode ``warn``), after one untimed call."""
    fn()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    msgs = [str(x.message)[:160] for x in w if "synchroniz" in str(x.message).lower()]
    return len(msgs), msgs[:3]


def main() -> int:
    out_path = sys.argv[1]
    cases = sys.argv[2:] or ["480p81", "720p81"]
    dev = torch.device("cuda")
    report = {"environment": environment(), "cases": []}
    for name in cases:
        grid = parse_case(name)
        q, k, v = structured_qkv(grid, 40, 128, dtype=torch.bfloat16, device=dev, seed=0)
        case = {"case": name, "tokens": q.shape[1], "settings": {}}
        for setting, params in (("topk", SpargeParams.topk_mode(40, 0.5)),
                                ("thr", SpargeParams.thresholds(40, cdfthreshd=0.9, simthreshd1=0.1))):
            r = case["settings"][setting] = {}
            fused = predict_block_mask(q, k, params, impl="triton")
            ref = predict_block_mask(q, k, params, impl="torch")
            r["flips"] = float((fused.blocks != ref.blocks).float().mean())
            r["sparsity"] = 1 - fused.density
            r["predict_triton"] = time_cuda(lambda: predict_block_mask(q, k, params, impl="triton"), warmup=2, iters=10)["median_ms"]
            r["predict_torch"] = time_cuda(lambda: predict_block_mask(q, k, params, impl="torch"), warmup=0, iters=2)["median_ms"]
            r["predictor_syncs"] = syncs(lambda: predict_block_mask(q, k, params, impl="triton"))
            be = SpargeFlex(device=dev, dtype=torch.bfloat16, impl="fa4").for_layer(params)
            r["fa4_kernel_syncs"] = syncs(lambda: be(q, k, v, return_lse=True, block_mask=fused))
            r["runs"] = be.runs
            print(f"[check] {name} {setting}: predictor triton {r['predict_triton']:.2f} ms, torch {r['predict_torch']:.2f} ms, "
                  f"flips {r['flips']:.2e}, sparsity {r['sparsity']:.3f}, syncs predictor {r['predictor_syncs'][0]}, "
                  f"fa4 kernel {r['fa4_kernel_syncs'][0]} {r['fa4_kernel_syncs'][1][:1]}", flush=True)
        report["cases"].append(case)
        q = k = v = None
        torch.cuda.empty_cache()
    with open(out_path, "w") as f:
        json.dump(report, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    t0 = time.perf_counter()
    rc = main()
    print(f"[check] done in {time.perf_counter() - t0:.0f} s")
    sys.exit(rc)
