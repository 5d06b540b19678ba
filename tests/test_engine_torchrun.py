"""The engine without Ray: the local executor, torchrun on CPU (gloo, 2 ranks), sparge checkpoints, exit codes.

* ``torchrun --nproc-per-node 2 -m ditfleet generate`` (launcher picked by itself, and with
  ``--launcher torchrun`` and a jobs file) writes the outputs and latents of ``--launcher local``
  (rel L2 <= 1e-4); rank 0 alone reads the sparge checkpoint and both ranks report its checksum;
* ``Engine`` with the local executor gives exactly ``Pipeline``'s latents and reports its start-up;
* sparge checkpoints: .pt and .safetensors load the same tensors; bad files are user errors naming the key;
* a worker failure is exit status 1 with one line; ``--launcher torchrun`` outside torchrun is exit 2;
* the random real-shape model folder loads through the pipeline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from ditfleet.defaults import TINY_DEFAULT  # noqa: E402
from ditfleet.engine import Engine, EngineError, generate_cli, request_from_config  # noqa: E402
from ditfleet.engine.sparge_weights import (  # noqa: E402
    SpargeCheckpointError,
    load_sparge_weights,
    make_sparge_weights,
    save_sparge_weights,
    sparge_checksum,
    validate_sparge_weights,
)
from ditfleet.engine.tiny import TINY_SPEC, tiny_model_path  # noqa: E402
from ditfleet.engine.video import read_video  # noqa: E402
from ditfleet.errors import UserError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4
LAYERS, HEADS = TINY_SPEC["dit"]["num_layers"], TINY_SPEC["dit"]["num_attention_heads"]


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module", autouse=True)
def cache(tiny_cache):
    """The session's tiny-model cache (tests/conftest.py), with the T2V model built before any launch."""
    tiny_model_path("t2v")
    return tiny_cache


@pytest.fixture(scope="module")
def local():
    with Engine.start({**TINY_DEFAULT, "device": "cpu"}) as eng:
        yield eng


@pytest.fixture(scope="module")
def local_ref(local, tmp_path_factory):
    return local.generate(output=str(tmp_path_factory.mktemp("local") / "local.npy"), quiet=True)


def torchrun(args: list[str], cwd: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "ditfleet", "generate", "--set", "device=cpu", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


# ---- torchrun -------------------------------------------------------------------------------------------
def test_torchrun_matches_local_and_broadcasts_sparge(local_ref, tmp_path):
    state = make_sparge_weights(LAYERS, HEADS, seed=5)
    ckpt = save_sparge_weights(state, tmp_path / "sparge.pt")
    out, lat = tmp_path / "tr.npy", tmp_path / "tr.pt"
    # the command line: no --launcher, torchrun's environment selects it
    p = torchrun(["--set", "parallel.seq_p_size=2", "--set", f"sparge_ckpt={ckpt}", "-o", str(out),
                  "--save-latents", str(lat)], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("wrote ") == 1  # rank 0 alone reports
    assert rel_l2(torch.load(lat), local_ref.latents) <= TOL
    assert np.abs(read_video(out).astype(int) - read_video(local_ref.output).astype(int)).max() <= 1
    e = json.loads(out.with_suffix(".json").read_text())["engine"]
    want = sparge_checksum(state)
    assert e["launcher"] == "torchrun" and [w["rank"] for w in e["workers"]] == [0, 1]
    assert all(w["sparge_sha256"] == want and w["backend"] == "gloo" for w in e["workers"])
    assert e["sparge"]["sha256"] == want and {"device", "process_group", "load"} <= set(e["startup_s"])
    # the transport the mesh resolved (auto -> nccl: gloo on CPU), recorded per worker and for the run
    assert e["parallel"] == {"transport": "nccl", "transport_reason": e["parallel"]["transport_reason"],
                             "transport_configured": "auto", "timeout_s": 300.0}
    assert "auto" in e["parallel"]["transport_reason"] and all(w["transport"] == "nccl" for w in e["workers"])


def test_sparge_run_binds_blocks_on_every_rank(tmp_path):
    """``sparge: true`` with a checkpoint: rank 0 reads it, both ranks bind it per block (block 0 absent: dense),
    and the ring run (the global mask from gathered statistics) equals the local sparge run."""
    from ditfleet.attention.sparge import SpargeParams
    from ditfleet.attention.sparge_ckpt import SpargeCheckpoint

    thr = SpargeParams.thresholds(HEADS, cdfthreshd=0.5, simthreshd1=0.0)
    ckpt = save_sparge_weights(SpargeCheckpoint(LAYERS, HEADS, {i: thr for i in range(1, LAYERS)}).state_dict(),
                               tmp_path / "sparge.safetensors")
    # 128 x 128 x 17 frames: 5 latent frames x 8 x 8 = 320 tokens, 3 x 5 Sparge blocks (the 64 x 64 default
    # has 32 tokens: one block, always kept, so a wrong mask could not show)
    size = {"target_height": 128, "target_width": 128, "target_video_length": 17}
    with Engine.start({**TINY_DEFAULT, "device": "cpu", **size}) as eng:
        dense = eng.generate(output=str(tmp_path / "dense.npy"), decode=False, quiet=True)
    cfg = {**TINY_DEFAULT, "device": "cpu", **size, "sparge": True, "sparge_ckpt": str(ckpt)}
    with Engine.start(cfg) as eng:
        ref = eng.generate(output=str(tmp_path / "local.npy"), quiet=True)
    bound = f"sparge (sparge_flex): {LAYERS - 1} of {LAYERS} blocks sparse (threshold mode), dense blocks [0]"
    assert ref.report["engine"]["workers"][0]["sparge_bound"] == bound
    assert rel_l2(ref.latents, dense.latents) > 10 * TOL  # the mask drops blocks: not the dense result
    out, lat = tmp_path / "tr.npy", tmp_path / "tr.pt"
    p = torchrun(["--set", "parallel.seq_p_size=2", "--set", "parallel.seq_p_attn_type=ring", "--set", "sparge=true",
                  "--set", f"sparge_ckpt={ckpt}", *(x for key, val in size.items() for x in ("--set", f"{key}={val}")),
                  "-o", str(out), "--save-latents", str(lat)], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert rel_l2(torch.load(lat), ref.latents) <= TOL
    e = json.loads(out.with_suffix(".json").read_text())["engine"]
    assert [w["sparge_bound"] for w in e["workers"]] == [bound, bound]


def test_torchrun_jobs_ring(local, tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join([
        json.dumps({"prompt": "a cat", "seed": 1, "output": str(tmp_path / "a.npy")}),
        json.dumps({"prompt": "a dog", "seed": 2, "frames": 6, "output": str(tmp_path / "bad.npy")}),
        json.dumps({"prompt": "a bird", "seed": 3, "output": str(tmp_path / "b.npy")}),
    ]) + "\n")
    p = torchrun(["--launcher", "torchrun", "--set", "parallel.seq_p_size=2", "--set", "parallel.seq_p_attn_type=ring",
                  "--jobs", str(jobs), "--quiet"], tmp_path)
    assert p.returncode == 1, p.stderr[-3000:]  # one invalid job
    assert p.stdout.count("2 ok, 1 failed, 3 total") == 1 and "frames: must be 4n+1" in p.stdout
    for name, prompt, seed in (("a", "a cat", 1), ("b", "a bird", 3)):
        ref = local.generate(prompt=prompt, seed=seed, output=str(tmp_path / f"ref-{name}.npy"), quiet=True)
        got = read_video(tmp_path / f"{name}.npy").astype(int)
        assert np.abs(got - read_video(ref.output).astype(int)).max() <= 1
    assert not (tmp_path / "bad.npy").exists()


def test_torchrun_launcher_outside_torchrun_is_a_user_error(tmp_path, capsys, monkeypatch):
    for var in ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    rc = generate_cli.run(["--launcher", "torchrun", "--set", "parallel.seq_p_size=2", "-o", str(tmp_path / "x.npy")])
    err = capsys.readouterr().err
    assert rc == 2 and "torchrun --nproc-per-node 2 -m ditfleet generate" in err and "Traceback" not in err


# ---- local executor ------------------------------------------------------------------------------------
def test_local_engine_runs_in_process(local, local_ref, tmp_path):
    """A local run is the engine's one generate path on an in-process worker, whose components are public."""
    pipe = local.pipeline
    req = request_from_config(local.cfg, output=str(tmp_path / "p.npy"))
    assert torch.equal(pipe.runner.denoise(pipe.encode(req)).float().cpu(), local_ref.latents)
    e = local_ref.report["engine"]
    assert e["launcher"] == "local" and e["attempts"] == 1 and e["workers"][0]["pid"] == os.getpid()
    assert {"device", "load"} <= set(e["startup_s"])
    steps = []
    local.generate(output=str(tmp_path / "s.npy"), decode=False, quiet=True, progress=lambda i, n: steps.append((i, n)))
    assert steps == [(i, 4) for i in range(4)]
    with pytest.raises(UserError, match="height: must be a positive multiple of 16"):
        local.generate(output=str(tmp_path / "h.npy"), height=40)


def test_worker_failure_exits_1_with_one_line(monkeypatch, tmp_path, capsys):
    def boom(self, *a, **k):
        raise EngineError("request: failed after 2 attempt(s): rank 1 (pid 1 on 10.0.0.2) died during execute")

    monkeypatch.setattr(Engine, "generate", boom)
    assert generate_cli.run(["--set", "device=cpu", "-o", str(tmp_path / "x.npy"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ditfleet: error: request: failed after 2 attempt(s)") and not any("Traceback" in x for x in err)


# ---- sparge checkpoints ---------------------------------------------------------------------------------
def test_sparge_pt_and_safetensors_load_the_same(tmp_path):
    state = make_sparge_weights(LAYERS, HEADS)
    a = load_sparge_weights(save_sparge_weights(state, tmp_path / "s.pt"))
    b = load_sparge_weights(save_sparge_weights(state, tmp_path / "s.safetensors"))
    assert sparge_checksum(a) == sparge_checksum(b) == sparge_checksum(state)
    assert validate_sparge_weights(a, num_layers=LAYERS, num_heads=HEADS) == (LAYERS, HEADS)


@pytest.mark.parametrize("break_it, match", [
    (lambda s: s.pop("blocks.1.self_attn.inner_attention.pvthreshd"), "block 1 is missing key.*pvthreshd"),
    (lambda s: s.__setitem__("blocks.0.self_attn.inner_attention.cdfthreshd", torch.tensor([float("nan"), 1.0])), "NaN"),
    (lambda s: s.__setitem__("blocks.0.self_attn.qkv.weight", torch.ones(2)), r"unexpected key\(s\) 'blocks.0.self_attn.qkv.weight'"),
    (lambda s: s.__setitem__("blocks.0.self_attn.inner_attention.simthreshd1", torch.ones(3)), r"simthreshd1 has shape \[3\], expected \[2\]"),
    (lambda s: s.__setitem__("blocks.0.self_attn.inner_attention.simthreshd2", torch.ones(2, 1)), r"shape \[2, 1\]"),
])
def test_sparge_validation_names_the_key(break_it, match):
    state = make_sparge_weights(LAYERS, HEADS)
    break_it(state)
    with pytest.raises(SpargeCheckpointError, match=match):
        validate_sparge_weights(state)


def test_sparge_file_errors_stop_before_any_worker(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save([torch.ones(2)], bad)
    with pytest.raises(SpargeCheckpointError, match="flat state dict"):
        load_sparge_weights(bad)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(SpargeCheckpointError, match="cannot be read"):
        load_sparge_weights(tmp_path / "junk.safetensors")
    wrong = save_sparge_weights(make_sparge_weights(LAYERS + 1, HEADS), tmp_path / "wrong.pt")
    with pytest.raises(SpargeCheckpointError, match=rf"thresholds for block\(s\) \[{LAYERS}\], but the DiT has {LAYERS} blocks"):
        Engine.start({**TINY_DEFAULT, "device": "cpu", "sparge_ckpt": str(wrong)})


# ---- the random real-shape model folder ---------------------------------------------------------------------
def test_random_model_folder_loads(tmp_path):
    from ditfleet.engine.random_model import build_random_model
    from ditfleet.models.wan import WanDiTConfig

    shape = WanDiTConfig.t2v_1_3b().replace(dim=96, num_heads=4, ffn_dim=128, num_layers=2)  # text_dim stays 4096
    folder = build_random_model(tmp_path / "m", shape, dtype=torch.float32)
    with Engine.start({**TINY_DEFAULT, "device": "cpu", "model_path": str(folder), "infer_steps": 2}) as eng:
        res = eng.generate(output=str(tmp_path / "m.npy"), quiet=True)
    assert res.report["model"]["dit"]["text_dim"] == 4096 and res.report["model"]["dit"]["dim"] == 96
    assert read_video(res.output).shape == (5, 64, 64, 3) and torch.isfinite(res.latents).all()
