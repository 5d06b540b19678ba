"""A new user's mistakes (issue 15): one message naming the key or path, exit 2, no traceback, nothing written
or deleted, and no model load where none is needed; outputs never destroy what ditfleet did not write."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ditfleet.cli import main
from ditfleet.engine.video import read_video

ROOT = Path(__file__).resolve().parents[1]
QUICK_S = 5.0  # a check that needs no model: well under this (in-process; the subprocess adds Python + torch start)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (what a test asserts is neither written nor deleted)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def user_folder(tmp_path: Path) -> Path:
    """A folder that already holds a user's files (a video, notes, a sub-folder, a PNG of theirs)."""
    d = tmp_path / "mine"
    (d / "sub").mkdir(parents=True)
    (d / "old.mp4").write_bytes(b"an earlier video")
    (d / "notes.txt").write_text("keep me")
    (d / "sub" / "00000.png").write_bytes(b"not ditfleet's")
    return d


def cli_error(capsys, *args: str) -> tuple[str, float]:
    """Run the CLI in-process; assert exit 2, one ``ditfleet: error:`` line and no traceback; return (stderr, s)."""
    t = time.perf_counter()
    rc = main(list(args))
    dt = time.perf_counter() - t
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and err.count("ditfleet: error:") == 1, err
    tail = err[err.index("ditfleet: error:"):]
    assert "INFO " not in tail and "WARNING " not in tail, err  # the message is the last thing said
    return err, dt


def sub(*args: str, cwd: Path, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1",
           **(env or {})}
    return subprocess.run([sys.executable, "-m", "ditfleet", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


# ---- 1. outputs never destroy what ditfleet did not write -------------------------------------------------------
@pytest.mark.parametrize("target,needle", [
    ("mine/", "output folder .*mine' is not empty"),
    ("mine", "output folder .*mine' is not empty"),
    ("mine/old.mp4", "mine/old.mp4' exists and was not written by ditfleet"),
])
def test_existing_folder_or_file_is_refused_before_any_work(tmp_path, capsys, target, needle, monkeypatch):
    import re

    d = user_folder(tmp_path)
    before = snapshot(tmp_path)
    monkeypatch.chdir(tmp_path)
    err, dt = cli_error(capsys, "generate", "-o", target)
    assert re.search(needle, err) and "--overwrite" in err, err
    assert dt < QUICK_S and snapshot(tmp_path) == before and (d / "notes.txt").exists()


def test_report_and_latents_paths_are_checked_before_any_work(tmp_path, capsys):
    d = user_folder(tmp_path)
    (d / "clip.json").write_text('{"mine": true}')
    before = snapshot(tmp_path)
    err, dt = cli_error(capsys, "generate", "-o", str(d / "clip.mp4"))
    assert "clip.json" in err and "not a ditfleet report" in err and dt < QUICK_S
    err, dt = cli_error(capsys, "generate", "-o", str(tmp_path / "new.mp4"), "--save-latents", str(d / "notes.txt"))
    assert "--save-latents" in err and "notes.txt" in err and "exists" in err and dt < QUICK_S
    err, dt = cli_error(capsys, "generate", "-o", str(tmp_path / "new.mp4"), "--save-latents", str(d / "notes.txt" / "l.pt"))
    assert "--save-latents" in err and "is a file" in err and dt < QUICK_S
    assert snapshot(tmp_path) == before and not (tmp_path / "new.mp4").exists()


def test_jobs_outputs_are_checked_before_the_model_loads(tmp_path, capsys, monkeypatch):
    d = user_folder(tmp_path)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(json.dumps(j) for j in [{"prompt": "a", "output": str(d / "old.mp4")},
                                                     {"prompt": "b", "output": str(d)}]) + "\n")
    before = snapshot(tmp_path)
    import ditfleet.engine.engine as engine_mod

    monkeypatch.setattr(engine_mod.Engine, "start", classmethod(lambda *a, **k: pytest.fail("the model was loaded")))
    err, dt = cli_error(capsys, "generate", "--jobs", str(jobs))
    assert "line 1:" in err and "old.mp4" in err and "line 2:" in err and "not empty" in err and dt < QUICK_S
    assert snapshot(tmp_path) == before


def test_a_users_folder_survives_every_output_mode(tmp_path, tiny_cache, capsys):
    """mp4, npy, PNG frames (with --overwrite into the user's folder), --save-latents, a jobs file: the user's
    files stay byte for byte; the PNG mode replaces only frame files NNNNN.png."""
    d = user_folder(tmp_path)
    mine = snapshot(d)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(json.dumps({"prompt": p, "output": str(d / o)}) for p, o in
                              [("a", "a.mp4"), ("b", "b.npy")]) + "\n")
    assert main(["generate", "--jobs", str(jobs), "-q", "--set", "infer_steps=1"]) == 0
    assert main(["generate", "-o", str(d / "c.mp4"), "--save-latents", str(d / "c.pt"), "-q",
                 "--set", "infer_steps=1"]) == 0
    assert main(["generate", "-o", str(d), "--overwrite", "-q", "--set", "infer_steps=1"]) == 0
    capsys.readouterr()
    after = snapshot(d)
    assert {k: after[k] for k in mine} == mine  # every file of the user's, byte for byte
    assert read_video(d / "b.npy").shape == (5, 64, 64, 3) and read_video(d / "a.mp4").shape[0] == 5
    assert sorted(p.name for p in d.glob("0000*.png")) == [f"{i:05d}.png" for i in range(5)]
    assert (tmp_path / "mine.json").is_file() and (d / "c.pt").is_file()
    # a second run over its own mp4 (report beside it names it) is allowed without --overwrite
    assert main(["generate", "-o", str(d / "c.mp4"), "-q", "--set", "infer_steps=1", "--set", "seed=3"]) == 0
    assert {k: snapshot(d)[k] for k in mine} == mine


def test_current_folder_as_output(tmp_path, tiny_cache, capsys, monkeypatch):
    run_dir = tmp_path / "frames"
    run_dir.mkdir()
    monkeypatch.chdir(run_dir)
    assert main(["generate", "-o", ".", "-q", "--set", "infer_steps=1"]) == 0
    assert sorted(p.name for p in run_dir.iterdir()) == [f"{i:05d}.png" for i in range(5)]
    assert json.loads((tmp_path / "frames.json").read_text())["frames"] == 5
    (run_dir / "mine.txt").write_text("x")
    err, dt = cli_error(capsys, "generate", "-o", ".")
    assert "not empty" in err and dt < QUICK_S


# ---- 2. impossible sizes, checked before anything loads; signals stop a run -------------------------------------
@pytest.mark.parametrize("command", ["generate", "check-config"])
@pytest.mark.parametrize("sets,needles", [
    (["target_height=16000", "target_width=16000"], ["target_width x target_height", "needs at least", "GiB"]),
    (["target_video_length=100001"], ["target_video_length: 100001", "1024 RoPE positions", "at most 4093"]),
    (["target_width=32768"], ["target_width: 32768", "RoPE"]),
])
def test_impossible_sizes_are_refused_before_loading(tmp_path, capsys, command, sets, needles, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [command, *[x for s in sets for x in ("--set", s)]]
    err, dt = cli_error(capsys, *args)
    assert all(n in err for n in needles), err
    assert dt < QUICK_S and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("stage,after", [("denoise", "engine: local"), ("decode", "decoding")])
def test_sigterm_stops_a_run_within_seconds_and_leaves_nothing(tmp_path, tiny_cache, stage, after):
    out = tmp_path / "o" / "v.npy"
    sets = ["target_height=512", "target_width=512", "target_video_length=33"]
    sets += ["infer_steps=2000"] if stage == "denoise" else ["infer_steps=1"]
    cmd = [sys.executable, "-m", "ditfleet", "generate", "-o", str(out), *[x for s in sets for x in ("--set", s)]]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(cmd, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    lines = []
    for line in p.stderr:  # wait until the run is in the stage
        lines.append(line)
        if after in line or time.monotonic() > deadline:
            break
    assert any(after in ln for ln in lines), "".join(lines)
    time.sleep(1.0)
    t = time.monotonic()
    p.send_signal(signal.SIGTERM)
    rest = p.communicate(timeout=60)[1]
    dt = time.monotonic() - t
    assert p.returncode == 143 and "terminated" in rest and "Traceback" not in rest, rest
    assert dt < 5.0, dt
    assert not (tmp_path / "o").exists() or list((tmp_path / "o").iterdir()) == []


# ---- 3. one message instead of a traceback ------------------------------------------------------------------------
def test_config_file_that_is_not_utf8(tmp_path, capsys):
    bad = tmp_path / "c.json"
    bad.write_bytes(b'{"prompt": "caf\xe9"}')
    for command in ("generate", "check-config"):
        err, dt = cli_error(capsys, command, str(bad))
        assert "c.json" in err and "not UTF-8" in err and dt < QUICK_S


def test_torchrun_world_size_mismatch_one_message_exit_2(tmp_path):
    t = time.perf_counter()
    p = sub("generate", "--nproc-per-node", "2", cwd=tmp_path)  # refused before torchrun starts anything
    assert p.returncode == 2 and "Traceback" not in p.stderr and p.stderr.count("ditfleet: error:") == 1, p.stderr
    assert "seq_p_size=1 x cfg_p_size=1 = 1 processes" in p.stderr and "--set parallel.seq_p_size=2" in p.stderr
    assert time.perf_counter() - t < 30 and list(tmp_path.iterdir()) == []


def test_user_error_on_every_torchrun_rank_exits_2_with_one_message(tmp_path):
    bad = tmp_path / "thresholds.pt"
    bad.write_text("not a checkpoint")
    p = sub("generate", "--nproc-per-node", "2", "--set", "parallel.seq_p_size=2", "--set", "device=cpu",
            "--set", "sparge=true", "--set", f"sparge_ckpt={bad}", "-o", str(tmp_path / "v.mp4"), cwd=tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.count("ditfleet: error:") == 1 and "sparge_ckpt" in p.stderr and "KeyError" not in p.stderr
    assert sorted(x.name for x in tmp_path.iterdir()) == ["thresholds.pt"]
    # bare torchrun: rank 0 alone prints and ends first with 2 (the others wait PEER_GRACE_S for it, then torchrun
    # stops them and adds its own failure report: that report is torchrun's, which is why --nproc-per-node exists)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    q = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                        "ditfleet", "generate"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert q.stderr.count("ditfleet: error:") == 1, q.stderr
    root = q.stderr.split("Root Cause")[1]
    assert "rank      : 0" in root and "exitcode  : 2" in root, q.stderr


def test_a_user_error_of_one_rank_alone_is_said_with_its_rank(monkeypatch, capsys):
    from ditfleet.engine import generate_cli

    monkeypatch.setattr(generate_cli, "PEER_GRACE_S", 0.0)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "t")
    for var, val in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(var, val)
    err, _ = cli_error(capsys, "generate", "--set", "infer_stepz=3")
    assert "ditfleet: error: rank 1: infer_stepz: unknown key" in err


# ---- 4. unknown keys ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("data,needle", [
    ({"infer_step": 3}, "infer_step: unknown key; did you mean 'infer_steps'?"),
    ({"sample_steps": 3}, "sample_steps: unknown key; ditfleet's name for it is 'infer_steps'"),
    ({"parallel": {"sp_size": 2}}, "parallel.sp_size: unknown key; ditfleet's name for it is 'parallel.seq_p_size'"),
])
def test_typod_config_key_is_an_error_with_the_right_suggestion(tmp_path, capsys, data, needle, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.json").write_text(json.dumps(data))
    for command in ("generate", "check-config"):
        err, dt = cli_error(capsys, command, "c.json")
        assert needle in err and dt < QUICK_S
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json"]


def test_positional_config_and_dash_c_together(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text("{}")
    b.write_text("{}")
    for command in ("generate", "check-config"):
        err, dt = cli_error(capsys, command, str(a), "-c", str(b))
        assert "two config files" in err and "a.json" in err and "b.json" in err and dt < QUICK_S


def test_set_through_a_non_object_says_why(capsys):
    err, _ = cli_error(capsys, "check-config", "--set", "infer_steps.x=1")
    assert "'infer_steps' is an integer, not an object" in err and "valid:" not in err


# ---- 5. check-config runs the same checks, and says valid last ------------------------------------------------------
SHIPPED = sorted((ROOT / "configs").glob("*.json"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_pass_check_config_with_their_documented_set(path, tiny_folders, tmp_path, capsys):
    data = json.loads(path.read_text())
    args = ["check-config", str(path), "--device", "cpu"]
    if str(data.get("model_path", "")).startswith("${"):
        err, _ = cli_error(capsys, *args)  # out of the box: the placeholder, and how to fill it
        assert "model_path: ${" in err and "--set model_path=" in err
        family = f"{data['model_cls']}/" if data.get("model_cls") else ""
        args += ["--set", f"model_path={tiny_folders[family + data.get('task', 't2v')]}"]
    if data.get("task") == "i2v":
        from PIL import Image

        Image.new("RGB", (832, 480)).save(tmp_path / "ref.png")
        args += ["--image", str(tmp_path / "ref.png")]
    assert main(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].endswith("-- valid") and sum("valid" in ln for ln in out) == 1


def test_check_config_never_says_valid_before_a_failing_check(capsys, tiny_folders):
    err, _ = cli_error(capsys, "check-config", str(ROOT / "configs" / "wan_t2v_radial_ring.json"), "--device", "cpu",
                       "--set", f"model_path={tiny_folders['t2v']}", "--set", "cross_attn_1_type=flash_attn4")
    assert "cross_attn_1_type" in err and "flash_attn4" in err
    assert "valid" not in capsys.readouterr().out


def test_check_config_reads_the_sparge_checkpoint(tmp_path, capsys):
    import torch

    class Code:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"blocks.0.self_attn.cdfthreshd": Code()}, tmp_path / "evil.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    for name, needle in (("evil.pt", "refused"), ("text.pt", "not a checkpoint written by torch.save")):
        err, dt = cli_error(capsys, "check-config", "--set", "sparge=true", "--set", f"sparge_ckpt={tmp_path / name}")
        assert f"sparge_ckpt {str(tmp_path / name)!r}" in err and needle in err and dt < QUICK_S
        assert "KeyError" not in err and "IndexError" not in err


def test_check_config_checks_the_model_folder_layout(tmp_path, capsys):
    (tmp_path / "model" / "transformer").mkdir(parents=True)
    err, dt = cli_error(capsys, "check-config", "--set", f"model_path={tmp_path / 'model'}")
    assert "model folder" in err and "tokenizer/" in err and "vae/config.json" in err and dt < QUICK_S


# ---- 7. the smaller items ------------------------------------------------------------------------------------------
def test_fallback_is_reported_once_and_sizes_are_width_x_height(tmp_path, tiny_cache):
    p = sub("generate", "--set", "self_attn_1_type=flash_attn3", "--set", "infer_steps=1", "--set", "target_width=96",
            "-o", str(tmp_path / "v.npy"), cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stderr.count("(FALLBACK)") == 1 and p.stderr.count("flash_attn3 ->") == 1, p.stderr
    assert "96x64 (WxH)" in p.stderr and "96x64" in p.stdout and "decoding 2 latent frames" in p.stderr
    c = sub("check-config", "--set", "target_width=96", cwd=tmp_path)
    assert "96x64 (WxH)" in c.stdout


def test_i2v_image_of_another_aspect_is_not_stretched_silently(tmp_path, tiny_cache, caplog):
    import logging

    from PIL import Image

    Image.new("RGB", (64, 128), (200, 10, 10)).save(tmp_path / "tall.png")
    with caplog.at_level(logging.WARNING):
        assert main(["generate", "--set", "task=i2v", "--image", str(tmp_path / "tall.png"), "-q", "--set",
                     "infer_steps=1", "-o", str(tmp_path / "v.npy")]) == 0
    assert "is 64x128 (aspect 0.500) and is stretched to the video's 64x64" in caplog.text


def test_doctor_lists_required_and_optional_packages(capsys):
    main(["doctor", "--device", "cpu"])
    out = capsys.readouterr().out
    for name in ("diffusers", "transformers", "safetensors", "flash-attn-4", "sageattention", "ray"):
        assert f"  {name} " in out
    assert "not installed  (" in out or "flash-attn-4           4" in out


def test_default_output_names_never_collide(tmp_path, monkeypatch):
    from ditfleet.engine.pipeline import default_output

    monkeypatch.chdir(tmp_path)
    first = default_output("t2v", 1)
    Path(first).parent.mkdir()
    Path(first).write_bytes(b"x")
    assert default_output("t2v", 1).endswith("-2.mp4")
