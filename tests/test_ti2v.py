"""Wan2.2 TI2V-5B image-to-video against Diffusers on tiny random components (CPU, fp32).

``WanImageToVideoPipeline(expand_timesteps=True)`` vs ditfleet's ``wan2.2`` family: the image, VAE-encoded as a
one-frame video, is the first latent frame; every step the DiT sees ``(1 - mask) * condition + mask * latents`` at
per-token timesteps ``mask * t``; the final latents get the first frame replaced before decoding. Checked: the final
latents (rel L2 <= 1e-4), the decoded frames, the first frame really replaced (and only it), sequence parallelism
(Ulysses / ring over 2 gloo ranks == one process), and the errors a user can make.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dist_utils import dit_under_two_rank_meshes, run_distributed

pytest.importorskip("diffusers")

from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline  # noqa: E402

from ditfleet.config import load_config  # noqa: E402
from ditfleet.engine import Engine  # noqa: E402
from ditfleet.engine.pipeline import request_from_config  # noqa: E402
from ditfleet.engine.tiny import build_components, save_components  # noqa: E402
from ditfleet.errors import UserError  # noqa: E402
from ditfleet.models.registry import detect  # noqa: E402

TOL = 1e-4
SEED, STEPS, SHIFT, SCALE = 1234, 6, 3.0, 5.0
FRAMES, HEIGHT, WIDTH = 9, 64, 96  # multiples of 32 (VAE 16 x patch 2): latents (48, 3, 4, 6)
PROMPT = "A red fox runs through fresh snow, golden hour"
NEGATIVE = "blurry, low quality, static"

pytestmark = pytest.mark.usefixtures("ftfy_as_ditfleet")  # tests/conftest.py


def rel_l2(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def ti2v(tmp_path_factory):
    """A Diffusers-layout tiny TI2V-5B I2V folder, its components and a reference image of the video's aspect."""
    from PIL import Image

    comps = build_components("i2v", family="wan2.2")
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in comps["transformer"].parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    folder = tmp_path_factory.mktemp("ti2v-i2v")
    save_components(comps, folder, "i2v")
    img = folder / "ref.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)).save(img)
    return folder, comps, img


def theirs(comps, img, output_type: str = "latent"):
    from PIL import Image

    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=SHIFT,
                                    num_train_timesteps=1000)
    pipe = WanImageToVideoPipeline(**{**comps, "scheduler": sched})
    assert pipe.config.expand_timesteps
    pipe.set_progress_bar_config(disable=True)
    out = pipe(image=Image.open(img).convert("RGB"), prompt=PROMPT, negative_prompt=NEGATIVE, height=HEIGHT,
               width=WIDTH, num_frames=FRAMES, num_inference_steps=STEPS, guidance_scale=SCALE,
               generator=torch.Generator().manual_seed(SEED), output_type=output_type, max_sequence_length=512)
    return out.frames


def ours(folder, **extra):
    cfg = load_config(None, [], data={
        "task": "i2v", "model_path": str(folder), "device": "cpu", "dtype": "fp32", "seed": SEED, "infer_steps": STEPS,
        "target_video_length": FRAMES, "target_height": HEIGHT, "target_width": WIDTH, "sample_shift": SHIFT,
        "sample_guide_scale": SCALE, **extra,
    })
    eng = Engine.start(cfg, launcher="local")
    eng.pipeline.runner.schedule = "diffusers"  # Diffusers' sigma grid, so the pipelines are comparable step by step
    return eng, cfg


def test_ti2v_image_to_video_matches_diffusers(ti2v, tmp_path):
    folder, comps, img = ti2v
    assert detect(folder) == "wan2.2"
    ref = theirs(comps, img).float()
    eng, cfg = ours(folder)
    with eng:
        pipe = eng.pipeline
        assert pipe.image_encoder is None  # TI2V: no CLIP; the image enters as the first latent frame only
        req = request_from_config(cfg, prompt=PROMPT, negative_prompt=NEGATIVE, image=str(img),
                                  output=str(tmp_path / "v.npy"))
        got = eng.generate(req, decode=True, quiet=True)
        enc = pipe.encode(req)
        assert enc.y.shape == (1, 1 + 48, 3, HEIGHT // 16, WIDTH // 16) and enc.clip_fea is None
        final = got.latents  # the result holds what is decoded: the first latent frame already replaced
        assert torch.equal(pipe.final_latents(final, enc), final)
        assert final.shape == ref.shape == (1, 48, 3, HEIGHT // 16, WIDTH // 16)
        err = rel_l2(final, ref)
        assert err <= TOL, f"final latents vs Diffusers: rel L2 {err:.2e}"
        # only the first latent frame is replaced, by the image's latent
        cond = enc.y[:, 1:, :1]
        raw = pipe.runner.denoise(enc).float().cpu()  # the sampler's own latents (same seed, same steps)
        assert torch.equal(final[:, :, :1], cond) and torch.equal(final[:, :, 1:], raw[:, :, 1:])
        assert rel_l2(raw[:, :, :1], cond) > 1e-2  # the sampler's own first frame is not the image's
        # what was written is the decode of the replaced latents (not of the sampler's)
        frames = np.load(got.output)
        assert frames.shape == (FRAMES, HEIGHT, WIDTH, 3)
        assert np.array_equal(frames, pipe.vae.decode(final))
        assert not np.array_equal(frames, pipe.vae.decode(raw))
    video = theirs(comps, img, output_type="np")  # Diffusers' decoded frames, float [0, 1]
    want = np.round(np.asarray(video[0], dtype=np.float64) * 255)
    assert np.abs(frames.astype(np.float64) - want).max() <= 1.0


def test_ti2v_user_errors(ti2v, tmp_path, caplog):
    folder, _, img = ti2v
    eng, cfg = ours(folder)
    with eng:
        out = str(tmp_path / "o.npy")
        with pytest.raises(UserError, match=r"task i2v needs a reference image"):
            eng.generate(prompt="p", output=out, quiet=True)
        with pytest.raises(UserError, match=r"^height: must be a positive multiple of 32, got 48"):
            eng.generate(prompt="p", image=str(img), height=48, output=out, quiet=True)
        with pytest.raises(UserError, match=r"^width: must be a positive multiple of 32, got 80"):
            eng.generate(prompt="p", image=str(img), width=80, output=out, quiet=True)
        # an image of another aspect: stretched to the video's size, with the warning every I2V model gives
        from PIL import Image

        square = tmp_path / "square.png"
        Image.fromarray(np.full((40, 40, 3), 128, dtype=np.uint8)).save(square)
        with caplog.at_level("WARNING", logger="ditfleet.engine.pipeline"):
            eng.generate(prompt="p", image=str(square), output=out, quiet=True, steps=1, decode=False)
        assert any("is stretched to the video's" in r.getMessage() for r in caplog.records)


def test_ti2v_text_to_video_of_an_i2v_request_is_refused(ti2v, tmp_path):
    folder, _, img = ti2v
    cfg = load_config(None, [], data={"task": "t2v", "model_path": str(folder), "device": "cpu", "dtype": "fp32",
                                      "target_height": HEIGHT, "target_width": WIDTH, "target_video_length": FRAMES})
    with Engine.start(cfg, launcher="local") as eng:
        with pytest.raises(UserError, match=r"given, but task is t2v"):
            eng.generate(prompt="p", image=str(img), output=str(tmp_path / "o.npy"), quiet=True)


# ---- the DiT under sequence parallelism --------------------------------------------------------------------
def _tiny_ti2v_dit():
    from ditfleet.models.wan import WanDiTConfig
    from ditfleet.models.wan.dit import default_attention
    from ditfleet.models.wan22.ti2v import Ti2vDiT

    cfg = WanDiTConfig(model_type="t2v", in_dim=48, out_dim=48, dim=48, ffn_dim=64, num_heads=3, num_layers=2,
                       text_dim=32, text_len=16, freq_dim=32)
    model = Ti2vDiT(cfg).requires_grad_(False).eval()
    model.init_random_(seed=0, std=0.1)
    return model.set_attention(default_attention(cfg, "cpu", torch.float32))


def _inputs():
    from ditfleet.models.wan22.ti2v import first_frame_condition

    g = torch.Generator().manual_seed(5)
    shape = (48, 3, 6, 10)  # tokens (3, 3, 5) = 45: pads over 2 ranks
    y = first_frame_condition(torch.randn(1, 48, 1, 6, 10, generator=g), shape)
    return {"x": torch.randn(2, *shape, generator=g), "t": torch.tensor([999.0, 321.5]),
            "context": torch.randn(2, 11, 32, generator=g), "y": y}


def test_ti2v_dit_sees_the_condition_at_t0():
    """Ti2vDiT(x, t, y) == WanDiT on the replaced latents at per-token timesteps (first-frame tokens at 0)."""
    from ditfleet.models.wan.dit import WanDiT
    from ditfleet.models.wan22.ti2v import apply_condition

    model, inp = _tiny_ti2v_dit(), _inputs()
    mask = torch.ones(3, 3 * 5)
    mask[0] = 0
    t_tok = inp["t"][:, None] * mask.flatten()[None]
    with torch.no_grad():
        got = model(**inp)
        want = WanDiT.forward(model, apply_condition(inp["x"], inp["y"]), t_tok, inp["context"])
        noisy_first = inp["x"].clone()
        noisy_first[:, :, 0] += 1.0  # the sampler's first frame never reaches the model
        again = model(**{**inp, "x": noisy_first})
    assert torch.equal(got, want) and torch.equal(got, again)


def _sp_world(rank: int, world: int) -> list[tuple[str, float, float]]:
    return dit_under_two_rank_meshes(_tiny_ti2v_dit(), _inputs())


def test_ti2v_dit_sequence_parallel_matches_single_process():
    per_rank = run_distributed(_sp_world, 2, timeout=300)
    for name, err, _ in per_rank[0]:
        assert err <= 1e-5, f"{name}: rel L2 {err:.2e}"
    assert [(n, s) for n, _, s in per_rank[0]] == [(n, s) for n, _, s in per_rank[1]]


def test_official_ti2v_config_loads_as_the_diffusers_one(ti2v, tmp_path):
    """The released TI2V-5B config says model_type "ti2v" (no CLIP branch): it reads as the Diffusers folder does."""
    import json

    from ditfleet.models.wan import convert_to_official, find_checkpoint, load_dit
    from ditfleet.models.wan22.ti2v import Ti2vDiT

    folder, _, _ = ti2v
    off = convert_to_official(folder / "transformer", tmp_path / "official")
    config = json.loads((off / "config.json").read_text())
    (off / "config.json").write_text(json.dumps({**config, "model_type": "ti2v"}))
    ckpt = find_checkpoint(off)
    assert ckpt.layout == "official" and ckpt.config == find_checkpoint(folder).config
    a = load_dit(folder, device="cpu", dtype=torch.float32, model_cls=Ti2vDiT)
    b = load_dit(off, device="cpu", dtype=torch.float32, model_cls=Ti2vDiT)
    inp = _inputs()
    inp["context"] = torch.randn(2, 11, a.config.text_dim)
    with torch.no_grad():
        assert torch.equal(a(**inp), b(**inp))
