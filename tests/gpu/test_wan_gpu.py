"""WanDiT on CUDA (skipped without a GPU): compiled fused ops vs eager, parity with Diffusers, bench smoke.

* Each fused op compiled by ``torch.compile`` matches its eager definition (bf16 outputs within
  one bf16 rounding step, float32 outputs to 1e-6).
* fp32 on CUDA: a tiny random Diffusers checkpoint loaded by ``load_dit`` matches Diffusers' forward
  (official float64 time embedding on both sides) to rel L2 <= 1e-5 (TF32 off).
* bf16 on CUDA, same weights (shared with ``bench dit``'s Diffusers builder): rel L2 <= 2e-2.
* ``bench dit`` at 14B block shapes with 2 layers and a small video runs every default kernel.
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from ditfleet.bench.common import rel_l2
from ditfleet.models.wan import build_dit, load_dit, ops
from ditfleet.models.wan.config import WanDiTConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEV = torch.device("cuda")


def _op_cases(dtype):
    g = torch.Generator(device=DEV).manual_seed(0)
    b, s, h, d = 2, 999, 5, 128
    c = h * d

    def r(*shape, dt=torch.float32):
        return torch.randn(*shape, generator=g, device=DEV, dtype=dt)

    x, y = r(b, s, c), r(b, s, c, dt=dtype)
    shift, scale, gate = r(b, 1, c), r(b, 1, c), r(b, 1, c)
    w, bias = r(c), r(c)
    cos, sin = r(s, d // 2), r(s, d // 2)
    return {
        "modulated_norm": (ops.modulated_norm, (x, shift, scale, 1e-6, dtype)),
        "gated_residual_norm": (ops.gated_residual_norm, (x, y, gate, w, bias, 1e-6, dtype)),
        "residual_modulated_norm": (ops.residual_modulated_norm, (x, y, gate, shift, scale, 1e-6, dtype)),
        "residual_modulated_norm_nogate": (ops.residual_modulated_norm, (x, y, None, shift, scale, 1e-6, dtype)),
        "rms_norm": (ops.rms_norm, (y, w, 1e-6, dtype)),
        "norm_rope": (ops.norm_rope, (y, w, 1e-6, cos, sin, h, dtype)),
    }


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_ops_compiled_match_eager(dtype):
    for name, (op, args) in _op_cases(dtype).items():
        with torch.inference_mode():
            eager = op.fn(*args)
            fused = op(*args)
        assert not op.broken, f"{name}: torch.compile failed, the eager fallback ran"
        eager = eager if isinstance(eager, tuple) else (eager,)
        fused = fused if isinstance(fused, tuple) else (fused,)
        for a, e in zip(fused, eager):
            assert a.dtype == e.dtype and a.shape == e.shape, name
            tol = 1e-6 if a.dtype == torch.float32 else 4e-3
            assert rel_l2(a, e) <= tol, f"{name}: rel L2 {rel_l2(a, e):.2e}"


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=64, in_channels=36, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=512, num_layers=2, cross_attn_norm=True, eps=1e-6, image_dim=1280,
        added_kv_proj_dim=256,
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    root = tmp_path_factory.mktemp("wan_gpu")
    model.save_pretrained(root)
    return model, root


def _inputs(seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    f, h, w = 5, 30, 52  # 5 * 15 * 26 = 1950 tokens
    return {"x": torch.randn(1, 16, f, h, w, generator=g, device=DEV), "t": torch.tensor([999.0], device=DEV),
            "context": torch.randn(1, 512, 4096, generator=g, device=DEV),
            "clip_fea": torch.randn(1, 257, 1280, generator=g, device=DEV),
            "y": torch.randn(1, 20, f, h, w, generator=g, device=DEV)}


def test_fp32_parity_with_diffusers_on_cuda(tiny_ckpt, monkeypatch):
    """Diffusers' float32 sinusoid is swapped for the official float64 one (see tests/test_wan_parity.py)."""
    from ditfleet.models.wan.rope import sinusoidal_embedding

    model, root = tiny_ckpt
    monkeypatch.setattr(model.condition_embedder.timesteps_proj, "forward", lambda t: sinusoidal_embedding(t, 256))
    old = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False  # the Conv3d patch embedding runs in TF32 by default
    try:
        ref_model = model.to(DEV)
        inp = _inputs()
        with torch.inference_mode():
            ref = ref_model(torch.cat([inp["x"], inp["y"]], 1), inp["t"], inp["context"],
                            encoder_hidden_states_image=inp["clip_fea"], return_dict=False)[0]
            ours = load_dit(root, device=DEV, dtype=torch.float32)
            assert ours.device.type == DEV.type
            err = rel_l2(ours(**inp), ref)
    finally:
        torch.set_float32_matmul_precision(old[0])
        torch.backends.cudnn.allow_tf32 = old[1]
        model.to("cpu")
    assert err <= 1e-5, f"rel L2 {err:.2e}"


def test_bf16_same_weights_as_diffusers(tiny_ckpt):
    from ditfleet.bench.dit import build_diffusers

    _, root = tiny_ckpt
    ours = load_dit(root, device=DEV, dtype=torch.bfloat16)
    dm = build_diffusers(ours, torch.bfloat16)
    inp = _inputs(1)
    with torch.inference_mode():
        out = ours(**inp)
        ref = dm(torch.cat([inp["x"], inp["y"]], 1).bfloat16(), inp["t"], inp["context"].bfloat16(),
                 encoder_hidden_states_image=inp["clip_fea"].bfloat16(), return_dict=False)[0]
    assert rel_l2(out, ref.float()) <= 2e-2


def test_build_on_gpu_is_fast_and_materialised():
    cfg = WanDiTConfig.t2v_14b().replace(num_layers=2)
    model = build_dit(cfg, device=DEV, dtype=torch.bfloat16)
    assert all(p.device.type == DEV.type for p in model.parameters())
    assert model.blocks[1].ffn[0].weight.dtype == torch.bfloat16 and model.blocks[1].modulation.dtype == torch.float32
    assert torch.isfinite(model.blocks[1].ffn[0].weight.float().std())


def test_bench_dit_small_video(tmp_path):
    from ditfleet.bench import dit

    p = argparse.ArgumentParser()
    dit.add_arguments(p)
    out = tmp_path / "dit.json"
    args = p.parse_args(["--layers", "2", "--frames", "9", "--height", "240", "--width", "416", "--iters", "2",
                         "--diffusers", "--out", str(out)])
    assert dit.main(args) == 0
    data = json.loads(out.read_text())
    ok = [r for r in data["results"] if r["status"] == "ok"]
    assert ok and all(r["forward_s"] > 0 and r["peak_mem_gib"] > 0 for r in ok)
    if data["diffusers"]["status"] == "ok":
        assert data["diffusers"]["rel_l2_vs_ditfleet"] < 5e-2
