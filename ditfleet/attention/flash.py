"""FlashAttention 2, 3 and 4 through their own packages (no wheels on our index for 2 and 3).

- FA2: ``flash_attn.flash_attn_func`` (compiled extension ``flash_attn_2_cuda``).
- FA3: ``flash_attn_interface.flash_attn_func`` (Hopper build of the ``hopper/`` folder).
- FA4: ``flash_attn.cute.flash_attn_func`` (pip ``flash-attn-4``, CUTLASS DSL; Hopper and Blackwell).

All three take ``[B, S, H, D]`` directly and return a natural-log float32 LSE ``[B, H, S_q]``.
Their return conventions changed across releases (FA3 returns a bare tensor unless
``return_attn_probs=True`` in newer builds; FA4 gained ``return_lse`` in a 4.0 beta), so each
call inspects the installed signature once and passes keywords only.
"""

from __future__ import annotations

import functools
import inspect

import torch

from .base import LOW_PRECISION, AttentionBackend, Capabilities


@functools.lru_cache(maxsize=None)
def _accepts(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _split_result(res, return_lse: bool, key: str):
    """Normalise ``out`` / ``(out, lse)`` / ``(out, lse, extra)`` results to ``(out, lse|None)``."""
    if isinstance(res, torch.Tensor):
        if return_lse:
            raise RuntimeError(f"{key}: the installed kernel returned no LSE")
        return res, None
    out, lse = res[0], res[1]
    if return_lse and lse is None:
        raise RuntimeError(f"{key}: the installed kernel returned no LSE")
    return out, (lse.float() if return_lse else None)


class FlashAttn2(AttentionBackend):
    """FlashAttention-2 (``flash_attn``), Ampere and newer."""

    key = "fa2"
    description = "FlashAttention-2 (flash_attn)"
    caps = Capabilities(lse=True, devices=frozenset({"cuda"}), dtypes=LOW_PRECISION, max_head_dim=256, min_compute_capability=(8, 0))
    install_hint = "pip install flash-attn --no-build-isolation (source build)"
    requires_modules = ("flash_attn_2_cuda",)

    def _forward(self, q, k, v, *, scale, return_lse):
        from flash_attn import flash_attn_func

        res = flash_attn_func(q, k, v, softmax_scale=scale, causal=False, return_attn_probs=return_lse)
        return _split_result(res, return_lse, self.key)


class FlashAttn3(AttentionBackend):
    """FlashAttention-3 (``flash_attn_interface``), Hopper only."""

    key = "fa3"
    description = "FlashAttention-3 (flash_attn_interface)"
    caps = Capabilities(lse=True, devices=frozenset({"cuda"}), dtypes=LOW_PRECISION, max_head_dim=256, min_compute_capability=(9, 0))
    install_hint = "build flash-attention's hopper/ folder: cd hopper && python setup.py install"
    requires_modules = ("flash_attn_interface",)

    @classmethod
    def unavailable_reasons(cls, device, dtype):
        reasons = super().unavailable_reasons(device, dtype)
        if not reasons and torch.cuda.get_device_capability(device)[0] != 9:
            reasons.append("FlashAttention-3 runs on Hopper (sm90) only")
        return reasons

    def _forward(self, q, k, v, *, scale, return_lse):
        from flash_attn_interface import flash_attn_func

        kwargs = {"softmax_scale": scale, "causal": False}
        if _accepts(flash_attn_func, "return_attn_probs"):
            kwargs["return_attn_probs"] = return_lse
        return _split_result(flash_attn_func(q, k, v, **kwargs), return_lse, self.key)


class FlashAttn4(AttentionBackend):
    """FlashAttention-4 (``flash_attn.cute``, pip ``flash-attn-4``): CUTLASS-DSL kernels for sm90 / sm100."""

    key = "fa4"
    description = "FlashAttention-4 (flash_attn.cute)"
    caps = Capabilities(
        lse=True, devices=frozenset({"cuda"}), dtypes=LOW_PRECISION, max_head_dim=256, min_compute_capability=(9, 0),
    )
    install_hint = "pip install flash-attn-4"
    requires_modules = ("flash_attn.cute",)

    def _forward(self, q, k, v, *, scale, return_lse):
        from flash_attn.cute import flash_attn_func

        kwargs = {"softmax_scale": scale, "causal": False}
        if _accepts(flash_attn_func, "return_lse"):
            kwargs["return_lse"] = return_lse
        return _split_result(flash_attn_func(q, k, v, **kwargs), return_lse, self.key)
