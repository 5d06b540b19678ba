"""Whole-request ``ditfleet generate`` runs on random real-shape folders (one GPU), for the issue acceptance runs.

Runs (each builds its random folder, runs ``python3 -m ditfleet generate`` as a user would, keeps the run report):

* ``a14b``: a Wan2.2 A14B-shape T2V folder (two 14B experts, ``boundary_ratio`` 0.875; the second expert's
  weight file is a hard link of the first's, both are loaded), ``configs/wan22_moe_t2v.json`` on one GPU, 4 steps
  with CFG at 720p x 81 (shift 12): the timesteps 999, 972, 922 run the high-noise expert, 799 the low-noise one.
* ``lora4``: a Wan2.1 T2V 14B-shape folder, a random rank-64 kohya-format LoRA on every block linear, and
  ``configs/wan_t2v_distill_4step.json`` (4 steps ``[1000, 750, 500, 250]``, no CFG) at 720p x 81.

Both folders carry the Wan2.1 release's VAE architecture with random weights (``real_vae``), so the decode costs
what it costs at full size; the text encoder is a one-layer UMT5 (the real one is ~50 ms of a request on an H200).

Usage: ``python3 benchmarks/gen_runs.py OUTDIR [a14b] [lora4] [--attn flash_attn4] [--work /dev/shm/ditfleet]``.
Writes ``OUTDIR/gen_<run>.json`` (the run report, the command, wall time of the whole process) and logs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Two anthropomorphic cats in comfy boxing gear and bright gloves fight intensely on a spotlighted stage."
sys.path.insert(0, str(ROOT))


def commit() -> str:
    stamp = ROOT / ".commit"
    return stamp.read_text().strip() if stamp.is_file() else "unknown"


def write_lora(path: Path, cfg, rank: int = 64, seed: int = 0) -> int:
    """A random kohya-format LoRA (``diffusion_model.blocks.N.<module>.lora_down/lora_up.weight`` + ``.alpha``)
    on every block linear of ``cfg``; returns the number of modules."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    mods = [f"{site}.{p}" for site in ("self_attn", "cross_attn") for p in "qkvo"] + ["ffn.0", "ffn.2"]
    shapes = {"ffn.0": (cfg.ffn_dim, cfg.dim), "ffn.2": (cfg.dim, cfg.ffn_dim)}
    state = {}
    for i in range(cfg.num_layers):
        for m in mods:
            out_f, in_f = shapes.get(m, (cfg.dim, cfg.dim))
            key = f"diffusion_model.blocks.{i}.{m}"
            state[f"{key}.lora_down.weight"] = (torch.randn(rank, in_f, generator=g) / in_f**0.5).to(torch.bfloat16)
            state[f"{key}.lora_up.weight"] = (torch.randn(out_f, rank, generator=g) * 1e-3).to(torch.bfloat16)
            state[f"{key}.alpha"] = torch.tensor(float(rank))
    save_file(state, str(path))
    return len(state) // 3


def run(name: str, folder: Path, config: str, sets: list[str], out: Path, requests: int = 1) -> dict:
    """``requests`` requests, the same but for their seeds (42, 43, ...), in one process (``--jobs``), the model loaded once: the
    first pays the JIT compilation (torch.compile of the fused ops, FA4's kernels), the later ones are warm."""
    outputs = [folder.parent / f"gen_{name}_{i}.npy" for i in range(requests)]  # lossless frames, in the work folder
    jobs = folder.parent / f"gen_{name}.jsonl"
    jobs.write_text("".join(json.dumps({"prompt": PROMPT, "output": str(o), "seed": 42 + i}) + "\n" for i, o in enumerate(outputs)))
    cmd = [sys.executable, "-m", "ditfleet", "generate", config, "--set", f"model_path={folder}", "--jobs", str(jobs),
           *[a for s in sets for a in ("--set", s)]]
    t0 = time.perf_counter()
    with open(out / f"gen_{name}.log", "w") as log:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=900).returncode
    wall = time.perf_counter() - t0
    reports = [json.loads(o.with_suffix(".json").read_text()) if o.with_suffix(".json").is_file() else None
               for o in outputs]
    # the frames of random weights are noise (removed with the work folder); the reports are what is kept
    return {"run": name, "rc": rc, "command": cmd, "process_wall_s": wall, "requests": requests,
            "report": reports[-1], "reports": reports}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("runs", nargs="*", help="a14b, lora4 (default: both)")
    ap.add_argument("--attn", default="flash_attn4", help="attention type of the cross-attention sites (and of "
                    "self-attention without --self-attn; default: flash_attn4)")
    ap.add_argument("--self-attn", help="attention type of self-attention (default: --attn)")
    ap.add_argument("--requests", type=int, default=1, help="requests per run in one process, the same but for the seed (42, 43, ...; default 1)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config overrides for every run (e.g. dit_quantized=true)")
    ap.add_argument("--tiny", action="store_true", help="a 2-block model, 5 frames 64x64 on the CPU (checks the script)")
    ap.add_argument("--work", default="/dev/shm/ditfleet" if Path("/dev/shm").is_dir() else "/tmp/ditfleet")
    args = ap.parse_args()
    args.runs = args.runs or ["a14b", "lora4"]
    if set(args.runs) - {"a14b", "lora4"}:
        ap.error(f"runs: a14b, lora4; got {args.runs}")
    from ditfleet.engine.random_model import build_random_model
    from ditfleet.models.wan import WanDiTConfig

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    attn = [f"self_attn_1_type={args.self_attn or args.attn}", *args.sets,
            *(f"{k}={args.attn}" for k in ("cross_attn_1_type", "cross_attn_2_type"))]
    cfg14 = WanDiTConfig.t2v_14b()
    device, size = "cuda", []
    if args.tiny:
        import dataclasses

        cfg14 = dataclasses.replace(cfg14, num_layers=2, dim=128, ffn_dim=256, num_heads=2)
        device, attn = "cpu", ["dtype=fp32", "device=cpu", *args.sets]
        size = ["target_video_length=5", "target_height=64", "target_width=64"]
    for name in args.runs:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        t0 = time.perf_counter()
        if name == "a14b":
            folder = build_random_model(work / "a14b", cfg14, device=device, family="wan2.2_moe", share_experts=True,
                                        real_vae=True)
            res = run(name, folder, "configs/wan22_moe_t2v.json",
                      ["launcher=local", "parallel.seq_p_size=1", "parallel.cfg_p_size=1", "infer_steps=4", *attn, *size], out, args.requests)
        else:
            folder = build_random_model(work / "w14", cfg14, device=device, real_vae=True)
            lora = work / "distill_lora_rank64.safetensors"
            res = run(name, folder, "configs/wan_t2v_distill_4step.json",
                      [f'lora_configs=[{{"path": "{lora}", "strength": 1.0}}]', *attn, *size], out, args.requests) if write_lora(lora, cfg14) else {}
        res["build_s"] = time.perf_counter() - t0 - res["process_wall_s"]
        res.update(card=torch.cuda.get_device_name(0) if device == "cuda" else "cpu", gpus=1, commit=commit(), torch=torch.__version__)
        (out / f"gen_{name}.json").write_text(json.dumps(res, indent=1) + "\n")
        r = res["report"] or {}
        for i, rep in enumerate(res.get("reports") or []):
            print(f"{name} request {i}: timings={(rep or {}).get('timings_s')}", flush=True)
        print(f"{name}: rc={res['rc']} timings={r.get('timings_s')} load={r.get('load_timings_s')} "
              f"peak={r.get('peak_memory')} sampler={r.get('sampler')}", flush=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
