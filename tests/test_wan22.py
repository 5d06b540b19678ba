"""Wan2.2 A14B (two experts switched at a noise boundary) against Diffusers on tiny random components (CPU, fp32).

``WanPipeline(transformer, transformer_2, boundary_ratio)`` / ``WanImageToVideoPipeline`` (no CLIP) vs ditfleet's
model registry (``wan2.2_moe``): the final latents, the step at which the expert switches, per-expert guidance
scales, the official layout (``high_noise_model/`` + ``low_noise_model/``) vs the Diffusers one, and the errors
a user can make (an expert missing, a boundary outside (0, 1), a second scale for a one-DiT model).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline  # noqa: E402

from ditfleet.config import load_config  # noqa: E402
from ditfleet.engine import Engine  # noqa: E402
from ditfleet.engine.pipeline import request_from_config  # noqa: E402
from ditfleet.engine.tiny import build_components, save_components  # noqa: E402
from ditfleet.errors import ConfigError, UserError  # noqa: E402
from ditfleet.models.registry import detect, spec_for  # noqa: E402

TOL = 1e-4
SEED, STEPS, SHIFT = 1234, 6, 3.0
FRAMES, HEIGHT, WIDTH = 9, 48, 64
PROMPT = "A red fox runs through fresh snow, golden hour"
NEGATIVE = "blurry, low quality, static"


pytestmark = pytest.mark.usefixtures("ftfy_as_ditfleet")  # tests/conftest.py


def rel_l2(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def perturb_(module, seed: int, std: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Diffusers-layout Wan2.2 T2V and I2V folders (experts made distinct) and their components."""
    out = {}
    for task in ("t2v", "i2v"):
        comps = build_components(task, family="wan2.2_moe")
        perturb_(comps["transformer"], seed=7)
        perturb_(comps["transformer_2"], seed=8)
        folder = tmp_path_factory.mktemp(f"wan22-{task}")
        save_components(comps, folder, task)
        out[task] = (folder, comps)
    return out


def scheduler():
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=SHIFT,
                                   num_train_timesteps=1000)


def ours(task: str, folder, image=None, **extra):
    cfg = load_config(None, [], data={
        "task": task, "model_path": str(folder), "device": "cpu", "dtype": "fp32", "seed": SEED, "infer_steps": STEPS,
        "target_video_length": FRAMES, "target_height": HEIGHT, "target_width": WIDTH, "sample_shift": SHIFT,
        "sample_guide_scale": [5.0, 3.0], **extra,
    })
    pipe = Engine.start(cfg, launcher="local")  # the one generate path; components: pipe.pipeline
    pipe.pipeline.runner.schedule = "diffusers"  # Diffusers' sigma grid, so the pipelines are comparable step by step
    req = request_from_config(cfg, prompt=PROMPT, negative_prompt=NEGATIVE, image=image, output=str(folder / "x.mp4"))
    return pipe, req


def theirs(cls, comps, switches: list, **kwargs):
    pipe = cls(**{**comps, "scheduler": scheduler()})
    pipe.set_progress_bar_config(disable=True)
    calls = {"transformer": 0, "transformer_2": 0}
    for name in calls:  # which expert Diffusers runs at each step
        model = getattr(pipe, name)
        model.register_forward_pre_hook(lambda m, a, k, name=name: switches.append(name), with_kwargs=True)
    out = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=HEIGHT, width=WIDTH, num_frames=FRAMES,
               num_inference_steps=STEPS, guidance_scale=5.0, guidance_scale_2=3.0,
               generator=torch.Generator().manual_seed(SEED), output_type="latent", max_sequence_length=512, **kwargs)
    return out.frames.float()


def our_switches(pipe) -> list:
    seen = []
    for name, dit in zip(pipe.pipeline.runner.denoisers.names, pipe.pipeline.runner.denoisers.experts):
        dit.register_forward_pre_hook(lambda m, a, k, name=name: seen.append(name), with_kwargs=True)
    return seen


def test_registry_detects_the_family(folders):
    assert detect(folders["t2v"][0]) == "wan2.2_moe" and spec_for("wan2.2_moe").experts == 2
    with pytest.raises(ConfigError) as info:
        spec_for("wan2.2_moe_distill")
    assert info.value.key == "model_cls" and "wan2.1" in str(info.value)


def test_t2v_two_experts_match_diffusers(folders):
    folder, comps = folders["t2v"]
    ref_calls, mine = [], None
    ref = theirs(WanPipeline, comps, ref_calls)
    pipe, req = ours("t2v", folder)
    mine = our_switches(pipe)
    got = pipe.generate(req, decode=False, quiet=True).latents
    assert rel_l2(got, ref) <= TOL
    # the same expert at every call (CFG: two calls per step), and the switch really happens inside the run
    assert mine == ref_calls and "transformer" in mine and "transformer_2" in mine, (mine, ref_calls)
    report = pipe.pipeline.report(req, pipe.pipeline.encode(req), {}, None, 0)
    assert report["model"]["family"] == "wan2.2_moe" and report["model"]["denoisers"]["boundary"] == 0.875


def test_i2v_two_experts_without_clip_match_diffusers(folders, tmp_path):
    from PIL import Image

    folder, comps = folders["i2v"]
    img_path = tmp_path / "ref.png"
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(img_path)
    ref_calls = []
    ref = theirs(WanImageToVideoPipeline, comps, ref_calls, image=Image.open(img_path).convert("RGB"))
    pipe, req = ours("i2v", folder, image=str(img_path))
    assert pipe.pipeline.image_encoder is None  # Wan2.2 A14B I2V: the image enters as the condition latent only
    mine = our_switches(pipe)
    got = pipe.generate(req, decode=False, quiet=True).latents
    assert rel_l2(got, ref) <= TOL and mine == ref_calls and len(set(mine)) == 2


def test_official_layout_equals_diffusers_layout(folders, tmp_path):
    """high_noise_model/ + low_noise_model/ (official names; no boundary file: T2V 0.875) load the same experts."""
    folder, _ = folders["t2v"]
    off = tmp_path / "official"
    shutil.copytree(folder, off)
    (off / "transformer").rename(off / "high_noise_model")
    (off / "transformer_2").rename(off / "low_noise_model")
    index = (off / "model_index.json").read_text().replace('"boundary_ratio": 0.875', '"boundary_ratio": null')
    (off / "model_index.json").write_text(index)
    a, req_a = ours("t2v", folder)
    b, req_b = ours("t2v", off)
    assert b.pipeline.runner.denoisers.names == ["high_noise_model", "low_noise_model"] and b.pipeline.runner.denoisers.boundary == 0.875
    for x, y in zip(a.pipeline.runner.denoisers, b.pipeline.runner.denoisers):
        assert all(torch.equal(p, q) for p, q in zip(x.state_dict().values(), y.state_dict().values()))
    la = a.generate(req_a, decode=False, quiet=True).latents
    lb = b.generate(req_b.replace(output=req_a.output), decode=False, quiet=True).latents
    assert torch.equal(la, lb)


def test_official_i2v_layout_equals_diffusers_layout(folders, tmp_path):
    """Wan2.2 I2V A14B as released: high_noise_model/ + low_noise_model/ in the official layout (config model_type
    "i2v", no image_dim, official tensor names), no CLIP image branch, no image_encoder/ (and no boundary file:
    I2V 0.9) -- the same experts, the same latents as the Diffusers layout."""
    import json

    from PIL import Image

    from ditfleet.models.wan import convert_to_official, find_checkpoint

    folder, _ = folders["i2v"]
    off = tmp_path / "official"
    shutil.copytree(folder, off, ignore=shutil.ignore_patterns("transformer", "transformer_2"))
    for src, dst in (("transformer", "high_noise_model"), ("transformer_2", "low_noise_model")):
        convert_to_official(folder / src, off / dst)
        config = json.loads((off / dst / "config.json").read_text())
        assert config["model_type"] == "i2v" and config["in_dim"] == 36 and "image_dim" not in config
        assert find_checkpoint(off / dst).layout == "official" and not find_checkpoint(off / dst).config.has_image_branch
    index = json.loads((off / "model_index.json").read_text())
    (off / "model_index.json").write_text(json.dumps({**index, "boundary_ratio": None}))
    assert not (off / "image_encoder").exists() and detect(off) == "wan2.2_moe"
    img = tmp_path / "ref.png"
    Image.fromarray(np.random.default_rng(4).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)).save(img)
    a, req_a = ours("i2v", folder, image=str(img))
    b, req_b = ours("i2v", off, image=str(img))
    assert b.pipeline.image_encoder is None and b.pipeline.runner.denoisers.boundary == 0.9
    assert b.pipeline.runner.denoisers.names == ["high_noise_model", "low_noise_model"]
    for x, y in zip(a.pipeline.runner.denoisers, b.pipeline.runner.denoisers):
        assert x.config == y.config and not y.config.has_image_branch
        sa, sb = x.state_dict(), y.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    la = a.generate(req_a, decode=False, quiet=True).latents
    lb = b.generate(req_b.replace(output=req_a.output), decode=False, quiet=True).latents
    assert torch.equal(la, lb)


def test_boundary_override_moves_the_switch(folders):
    folder, _ = folders["t2v"]
    pipe, req = ours("t2v", folder, boundary=0.3)
    assert pipe.pipeline.runner.denoisers.boundary == 0.3
    seen = our_switches(pipe)
    pipe.generate(req, decode=False, quiet=True)
    ts = pipe.pipeline.runner.sampler(pipe.pipeline.encode(req)).timesteps
    want = ["transformer" if float(t) >= 300 else "transformer_2" for t in ts for _ in range(2)]
    assert seen == want


def test_user_errors(folders, tmp_path):
    folder, _ = folders["t2v"]
    broken = tmp_path / "one-expert"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "transformer_2")
    (broken / "transformer_3").mkdir()  # noise: still a two-expert folder by its model_index.json
    with pytest.raises(UserError, match=r"lacks transformer_2/"):
        ours("t2v", broken)
    with pytest.raises(ConfigError) as info:
        load_config(None, ["boundary=1.5"])
    assert info.value.key == "boundary" and "(0, 1)" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model_cls=wan2.1", "sample_guide_scale=[4.0, 3.0]"])
    assert info.value.key == "sample_guide_scale"
    from ditfleet.engine.tiny import tiny_model_path

    # raised on the engine's worker: the same one-line message (a UserError: the CLI exits 2)
    with pytest.raises(UserError, match=r"^model_cls: 'wan2.2_moe' .* is a wan2.1 folder"):  # one DiT there
        ours("t2v", tiny_model_path("t2v"), model_cls="wan2.2_moe")
    with pytest.raises(UserError, match=r"^sample_guide_scale: \[high_noise, low_noise\] scales need a two-expert"):
        ours("t2v", tiny_model_path("t2v"))  # per-expert scales for a one-DiT folder found by detection


# ---- TI2V-5B (family wan2.2): one 48-channel DiT over the Wan2.2 VAE (4x16x16 with a 2x2 patch) -------------
def test_ti2v_5b_text_to_video_matches_diffusers(tmp_path):
    comps = build_components("t2v", family="wan2.2")
    perturb_(comps["transformer"], seed=9)
    folder = tmp_path / "ti2v"
    save_components(comps, folder, "t2v")
    assert detect(folder) == "wan2.2"
    pipe = WanPipeline(**{**comps, "scheduler": scheduler()})  # expand_timesteps: one timestep per token
    pipe.set_progress_bar_config(disable=True)
    h, w = 64, 96  # multiples of 32 (VAE 16 x patch 2)
    ref = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=h, width=w, num_frames=FRAMES, num_inference_steps=STEPS,
               guidance_scale=5.0, generator=torch.Generator().manual_seed(SEED), output_type="latent",
               max_sequence_length=512).frames.float()
    eng, req = ours("t2v", folder, sample_guide_scale=5.0, target_height=h, target_width=w)
    got = eng.generate(req, decode=True, quiet=True)
    assert got.latents.shape == ref.shape == (1, 48, 3, h // 16, w // 16)
    assert rel_l2(got.latents, ref) <= TOL
    from ditfleet.engine.video import read_video

    assert read_video(got.output).shape == (FRAMES, h, w, 3) and got.report["model"]["family"] == "wan2.2"
    # sizes follow the family's multiples (32 here); image-to-video: tests/test_ti2v.py
    with pytest.raises(UserError, match=r"height: must be a positive multiple of 32, got 48"):
        eng.generate(req.replace(height=48))


def test_guide_scale_shapes_are_checked(folders, tmp_path):
    """One scale, or exactly [high, low] for a two-expert model -- never a list of one, a negative scale, or a
    pair silently cut to its first value on a one-DiT model (config, request and serve bodies alike)."""
    from ditfleet.engine.request import GenerateRequest
    from ditfleet.engine.tiny import tiny_model_path

    with pytest.raises(ConfigError) as info:
        load_config(None, ["sample_guide_scale=[4.0]"])
    assert info.value.key == "sample_guide_scale"
    for bad in (-1.0, (4.0,), (4.0, -3.0)):
        with pytest.raises(UserError, match="^guide_scale: must be a number >= 0"):
            GenerateRequest(prompt="p", output=str(tmp_path / "o.mp4"), guide_scale=bad).validate("t2v")
    cfg = load_config(None, [], data={"model_path": str(tiny_model_path("t2v")), "device": "cpu"})
    with Engine.start(cfg, launcher="local") as eng:
        with pytest.raises(UserError, match=r"guide_scale: \[7.0, 3.0\] gives one scale per expert, but this model has one DiT"):
            eng.generate(prompt="p", output=str(tmp_path / "o.npy"), guide_scale=(7.0, 3.0), quiet=True)
