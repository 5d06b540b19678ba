"""Where a whole CFG step of a real-shape Wan DiT goes, on one GPU (issue 17's 14B 720p x 81 step target).

    python benchmarks/profile_step.py OUT_DIR [--model t2v-14b] [--video 720p81] [--attn-type flash_attn4]

Builds the model as ``ditfleet bench step`` does (same argument parser and helpers), then in one process:
one B=1 forward (the ``bench dit`` number), a step with CFG batched (B=2, the engine's default), a step with
``cfg_batch=False`` (two B=1 forwards), each median of --iters after --warmup (CUDA events), and a
``torch.profiler`` trace of one batched step summarised by kernel (top 40 by CUDA time) into OUT_DIR.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from ditfleet.bench import step as bstep
from ditfleet.bench.common import environment


def _time(fn, warmup: int, iters: int) -> list[float]:
    import time

    out = []
    cuda = torch.cuda.is_available()
    for i in range(warmup + iters):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            dt = a.elapsed_time(b) / 1e3
        else:
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
        if i >= warmup:
            out.append(dt)
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out_dir")
    p.add_argument("--attn-type", default="flash_attn4")
    known, rest = p.parse_known_args()
    parser = argparse.ArgumentParser()
    bstep.add_arguments(parser)
    args = parser.parse_args(["--peers", "--attn-types", known.attn_type, *rest])
    from ditfleet.engine.runner import ModelRunner
    from ditfleet.parallel import init_distributed

    env = init_distributed()
    bench = bstep.Bench(args, env, {"launcher": "profile"})
    res = bstep.registry.resolve(known.attn_type, site=bstep.SELF_SITE, device=bench.device, dtype=bench.dtype)
    model = bench.model
    model.set_attention(bench._attention(res))
    bstep.bind_self_attention(model, args, bench.radial)
    out = {"environment": environment(1), "args": vars(args), "kernel": res.kernel}
    enc = bench.enc
    with torch.inference_mode():
        e = enc.to(bench.device)
        x = bench.noise.to(bench.device, torch.float32)
        t = torch.full((1,), 900.0, device=bench.device)
        single = ModelRunner(model)
        out["forward_b1_s"] = _time(lambda: single.dit(x, t, e.context, clip_fea=e.clip_fea, y=e.y), args.warmup, args.iters)
        for batch in (True, False):
            runner = ModelRunner(model, cfg_batch=batch)

            def one_step(runner=runner):
                it = runner.denoise_iter(enc, noise=bench.noise)
                next(it)
                it.close()

            out[f"step_cfg_batch_{batch}_s"] = _time(one_step, args.warmup, args.iters)
        runner = ModelRunner(model, cfg_batch=True)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            it = runner.denoise_iter(enc, noise=bench.noise)
            next(it)
            it.close()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90)
    d = Path(known.out_dir)
    d.mkdir(parents=True, exist_ok=True)
    (d / "profile_step_kernels.txt").write_text(table)
    out = {k: ({"times": v, "median": statistics.median(v)} if isinstance(v, list) and v and isinstance(v[0], float)
               else v) for k, v in out.items()}
    (d / "profile_step.json").write_text(json.dumps(out, indent=1, default=str))
    print(json.dumps({k: v["median"] for k, v in out.items() if isinstance(v, dict) and "median" in v}, indent=1))
    print(table[:6000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
