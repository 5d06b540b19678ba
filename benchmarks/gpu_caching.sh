#!/usr/bin/env bash
# Issue 20's one-H200 run: `ditfleet generate` on a random Wan2.1-1.3B-shape folder, 480p x 81 frames, 50 steps,
# feature_caching none and then Tea at its default threshold (teacache_thresh 0.26, TeaCache4Wan2.1's published
# 1.3B polynomial), in one script. Writes OUTDIR/gpu_caching.json (per run: computed / skipped forwards, the
# skipped steps of each CFG branch, the generate wall time and the denoising time; the commit from .commit) and
# one log per run. Random weights show the speed only, not the quality trade-off (README "Step caching").
#
# Usage: bash benchmarks/gpu_caching.sh OUTDIR
#   CACHING_SHAPE=tiny  a small DiT on the CPU (fp32, 64x64 x 5 frames, 8 steps; the 1.3B polynomial given
#                       explicitly, as no polynomial is published for that shape): checks the script end to end.
#   ATTN=<type>         self-attention kernel (default torch_sdpa: always available).
#   WORK=<dir>          where the model folder and the videos go (default /tmp/ditfleet-gpu-caching; not OUTDIR:
#                       the videos are large).
set -euo pipefail
out=${1:?usage: gpu_caching.sh OUTDIR}
mkdir -p "$out"
export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
export GIT_DIR=/nonexistent-ditfleet-git  # a copy's .git may be stale: the commit comes from .commit
export CACHING_SHAPE=${CACHING_SHAPE:-1.3b} ATTN=${ATTN:-torch_sdpa} WORK=${WORK:-/tmp/ditfleet-gpu-caching}
exec python3 - "$out" <<'PY'
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

out = Path(sys.argv[1]).resolve()
shape, attn, work = os.environ["CACHING_SHAPE"], os.environ["ATTN"], Path(os.environ["WORK"])
if shape not in ("1.3b", "tiny"):
    sys.exit(f"CACHING_SHAPE must be 1.3b or tiny, got {shape!r}")
commit = Path(".commit").read_text().strip() if Path(".commit").is_file() else "unknown (no .commit)"
work.mkdir(parents=True, exist_ok=True)

from ditfleet.engine.random_model import build_random_model
from ditfleet.models.wan import WanDiTConfig
from ditfleet.models.wan.cache_hooks import TEACACHE_COEFFICIENTS

cuda = torch.cuda.is_available() and shape == "1.3b"
if shape == "1.3b":
    dit = WanDiTConfig.t2v_1_3b()
    video = dict(target_video_length=81, target_height=480, target_width=832, infer_steps=50, dtype="bf16",
                 device="cuda")
    extra = {}  # the published Wan2.1 T2V 1.3B polynomial is picked from the model's shape
else:
    dit = WanDiTConfig(model_type="t2v", dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=64, text_len=32,
                       freq_dim=32)
    video = dict(target_video_length=5, target_height=64, target_width=64, infer_steps=8, dtype="fp32",
                 device="cpu", text_len=32)
    extra = {"coefficients": [list(c) for c in TEACACHE_COEFFICIENTS["1.3B", "t2v"]]}
if shape == "1.3b" and not torch.cuda.is_available():
    sys.exit("CACHING_SHAPE=1.3b needs a CUDA device (CACHING_SHAPE=tiny runs on the CPU)")

model = work / f"model-{shape}"
t0 = time.perf_counter()
if not (model / "model_index.json").is_file():
    build_random_model(model, dit, device="cuda" if cuda else "cpu", dtype=torch.bfloat16 if cuda else torch.float32)
build_s = time.perf_counter() - t0
print(f"model folder {model} ({build_s:.1f} s)", flush=True)

base = dict(task="t2v", model_path=str(model), seed=42, sample_guide_scale=6.0, sample_shift=8.0, enable_cfg=True,
            self_attn_1_type=attn, cross_attn_1_type=attn if attn != "radial_attn" else "torch_sdpa", **video)
runs = {"none": {"feature_caching": "none"}, "Tea": {"feature_caching": "Tea", **extra}}
results = {}
for name, keys in runs.items():
    cfg = work / f"{name}.json"
    cfg.write_text(json.dumps({**base, **keys}, indent=2))
    video_path = work / f"{name}.npy"
    log = out / f"{name}.log"
    cmd = [sys.executable, "-m", "ditfleet", "generate", str(cfg), "-o", str(video_path), "--overwrite", "--quiet",
           "--save-latents", str(work / f"{name}.pt")]
    print("$ " + " ".join(cmd), flush=True)
    t = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t
    if rc != 0:
        print(open(log).read()[-4000:])
        sys.exit(f"{name}: ditfleet generate exited {rc} (log {log})")
    rep = json.loads(video_path.with_suffix(".json").read_text())
    sc = rep["step_cache"]
    results[name] = {
        "feature_caching": sc["feature_caching"], "settings": sc.get("settings", {}),
        "forwards_computed": sc.get("forwards_computed", 2 * video["infer_steps"]),
        "forwards_skipped": sc.get("forwards_skipped", 0), "branches": sc.get("branches"),
        "generate_wall_s": round(wall, 2), "denoise_s": round(rep["timings_s"]["denoise_s"], 3),
        "denoise_step_s": round(rep["timings_s"]["denoise_step_s"], 4), "load_timings_s": rep.get("load_timings_s"),
        "peak_memory": rep.get("peak_memory"), "attention": {k: (v or {}).get("kernel") for k, v in rep["attention"].items()},
    }
    print(json.dumps({name: results[name]}, indent=1), flush=True)

a = torch.load(work / "none.pt").double()
b = torch.load(work / "Tea.pt").double()
summary = {
    "what": "ditfleet generate, random Wan2.1-1.3B-shape weights (README: random weights show no quality trade-off)"
            if shape == "1.3b" else "CPU check of the script (tiny shape)",
    "commit": commit, "shape": shape, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
    "torch": torch.__version__, "video": video, "self_attn": attn, "build_model_s": round(build_s, 1),
    "runs": results,
    "denoise_speedup": round(results["none"]["denoise_s"] / results["Tea"]["denoise_s"], 3),
    "computed_forwards": {k: v["forwards_computed"] for k, v in results.items()},
    "final_latents_rel_l2_tea_vs_none": float((b - a).norm() / a.norm()),
}
(out / "gpu_caching.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps({k: summary[k] for k in ("computed_forwards", "denoise_speedup", "final_latents_rel_l2_tea_vs_none")}))
print(f"wrote {out / 'gpu_caching.json'}")
PY
