"""WanDiT with per-token timesteps ``t [B, S]`` (Wan2.2 TI2V-5B image-to-video) (CPU, fp32).

Against Diffusers' ``WanTransformer3DModel`` 2-D timestep path (the first latent frame's tokens at t=0, the
rest at the step's t, per sample), the scalar path when every token has the same timestep, and under
sequence parallelism (Ulysses and ring over 2 gloo ranks, a token count that pads) equal to one process.
"""

from __future__ import annotations

import pytest
import torch

from dist_utils import dit_under_two_rank_meshes, run_distributed
from ditfleet.bench.common import rel_l2

TOL = 1e-5
LATENT = (3, 6, 10)  # tokens (3, 3, 5) = 45: pads over 2 ranks


def first_frame_zero(t: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """``t [B]`` -> ``[B, f*h*w]``: 0 on the first latent frame's tokens, ``t`` elsewhere (as TI2V i2v)."""
    f, h, w = grid
    mask = torch.ones(f, h * w)
    mask[0] = 0
    return t[:, None] * mask.flatten()[None]


def tiny_ti2v_config():
    from ditfleet.models.wan import WanDiTConfig

    return WanDiTConfig(model_type="t2v", in_dim=48, out_dim=48, dim=48, ffn_dim=64, num_heads=3, num_layers=2,
                        text_dim=32, text_len=16, freq_dim=32)


def inputs(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor([999.0, 321.5])
    return {"x": torch.randn(2, 48, *LATENT, generator=g), "t": first_frame_zero(t, (3, 3, 5)),
            "context": torch.randn(2, 11, 32, generator=g)}


def test_per_token_timesteps_match_diffusers(tmp_path):
    pytest.importorskip("diffusers")
    from diffusers import WanTransformer3DModel

    from ditfleet.models.wan import load_dit

    torch.manual_seed(3)
    theirs = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=3, attention_head_dim=16, in_channels=48,
                                   out_channels=48, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2,
                                   cross_attn_norm=True, eps=1e-6).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.1 * torch.randn_like(p))
    theirs.save_pretrained(tmp_path / "transformer")
    ours = load_dit(tmp_path / "transformer", device="cpu", dtype=torch.float32)
    inp = inputs()
    ctx = torch.nn.functional.pad(inp["context"], (0, 0, 0, 512 - 11))  # Diffusers' text length
    with torch.no_grad():
        ref = theirs(inp["x"], inp["t"], ctx, return_dict=False)[0]
        out = ours(**{**inp, "context": ctx})
    err = rel_l2(out, ref)
    assert err <= TOL, f"per-token timesteps vs Diffusers: rel L2 {err:.2e}"
    # the first frame at t=0 really changes the output (the test sees the per-token path)
    with torch.no_grad():
        scalar = ours(inp["x"], inp["t"].amax(dim=1), ctx)
    assert rel_l2(scalar, ref) > 1e-3


def test_uniform_per_token_equals_scalar():
    from ditfleet.models.wan import build_dit

    model = build_dit(tiny_ti2v_config(), device="cpu", dtype=torch.float32, seed=0, std=0.1)
    inp = inputs()
    t = torch.tensor([999.0, 321.5])
    with torch.no_grad():
        scalar = model(inp["x"], t, inp["context"])
        per_token = model(inp["x"], t[:, None].expand(2, 45), inp["context"])
    assert rel_l2(per_token, scalar) <= 1e-6


def test_per_token_time_embedding_is_kept_per_distinct_timestep():
    """e / e0 of per-token timesteps: one row per distinct value (0, 999, 321.5 here) and an index, not a [B, S, 6, C]
    table; the rows it gives each token are the scalar path's embedding of that token's timestep."""
    from ditfleet.models.wan import build_dit
    from ditfleet.models.wan.dit import TokenRows

    model = build_dit(tiny_ti2v_config(), device="cpu", dtype=torch.float32, seed=0, std=0.1)
    inp = inputs()
    step = model.prepare(inp["x"], inp["t"], inp["context"])
    assert isinstance(step.e0, TokenRows) and isinstance(step.e, TokenRows)
    assert tuple(step.e0.values.shape) == (3, 6, 48) and tuple(step.e0.index.shape) == (2, 45)
    scalar_e, scalar_e0 = model.embed_time(inp["t"].flatten())
    torch.testing.assert_close(step.e0.take().flatten(0, 1), scalar_e0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(step.e.take().flatten(0, 1), scalar_e, rtol=1e-6, atol=1e-6)


def test_per_token_length_is_checked():
    from ditfleet.models.wan import build_dit

    model = build_dit(tiny_ti2v_config(), device="cpu", dtype=torch.float32, seed=0)
    inp = inputs()
    with pytest.raises(ValueError, match="per-token timesteps: t has 44 per sample, the latent has 45 tokens"):
        model(inp["x"], inp["t"][:, :44], inp["context"])


def _sp_world(rank: int, world: int) -> list[tuple[str, float, float]]:
    from ditfleet.models.wan import build_dit

    return dit_under_two_rank_meshes(build_dit(tiny_ti2v_config(), device="cpu", dtype=torch.float32, seed=0, std=0.1),
                                     inputs())


def test_per_token_timesteps_sequence_parallel_match_single_process():
    per_rank = run_distributed(_sp_world, 2, timeout=300)
    for name, err, _ in per_rank[0]:
        assert err <= TOL, f"{name}: rel L2 {err:.2e} > {TOL}"
    assert [(n, s) for n, _, s in per_rank[0]] == [(n, s) for n, _, s in per_rank[1]]
