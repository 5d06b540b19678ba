"""Quantised DiT linears (``dit_quantized`` / ``dit_quant_scheme``).

Not implemented in this build yet: a run that asks for quantised linears is refused, so it never runs unquantised
while its config says otherwise.
"""

from __future__ import annotations

from ..errors import ConfigError


def quantize_denoisers_(denoisers, scheme: str) -> None:
    """Quantise the block linears of every expert in ``denoisers`` with ``scheme`` (in place)."""
    raise ConfigError("dit_quantized", f"quantised DiT linears ({scheme}) are not available in this build; "
                                       "set dit_quantized to false")
