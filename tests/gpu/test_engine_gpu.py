"""The Ray and torchrun launchers on 2 and 4 GPUs with NCCL (skipped without >= 2 CUDA GPUs or without Ray).

For each world size W (``DITFLEET_GPU_WORLDS``, default every one of 2 and 4 that fits the host):

* the tiny default model (fp32), Ulysses over W GPUs: ``--launcher ray`` and ``torchrun`` give the
  latents of the one-GPU local run;
* a Wan-1.3B-shape random model (``ditfleet.engine.random_model``: 30 blocks, dim 1536, 12 heads,
  text_dim 4096) at 832x480, ``DITFLEET_GPU_FRAMES`` frames (default 81: 32,760 tokens), 2 steps,
  bf16: Ray and torchrun give the same latents and frames;
* the Ray engine's start-up (Ray up, workers placed, process group formed; loading excluded) is at
  most 15 s, read from the run report's ``engine.startup_s``;
* a rank SIGKILLed mid-denoise under NCCL: the request is retried on a rebuilt group within 60 s,
  and no killed worker keeps a GPU context (nvidia-smi).

Every launch is the CLI in a subprocess (``python -m ditfleet generate --launcher ray`` starts its
own local cluster, as a user's run does). A summary JSON (card, GPU count, start-up stages, errors,
timings) goes to ``$DITFLEET_RESULTS_DIR/engine_<card>_<W>gpu.json`` when that is set.

    DITFLEET_GPU_WORLDS=2 python -m pytest -q tests/gpu/test_engine_gpu.py
    DITFLEET_GPU_WORLDS=4 DITFLEET_RESULTS_DIR=benchmarks/results python -m pytest -q tests/gpu/test_engine_gpu.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("ray")
pytest.importorskip("diffusers")

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = pytest.mark.skipif(GPUS < 2, reason="needs >= 2 CUDA GPUs")

ROOT = Path(__file__).resolve().parents[2]
WORLDS = [int(w) for w in os.environ.get("DITFLEET_GPU_WORLDS", "2,4").split(",") if w.strip() and int(w) <= GPUS]
FRAMES = int(os.environ.get("DITFLEET_GPU_FRAMES", "81"))
STARTUP_LIMIT_S = 15.0
TINY_TOL = 1e-3  # fp32 on GPU (TF32 off in SDPA's math/efficient kernels; sharded sums reorder)
SAME_TOL = 1e-3  # Ray vs torchrun: same world, same kernels -> identical in practice


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


_CACHE: list[Path] = []


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """One tiny-model cache for every launch of the module."""
    _CACHE[:] = [tmp_path_factory.mktemp("ditfleet-cache")]
    yield _CACHE[0]


def _env(tmp: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "DITFLEET_CACHE": str(_CACHE[0] if _CACHE else tmp / "cache"), "OMP_NUM_THREADS": "4"}
    env.pop("RAY_ADDRESS", None)
    return env


def launch(kind: str, world: int, cfg: Path, out: Path, tmp: Path, *sets: str) -> dict:
    """Run one generation; returns ``{"latents", "frames", "report", "seconds"}``."""
    common = ["-c", str(cfg), "-o", str(out), "--save-latents", str(out.with_suffix(".pt")), "--quiet",
              "--set", f"parallel.seq_p_size={world}", *[a for s in sets for a in ("--set", s)]]
    if kind == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
               "-m", "ditfleet", "generate", *common]
    else:
        cmd = [sys.executable, "-m", "ditfleet", "generate", "--launcher", kind, *common]
    t = time.perf_counter()
    p = subprocess.run(cmd, env=_env(tmp), cwd=tmp, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - t
    assert p.returncode == 0, f"{' '.join(cmd)}\n{p.stderr[-5000:]}"
    return {"latents": torch.load(out.with_suffix(".pt")), "frames": np.load(out),
            "report": json.loads(out.with_suffix(".json").read_text()), "seconds": seconds}


def write_config(path: Path, **cfg) -> Path:
    path.write_text(json.dumps(cfg, indent=2))
    return path


@pytest.fixture(scope="module")
def model_13b(tmp_path_factory):
    """A random Wan-1.3B-shape folder (or ``$DITFLEET_MODEL_13B`` if it names one already built)."""
    given = os.environ.get("DITFLEET_MODEL_13B")
    if given and (Path(given) / "model_index.json").is_file():
        return Path(given)
    from ditfleet.engine.random_model import build_random_model

    folder = Path(given) if given else tmp_path_factory.mktemp("wan13b") / "model"
    return build_random_model(folder, device="cuda")


def record(world: int, name: str, data: dict) -> None:
    out_dir = os.environ.get("DITFLEET_RESULTS_DIR")
    if not out_dir:
        return
    card = torch.cuda.get_device_name(0).lower().replace("nvidia ", "").split()[0]
    path = Path(out_dir) / f"engine_{card}_{world}gpu.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(path.read_text()) if path.is_file() else {"card": torch.cuda.get_device_name(0), "gpus": world}
    old[name] = data
    path.write_text(json.dumps(old, indent=2) + "\n")


def summary(runs: dict) -> dict:
    out = {}
    for k, r in runs.items():
        e = r["report"]["engine"]
        out[k] = {"wall_s": r["seconds"], "startup_s": e["startup_s"], "startup_excl_load_s": e["startup_excl_load_s"],
                  "denoise_s": r["report"]["timings_s"].get("denoise_s"),
                  "workers": [{x: w[x] for x in ("rank", "device", "gpu_ids", "backend")} for w in e["workers"]]}
    return out


def check_ray_workers(report: dict, world: int) -> None:
    e = report["engine"]
    assert e["launcher"] == "ray" and e["world_size"] == world and e["placement_strategy"] == "STRICT_PACK"
    assert all(w["backend"] == "nccl" for w in e["workers"])
    assert sorted(w["device"] for w in e["workers"]) == sorted(f"cuda:{i}" for i in range(world))
    assert len({g for w in e["workers"] for g in w["gpu_ids"]}) == world  # one distinct GPU per rank


@pytest.mark.parametrize("world", WORLDS)
def test_tiny_default_ray_and_torchrun_match_local(world, tmp_path):
    cfg = write_config(tmp_path / "tiny.json", device="cuda", dtype="fp32", infer_steps=4, target_video_length=5,
                       target_height=64, target_width=64)
    local = launch("local", 1, cfg, tmp_path / "local.npy", tmp_path)
    runs = {k: launch(k, world, cfg, tmp_path / f"{k}.npy", tmp_path) for k in ("ray", "torchrun")}
    errs = {k: rel_l2(r["latents"], local["latents"]) for k, r in runs.items()}
    errs["ray_vs_torchrun"] = rel_l2(runs["ray"]["latents"], runs["torchrun"]["latents"])
    check_ray_workers(runs["ray"]["report"], world)
    startup = runs["ray"]["report"]["engine"]["startup_excl_load_s"]
    record(world, "tiny", {"rel_l2": errs, **summary(runs)})
    assert all(e <= TINY_TOL for e in errs.values()), errs
    assert startup <= STARTUP_LIMIT_S, runs["ray"]["report"]["engine"]["startup_s"]


@pytest.mark.parametrize("world", WORLDS)
def test_wan13b_shape_480p_ray_equals_torchrun(world, model_13b, tmp_path):
    cfg = write_config(tmp_path / "wan13b.json", model_path=str(model_13b), device="cuda", dtype="bf16",
                       infer_steps=2, target_video_length=FRAMES, target_height=480, target_width=832,
                       sample_shift=8.0, sample_guide_scale=6.0)
    runs = {k: launch(k, world, cfg, tmp_path / f"{k}.npy", tmp_path) for k in ("ray", "torchrun")}
    a, b = runs["ray"], runs["torchrun"]
    err = rel_l2(a["latents"], b["latents"])
    diff = int(np.abs(a["frames"].astype(int) - b["frames"].astype(int)).max())
    check_ray_workers(a["report"], world)
    record(world, f"wan1.3b_480p_{FRAMES}f_2steps", {"rel_l2_ray_vs_torchrun": err, "bitwise_equal":
                                                     bool(torch.equal(a["latents"], b["latents"])),
                                                     "max_frame_diff": diff, **summary(runs)})
    assert a["latents"].shape == (1, 16, (FRAMES - 1) // 4 + 1, 60, 104)
    assert torch.isfinite(a["latents"]).all() and err <= SAME_TOL and diff <= 1
    assert a["report"]["engine"]["startup_excl_load_s"] <= STARTUP_LIMIT_S, a["report"]["engine"]["startup_s"]


def gpu_pids() -> set[int]:
    """Processes holding a CUDA context on any GPU (nvidia-smi), or an empty set without nvidia-smi."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return set()
    return {int(x) for x in out.split() if x.strip().isdigit()}


def test_killed_nccl_worker_is_retried_and_gpus_freed(tmp_path, monkeypatch):
    """SIGKILL of one rank mid-denoise under NCCL: retried on a rebuilt group in < 60 s; no process keeps a GPU."""
    import signal

    from ditfleet.defaults import TINY_DEFAULT
    from ditfleet.engine import Engine

    monkeypatch.setenv("DITFLEET_CACHE", str(_CACHE[0]))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = {**TINY_DEFAULT, "device": "cuda", "dtype": "fp32", "launcher": "ray", "infer_steps": 200,
           "parallel": {"seq_p_size": 2}, "ray": {"max_retries": 1, "request_timeout_s": 60}}
    with Engine.start(cfg) as eng:
        old = [w["pid"] for w in eng.workers]
        assert set(old) <= gpu_pids() or not gpu_pids()
        fired: list[float] = []

        def progress(i, n):
            if i == 1 and not fired:
                fired.append(time.monotonic())
                os.kill(old[1], signal.SIGKILL)

        t0 = time.perf_counter()
        res = eng.generate(output=str(tmp_path / "k.npy"), progress=progress, quiet=True)
        assert fired and time.perf_counter() - t0 < 60 and res.report["engine"]["attempts"] == 2
        assert not set(old) & gpu_pids()  # the broken group's GPU memory is released
        new = [w["pid"] for w in eng.workers]
    deadline = time.monotonic() + 20
    while set(new) & gpu_pids() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not set(new) & gpu_pids()
