"""PyTorch's own attention kernels (the ``torch_sdpa`` family and the fallbacks of other types).

Every kernel here returns the LSE from the kernel itself (aten's flash / efficient / cuDNN ops,
or the CPU flash op); ``SdpaMath`` computes it chunk by chunk over the queries, from the same
scores it uses for the output, never by a second dense pass.
"""

from __future__ import annotations

import torch

from .base import ALL_FLOATS, LOW_PRECISION, AttentionBackend, Capabilities

aten = torch.ops.aten


def _bhsd(t: torch.Tensor) -> torch.Tensor:
    """``[B, S, H, D]`` -> ``[B, H, S, D]`` view (the layout aten's SDPA ops take)."""
    return t.transpose(1, 2)


def _lse_bhs(lse: torch.Tensor, s_q: int) -> torch.Tensor:
    """Normalise an aten LSE (``[B, H, S]``, ``[B, H, S, 1]`` or padded in S) to float32 ``[B, H, S_q]``."""
    if lse.dim() == 4:
        lse = lse.squeeze(-1)
    return lse[..., :s_q].float()


class SdpaCpuFlash(AttentionBackend):
    """aten ``_scaled_dot_product_flash_attention_for_cpu``: fused, returns the LSE, any float dtype."""

    key = "sdpa_cpu_flash"
    description = "torch SDPA flash kernel (CPU)"
    caps = Capabilities(lse=True, devices=frozenset({"cpu"}), dtypes=ALL_FLOATS, max_head_dim=1024)

    def _forward(self, q, k, v, *, scale, return_lse):
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(_bhsd(q), _bhsd(k), _bhsd(v), scale=scale)
        return _bhsd(out), (lse.float() if return_lse else None)


class SdpaCudnn(AttentionBackend):
    """aten ``_scaled_dot_product_cudnn_attention`` (cuDNN fused attention; what SDPA picks on Hopper)."""

    key = "sdpa_cudnn"
    description = "torch SDPA cuDNN kernel"
    caps = Capabilities(
        lse=True, devices=frozenset({"cuda"}), dtypes=LOW_PRECISION, max_head_dim=128, min_compute_capability=(8, 0)
    )

    @classmethod
    def unavailable_reasons(cls, device, dtype):
        reasons = super().unavailable_reasons(device, dtype)
        if not reasons and not torch.backends.cudnn.is_available():
            reasons.append("cuDNN is not available in this PyTorch build")
        return reasons

    def _forward(self, q, k, v, *, scale, return_lse):
        res = aten._scaled_dot_product_cudnn_attention(
            _bhsd(q), _bhsd(k), _bhsd(v), None, return_lse, 0.0, False, False, scale=scale
        )
        return _bhsd(res[0]), (_lse_bhs(res[1], q.shape[1]) if return_lse else None)


class SdpaFlash(AttentionBackend):
    """aten ``_scaled_dot_product_flash_attention``: PyTorch's bundled FlashAttention-2 kernel."""

    key = "sdpa_flash"
    description = "torch SDPA FlashAttention-2 kernel"
    caps = Capabilities(
        lse=True, devices=frozenset({"cuda"}), dtypes=LOW_PRECISION, max_head_dim=256, min_compute_capability=(8, 0)
    )

    def _forward(self, q, k, v, *, scale, return_lse):
        res = aten._scaled_dot_product_flash_attention(_bhsd(q), _bhsd(k), _bhsd(v), 0.0, False, False, scale=scale)
        return _bhsd(res[0]), (_lse_bhs(res[1], q.shape[1]) if return_lse else None)


class SdpaEfficient(AttentionBackend):
    """aten ``_scaled_dot_product_efficient_attention`` (memory-efficient kernel; also float32)."""

    key = "sdpa_efficient"
    description = "torch SDPA memory-efficient kernel"
    caps = Capabilities(
        lse=True,
        devices=frozenset({"cuda"}),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
        max_head_dim=256,
        min_compute_capability=(5, 0),
    )

    def _forward(self, q, k, v, *, scale, return_lse):
        res = aten._scaled_dot_product_efficient_attention(
            _bhsd(q), _bhsd(k), _bhsd(v), None, return_lse, 0.0, False, scale=scale
        )
        return _bhsd(res[0]), (_lse_bhs(res[1], q.shape[1]) if return_lse else None)


class SdpaMath(AttentionBackend):
    """Plain PyTorch math in query chunks (any device, any float dtype); the LSE comes from the same scores.

    Scores are formed in float32 (float64 for float64 inputs), so memory stays at
    ``chunk * S_k`` per head instead of ``S_q * S_k``.
    """

    key = "sdpa_math"
    description = "PyTorch math attention (chunked)"
    caps = Capabilities(lse=True, devices=frozenset({"cpu", "cuda"}), dtypes=ALL_FLOATS, max_head_dim=1024)
    chunk: int = 1024

    def _forward(self, q, k, v, *, scale, return_lse):
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        kt = _bhsd(k).to(acc).transpose(-1, -2)  # [B, H, D, S_k]
        vv = _bhsd(v).to(acc)
        qq = _bhsd(q)
        out = torch.empty_like(qq)
        lse = torch.empty(qq.shape[:3], dtype=torch.float32, device=q.device) if return_lse else None
        for i in range(0, qq.shape[2], self.chunk):
            s = torch.matmul(qq[:, :, i : i + self.chunk].to(acc), kt) * scale
            m = torch.logsumexp(s, dim=-1, keepdim=True)
            out[:, :, i : i + self.chunk] = torch.matmul(torch.exp(s - m), vv).to(q.dtype)
            if lse is not None:
                lse[:, :, i : i + self.chunk] = m.squeeze(-1).float()
        return _bhsd(out), lse
