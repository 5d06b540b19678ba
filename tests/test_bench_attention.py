"""CPU smoke test of ``ditfleet bench attention`` (tiny shapes; the real numbers come from a GPU run)."""

from __future__ import annotations

import argparse
import json

import pytest

from ditfleet.attention import registry
from ditfleet.attention.sdpa import SdpaCpuFlash
from ditfleet.bench import attention as bench
from ditfleet.errors import UserError

TINY = ["--seq-lens", "300", "--heads", "2", "--head-dim", "32", "--dtype", "fp32",
        "--iters", "2", "--warmup", "1", "--ref-rows", "64", "--device", "cpu"]


def run(tmp_path, *extra: str) -> tuple[int, dict]:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out = tmp_path / "attention_cpu.json"
    rc = bench.main(parser.parse_args([*TINY, "--out", str(out), *extra]))
    return rc, json.loads(out.read_text())


def test_cpu_run_measures_available_kernels_and_lists_the_rest(tmp_path):
    rc, rep = run(tmp_path)
    assert rc == 0
    res = {r["kernel"]: r for r in rep["results"]}
    for key in ("sdpa_cpu_flash", "sdpa_math"):
        r = res[key]
        assert r["status"] == "ok", r
        assert r["seq_len"] == 300 and r["checked_rows"] == 64 and r["finite"]
        assert r["median_ms"] > 0 and r["tflops"] > 0 and len(r["times_ms"]) == 2
        assert r["rel_l2"] is not None and r["rel_l2"] < 1e-5
        assert r["lse_max_abs_err"] is not None and r["lse_max_abs_err"] < 1e-4
    # Every registered kernel is either measured or listed as unavailable with its reasons.
    assert set(res) | set(rep["unavailable"]) == set(registry.dense_kernel_keys())
    assert not set(res) & set(rep["unavailable"])
    for key in ("fa4", "sdpa_cudnn"):
        assert key not in res
        reasons = rep["unavailable"][key]
        assert reasons and all(isinstance(r, str) and r for r in reasons)
    assert any("CUDA" in r for r in rep["unavailable"]["sdpa_cudnn"])
    env, cfg = rep["environment"], rep["config"]
    assert env["card"] == "cpu" and env["gpu_count"] == 0 and "commit" in env and "torch" in env["packages"]
    assert (cfg["seq_lens"], cfg["heads"], cfg["head_dim"], cfg["batch"], cfg["dtype"]) == ([300], 2, 32, 1, "fp32")
    assert rep["types"]["torch_sdpa"]["kernel"] == "sdpa_cpu_flash"
    assert rep["types"]["radial_attn"]["kernel"] == "radial_flex"
    assert rep["types"]["sparge"]["kernel"] == "sparge_flex"
    assert rep["plot"] or rep["plot_note"]


class _WrongScale(SdpaCpuFlash):
    """A subtly wrong kernel: softmax scale off by 1.5x."""

    key = "wrong_scale"

    def _forward(self, q, k, v, *, scale, return_lse):
        return super()._forward(q, k, v, scale=scale * 1.5, return_lse=return_lse)


class _Broken(SdpaCpuFlash):
    key = "broken"

    def _forward(self, q, k, v, *, scale, return_lse):
        raise RuntimeError("kernel exploded")


def test_wrong_kernels_are_caught_and_failures_do_not_stop_the_others(tmp_path, monkeypatch):
    fakes = {"wrong_scale": _WrongScale, "broken": _Broken}
    real = registry.kernel_class
    for key, cls in fakes.items():
        monkeypatch.setitem(registry.KERNELS, key, f"tests:{cls.__name__}")
    monkeypatch.setattr(registry, "kernel_class", lambda key: fakes.get(key) or real(key))
    rc, rep = run(tmp_path, "--kernels", "broken", "wrong_scale", "sdpa_cpu_flash", "fa4")
    assert rc == 0
    res = {r["kernel"]: r for r in rep["results"]}
    assert res["broken"]["status"] == "error" and "kernel exploded" in res["broken"]["error"]
    assert res["wrong_scale"]["status"] == "ok"
    assert res["wrong_scale"]["rel_l2"] > 1e-2 and res["wrong_scale"]["lse_max_abs_err"] > 1e-2
    assert res["sdpa_cpu_flash"]["status"] == "ok" and res["sdpa_cpu_flash"]["rel_l2"] < 1e-5
    assert "fa4" in rep["unavailable"] and "sdpa_math" not in res


def test_all_failed_returns_1_and_bad_options_are_user_errors(tmp_path, monkeypatch):
    monkeypatch.setitem(registry.KERNELS, "broken", "tests:_Broken")
    real = registry.kernel_class
    monkeypatch.setattr(registry, "kernel_class", lambda key: _Broken if key == "broken" else real(key))
    rc, rep = run(tmp_path, "--kernels", "broken")
    assert rc == 1 and rep["results"][0]["status"] == "error"
    with pytest.raises(UserError, match="--kernels"):
        run(tmp_path, "--kernels", "no_such_kernel")


@pytest.mark.parametrize(
    "name, slug",
    [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"), ("NVIDIA A100-SXM4-80GB", "a100"),
     ("NVIDIA L40S", "l40s"), ("NVIDIA GeForce RTX 4090", "rtx-4090"), ("cpu", "cpu")],
)
def test_card_slug(name, slug):
    assert bench.card_slug(name) == slug
