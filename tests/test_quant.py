"""FP8 DiT linears (``dit_quantized``) on CPU: which modules, the math, the fused quantisation, SP, refusals.

The module runs on CPU through torch's CPU ``_scaled_mm`` (torchao's wrapper); the engine refuses CPU at
start-up. The quantisation math is checked against an independent float64 emulation of e4m3 rounding.
"""

from __future__ import annotations

import copy
import fnmatch
import math

import pytest
import torch
import torch.nn as nn

from dist_utils import run_distributed
from ditfleet.bench.common import rel_l2
from ditfleet.errors import ConfigError

pytest.importorskip("torchao")

from ditfleet.models import quant  # noqa: E402
from ditfleet.models.quant import Fp8Linear, GeluQuant, quantize_model_  # noqa: E402
from ditfleet.models.wan import ops  # noqa: E402


def tiny_config(model_type: str = "i2v"):
    from ditfleet.models.wan import WanDiTConfig

    return WanDiTConfig(model_type=model_type, in_dim=36 if model_type == "i2v" else 16, dim=64, ffn_dim=128,
                        num_heads=4, num_layers=2, text_dim=32, text_len=16, freq_dim=32, image_dim=32)


def inputs(cfg, shape=(2, 8, 8), seed: int = 1, batch: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    f, h, w = shape
    inp = {"x": torch.randn(batch, 16, f, h, w, generator=g), "t": torch.tensor([700.0, 300.0][:batch]),
           "context": torch.randn(batch, 11, cfg.text_dim, generator=g)}
    if cfg.has_image_branch:
        inp["clip_fea"] = torch.randn(batch, 257, cfg.image_dim, generator=g)
        inp["y"] = torch.randn(batch, cfg.in_dim - 16, f, h, w, generator=g)
    return inp


def tiny_dit(model_type: str = "i2v", std: float = 0.05):
    from ditfleet.models.wan import build_dit

    return build_dit(tiny_config(model_type), dtype=torch.bfloat16, seed=0, std=std)


# ---- float64 emulation of the scheme ----------------------------------------------------------------------
def e4m3_round(v: torch.Tensor) -> torch.Tensor:
    """Round float64 values (|v| <= 448) to the e4m3fn grid, nearest-even (3 mantissa bits, min normal 2^-6,
    subnormal step 2^-9) -- independent of torch's float8 cast."""
    v = v.double()
    mag = v.abs()
    exp = torch.floor(torch.log2(mag.clamp(min=2.0**-30))).clamp(min=-6.0)
    step = torch.exp2(exp - 3)
    return (torch.round(v / step) * step).clamp(-448.0, 448.0)


def emulate_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row e4m3 quantisation: ``(codes as float64, scale [..., 1])``. Scale and quotient are the scheme's
    float32 numbers (amax / 448, then x / scale: bf16 inputs put many quotients on e4m3 rounding ties, where
    float32 and float64 division round apart); the e4m3 rounding and everything after it run in float64."""
    scale = x.float().abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 448.0
    return e4m3_round((x.float() / scale).double()), scale.double()


def test_quantised_modules_and_what_stays_bf16():
    model = tiny_dit()
    before = {n: (type(m), [p.dtype for p in m.parameters(recurse=False)]) for n, m in model.named_modules()}
    report = quantize_model_(model, "fp8-vllm", check_device=False)
    linears = {n for n, m in model.named_modules() if isinstance(m, Fp8Linear)}
    expected = {f"blocks.{i}.{leaf}" for i in range(2) for leaf in
                ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                 "cross_attn.v", "cross_attn.o", "cross_attn.k_img", "cross_attn.v_img", "ffn.0", "ffn.2")}
    assert linears == expected
    assert {n for n, m in model.named_modules() if isinstance(m, GeluQuant)} == {"blocks.0.ffn.1", "blocks.1.ffn.1"}
    for n, m in model.named_modules():
        if n in expected or n in ("blocks.0.ffn.1", "blocks.1.ffn.1"):
            continue
        assert (type(m), [p.dtype for p in m.parameters(recurse=False)]) == before[n], n  # untouched
    for n, p in model.named_parameters():
        if "modulation" in n or "norm" in n or n.startswith(("head.", "time_")):
            assert p.dtype == torch.float32, n
    assert model.patch_embedding.weight.dtype == torch.bfloat16 and isinstance(model.text_embedding[0], nn.Linear)
    assert model.dtype == torch.bfloat16
    lin = model.blocks[0].ffn[0]
    assert lin.weight_fp8.dtype == torch.float8_e4m3fn and lin.weight_scale.shape == (1, 128)
    assert not hasattr(lin, "weight")  # the bf16 weight is gone
    assert report["scheme"] == "fp8" and report["requested"] == "fp8-vllm" and report["linears"] == 24
    assert report["modules"]["blocks.*.ffn.0"] == 2 and len(report["modules"]) == 12
    assert report["fused_gelu_quant"] == 2
    assert "head.head" in report["unquantised_linears"] and "patch_embedding" in report["unquantised_linears"]
    with pytest.raises(ValueError, match="already quantised"):
        quantize_model_(model, check_device=False)


def test_fp8_linear_matches_float64_emulation():
    g = torch.Generator().manual_seed(3)
    k, n = 256, 96
    lin = nn.Linear(k, n)
    with torch.no_grad():  # rows and tokens of very different magnitudes: the per-row scales must follow them
        lin.weight.copy_(torch.randn(n, k, generator=g) * torch.logspace(-2, 1, n)[:, None])
        lin.bias.copy_(torch.randn(n, generator=g))
    lin = lin.to(torch.bfloat16)
    x = (torch.randn(2, 37, k, generator=g) * torch.logspace(-3, 2, 37)[None, :, None]).to(torch.bfloat16)
    x[0, 5] = 0.0  # an all-zero token: scale from the epsilon, no NaN
    q = Fp8Linear.from_linear(lin, quant.torchao_gemm())

    lin.requires_grad_(False)
    wq, ws = emulate_rows(lin.weight)
    codes_match = (q.weight_fp8.double() == wq).double().mean().item()
    assert codes_match == 1.0, codes_match
    assert torch.allclose(q.weight_scale.double().t(), ws, rtol=1e-6, atol=0)
    xq, xs = emulate_rows(x)
    emulated = (xq * xs) @ (wq * ws).t() + lin.bias.double()
    exact = x.double() @ lin.weight.double().t() + lin.bias.double()
    with torch.no_grad():
        out = q(x)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 37, n) and torch.isfinite(out).all()
    rows = (out.double() - emulated).norm(dim=-1) / emulated.norm(dim=-1)
    assert rows.max().item() < 5e-3  # the emulation explains the output up to fp32 accumulation + bf16 rounding
    err_vs_exact = rel_l2(out.double(), exact)
    assert 3e-3 < err_vs_exact < 6e-2  # and e4m3 is what separates it from the exact product
    pre = ops.quant_rows(x)
    with torch.no_grad():
        assert torch.equal(q(pre), out)  # pre-quantised rows == quantised inside


def test_fused_norm_ops_emit_quantised_rows():
    g = torch.Generator().manual_seed(4)
    b, s, c = 2, 19, 64
    x, y = torch.randn(b, s, c, generator=g), torch.randn(b, s, c, generator=g).to(torch.bfloat16)
    shift, scale, gate = (torch.randn(b, 1, c, generator=g) * 0.3 for _ in range(3))
    w, bias = 1 + 0.1 * torch.randn(c, generator=g), 0.1 * torch.randn(c, generator=g)
    fp8, bf16 = ops.FP8, torch.bfloat16
    pairs = [
        (ops.modulated_norm(x, shift, scale, 1e-6, fp8), ops.modulated_norm(x, shift, scale, 1e-6, torch.float32)),
        (ops.gated_residual_norm(x, y, gate, w, bias, 1e-6, fp8)[1],
         ops.gated_residual_norm(x, y, gate, w, bias, 1e-6, torch.float32)[1]),
        (ops.residual_modulated_norm(x, y, gate, shift, scale, 1e-6, fp8)[1],
         ops.residual_modulated_norm(x, y, gate, shift, scale, 1e-6, torch.float32)[1]),
        (ops.gelu_quant(y), torch.nn.functional.gelu(y.float(), approximate="tanh")),
    ]
    for got, ref in pairs:
        assert isinstance(got, ops.Fp8Rows) and got.shape == ref.shape and got.scale.shape == (*ref.shape[:-1], 1)
        want = ops.quant_rows(ref)  # the same float32 value, quantised: the fusion changes nothing
        assert torch.equal(got.data.float(), want.data.float()) and torch.equal(got.scale, want.scale)
        err = (got.dequantize() - ref).abs() / ref.abs().amax(dim=-1, keepdim=True)
        assert err.max().item() <= 2.0**-4  # half an e4m3 step at the row max, relative
    assert ops.modulated_norm(x, shift, scale, 1e-6, bf16).dtype == bf16  # unquantised path unchanged
    zero = ops.quant_rows(torch.zeros(3, 8))
    assert torch.equal(zero.data.float(), torch.zeros(3, 8)) and (zero.scale > 0).all()


def test_dit_fp8_close_to_bf16_and_norms_quantise(monkeypatch):
    model = tiny_dit()
    inp = inputs(model.config)
    with torch.no_grad():
        ref = model(**inp).float()
    q = copy.deepcopy(model)
    quantize_model_(q, check_device=False)
    fed: dict[str, int] = {"rows": 0, "tensor": 0}
    real = Fp8Linear.quantize_input

    def spy(self, x):
        fed["rows" if isinstance(x, ops.Fp8Rows) else "tensor"] += 1
        return real(self, x)

    monkeypatch.setattr(Fp8Linear, "quantize_input", spy)
    with torch.no_grad():
        out = q(**inp).float()
    # per block: q, k, v, cross q, ffn.0 (from the norms) and ffn.2 (from GeluQuant) take rows; o, cross o,
    # cross k / v / k_img / v_img quantise their own input
    assert fed == {"rows": 2 * 6, "tensor": 2 * 6}
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item()
    assert cos > 0.999 and rel_l2(out, ref) < 5e-2
    assert rel_l2(out, ref) > 1e-4  # really quantised


def _sp_fp8(rank: int, world: int) -> list[tuple[str, str, float]]:
    from ditfleet.parallel import init_parallel

    meshes = {"ulysses": init_parallel(ulysses_size=2, ring_size=1), "ring": init_parallel(ulysses_size=1, ring_size=2)}
    model = tiny_dit("t2v")
    quantize_model_(model, check_device=False)
    results = []
    for shape_name, shape in (("divides", (2, 4, 8)), ("pads", (3, 6, 10))):
        inp = inputs(model.config, shape, batch=2)
        with torch.no_grad():
            model.set_parallel(None)
            ref = model(**inp).float()
            for name, mesh in meshes.items():
                model.set_parallel(mesh)
                out = model(**inp).float()
                results.append((name, shape_name, rel_l2(out, ref)))
    return results


def test_fp8_under_sequence_parallel():
    """Ulysses and ring over 2 gloo ranks == one process, quantised (per-token scales do not cross ranks)."""
    for rank_results in run_distributed(_sp_fp8, 2):
        for name, shape, err in rank_results:
            assert err < 5e-3, (name, shape, err)  # seen: Ulysses 0, ring ~1e-3 (bf16 partial-softmax merge)


# ---- refusals ---------------------------------------------------------------------------------------------
def _cfg(**kw):
    from ditfleet.config import load_config
    from ditfleet.defaults import TINY_DEFAULT

    return load_config(data={**TINY_DEFAULT, "dit_quantized": True, **kw})


def _fake_gpu(monkeypatch, cap, name="NVIDIA A100"):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda idx=None: cap)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda idx=None: name)


def test_refused_at_start_up_on_cpu():
    from ditfleet.engine.preflight import preflight

    cfg = _cfg(device="cpu")
    with pytest.raises(ConfigError, match=r"^dit_quantized: FP8 linears need a CUDA GPU .* device is cpu"):
        preflight(cfg, None)
    model = tiny_dit()
    with pytest.raises(ConfigError, match="^dit_quantized: .*device is cpu"):
        quantize_model_(model)  # the load path refuses too: never unquantised while the config says otherwise
    assert not any(isinstance(m, Fp8Linear) for m in model.modules())


@pytest.mark.parametrize("cap, dtype, match", [
    ((8, 0), torch.bfloat16, r"NVIDIA A100 is sm80, without FP8 tensor cores"),
    ((9, 0), torch.float32, r"compute in bf16 .* dtype is float32; set dtype to bf16"),
    ((9, 0), torch.float16, r"dtype is float16"),
])
def test_refusals_gpu_capability_and_dtype(monkeypatch, cap, dtype, match):
    _fake_gpu(monkeypatch, cap)
    with pytest.raises(ConfigError, match="^dit_quantized: .*" + match):
        quant.check_quant_runtime(torch.device("cuda"), dtype)


def test_refused_without_torchao(monkeypatch):
    import importlib

    _fake_gpu(monkeypatch, (9, 0), "NVIDIA H200")
    real = importlib.import_module

    def no_torchao(name, *a, **kw):
        if name.startswith("torchao"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *a, **kw)

    monkeypatch.setattr(importlib, "import_module", no_torchao)
    with pytest.raises(ConfigError, match=r"^dit_quantized: needs torchao .* pip install 'ditfleet\[fp8\]'"):
        quant.check_quant_runtime(torch.device("cuda"), torch.bfloat16)


def test_schemes_and_misfit_shapes():
    for name in ("fp8", "fp8-vllm", "fp8-sgl", "fp8-q8f", "fp8-torchao"):
        assert quant.canonical_scheme(name) == "fp8"
    with pytest.raises(ConfigError, match="^dit_quant_scheme: 'int8' is not a quantisation scheme"):
        quant.canonical_scheme("int8")
    from ditfleet.models.wan import build_dit

    odd = build_dit(tiny_config("t2v").replace(dim=40, num_heads=4), dtype=torch.bfloat16, seed=0)
    with pytest.raises(ConfigError, match="multiples of 16; blocks.0.self_attn.q is 40 -> 40"):
        quantize_model_(odd, check_device=False)


def test_denoisers_report(monkeypatch):
    from ditfleet.models.spec import Denoisers

    den = Denoisers([tiny_dit("t2v"), tiny_dit("t2v")], ["high_noise_model", "low_noise_model"], boundary=0.875)
    assert den.describe()["quant"] is None
    monkeypatch.setattr(quant, "check_quant_runtime", lambda device, dtype: None)  # as on an sm90 GPU
    quant.quantize_denoisers_(den, "fp8-q8f")
    rep = den.describe()["quant"]
    per_expert = 2 * 10  # 2 blocks x (4 self + 4 cross + 2 ffn) linears
    assert rep["scheme"] == "fp8" and rep["requested"] == "fp8-q8f" and rep["linears"] == 2 * per_expert
    assert {n: e["linears"] for n, e in rep["per_expert"].items()} == {"high_noise_model": per_expert,
                                                                       "low_noise_model": per_expert}
    assert rep["quantised_params"] == sum(e["quantised_params"] for e in rep["per_expert"].values())
    assert rep["experts"] == ["high_noise_model", "low_noise_model"]
    assert all(isinstance(d.blocks[1].ffn[2], Fp8Linear) for d in den)
    assert all(fnmatch.fnmatchcase(k, "blocks.*") for k in rep["modules"]) and math.isfinite(rep["quantised_params"])


def test_generate_refuses_before_loading(tmp_path):
    """``ditfleet generate`` with dit_quantized on CPU: exit 2 and the one message, before anything loads."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, "-m", "ditfleet", "generate", "--set", "dit_quantized=true", "--set",
                        "device=cpu", "-o", str(tmp_path / "v.npy")], cwd=root, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2, p.stderr
    assert "ditfleet: error: dit_quantized: FP8 linears need a CUDA GPU" in p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "v.npy").exists()


def test_engine_start_refuses_before_any_component_loads(monkeypatch):
    """An engine (Pipeline.from_config / load_runner, as the workers load) refuses before reading a component."""
    from ditfleet.config import load_config
    from ditfleet.engine import pipeline as pl
    from ditfleet.engine.encoders import TextEncoder
    from ditfleet.models.registry import FAMILIES, spec_for

    def loaded(*a, **kw):
        raise AssertionError("a component was loaded before the dit_quantized refusal")

    monkeypatch.setattr(TextEncoder, "load", loaded)
    for family in FAMILIES:  # every family's denoiser loader (what ModelRunner.load calls)
        monkeypatch.setattr(type(spec_for(family)), "load", loaded)
    cfg = load_config(data={"dit_quantized": True, "device": "cpu"})
    for load in (lambda: pl.Pipeline.from_config(cfg), lambda: pl.load_runner(cfg, device=torch.device("cpu"))):
        with pytest.raises(ConfigError, match=r"^dit_quantized: FP8 linears need a CUDA GPU"):
            load()


def test_scaled_mm_stand_in_equals_torchao():
    """bench dit's stand-in where torchao does not import: the same torch._scaled_mm call, the same numbers."""
    g = torch.Generator().manual_seed(5)
    a, w = ops.quant_rows(torch.randn(33, 64, generator=g)), ops.quant_rows(torch.randn(48, 64, generator=g))
    bias = torch.randn(48, generator=g).to(torch.bfloat16)
    args = (a.data, a.scale, w.data.t(), w.scale.reshape(1, -1).contiguous(), torch.bfloat16)
    assert torch.equal(quant.scaled_mm_gemm(*args, bias=bias), quant.torchao_gemm()(*args, bias=bias))


def test_fp8_with_per_token_timesteps():
    """Per-token timesteps (TI2V image-to-video: per-token modulation [B, S, C]) through the quantising norms."""
    model = tiny_dit("t2v")
    inp = inputs(model.config, (2, 4, 8))
    tokens = 2 * 2 * 4
    inp["t"] = torch.cat([torch.zeros(1, 8), torch.full((1, tokens - 8), 700.0)], dim=1)  # first frame at t=0
    with torch.no_grad():
        ref = model(**inp).float()
        quantize_model_(model, check_device=False)
        out = model(**inp).float()
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item()
    assert cos > 0.999 and 1e-4 < rel_l2(out, ref) < 5e-2
