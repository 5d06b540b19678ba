"""``ditfleet bench dit`` in its CPU smoke mode (``--tiny``): runs, writes the JSON the GPU run writes."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from ditfleet.bench import dit
from ditfleet.errors import UserError


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    dit.add_arguments(p)
    return p.parse_args(list(argv))


@pytest.mark.parametrize("model", ["t2v-14b", "i2v-14b"])
def test_bench_dit_tiny_cpu(tmp_path, model):
    pytest.importorskip("diffusers")
    out = tmp_path / "dit.json"
    args = parse("--tiny", "--device", "cpu", "--model", model, "--diffusers", "--iters", "1", "--block-iters", "1",
                 "--block-warmup", "0", "--warmup", "0", "--out", str(out))
    assert dit.main(args) == 0
    data = json.loads(out.read_text())
    assert data["suite"] == "dit" and data["config"]["tokens"] == 3 * 4 * 6 and data["config"]["tiny"]
    (res,) = data["results"]
    assert res["status"] == "ok" and res["kernel"] == "sdpa_cpu_flash"
    for key in ("attention_ms", "block_linears_ms", "block_ms", "forward_s"):
        assert res[key] > 0, key
    diff = data["diffusers"]
    assert diff["status"] == "ok" and diff["forward_s"] > 0
    assert diff["rel_l2_vs_ditfleet"] < 3e-2  # same weights, bf16 on both sides
    assert data["summary"]["fastest_kernel"] == "sdpa_cpu_flash"


def test_bench_dit_refuses_full_size_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(UserError, match="--tiny"):
        dit.main(parse("--device", "cpu"))
    with pytest.raises(UserError, match="4n\\+1"):
        dit.main(parse("--tiny", "--frames", "10"))
    with pytest.raises(UserError, match="unknown kernel"):
        dit.main(parse("--tiny", "--kernels", "nope"))


def test_bench_dit_tiny_cpu_attn_types(tmp_path):
    """--attn-types: each type resolved for self-attention as a run resolves it; radial / Sparge bound and sparse."""
    out = tmp_path / "dit_types.json"
    args = parse("--tiny", "--device", "cpu", "--frames", "9", "--height", "128", "--width", "128",
                 "--kernels", "sdpa_cpu_flash", "--attn-types", "sage_attn2", "sparge", "radial_attn", "flash_attn3",
                 "--sparge-topk", "0.5", "--radial-block-size", "16", "--iters", "1", "--warmup", "0",
                 "--block-iters", "1", "--block-warmup", "0", "--out", str(out))
    assert dit.main(args) == 0
    data = json.loads(out.read_text())
    cfg = data["config"]
    assert cfg["tokens"] == 3 * 8 * 8 and cfg["kernels"] == ["sdpa_cpu_flash"]
    assert cfg["attn_types"] == ["sage_attn2", "sparge", "radial_attn", "flash_attn3"]
    assert cfg["cross_kernel"] == "sdpa_cpu_flash" and "fa4 unavailable" in cfg["cross_kernel_why"]
    assert cfg["radial_attn_setting"] == {"decay_factor": 0.2, "block_size": 16, "dense_timesteps": 0, "dense_layers": 0}
    assert cfg["sparge_topk"] == 0.5 and data["complete"] is True
    res = {r["label"]: r for r in data["results"]}
    assert list(res) == ["sdpa_cpu_flash", "sage_attn2", "sparge", "radial_attn", "flash_attn3"]
    for label, r in res.items():
        assert r["status"] == "ok", (label, r.get("error"))
        for key in ("attention_ms", "block_linears_ms", "block_ms", "forward_s"):
            assert math.isfinite(r[key]) and r[key] > 0, (label, key)
    assert res["sdpa_cpu_flash"]["attn_type"] is None and "resolution" not in res["sdpa_cpu_flash"]
    want = {"sage_attn2": ("sdpa_cpu_flash", True), "sparge": ("sparge_flex", False),
            "radial_attn": ("radial_flex", False), "flash_attn3": ("sdpa_cpu_flash", True)}
    for label, (kernel, fallback) in want.items():
        r = res[label]
        assert r["attn_type"] == label and r["kernel"] == kernel and r["fallback"] is fallback, label
        assert r["resolution"]["requested"] == label and r["resolution"]["kernel"] == kernel
        assert r["resolution"]["site"] == "self_attn_1_type"
        assert r["site_kernels"] == {"self_attn_1_type": kernel, "cross_attn_1_type": "sdpa_cpu_flash"}
    assert "sage_triton" in res["sage_attn2"]["resolution"]["skipped"]
    sp = res["sparge"]
    assert sp["sparge"]["topk"] == 0.5 and "2 of 2 blocks sparse (topk mode)" in sp["sparge"]["bound"]
    assert 0 < sp["sparge_density_block0"] < 1
    rad = res["radial_attn"]
    assert rad["radial"]["step"] == 0 and rad["radial"]["block_size"] == 16
    assert 0 < rad["radial_density_block0"] < 1 and 0 < rad["radial_density_mean"] < 1
    summary = data["summary"]
    assert summary["forward_reference"] == "sdpa_cpu_flash"
    assert set(summary["forward_vs_reference"]) == set(res)
    assert all(math.isfinite(v) and v > 0 for v in summary["forward_vs_reference"].values())


def test_bench_dit_attn_types_errors(tmp_path):
    with pytest.raises(UserError, match="unknown attention type nope; valid: torch_sdpa"):
        dit.main(parse("--tiny", "--device", "cpu", "--attn-types", "nope"))
    with pytest.raises(UserError, match="--sparge-topk"):
        dit.main(parse("--tiny", "--device", "cpu", "--attn-types", "sparge", "--sparge-topk", "0"))
    with pytest.raises(UserError, match="--radial-block-size"):
        dit.main(parse("--tiny", "--device", "cpu", "--attn-types", "radial_attn", "--radial-block-size", "24"))
    with pytest.raises(UserError, match="cross-attention needs a dense kernel"):
        dit.main(parse("--tiny", "--device", "cpu", "--attn-types", "torch_sdpa", "--cross-kernel", "radial_flex"))
    with pytest.raises(UserError, match="--cross-kernel sdpa_cudnn cannot run here"):
        dit.main(parse("--tiny", "--device", "cpu", "--attn-types", "torch_sdpa", "--cross-kernel", "sdpa_cudnn"))


def test_bench_dit_tiny_cpu_quant(tmp_path):
    """``--quant none,fp8`` on CPU (torch's CPU _scaled_mm): both rows, the fp8 row compared with the bf16 one."""
    pytest.importorskip("torchao")
    out = tmp_path / "dit.json"
    args = parse("--tiny", "--device", "cpu", "--quant", "none,fp8-vllm", "--iters", "1", "--block-iters", "1",
                 "--block-warmup", "0", "--warmup", "0", "--out", str(out))
    assert dit.main(args) == 0
    data = json.loads(out.read_text())
    assert data["config"]["quant"] == ["none", "fp8-vllm"] and data["complete"]
    base, q = data["results"]
    assert base["label"] == "sdpa_cpu_flash" and base["quant"] is None and "cosine" not in base
    assert q["label"] == "sdpa_cpu_flash+fp8-vllm" and q["quant"] == "fp8-vllm" and q["status"] == "ok"
    assert 0.99 < q["cosine"] <= 1.0 and 0 < q["rel_l2"] < 0.1
    rep = data["quant_report"]
    assert rep["scheme"] == "fp8" and rep["linears"] == 2 * 10 and rep["modules"]["blocks.*.ffn.2"] == 2
    assert data["config"]["weights_gib_quantised"] < data["config"]["weights_gib"]
    s = data["summary"]["quant"]["sdpa_cpu_flash+fp8-vllm"]
    assert s["block_linears_speedup"] > 0 and s["cosine"] == q["cosine"]


def test_bench_dit_quant_errors():
    for bad in ("int8", "fp8,none", "none,none", "none,fp8,fp8-sgl", ""):
        with pytest.raises(UserError, match="--quant"):
            dit.main(parse("--tiny", "--device", "cpu", "--quant", bad))
    with pytest.raises(UserError, match="--diffusers runs on the unquantised weights"):
        dit.main(parse("--tiny", "--device", "cpu", "--quant", "none,fp8", "--diffusers"))
