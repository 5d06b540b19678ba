"""WanDiT vs Diffusers' WanTransformer3DModel, checkpoint layouts, key mapping (CPU, fp32).

Tiny random Diffusers models (T2V, I2V, FLF2V; every parameter perturbed so that a swapped norm
or a wrong mapping shows) are written with ``save_pretrained``, loaded by ``load_dit`` in the
Diffusers layout (the ``transformer/`` folder and the pipeline folder above it) and after
``convert_to_official`` (sharded, optionally ``model.diffusion_model.``-prefixed), and must agree
with Diffusers' forward to fp32 rel L2 <= 1e-5. Odd sizes: 3 heads of 16 channels (RoPE split
8/4/4), latent 3 x 6 x 10 (45 tokens), batch 2 with different timesteps.

The only intended difference from Diffusers is the sinusoidal time embedding, computed in float64
like the official model (Diffusers: float32), worth a few 1e-6 at t = 999; with Diffusers'
embedding patched to the official one, the outputs agree to <= 1e-6.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import WanTransformer3DModel  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from ditfleet.bench.common import rel_l2  # noqa: E402
from ditfleet.models.wan import (  # noqa: E402
    CheckpointError,
    WanDiTConfig,
    convert_to_diffusers,
    convert_to_official,
    diffusers_to_official,
    find_checkpoint,
    load_dit,
    official_to_diffusers,
)
from ditfleet.models.wan.dit import WanDiT  # noqa: E402
from ditfleet.models.wan.rope import sinusoidal_embedding  # noqa: E402

TOL = 1e-5
LATENT = (3, 6, 10)
BASE = dict(patch_size=(1, 2, 2), num_attention_heads=3, attention_head_dim=16, out_channels=16, text_dim=4096,
            freq_dim=256, ffn_dim=80, num_layers=2, cross_attn_norm=True, eps=1e-6)
VARIANTS = {
    "t2v": dict(in_channels=16),
    "i2v": dict(in_channels=36, image_dim=1280, added_kv_proj_dim=48),
    "flf2v": dict(in_channels=36, image_dim=1280, added_kv_proj_dim=48, pos_embed_seq_len=514),
}


def make_inputs(kind: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    f, h, w = LATENT
    inp = {"x": torch.randn(2, 16, f, h, w, generator=g), "t": torch.tensor([999.0, 500.5]),
           "context": torch.randn(2, 512, 4096, generator=g)}
    if kind != "t2v":
        n = 2 * 2 if kind == "flf2v" else 2  # flf2v: two CLIP images per sample
        inp["clip_fea"] = torch.randn(n, 257, 1280, generator=g)
        inp["y"] = torch.randn(2, 20, f, h, w, generator=g)
    return inp


def diffusers_forward(model, inp: dict) -> torch.Tensor:
    x = inp["x"] if "y" not in inp else torch.cat([inp["x"], inp["y"]], dim=1)
    with torch.no_grad():
        return model(x, inp["t"], inp["context"], encoder_hidden_states_image=inp.get("clip_fea"), return_dict=False)[0]


def ours_forward(model, inp: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inp)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """kind -> (diffusers model, pipeline folder with transformer/ inside)."""
    out = {}
    for i, (kind, extra) in enumerate(VARIANTS.items()):
        torch.manual_seed(100 + i)
        model = WanTransformer3DModel(**BASE, **extra).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        root = tmp_path_factory.mktemp(f"wan_{kind}")
        model.save_pretrained(root / "transformer")
        out[kind] = (model, root)
    return out


@pytest.mark.parametrize("kind", list(VARIANTS))
def test_parity_diffusers_layout(saved, kind):
    model, root = saved[kind]
    inp = make_inputs(kind)
    ref = diffusers_forward(model, inp)
    for path in (root / "transformer", root):  # the transformer folder and the pipeline folder
        ours = load_dit(path, device="cpu", dtype=torch.float32)
        assert ours.config.model_type == kind
        out = ours_forward(ours, inp)
        assert out.shape == ref.shape == (2, 16, *LATENT) and out.dtype == torch.float32
        err = rel_l2(out, ref)
        print(f"\n{kind} diffusers layout ({path.name}): rel L2 {err:.2e}")
        assert err <= TOL


@pytest.mark.parametrize("kind", list(VARIANTS))
def test_parity_official_layout(saved, tmp_path, kind):
    model, root = saved[kind]
    official = convert_to_official(root, tmp_path / "official", max_shard_bytes=300_000)
    cfg = json.loads((official / "config.json").read_text())
    assert cfg["model_type"] == kind and cfg["dim"] == 48 and cfg["num_heads"] == 3 and cfg["in_dim"] == VARIANTS[kind]["in_channels"]
    assert "text_dim" not in cfg and "num_attention_heads" not in cfg  # official keys only at official defaults
    shards = sorted(official.glob("diffusion_pytorch_model-*-of-*.safetensors"))
    assert len(shards) > 1 and (official / "diffusion_pytorch_model.safetensors.index.json").is_file()
    keys = set().union(*(load_file(s).keys() for s in shards))
    assert "blocks.0.self_attn.q.weight" in keys and "blocks.1.norm3.weight" in keys and "head.modulation" in keys
    inp = make_inputs(kind)
    ref = diffusers_forward(model, inp)
    err = rel_l2(ours_forward(load_dit(official, device="cpu", dtype=torch.float32), inp), ref)
    print(f"\n{kind} official layout: rel L2 {err:.2e}")
    assert err <= TOL


def test_official_prefixed_keys(saved, tmp_path):
    """ComfyUI-style single file with ``model.diffusion_model.`` prefixes loads the same."""
    model, root = saved["t2v"]
    official = convert_to_official(root, tmp_path / "official")
    state = load_file(official / "diffusion_pytorch_model.safetensors")
    save_file({"model.diffusion_model." + k: v for k, v in state.items()}, official / "diffusion_pytorch_model.safetensors")
    inp = make_inputs("t2v")
    assert rel_l2(ours_forward(load_dit(official, device="cpu", dtype=torch.float32), inp), diffusers_forward(model, inp)) <= TOL


def test_official_config_with_diffusers_names(saved, tmp_path):
    """Tensor names are mapped by what they are, whichever config format sits beside them."""
    model, root = saved["i2v"]
    folder = tmp_path / "mixed"
    shutil.copytree(root / "transformer", folder)
    cfg = WanDiTConfig.from_diffusers(json.loads((folder / "config.json").read_text()))
    (folder / "config.json").write_text(json.dumps(cfg.to_official()))
    inp = make_inputs("i2v")
    assert rel_l2(ours_forward(load_dit(folder, device="cpu", dtype=torch.float32), inp), diffusers_forward(model, inp)) <= TOL


@pytest.mark.parametrize("kind", ["t2v", "i2v"])
def test_parity_with_official_time_embedding(saved, monkeypatch, kind):
    """With Diffusers' float32 sinusoid replaced by the official float64 one, the rest agrees to <= 1e-6."""
    model, root = saved[kind]
    proj = model.condition_embedder.timesteps_proj
    monkeypatch.setattr(proj, "forward", lambda t: sinusoidal_embedding(t, 256))
    inp = make_inputs(kind, seed=3)
    err = rel_l2(ours_forward(load_dit(root, device="cpu", dtype=torch.float32), inp), diffusers_forward(model, inp))
    print(f"\n{kind} with the official time embedding on both sides: rel L2 {err:.2e}")
    assert err <= 1e-6


def test_convert_back_to_diffusers(saved, tmp_path):
    """official -> Diffusers conversion: Diffusers loads it strictly and computes the same output."""
    model, root = saved["i2v"]
    official = convert_to_official(root, tmp_path / "official")
    back = convert_to_diffusers(official, tmp_path / "diffusers")
    reloaded = WanTransformer3DModel.from_config(json.loads((back / "config.json").read_text())).eval()
    reloaded.load_state_dict(load_file(back / "diffusion_pytorch_model.safetensors"), strict=True)
    inp = make_inputs("i2v")
    assert rel_l2(diffusers_forward(reloaded, inp), diffusers_forward(model, inp)) == 0.0


def test_short_context_is_zero_padded(saved):
    """Context shorter than text_len is zero-padded inside, as the official model (no mask)."""
    _, root = saved["t2v"]
    ours = load_dit(root, device="cpu", dtype=torch.float32)
    inp = make_inputs("t2v")
    inp["context"][:, 300:] = 0
    full = ours_forward(ours, inp)
    short = ours_forward(ours, dict(inp, context=inp["context"][:, :300]))
    assert torch.equal(full, short)
    with pytest.raises(ValueError, match="text_len"):
        ours_forward(ours, dict(inp, context=torch.zeros(2, 513, 4096)))


def test_bf16_forward_close_to_fp32(saved):
    """bf16 model: matmul weights bf16, time path / modulation / norms / head stay fp32; output near fp32."""
    model, root = saved["i2v"]
    inp = make_inputs("i2v")
    ours = load_dit(root, device="cpu", dtype=torch.bfloat16)
    dtypes = {n: p.dtype for n, p in ours.named_parameters()}
    assert dtypes["blocks.0.self_attn.q.weight"] == torch.bfloat16 and dtypes["blocks.0.ffn.0.bias"] == torch.bfloat16
    for name in ("blocks.0.modulation", "head.modulation", "head.head.weight", "time_embedding.0.weight",
                 "time_projection.1.weight", "blocks.0.norm3.weight", "blocks.0.self_attn.norm_q.weight",
                 "img_emb.proj.0.weight"):
        assert dtypes[name] == torch.float32, name
    assert rel_l2(ours_forward(ours, inp), diffusers_forward(model, inp)) <= 2e-2


# ---- key mapping on the real model sizes (meta tensors, no memory) ----------------------------------------
@pytest.mark.parametrize("preset", ["t2v_1_3b", "t2v_14b", "i2v_14b"])
def test_key_mapping_real_configs(preset):
    cfg = getattr(WanDiTConfig, preset)()
    with torch.device("meta"):
        ours = WanDiT(cfg)
        theirs = WanTransformer3DModel(**{k: v for k, v in cfg.to_diffusers().items() if not k.startswith("_")})
    ours_shapes = {n: tuple(p.shape) for n, p in ours.named_parameters()}
    their_shapes = {n: tuple(p.shape) for n, p in theirs.named_parameters()}
    mapped = {official_to_diffusers(n): s for n, s in ours_shapes.items()}
    assert mapped == their_shapes
    assert {diffusers_to_official(n): s for n, s in their_shapes.items()} == ours_shapes
    assert diffusers_to_official("blocks.3.attn2.norm_added_q.weight") is None  # ignored, as Diffusers does
    n_params = sum(p.numel() for p in ours.parameters())
    expected = {"t2v_1_3b": 1.42e9, "t2v_14b": 14.29e9, "i2v_14b": 16.39e9}[preset]
    assert abs(n_params / expected - 1) < 0.01, n_params
    assert WanDiTConfig.from_diffusers(cfg.to_diffusers()) == cfg
    assert WanDiTConfig.from_official(cfg.to_official()) == cfg
    assert cfg.rope_split == (44, 42, 42)


# ---- loader errors -----------------------------------------------------------------------------------------
def _official_copy(saved, tmp_path) -> Path:
    return convert_to_official(saved["t2v"][1], tmp_path / "official")


def _rewrite(folder: Path, edit) -> None:
    path = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path)


def test_error_missing_key(saved, tmp_path):
    folder = _official_copy(saved, tmp_path)
    _rewrite(folder, lambda s: (s.pop("blocks.1.cross_attn.k.weight"), s.pop("head.modulation")))
    with pytest.raises(CheckpointError, match=r"2 missing: .*blocks\.1\.cross_attn\.k\.weight.*head\.modulation"):
        load_dit(folder, device="cpu", dtype=torch.float32)


def test_error_unexpected_and_misshaped(saved, tmp_path):
    folder = _official_copy(saved, tmp_path)

    def edit(s):
        s["blocks.0.extra.weight"] = torch.zeros(3)
        s["blocks.0.ffn.0.weight"] = torch.zeros(81, 48)

    _rewrite(folder, edit)
    with pytest.raises(CheckpointError) as e:
        load_dit(folder, device="cpu", dtype=torch.float32)
    msg = str(e.value)
    assert "1 unexpected: blocks.0.extra.weight" in msg
    assert "1 misshaped: blocks.0.ffn.0.weight (checkpoint [81, 48], model [80, 48])" in msg
    assert str(folder) in msg


def test_error_diffusers_key_named_as_stored(saved, tmp_path):
    """Unexpected keys are reported under the name stored in the file (Diffusers names for a Diffusers folder)."""
    folder = tmp_path / "transformer"
    shutil.copytree(saved["t2v"][1] / "transformer", folder)
    _rewrite(folder, lambda s: s.update({"blocks.0.attn1.to_x.weight": torch.zeros(1)}))
    with pytest.raises(CheckpointError, match=r"unexpected: blocks\.0\.attn1\.to_x\.weight"):
        load_dit(folder, device="cpu", dtype=torch.float32)


def test_error_paths(saved, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_dit(tmp_path / "nope", device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_dit(tmp_path / "empty", device="cpu")
    folder = _official_copy(saved, tmp_path)
    with pytest.raises(CheckpointError, match="is a file"):
        load_dit(folder / "config.json", device="cpu")
    # pickle-only folder
    pk = tmp_path / "pickle"
    pk.mkdir()
    shutil.copy(folder / "config.json", pk / "config.json")
    torch.save({"a": torch.zeros(1)}, pk / "model.pth")
    with pytest.raises(CheckpointError, match=r"model\.pth: not a safetensors checkpoint"):
        load_dit(pk, device="cpu")
    # corrupt safetensors
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.safetensors: not a readable safetensors file"):
        load_dit(folder, device="cpu")


def test_error_configs(saved, tmp_path):
    folder = _official_copy(saved, tmp_path)
    (folder / "config.json").write_text("{\"dim\": 48,")
    with pytest.raises(CheckpointError, match=r"config\.json: invalid JSON at line 1"):
        find_checkpoint(folder)
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLWan", "z_dim": 16}))
    with pytest.raises(CheckpointError, match="not a Wan2.1 DiT config"):
        find_checkpoint(folder)
    (folder / "config.json").write_text(json.dumps({"dim": 48, "num_heads": 5, "num_layers": 2}))
    with pytest.raises(CheckpointError, match="not a multiple of num_heads"):
        find_checkpoint(folder)
    (folder / "config.json").write_text(json.dumps({"dim": 48, "num_heads": 3, "num_layers": 2, "model_type": "x2v"}))
    with pytest.raises(CheckpointError, match="model_type"):
        find_checkpoint(folder)


def test_error_index_names_missing_shard(saved, tmp_path):
    folder = convert_to_official(saved["t2v"][1], tmp_path / "official", max_shard_bytes=300_000)
    shard = sorted(folder.glob("diffusion_pytorch_model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        load_dit(folder, device="cpu")


# ---- RoPE against the official formulation ---------------------------------------------------------------
def _official_rope_freqs(d: int, grid: tuple[int, int, int]) -> torch.Tensor:
    """The official ``rope_params`` / ``rope_apply`` multipliers (complex128 ``[f*h*w, d/2]``)."""

    def rope_params(max_len, dim, theta=10000):
        freqs = torch.outer(torch.arange(max_len), 1.0 / torch.pow(theta, torch.arange(0, dim, 2).to(torch.float64).div(dim)))
        return torch.polar(torch.ones_like(freqs), freqs)

    freqs = torch.cat([rope_params(1024, d - 4 * (d // 6)), rope_params(1024, 2 * (d // 6)), rope_params(1024, 2 * (d // 6))], dim=1)
    c = d // 2
    parts = freqs.split([c - 2 * (c // 3), c // 3, c // 3], dim=1)
    f, h, w = grid
    return torch.cat([parts[0][:f].view(f, 1, 1, -1).expand(f, h, w, -1), parts[1][:h].view(1, h, 1, -1).expand(f, h, w, -1),
                      parts[2][:w].view(1, 1, w, -1).expand(f, h, w, -1)], dim=-1).reshape(f * h * w, -1)


@pytest.mark.parametrize("d", [128, 16, 12])
def test_rope_table_matches_official(d):
    from ditfleet.models.wan import ops
    from ditfleet.models.wan.rope import apply_rope_reference, rope_table

    grid = (3, 4, 5)
    cos, sin = rope_table(grid, d)
    ref = _official_rope_freqs(d, grid)
    assert cos.dtype == torch.float32 and cos.shape == (60, d // 2)
    assert torch.allclose(cos.double(), ref.real, atol=1e-7) and torch.allclose(sin.double(), ref.imag, atol=1e-7)
    x = torch.randn(2, 60, 3, d, dtype=torch.float64)
    official = torch.view_as_real(torch.view_as_complex(x.reshape(2, 60, 3, -1, 2)) * ref[None, :, None, :]).flatten(3)
    assert torch.allclose(apply_rope_reference(x, cos, sin), official, atol=1e-6)
    ours = ops.norm_rope(x.float().reshape(2, 60, 3 * d), None, 1e-6, cos, sin, 3, torch.float32)
    assert rel_l2(ours, official) <= 1e-6
