"""Attention backends: one contract (``[B, S, H, D]`` in, ``(out, lse)`` out), a registry of kernels.

Public API::

    from ditfleet.attention import resolve, AttentionBackend
    res = resolve("flash_attn3", site="self_attn_1_type", device="cuda", dtype=torch.bfloat16)
    out, lse = res.backend(q, k, v, scale=None, kv_lens=None, return_lse=True)
"""

from .base import AttentionBackend, Capabilities, attention_flops
from .reference import reference_attention
from .registry import ATTN_TYPES, Resolution, format_table, kernel_class, resolve, valid_types

__all__ = [
    "ATTN_TYPES",
    "AttentionBackend",
    "Capabilities",
    "Resolution",
    "attention_flops",
    "format_table",
    "kernel_class",
    "reference_attention",
    "resolve",
    "valid_types",
]
