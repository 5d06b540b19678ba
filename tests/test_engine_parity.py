"""End-to-end parity: ditfleet's pipeline vs Diffusers' WanPipeline / WanImageToVideoPipeline (CPU, fp32).

The same tiny random components (:func:`ditfleet.engine.tiny.build_components`; every DiT
parameter perturbed so a wrong mapping shows) are saved as a Diffusers pipeline folder; ditfleet
loads that folder (tokenizer, UMT5, CLIP, VAE through transformers / Diffusers, the DiT through
``load_dit``), Diffusers runs the in-memory components (its ``from_pretrained`` of the
transformer needs ``accelerate``, which ditfleet does not depend on). Same prompt, negative
prompt, seed, steps, guidance and flow shift; the noise is the same by construction: both draw
``torch.randn([1, 16, F', H/8, W/8], float32)`` from ``torch.Generator('cpu').manual_seed(seed)``.

Diffusers' UniPC uses its own sigma grid unless given sigmas; ditfleet uses the official Wan grid.
So each test runs twice: Diffusers fed the official sigmas vs ditfleet's default, and plain
Diffusers vs ditfleet with ``schedule="diffusers"``. Final latents must agree to fp32 rel L2
<= 1e-4; the T2V test also compares the decoded frames (ditfleet's streamed uint8 ``.npy`` vs
Diffusers' ``vae.decode`` of its latents) to one 8-bit level.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline  # noqa: E402

from ditfleet.config import load_config  # noqa: E402
from ditfleet.engine import Engine  # noqa: E402
from ditfleet.engine.pipeline import request_from_config  # noqa: E402
from ditfleet.engine.sampler import flow_sigmas  # noqa: E402
from ditfleet.engine.tiny import build_components, save_components  # noqa: E402
from ditfleet.engine.video import read_video  # noqa: E402

TOL = 1e-4
SEED, STEPS, SHIFT, SCALE = 1234, 6, 3.0, 5.0
FRAMES, HEIGHT, WIDTH = 9, 48, 64
PROMPT = "A red fox runs through fresh snow, golden hour"
NEGATIVE = "blurry, low quality, static"


pytestmark = pytest.mark.usefixtures("ftfy_as_ditfleet")  # tests/conftest.py


class WanSigmaUniPC(UniPCMultistepScheduler):
    """Diffusers' UniPC fed the official Wan sigma grid (linspace(0.999, 0) before the shift)."""

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None):
        if sigmas is None:
            sigmas = flow_sigmas(num_inference_steps, 1.0, "wan")  # unshifted; Diffusers applies flow_shift
        super().set_timesteps(device=device, sigmas=sigmas, mu=mu)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def perturb_(module: torch.nn.Module, seed: int, std: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)


@pytest.fixture(scope="module")
def torch_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(min(n, 4))
    yield
    torch.set_num_threads(n)


def build(task: str, folder) -> dict:
    comps = build_components(task)
    perturb_(comps["transformer"], seed=7)
    save_components(comps, folder, task)
    return comps


def ditfleet_pipeline(task: str, folder) -> Engine:
    """A local engine on the folder (the one generate path); its components are ``.pipeline``."""
    cfg = load_config(None, [], data={
        "task": task, "model_path": str(folder), "device": "cpu", "dtype": "fp32", "seed": SEED,
        "infer_steps": STEPS, "target_video_length": FRAMES, "target_height": HEIGHT, "target_width": WIDTH,
        "sample_guide_scale": SCALE, "sample_shift": SHIFT, "enable_cfg": True,
    })
    return Engine.start(cfg, launcher="local")


def diffusers_latents(cls, comps: dict, scheduler, **kwargs) -> torch.Tensor:
    pipe = cls(**{**comps, "scheduler": scheduler})
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=HEIGHT, width=WIDTH, num_frames=FRAMES,
               num_inference_steps=STEPS, guidance_scale=SCALE, generator=torch.Generator().manual_seed(SEED),
               output_type="latent", max_sequence_length=512, **kwargs)
    return out.frames.float()


def schedulers():
    kw = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=SHIFT, num_train_timesteps=1000)
    return {"wan": WanSigmaUniPC(**kw), "diffusers": UniPCMultistepScheduler(**kw)}


def test_t2v_latents_and_frames_match_diffusers(tmp_path, torch_threads):
    comps = build("t2v", tmp_path / "t2v")
    pipe = ditfleet_pipeline("t2v", tmp_path / "t2v")
    req = request_from_config(pipe.cfg, prompt=PROMPT, negative_prompt=NEGATIVE, output=str(tmp_path / "t2v.npy"))
    for schedule, scheduler in schedulers().items():
        ref = diffusers_latents(WanPipeline, comps, scheduler)
        pipe.pipeline.runner.schedule = schedule
        result = pipe.generate(req, decode=(schedule == "wan"), quiet=True)
        assert result.latents.shape == ref.shape == (1, 16, 3, HEIGHT // 8, WIDTH // 8)
        err = rel_l2(result.latents, ref)
        assert err <= TOL, (schedule, err)
        if schedule == "wan":  # decoded frames: Diffusers' whole-video decode of its latents vs our streamed .npy
            vae = comps["vae"]
            mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
            inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
            with torch.no_grad():
                video = vae.decode(ref / inv_std + mean, return_dict=False)[0]
            theirs = ((video[0] / 2 + 0.5).clamp(0, 1)).permute(1, 2, 3, 0).numpy()
            ours = read_video(result.output)
            assert ours.shape == (FRAMES, HEIGHT, WIDTH, 3) and ours.dtype == np.uint8
            assert np.abs(ours / 255.0 - theirs).max() <= 1.0 / 255 + 1e-3
            assert result.report_path.is_file()


def test_i2v_latents_match_diffusers(tmp_path, torch_threads):
    from PIL import Image

    comps = build("i2v", tmp_path / "i2v")
    rng = np.random.default_rng(3)
    img_path = tmp_path / "ref.png"
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).resize((112, 80)).save(img_path)
    image = Image.open(img_path).convert("RGB")
    pipe = ditfleet_pipeline("i2v", tmp_path / "i2v")
    req = request_from_config(pipe.cfg, prompt=PROMPT, negative_prompt=NEGATIVE, image=str(img_path),
                              output=str(tmp_path / "i2v.mp4"))
    for schedule, scheduler in schedulers().items():
        ref = diffusers_latents(WanImageToVideoPipeline, comps, scheduler, image=image)
        pipe.pipeline.runner.schedule = schedule
        ours = pipe.generate(req, decode=False, quiet=True).latents
        err = rel_l2(ours, ref)
        assert err <= TOL, (schedule, err)


def test_cfg_off_and_sequential_cfg_match_diffusers(tmp_path, torch_threads):
    """enable_cfg false (one pass per step) == Diffusers at guidance 1; sequential CFG == batched CFG."""
    comps = build("t2v", tmp_path / "t2v")
    pipe = ditfleet_pipeline("t2v", tmp_path / "t2v")
    req = request_from_config(pipe.cfg, prompt=PROMPT, negative_prompt=NEGATIVE, output=str(tmp_path / "x.mp4"))
    pipe.pipeline.runner.schedule = "diffusers"
    pipe_ref = WanPipeline(**{**comps, "scheduler": schedulers()["diffusers"]})
    pipe_ref.set_progress_bar_config(disable=True)
    ref = pipe_ref(prompt=PROMPT, height=HEIGHT, width=WIDTH, num_frames=FRAMES, num_inference_steps=STEPS,
                   guidance_scale=1.0, generator=torch.Generator().manual_seed(SEED), output_type="latent").frames
    ours = pipe.generate(req.replace(enable_cfg=False), decode=False, quiet=True).latents
    assert rel_l2(ours, ref) <= TOL
    sequential = pipe.generate(req, decode=False, quiet=True).latents  # the default
    pipe.pipeline.runner.cfg_batch = True
    batched = pipe.generate(req, decode=False, quiet=True).latents
    assert rel_l2(sequential, batched) <= 1e-5
