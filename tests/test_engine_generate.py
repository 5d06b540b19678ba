"""``ditfleet generate`` end to end on the embedded tiny model (CPU): outputs, reports, jobs, user errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from ditfleet.config import load_config  # noqa: E402
from ditfleet.defaults import TINY_DEFAULT  # noqa: E402
from ditfleet.engine import generate_cli  # noqa: E402
from ditfleet.engine.errors import ImageError, ModelFolderError, OutputError, RequestError  # noqa: E402
from ditfleet.engine import Engine  # noqa: E402
from ditfleet.engine.pipeline import Pipeline, request_from_config  # noqa: E402
from ditfleet.engine.runner import initial_noise  # noqa: E402
from ditfleet.engine.tiny import MARKER, tiny_model_path  # noqa: E402
from ditfleet.engine.video import read_video  # noqa: E402
from ditfleet.errors import UserError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def cache(tiny_cache):
    """The session's tiny-model cache (tests/conftest.py), never the user's ~/.cache."""
    return tiny_cache


def config(**changes):
    return load_config(None, [], data={**TINY_DEFAULT, "device": "cpu", **changes})


@pytest.fixture(scope="module")
def t2v():
    with Engine.start(config(), launcher="local") as eng:  # the one generate path; components: eng.pipeline
        yield eng


@pytest.fixture(scope="module")
def i2v():
    with Engine.start(config(task="i2v"), launcher="local") as eng:
        yield eng


@pytest.fixture
def image(tmp_path):
    from PIL import Image

    path = tmp_path / "ref.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (72, 96, 3), dtype=np.uint8)).save(path)
    return path


def clean(folder: Path) -> bool:
    """No temporary leftovers anywhere under ``folder``."""
    return not [p for p in folder.rglob("*") if ".partial-" in p.name or ".old-" in p.name]


def generate_command() -> list[str]:
    """``ditfleet generate`` once the CLI wires it, else this package's standalone entry point."""
    from ditfleet.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    if "generate" in sub.choices:
        return [sys.executable, "-m", "ditfleet", "generate"]
    return [sys.executable, "-m", "ditfleet.engine.generate_cli"]


# ---- the README's default command ------------------------------------------------------------------
def test_default_command_writes_a_valid_mp4(tmp_path):
    """No arguments at all: builds the tiny model into an empty cache, writes outputs/<name>.mp4 + .json."""
    env = {**os.environ, "DITFLEET_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "2",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run(generate_command(), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    videos = list((tmp_path / "outputs").glob("*.mp4"))
    assert len(videos) == 1 and "wrote" in p.stdout
    import imageio.v2 as imageio

    reader = imageio.get_reader(str(videos[0]), "ffmpeg")
    got = [f for f in reader]
    assert reader.get_meta_data()["fps"] == 16
    reader.close()
    assert len(got) == TINY_DEFAULT["target_video_length"]
    assert got[0].shape == (TINY_DEFAULT["target_height"], TINY_DEFAULT["target_width"], 3)
    report = json.loads(videos[0].with_suffix(".json").read_text())
    assert report["seed"] == 42 and report["frames"] == 5 and report["model"]["embedded_tiny_random"]
    assert report["attention"]["self_attn_1_type"]["kernel"] and report["attention"]["cross_attn_2_type"] is None
    assert report["parallel"]["world_size"] == 1 and report["config"]["infer_steps"] == 4
    assert {"encode_text_s", "denoise_s", "decode_write_s", "total_s"} <= set(report["timings_s"])
    assert report["peak_memory"]["host_peak_rss_bytes"] > 0
    assert report["sampler"]["timesteps"] == [999, 937, 833, 624]
    assert "random weights" in p.stderr
    assert clean(tmp_path)


# ---- outputs -------------------------------------------------------------------------------------------
def test_npy_png_and_latents_agree(t2v, tmp_path):
    req = request_from_config(t2v.cfg, output=str(tmp_path / "v.npy"))
    a = t2v.generate(req, quiet=True)
    b = t2v.generate(req.replace(output=str(tmp_path / "frames")), quiet=True)
    va, vb = read_video(a.output), read_video(b.output)
    assert va.shape == (5, 64, 64, 3) and va.dtype == np.uint8
    assert np.array_equal(va, vb)
    assert sorted(p.name for p in b.output.iterdir()) == [f"{i:05d}.png" for i in range(5)]
    assert torch.equal(a.latents, b.latents)  # same seed, same result
    assert np.array_equal(va, t2v.pipeline.vae.decode(a.latents))
    assert (tmp_path / "frames.json").is_file() and (tmp_path / "v.json").is_file()
    c = t2v.generate(req.replace(seed=7), decode=False, quiet=True)
    assert not torch.equal(a.latents, c.latents)


def test_streamed_decode_equals_whole_video_decode(t2v):
    z = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    chunks = list(t2v.pipeline.vae.decode_stream(z))
    assert [c.shape[0] for c in chunks] == [1, 4, 4]
    with torch.no_grad():
        whole = t2v.pipeline.vae.vae.decode(t2v.pipeline.vae.denormalize(z), return_dict=False)[0]
    ref = ((whole[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    assert np.array_equal(np.concatenate(chunks), ref)


def test_noise_is_the_diffusers_cpu_generator_draw():
    ref = torch.randn((1, 16, 2, 8, 8), generator=torch.Generator().manual_seed(5), dtype=torch.float32)
    assert torch.equal(initial_noise((16, 2, 8, 8), 5), ref)


def test_i2v_generates_with_image_branch(i2v, image, tmp_path):
    req = request_from_config(i2v.cfg, image=str(image), output=str(tmp_path / "i2v.npy"))
    res = i2v.generate(req, quiet=True)
    assert read_video(res.output).shape == (5, 64, 64, 3)
    assert res.report["attention"]["cross_attn_2_type"]["kernel"]
    enc = i2v.pipeline.encode(req)
    assert enc.clip_fea.shape == (1, 257, 32) and enc.y.shape == (1, 20, 2, 8, 8)
    assert torch.equal(enc.y[:, :4, 0], torch.ones_like(enc.y[:, :4, 0])) and not enc.y[:, :4, 1:].any()


def test_failure_mid_decode_leaves_nothing(t2v, tmp_path, monkeypatch):
    def broken(latents):
        yield np.zeros((1, 64, 64, 3), np.uint8)
        raise RuntimeError("VAE exploded")

    monkeypatch.setattr(t2v.pipeline.vae, "decode_stream", broken)
    for name in ("v.mp4", "v.npy", "frames"):
        with pytest.raises(RuntimeError, match="exploded"):
            t2v.generate(request_from_config(t2v.cfg, output=str(tmp_path / name)), quiet=True)
    assert list(tmp_path.iterdir()) == []


# ---- user errors ------------------------------------------------------------------------------------------
def test_model_folder_errors(tmp_path):
    with pytest.raises(ModelFolderError, match="does not exist"):
        Pipeline.from_config(config(model_path=str(tmp_path / "nope")))
    src = tiny_model_path("t2v")
    partial = tmp_path / "partial"
    shutil.copytree(src, partial)
    (partial / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    shutil.rmtree(partial / "tokenizer")
    with pytest.raises(ModelFolderError) as e:
        Pipeline.from_config(config(model_path=str(partial)))
    msg = str(e.value)
    assert "vae/diffusion_pytorch_model.safetensors" in msg and "tokenizer/tokenizer.json" in msg and "Diffusers" in msg
    official = tmp_path / "official"
    official.mkdir()
    (official / "Wan2.1_VAE.pth").write_bytes(b"x")
    with pytest.raises(ModelFolderError, match="official Wan2.1 release"):
        Pipeline.from_config(config(model_path=str(official)))
    corrupt = tmp_path / "corrupt"
    shutil.copytree(src, corrupt)
    (corrupt / "text_encoder" / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelFolderError, match="text_encoder"):
        Pipeline.from_config(config(model_path=str(corrupt)))
    with pytest.raises(ModelFolderError, match="task i2v needs an I2V model"):  # T2V folder for an I2V run
        Pipeline.from_config(config(task="i2v", model_path=str(src)))
    with pytest.raises(ModelFolderError, match="describes an image-conditioned DiT"):
        Pipeline.from_config(config(model_path=str(tiny_model_path("i2v"))))


def test_image_errors(i2v, tmp_path):
    req = request_from_config(i2v.cfg, output=str(tmp_path / "o.mp4"))
    with pytest.raises(RequestError, match="needs a reference image"):
        i2v.generate(req)
    with pytest.raises(ImageError, match="does not exist"):
        i2v.generate(req.replace(image=str(tmp_path / "missing.png")))
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(ImageError, match="cannot be read as an image"):
        i2v.generate(req.replace(image=str(bad)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.png"]


def test_request_errors(t2v, tmp_path, image):
    req = request_from_config(t2v.cfg, output=str(tmp_path / "o.mp4"))
    for change, match in [({"output": str(tmp_path / "o.avi")}, "unsupported suffix"),
                          ({"frames": 6}, "frames: must be 4n\\+1"), ({"height": 40}, "height: must be a positive multiple of 16"),
                          ({"image": str(image)}, "task is t2v")]:
        with pytest.raises(UserError, match=match):
            t2v.generate(req.replace(**change))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.png"]


def test_cli_user_errors_exit_2_before_loading(tmp_path, capsys):
    for args, needle in [(["--output", str(tmp_path / "x.gif")], "unsupported suffix"),
                         (["--set", f"model_path={tmp_path / 'none'}", "-o", str(tmp_path / "x.mp4")], "does not exist"),
                         (["--set", "task=i2v", "--image", str(tmp_path / "none.png")], "does not exist"),
                         (["--jobs", str(tmp_path / "none.jsonl")], "jobs file"),
                         (["--bogus"], "unrecognized arguments")]:
        assert generate_cli.run([*args, "--quiet"]) == 2, args
        err = capsys.readouterr().err
        assert err.strip().splitlines()[-1].startswith("ditfleet: error:") and needle in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


# ---- jobs ----------------------------------------------------------------------------------------------------
def test_jobs_bad_lines_are_reported_and_the_rest_run(tmp_path, capsys):
    out = tmp_path / "out"
    lines = [
        json.dumps({"prompt": "a cat", "seed": 1, "output": str(out / "cat.npy")}),
        "# a comment",
        '{"prompt": "broken", "seed": }',
        json.dumps({"prompt": "a dog", "frames": 6, "output": str(out / "dog.mp4")}),
        json.dumps({"promt": "typo"}),
        "",
        json.dumps({"prompt": "a bird", "size": "64x48", "seed": 3, "output": str(out / "bird")}),
        json.dumps({"prompt": "again", "output": str(out / "cat.npy")}),
        json.dumps({"prompt": "a fish", "output": str(out / "fish.webm")}),
    ]
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(lines) + "\n")
    rc = generate_cli.run(["--jobs", str(jobs), "--quiet"])
    stdout = capsys.readouterr().out
    assert rc == 1
    assert "2 ok, 5 failed, 7 total" in stdout
    assert "jobs.jsonl:3  line 3: invalid JSON" in stdout
    assert "line 4:" in stdout and "frames: must be 4n+1" in stdout
    assert "line 5: unknown key 'promt'; did you mean 'prompt'?" in stdout
    assert "line 8: output" in stdout and "also written by line 1" in stdout
    assert "line 9:" in stdout and "unsupported suffix" in stdout
    assert read_video(out / "cat.npy").shape == (5, 64, 64, 3)
    assert read_video(out / "bird").shape == (5, 48, 64, 3)
    assert json.loads((out / "bird.json").read_text())["request"]["label"] == "jobs.jsonl:7"
    assert sorted(p.name for p in out.iterdir()) == ["bird", "bird.json", "cat.json", "cat.npy"]
    assert clean(tmp_path)


def test_jobs_runtime_failure_does_not_stop_the_batch(t2v, tmp_path, monkeypatch):
    from ditfleet.engine.jobs import parse_jobs, run_jobs

    jobs_file = tmp_path / "j.jsonl"
    jobs_file.write_text("\n".join(json.dumps({"prompt": "p", "seed": s, "output": str(tmp_path / f"{s}.npy")})
                                   for s in (1, 13, 2)))
    real = t2v.pipeline.runner.denoise_iter

    def flaky(enc, **kw):
        if enc.seed == 13:
            raise RuntimeError("CUDA error: out of memory (simulated)")
        return real(enc, **kw)

    monkeypatch.setattr(t2v.pipeline.runner, "denoise_iter", flaky)
    base = request_from_config(t2v.cfg, output=str(tmp_path / "x.mp4"))
    summary = run_jobs(t2v, parse_jobs(jobs_file, base), path=str(jobs_file), quiet=True)
    assert (summary.ok, summary.failed) == (2, 1)
    assert "out of memory" in summary.outcomes[1].error and summary.outcomes[1].line == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1.json", "1.npy", "2.json", "2.npy", "j.jsonl"]


def test_empty_jobs_file_is_a_user_error(tmp_path):
    from ditfleet.engine.errors import JobsFileError
    from ditfleet.engine.jobs import parse_jobs

    empty = tmp_path / "e.jsonl"
    empty.write_text("# nothing\n\n")
    with pytest.raises(JobsFileError, match="holds no job"):
        parse_jobs(empty, request_from_config(config(), output="x.mp4"))


# ---- the tiny cache ----------------------------------------------------------------------------------------
def test_tiny_cache_is_reused_and_an_incomplete_folder_rebuilt(tmp_path):
    first = tiny_model_path("t2v", cache_dir=tmp_path)
    stamp = (first / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert tiny_model_path("t2v", cache_dir=tmp_path) == first
    assert (first / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp
    (first / MARKER).unlink()
    (first / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    again = tiny_model_path("t2v", cache_dir=tmp_path)
    assert again == first and (again / MARKER).is_file() and (again / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [first.name]


def test_output_error_is_raised_for_paths_the_writer_cannot_create(t2v, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="cannot create its folder"):
        t2v.generate(request_from_config(t2v.cfg, output=str(blocker / "sub" / "v.npy")), quiet=True)


def test_euler_solver_and_cfg_off_run(t2v, tmp_path):
    req = request_from_config(t2v.cfg, output=str(tmp_path / "x.npy"))
    unipc = t2v.generate(req, decode=False, quiet=True)
    euler = t2v.generate(req.replace(solver="euler"), decode=False, quiet=True)
    assert euler.report["sampler"]["solver"] == "euler" and not torch.equal(unipc.latents, euler.latents)
    off = t2v.generate(req.replace(enable_cfg=False), decode=False, quiet=True)
    assert off.report["parallel"]["cfg_mode"] == "off" and torch.isfinite(off.latents).all()


def test_progress_bar_only_on_a_terminal(monkeypatch):
    from ditfleet.engine.pipeline import _Progress

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert _Progress(4, "x", quiet=False).bar is None
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert _Progress(4, "x", quiet=True).bar is None
    bar = _Progress(4, "x", quiet=False)
    assert bar.bar is not None
    bar(0, 4)
    assert bar.bar.n == 1
    bar.close()
