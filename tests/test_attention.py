"""Attention backends vs a float64 reference, the backend contract, and the registry's resolution rules."""

from __future__ import annotations

import logging

import pytest
import torch

from ditfleet.attention import reference_attention, resolve, valid_types
from ditfleet.attention.base import AttentionBackend, Capabilities
from ditfleet.attention.registry import dense_kernel_keys, kernel_class
from ditfleet.attention.sdpa import SdpaMath
from ditfleet.errors import BackendUnavailableError

CPU = torch.device("cpu")


def cpu_kernels() -> list[str]:
    return [k for k in dense_kernel_keys() if not kernel_class(k).unavailable_reasons(CPU, torch.float32)]


def rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).norm() / ref.double().norm())


def rand(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def test_cpu_kernels_present():
    assert {"sdpa_cpu_flash", "sdpa_math"} <= set(cpu_kernels())


@pytest.mark.parametrize("key", cpu_kernels())
@pytest.mark.parametrize("s_q,s_k", [(1001, 1001), (1000, 512), (7, 300)])
def test_cpu_kernel_vs_float64(key, s_q, s_k):
    backend = kernel_class(key)(device=CPU, dtype=torch.float32)
    q, k, v = rand(2, s_q, 6, 64, seed=1), rand(2, s_k, 6, 64, seed=2), rand(2, s_k, 6, 64, seed=3)
    out, lse = backend(q, k, v, return_lse=True)
    ref, ref_lse = reference_attention(q, k, v)
    assert out.shape == (2, s_q, 6, 64) and out.dtype == torch.float32
    assert lse.shape == (2, 6, s_q) and lse.dtype == torch.float32
    assert rel_l2(out, ref) <= 1e-5
    assert float((lse.double() - ref_lse).abs().max()) <= 1e-5
    out2, none = backend(q, k, v)
    assert none is None and torch.equal(out2, out)


@pytest.mark.parametrize("key", cpu_kernels())
def test_scale_argument(key):
    backend = kernel_class(key)(device=CPU, dtype=torch.float32)
    q, k, v = rand(1, 33, 3, 16, seed=4), rand(1, 40, 3, 16, seed=5), rand(1, 40, 3, 16, seed=6)
    out, lse = backend(q, k, v, scale=0.37, return_lse=True)
    ref, ref_lse = reference_attention(q, k, v, scale=0.37)
    assert rel_l2(out, ref) <= 1e-5 and float((lse - ref_lse).abs().max()) <= 1e-5


@pytest.mark.parametrize("key", cpu_kernels())
def test_kv_lens_masks_padded_keys(key):
    backend = kernel_class(key)(device=CPU, dtype=torch.float32)
    q, k, v = rand(3, 50, 6, 32, seed=7), rand(3, 64, 6, 32, seed=8), rand(3, 64, 6, 32, seed=9)
    lens = [64, 41, 1]
    out, lse = backend(q, k, v, kv_lens=lens, return_lse=True)
    ref, ref_lse = reference_attention(q, k, v, kv_lens=lens)
    assert rel_l2(out, ref) <= 1e-5 and float((lse - ref_lse).abs().max()) <= 1e-5
    # padded keys must not matter at all: scramble them and get the same bits
    k2, v2 = k.clone(), v.clone()
    k2[1, 41:] = 1e4
    v2[2, 1:] = -1e4
    out2, _ = backend(q, k2, v2, kv_lens=lens)
    assert torch.equal(out2, out)
    # and they do matter without kv_lens (the test can fail)
    assert rel_l2(backend(q, k2, v2)[0], ref) > 1e-2


def test_float64_math_path_is_exact_and_chunked():
    m = SdpaMath(device=CPU, dtype=torch.float64)
    m.chunk = 100
    q, k, v = (rand(1, n, 2, 8, seed=i, dtype=torch.float64) for i, n in enumerate((1001, 999, 999)))
    out, lse = m(q, k, v, kv_lens=[500], return_lse=True)
    ref, ref_lse = reference_attention(q, k, v, kv_lens=[500])
    assert rel_l2(out, ref) <= 1e-12 and float((lse.double() - ref_lse).abs().max()) <= 1e-5


def test_low_precision_cpu_tolerance_scales_with_plain_bf16():
    """bf16 kernel error is judged against the same computation in plain PyTorch bf16 math."""
    backend = kernel_class("sdpa_cpu_flash")(device=CPU, dtype=torch.bfloat16)
    q, k, v = (rand(1, 257, 6, 64, seed=i) for i in (10, 11, 12))
    ref, _ = reference_attention(q, k, v)
    out, _ = backend(q.bfloat16(), k.bfloat16(), v.bfloat16())
    s = torch.softmax((q.bfloat16().transpose(1, 2) @ k.bfloat16().transpose(1, 2).transpose(-1, -2)) * 64**-0.5, -1)
    plain = (s @ v.bfloat16().transpose(1, 2)).transpose(1, 2)
    assert rel_l2(out, ref) <= 2 * rel_l2(plain, ref) + 1e-3


# --- contract ------------------------------------------------------------------------------


class NoLse(AttentionBackend):
    key = "nolse"
    description = "test kernel without LSE"
    caps = Capabilities(lse=False, devices=frozenset({"cpu"}), dtypes=frozenset({torch.float32}))

    def _forward(self, q, k, v, *, scale, return_lse):
        return reference_attention(q, k, v, scale=scale, dtype=torch.float32)[0], None


def test_unsupported_arguments_raise_instead_of_vanishing():
    b = NoLse(device=CPU, dtype=torch.float32)
    q = rand(1, 10, 2, 8)
    with pytest.raises(NotImplementedError, match="does not return the LSE"):
        b(q, q, q, return_lse=True)
    with pytest.raises(TypeError, match="built for torch.float32"):
        b(q.double(), q.double(), q.double())
    with pytest.raises(ValueError, match=r"\[B, S, H, D\]"):
        b(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="disagree"):
        b(q, rand(1, 10, 3, 8), rand(1, 10, 3, 8))
    with pytest.raises(ValueError, match=r"kv_lens must lie in \[1, 10\]"):
        b(q, q, q, kv_lens=[0])
    with pytest.raises(ValueError, match="1 entries for batch 2"):
        b(rand(2, 10, 2, 8), rand(2, 10, 2, 8), rand(2, 10, 2, 8), kv_lens=[3])


# --- registry --------------------------------------------------------------------------------


def test_unknown_type_lists_valid_ones():
    with pytest.raises(BackendUnavailableError, match="flash_attn9.*torch_sdpa.*flash_attn4.*sage_attn2"):
        resolve("flash_attn9", site="self_attn_1_type", device="cpu", dtype=torch.float32)


def test_torch_sdpa_on_cpu_is_native_and_exact():
    r = resolve("torch_sdpa", site="self_attn_1_type", device="cpu", dtype=torch.float32)
    assert r.kernel == "sdpa_cpu_flash" and not r.fallback
    assert {k for k, _ in r.skipped} == {"sdpa_cudnn", "sdpa_flash", "sdpa_efficient"}


@pytest.mark.parametrize("attn_type", ["flash_attn2", "flash_attn3", "sage_attn2"])
def test_missing_packages_fall_back_with_one_warning(attn_type, caplog):
    from ditfleet.attention.registry import log_resolutions

    with caplog.at_level(logging.WARNING):
        r = resolve(attn_type, site="cross_attn_1_type", device="cpu", dtype=torch.float32)
        dense = resolve("torch_sdpa", site="self_attn_1_type", device="cpu", dtype=torch.float32)
        log_resolutions([dense, r])  # the start-up table: the one place a fallback is told
    assert r.fallback and r.kernel == "sdpa_cpu_flash"
    warnings = [rec for rec in caplog.records if rec.levelno == logging.WARNING]
    assert len(warnings) == 1 and "cross_attn_1_type" in warnings[0].getMessage()
    assert warnings[0].getMessage().count("(FALLBACK") == 1
    # and the fallback really runs
    q = rand(1, 20, 2, 16)
    out, _ = r.backend(q, q, q)
    assert rel_l2(out, reference_attention(q, q, q)[0]) <= 1e-5


def test_strict_backends_refuses_fallback_with_install_hint():
    with pytest.raises(BackendUnavailableError) as e:
        resolve("flash_attn3", site="self_attn_1_type", device="cpu", dtype=torch.float32, strict=True)
    msg = str(e.value)
    assert msg.startswith("self_attn_1_type:") and "strict_backends" in msg and "flash_attn_interface" in msg


def test_flash_attn4_has_no_fallback():
    with pytest.raises(BackendUnavailableError, match="flash-attn-4"):
        resolve("flash_attn4", site="self_attn_1_type", device="cpu", dtype=torch.bfloat16)


def test_need_lse_skips_kernels_without_lse(monkeypatch):
    import ditfleet.attention.registry as reg

    monkeypatch.setitem(reg.KERNELS, "nolse", f"{__name__}:NoLse")
    monkeypatch.setitem(reg.ATTN_TYPES, "test_t", reg.AttnType("test_t", ("nolse", "sdpa_math"), native=1))
    assert resolve("test_t", site="s", device="cpu", dtype=torch.float32).kernel == "nolse"
    r = resolve("test_t", site="s", device="cpu", dtype=torch.float32, need_lse=True)
    assert r.kernel == "sdpa_math" and "returns no LSE" in r.why


def test_sparge_resolves_to_builtin_on_cpu_and_is_self_attention_only():
    r = resolve("sparge", site="self_attn_1_type", device="cpu", dtype=torch.float32)
    assert r.kernel == "sparge_flex" and not r.fallback
    assert "sparge" not in valid_types("cross_attn_1_type")


@pytest.mark.parametrize("key", ["fa2", "fa3", "fa4", "sageattention2", "sageattention1", "sdpa_cudnn", "sdpa_flash"])
def test_gpu_kernels_explain_why_not_on_cpu(key):
    reasons = kernel_class(key).unavailable_reasons(CPU, torch.bfloat16)
    assert reasons and any("CUDA" in r or "not installed" in r for r in reasons)
