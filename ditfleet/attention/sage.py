"""SageAttention through its own package (``sageattention``; 2.x is a source build, 1.x is on PyPI).

- 2.x: ``sageattn(..., return_lse=True)`` dispatches by GPU arch (INT8 QK; FP8 PV on sm89/sm90/sm120,
  FP16 PV on sm80) and returns a natural-log LSE ``[B, H, S_q]`` that already includes the K
  smoothing correction.
- 1.x (Triton, INT8 QK, FP16 PV): no LSE, so it cannot serve ring attention. Its kernel loads key
  rows past the end of a non-multiple-of-64 key length as zeros without masking them, so they
  enter the softmax (sageattention 1.0.6, ``triton/attn_qk_int8_per_block.py``); ditfleet therefore
  refuses such key lengths with a clear error instead of returning a wrong result.

``sage_attn2`` resolves (``registry.py``) to SageAttention 2.x when installed, else to ditfleet's own
Triton kernel of the same algorithm (``sage_triton.py``, sm89+), else to the fastest dense kernel that
runs (FA4, FA3, cuDNN SDPA, ...), marked as a fallback in the start-up table. SageAttention 1.x stays
available as the kernel ``sageattention1`` but is not in the chain (no LSE, and the key-length limit).
"""

from __future__ import annotations

import importlib.metadata

from .base import LOW_PRECISION, AttentionBackend, Capabilities


def _sage_major() -> int | None:
    try:
        return int(importlib.metadata.version("sageattention").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None


class SageAttention2(AttentionBackend):
    """SageAttention 2.x (``sageattention.sageattn`` with ``return_lse``)."""

    key = "sageattention2"
    description = "SageAttention 2 (sageattention, INT8 QK / FP8 PV)"
    caps = Capabilities(lse=True, devices=frozenset({"cuda"}), dtypes=LOW_PRECISION, max_head_dim=128, min_compute_capability=(8, 0))
    install_hint = "build SageAttention 2 from source: github thu-ml/SageAttention, python setup.py install"
    requires_modules = ("sageattention",)

    @classmethod
    def unavailable_reasons(cls, device, dtype):
        reasons = super().unavailable_reasons(device, dtype)
        major = _sage_major()
        if major is not None and major < 2:
            reasons.append(f"installed sageattention is {major}.x; 2.x is needed for the FP8 kernels and the LSE")
        return reasons

    def _forward(self, q, k, v, *, scale, return_lse):
        from sageattention import sageattn

        res = sageattn(q, k, v, tensor_layout="NHD", is_causal=False, sm_scale=scale, return_lse=return_lse)
        if return_lse:
            out, lse = res
            return out, lse.float()
        return res, None


class SageAttention1(AttentionBackend):
    """SageAttention 1.x (``sageattention.sageattn``, Triton, INT8 QK / FP16 PV); no LSE."""

    key = "sageattention1"
    description = "SageAttention 1 (sageattention, INT8 QK / FP16 PV)"
    caps = Capabilities(lse=False, devices=frozenset({"cuda"}), dtypes=LOW_PRECISION, max_head_dim=128, min_compute_capability=(8, 0))
    install_hint = "pip install sageattention==1.0.6"
    requires_modules = ("sageattention",)

    @classmethod
    def unavailable_reasons(cls, device, dtype):
        reasons = super().unavailable_reasons(device, dtype)
        major = _sage_major()
        if major is not None and major != 1:
            reasons.append(f"installed sageattention is {major}.x (the 1.x entry is used for 1.x only)")
        return reasons

    def _forward(self, q, k, v, *, scale, return_lse):
        from sageattention import sageattn

        if k.shape[1] % 64:
            raise ValueError(
                f"{self.key}: key length {k.shape[1]} is not a multiple of 64; SageAttention 1.x does not mask the "
                "tail block. Use sage_attn2 with SageAttention 2.x or ditfleet's Triton kernel."
            )
        return sageattn(q, k, v, tensor_layout="NHD", is_causal=False, sm_scale=scale), None
