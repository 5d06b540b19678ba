"""FP8 DiT linears on an FP8 GPU (skipped without CUDA sm89+ or torchao).

* The fused quantising ops compiled by ``torch.compile`` match their eager definitions (codes and scales).
* A Wan-1.3B-shape random DiT (4 blocks, 17 x 480 x 832): the fp8 forward's output against the bf16 forward
  on the same weights and inputs, cosine >= 0.995 (cosine and rel L2 printed).
* The engine: ``dit_quantized`` on the tiny default model (bf16) generates, and the run report states the
  quantisation (``model.denoisers.quant``).

    python -m pytest -q -s tests/gpu/test_quant_gpu.py
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("torchao")

from ditfleet.bench.common import rel_l2  # noqa: E402
from ditfleet.models.wan import build_dit, ops  # noqa: E402
from ditfleet.models.wan.config import WanDiTConfig  # noqa: E402

FP8_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
pytestmark = pytest.mark.skipif(not FP8_GPU, reason="needs a CUDA GPU with FP8 tensor cores (sm89+)")
DEV = torch.device("cuda")


def test_fused_quant_ops_compiled_match_eager():
    g = torch.Generator(device=DEV).manual_seed(0)
    b, s, c = 1, 999, 640

    def r(*shape, dt=torch.float32):
        return torch.randn(*shape, generator=g, device=DEV, dtype=dt)

    x, y = r(b, s, c), r(b, s, c, dt=torch.bfloat16)
    shift, scale, gate, w, bias = r(b, 1, c), r(b, 1, c), r(b, 1, c), r(c), r(c)
    cases = {
        "modulated_norm": (ops.modulated_norm, (x, shift, scale, 1e-6, ops.FP8)),
        "gated_residual_norm": (ops.gated_residual_norm, (x, y, gate, w, bias, 1e-6, ops.FP8)),
        "residual_modulated_norm": (ops.residual_modulated_norm, (x, y, gate, shift, scale, 1e-6, ops.FP8)),
        "quant_rows_op": (ops.quant_rows_op, (y,)),
        "gelu_quant": (ops.gelu_quant, (r(b, s, 4 * c, dt=torch.bfloat16),)),
    }
    for name, (op, args) in cases.items():
        with torch.inference_mode():
            eager, fused = op.fn(*args), op(*args)
        assert not op.broken, f"{name}: torch.compile failed, the eager fallback ran"
        eager = eager[-1] if isinstance(eager, tuple) and not isinstance(eager, ops.Fp8Rows) else eager
        fused = fused[-1] if isinstance(fused, tuple) and not isinstance(fused, ops.Fp8Rows) else fused
        assert isinstance(fused, ops.Fp8Rows) and fused.data.dtype == ops.FP8, name
        assert torch.allclose(fused.scale, eager.scale, rtol=1e-5, atol=0), name
        same = (fused.data.float() == eager.data.float()).float().mean().item()
        assert same > 0.999, (name, same)  # float rounding may move a value across an e4m3 rounding tie


def test_dit_fp8_output_close_to_bf16():
    from ditfleet.models.quant import quantize_model_

    cfg = WanDiTConfig.t2v_1_3b().replace(num_layers=4)
    model = build_dit(cfg, device=DEV, dtype=torch.bfloat16, seed=0, std=0.02)
    g = torch.Generator(device=DEV).manual_seed(1)
    inp = {"x": torch.randn(1, 16, 5, 60, 104, generator=g, device=DEV), "t": torch.tensor([999.0], device=DEV),
           "context": torch.randn(1, 512, cfg.text_dim, generator=g, device=DEV)}
    with torch.inference_mode():
        ref = model(**inp).float()
    q = copy.deepcopy(model)
    report = quantize_model_(q, "fp8")
    assert report["linears"] == 4 * 10
    with torch.inference_mode():
        out = q(**inp).float()
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item()
    err = rel_l2(out, ref)
    print(f"\n[fp8] Wan-1.3B shape, 4 blocks, 7,800 tokens: cosine {cos:.5f}, rel L2 {err:.3e}")
    assert cos >= 0.995 and err > 1e-4


def test_engine_generates_quantised_and_reports_it(tmp_path, tiny_cache):
    from ditfleet.config import load_config
    from ditfleet.defaults import TINY_DEFAULT
    from ditfleet.engine import Engine
    from ditfleet.engine.pipeline import request_from_config

    cfg = load_config(None, [], data={**TINY_DEFAULT, "device": "cuda", "dtype": "bf16", "dit_quantized": True,
                                      "dit_quant_scheme": "fp8-sgl"})
    with Engine.start(cfg, launcher="local") as eng:
        res = eng.generate(request_from_config(eng.cfg, output=str(tmp_path / "v.npy")), quiet=True)
    assert torch.isfinite(res.latents).all()
    quant = res.report["model"]["denoisers"]["quant"]
    assert quant["scheme"] == "fp8" and quant["requested"] == "fp8-sgl" and quant["linears"] > 0
    assert "_scaled_mm" in quant["gemm"]
