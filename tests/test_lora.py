"""LoRA merged at load (lora_configs) vs Diffusers' ``load_lora_weights`` (PEFT) on tiny random components (CPU, fp32).

Formats: Diffusers / PEFT (``transformer.blocks.N.attn1.to_q.lora_A/lora_B.weight``) and kohya / ComfyUI / LightX2V
(``diffusion_model.blocks.N.self_attn.q.lora_down/lora_up.weight`` + ``.alpha``, converted by Diffusers' own Wan
loader); strength 0 equals no LoRA; the errors a LoRA file can cause name the file and the key.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from safetensors.torch import save_file  # noqa: E402

from ditfleet.engine.tiny import build_components, save_components  # noqa: E402
from ditfleet.errors import UserError  # noqa: E402

TOL = 1e-5
MODULES = {"attn1.to_q": "self_attn.q", "attn1.to_v": "self_attn.v", "attn2.to_k": "cross_attn.k",
           "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2"}


def rel_l2(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    comps = build_components("t2v")
    folder = tmp_path_factory.mktemp("lora-base")
    save_components(comps, folder, "t2v")
    return folder, comps


def lora_tensors(transformer, rank: int = 4, seed: int = 0):
    """Random low-rank factors for MODULES of both blocks: {diffusers module: (up [out, r], down [r, in])}."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(len(transformer.blocks)):
        for dmod in MODULES:
            lin = transformer.get_submodule(f"blocks.{i}.{dmod}")
            out[f"blocks.{i}.{dmod}"] = (torch.randn(lin.out_features, rank, generator=g) * 0.1,
                                         torch.randn(rank, lin.in_features, generator=g) * 0.1)
    return out


def inputs(transformer, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 2, 8, 8, generator=g)
    ctx = torch.randn(1, 512, transformer.config.text_dim, generator=g)
    return x, torch.tensor([700.0]), ctx


def ours(folder, lora_configs):
    from ditfleet.config import load_config
    from ditfleet.engine.pipeline import load_runner

    cfg = load_config(None, [], data={"model_path": str(folder), "device": "cpu", "dtype": "fp32",
                                      "lora_configs": lora_configs})
    return load_runner(cfg, device=torch.device("cpu"))


def diffusers_out(folder, comps, path, x, t, ctx, adapter: str):
    from diffusers import WanPipeline

    pipe = WanPipeline(**comps)
    pipe.load_lora_weights(str(path), adapter_name=adapter)
    with torch.no_grad():
        out = pipe.transformer(x, t, ctx, return_dict=False)[0]
    pipe.unload_lora_weights()
    return out


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_lora_merge_equals_diffusers(model, tmp_path, fmt):
    folder, comps = model
    tr = comps["transformer"]
    factors = lora_tensors(tr)
    state, alpha = {}, 2.0
    for dmod, (up, down) in factors.items():
        if fmt == "peft":
            state[f"transformer.{dmod}.lora_A.weight"] = down
            state[f"transformer.{dmod}.lora_B.weight"] = up
        else:  # official module names, as ComfyUI / LightX2V LoRAs
            b, rest = dmod.split(".", 2)[:2], dmod.split(".", 2)[2]
            mod = f"diffusion_model.{b[0]}.{b[1]}.{MODULES[rest]}"
            state[f"{mod}.lora_down.weight"] = down
            state[f"{mod}.lora_up.weight"] = up
            state[f"{mod}.alpha"] = torch.tensor(alpha)
    path = tmp_path / f"{fmt}.safetensors"
    save_file(state, str(path))
    x, t, ctx = inputs(tr)
    ref = diffusers_out(folder, comps, path, x, t, ctx, fmt)
    with torch.no_grad():
        base = tr(x, t, ctx, return_dict=False)[0]
    runner = ours(folder, [{"path": str(path), "strength": 1.0}])
    got = runner.dit(x, t, ctx)
    assert rel_l2(ref, base) > 1e-3  # the LoRA changes the output
    assert rel_l2(got, ref) <= TOL, (fmt, rel_l2(got, ref))
    entry = runner.denoisers.describe()["loras"][0]
    assert entry["modules"] == len(factors) and len(entry["sha256"]) == 64 and entry["strength"] == 1.0
    # strength 0 equals no LoRA at all
    zero = ours(folder, [{"path": str(path), "strength": 0.0}]).dit(x, t, ctx)
    assert torch.equal(zero, ours(folder, None).dit(x, t, ctx))


def test_lora_errors(model, tmp_path):
    folder, _ = model
    bad_rank = tmp_path / "rank.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 32),
               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(32, 3),
               "diffusion_model.blocks.0.self_attn.q.alpha": torch.tensor(4.0)}, str(bad_rank))
    unknown = tmp_path / "unknown.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.zz.lora_down.weight": torch.zeros(4, 32),
               "diffusion_model.blocks.0.self_attn.zz.lora_up.weight": torch.zeros(32, 4)}, str(unknown))
    half_alpha = tmp_path / "alpha.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 32),
               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(32, 4),
               "diffusion_model.blocks.0.self_attn.q.alpha": torch.tensor(4.0),
               "diffusion_model.blocks.0.self_attn.k.lora_down.weight": torch.zeros(4, 32),
               "diffusion_model.blocks.0.self_attn.k.lora_up.weight": torch.zeros(32, 4)}, str(half_alpha))
    pickle = tmp_path / "lora.pt"
    torch.save({"x": torch.zeros(1)}, pickle)
    cases = [(bad_rank, "rank mismatch"), (unknown, "match no module of the DiT, e.g. diffusion_model.blocks.0.self_attn.zz"),
             (half_alpha, "blocks.0.self_attn.k.alpha is missing"), (pickle, "is a pickle"),
             (tmp_path / "missing.safetensors", "does not exist")]
    for path, needle in cases:
        with pytest.raises(UserError) as info:
            ours(folder, [{"path": str(path)}])
        assert str(path) in str(info.value) and needle in str(info.value), (path, str(info.value))
    with pytest.raises(UserError, match=r"lora_configs\[0\]\.name"):  # a one-DiT model has no expert of that name
        ours(folder, [{"path": str(bad_rank), "name": "low_noise_model"}])


def test_cli_exits_2_on_a_bad_lora(model, tmp_path, capsys):
    from ditfleet.cli import main

    folder, _ = model
    pickle = tmp_path / "l.pth"
    pickle.write_bytes(b"not safetensors")
    rc = main(["generate", "--set", f"model_path={folder}", "--set", "device=cpu", "--set",
               f'lora_configs=[{{"path": "{pickle}"}}]', "-o", str(tmp_path / "o.npy")])
    err = capsys.readouterr().err
    assert rc == 2 and "is a pickle" in err and "Traceback" not in err


def test_two_experts_take_their_own_lora(tmp_path):
    """Wan2.2 A14B: each LoRA names its expert (LightX2V's high_noise_model / low_noise_model, or the Diffusers
    folder names); an unnamed LoRA is refused rather than applied to one expert or both."""
    comps = build_components("t2v", family="wan2.2_moe")
    folder = tmp_path / "moe"
    save_components(comps, folder, "t2v")
    factors = lora_tensors(comps["transformer"], seed=3)
    path = tmp_path / "high.safetensors"
    save_file({f"transformer.{m}.lora_{k}.weight": t for m, (up, down) in factors.items()
               for k, t in (("A", down), ("B", up))}, str(path))
    runner = ours(folder, [{"path": str(path), "name": "high_noise_model"}])
    base = ours(folder, None)
    x, t, ctx = inputs(comps["transformer"])
    high, low = runner.denoisers.experts
    assert not torch.equal(high(x, t, ctx), base.denoisers.experts[0](x, t, ctx))
    assert torch.equal(low(x, t, ctx), base.denoisers.experts[1](x, t, ctx))  # the other expert untouched
    assert runner.denoisers.describe()["loras"][0]["name"] == "high_noise_model"
    with pytest.raises(UserError, match=r"lora_configs\[0\]\.name.*valid: high_noise_model, low_noise_model"):
        ours(folder, [{"path": str(path)}])
