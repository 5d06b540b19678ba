"""The elementwise work of a Wan block, as a few fused ops.

At 75,600 tokens x 5120 channels one fp32 pass over the residual stream moves 1.5 GB, so the
norms, modulation, residual updates and RoPE are grouped into five ops that each read their
inputs once. On CUDA each op is compiled by ``torch.compile`` (one Triton kernel per op, built on
first use for each shape); elsewhere, after ``set_compile(False)``, or if compilation fails
(one warning, then eager for good), the same Python function runs eagerly. The eager function
is the definition: compiled and eager results agree to float rounding.

Dtypes follow the official model: the residual stream ``x`` and the modulation are float32,
norms compute in float32, and every op that feeds a matmul returns the model dtype.

Quantised linears (``dit_quantized``, :mod:`ditfleet.models.quant`): an op that feeds a matmul, given
``dtype=torch.float8_e4m3fn`` (:data:`FP8`), returns its output quantised per token instead
(:class:`Fp8Rows`: e4m3 values and one float32 scale per row, :func:`quant_rows`), computed from the
float32 value in the same pass -- the activation quantisation fused into the norm / modulation that
precedes the linear; :func:`quant_rows_op` and :func:`gelu_quant` are the passes for the linears whose
input comes from elsewhere (attention output, the FFN's GELU).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

_COMPILE = {"enabled": True}


def set_compile(enabled: bool) -> None:
    """Compile the fused ops on CUDA (default) or run them eagerly (``ditfleet bench dit --eager``)."""
    _COMPILE["enabled"] = bool(enabled)


def compile_enabled() -> bool:
    """Whether CUDA ops are compiled (see :func:`set_compile`)."""
    return _COMPILE["enabled"]


class FusedOp:
    """An eager function, compiled with ``torch.compile`` when called on CUDA tensors.

    Attributes:
        fn: the eager definition.
        broken: set once compilation failed; from then on the eager function runs.
    """

    def __init__(self, fn: Callable):
        self.fn = fn
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__
        self._compiled: Callable | None = None
        self.broken = False

    def __call__(self, x: torch.Tensor, *args, **kwargs):
        if x.is_cuda and not self.broken and compile_enabled():
            try:
                if self._compiled is None:
                    self._compiled = torch.compile(self.fn, fullgraph=True, dynamic=False)
                return self._compiled(x, *args, **kwargs)
            except Exception as e:  # noqa: BLE001 - any compiler failure falls back to eager
                self.broken = True
                log.warning("torch.compile of %s failed (%s: %s); running it eagerly", self.__name__,
                            type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return self.fn(x, *args, **kwargs)


def fused_op(fn: Callable) -> FusedOp:
    return FusedOp(fn)


def fused_mode() -> str:
    """What runs the fused ops on CUDA: ``"torch.compile"`` or ``"eager"``."""
    return "torch.compile" if compile_enabled() else "eager"


#: The float8 format of quantised activations and weights (e4m3: 3 mantissa bits, finite max 448).
FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)
#: Smallest row amax a scale is computed from (an all-zero row gets scale 1e-12 / 448, its values stay 0).
AMAX_EPS = 1e-12


class Fp8Rows(NamedTuple):
    """A tensor quantised per row (per token / per output channel): ``value ~= data * scale``.

    Attributes:
        data: ``float8_e4m3fn`` ``[..., K]``.
        scale: float32 ``[..., 1]``, one per row: the row's amax / 448.
    """

    data: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        """The shape of the quantised tensor (``data``'s)."""
        return self.data.shape

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``data * scale`` in ``dtype`` (tests, debugging)."""
        return (self.data.float() * self.scale).to(dtype)


def quant_rows(h: torch.Tensor) -> Fp8Rows:
    """Symmetric e4m3 quantisation with one scale per row of the last dim (the definition, eager).

    ``scale = max(amax(|row|), AMAX_EPS) / 448``; ``data = clamp(row / scale, -448, 448)`` rounded to
    nearest (even) e4m3. The clamp only catches rounding at the row's maximum (and makes the cast saturate
    on torch versions whose eager cast does not).

    Args:
        h: ``[..., K]`` any float dtype (computed in float32).

    Returns:
        :class:`Fp8Rows` with ``data`` ``[..., K]`` e4m3, ``scale`` float32 ``[..., 1]``.
    """
    hf = h.float()
    scale = hf.abs().amax(dim=-1, keepdim=True).clamp(min=AMAX_EPS) / FP8_MAX
    return Fp8Rows((hf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale)


def _emit(h: torch.Tensor, dtype: torch.dtype):
    """``h`` (float32) as an op's matmul-bound output: cast to ``dtype``, or quantised per row when ``dtype`` is FP8."""
    return quant_rows(h) if dtype == FP8 else h.to(dtype)


@fused_op
def modulated_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """``LayerNorm(x) * (1 + scale) + shift`` (parameter-free LayerNorm, float32), cast to ``dtype``.

    Args:
        x: float32 ``[B, S, C]`` residual stream.
        shift, scale: float32 ``[B, 1, C]``, or ``[B, S, C]`` per token (per-token timesteps).
        eps: LayerNorm epsilon.
        dtype: output dtype (the model dtype), or :data:`FP8` (quantised per token).

    Returns:
        ``[B, S, C]`` in ``dtype`` (:class:`Fp8Rows` for :data:`FP8`).
    """
    h = F.layer_norm(x.float(), (x.shape[-1],), None, None, eps)
    return _emit(torch.addcmul(shift, h, 1 + scale), dtype)


@fused_op
def gated_residual_norm(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
    eps: float, dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x' = x + y * gate`` and ``LayerNorm(x'; weight, bias)`` (the cross-attention input).

    Args:
        x: float32 ``[B, S, C]``.
        y: ``[B, S, C]`` any float dtype (the self-attention output).
        gate: float32 ``[B, 1, C]`` or ``[B, S, C]`` (per token).
        weight, bias: affine LayerNorm parameters ``[C]`` (``norm3``), or ``None`` for no norm.
        eps: LayerNorm epsilon.
        dtype: dtype of the normalised output, or :data:`FP8` (quantised per token).

    Returns:
        ``(x', h)``: float32 ``[B, S, C]`` new residual, ``[B, S, C]`` ``dtype`` normalised (:class:`Fp8Rows`
        for :data:`FP8`).
    """
    x = torch.addcmul(x, y.float(), gate)
    if weight is None:
        return x, _emit(x, dtype)
    h = F.layer_norm(x, (x.shape[-1],), weight.float(), None if bias is None else bias.float(), eps)
    return x, _emit(h, dtype)


@fused_op
def residual_modulated_norm(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None, shift: torch.Tensor, scale: torch.Tensor, eps: float,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x' = x + y * gate`` (``x + y`` when ``gate`` is None) and ``LayerNorm(x') * (1 + scale) + shift``.

    Used before the FFN (``x + cross_attn``), and at the start of the next block / the head, where
    it folds in the previous block's deferred FFN residual (saving one pass over ``x``).

    Args:
        x: float32 ``[B, S, C]``.
        y: ``[B, S, C]`` any float dtype.
        gate: float32 ``[B, 1, C]`` or ``[B, S, C]`` (per token), or ``None``.
        shift, scale: float32 ``[B, 1, C]`` or ``[B, S, C]`` (per token).
        dtype: dtype of the modulated norm, or :data:`FP8` (quantised per token).

    Returns:
        ``(x', h)``: float32 new residual and its modulated norm in ``dtype`` (:class:`Fp8Rows` for
        :data:`FP8`), both ``[B, S, C]``.
    """
    x = x + y.float() if gate is None else torch.addcmul(x, y.float(), gate)
    h = F.layer_norm(x, (x.shape[-1],), None, None, eps)
    return x, _emit(torch.addcmul(shift, h, 1 + scale), dtype)


@fused_op
def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """RMSNorm over the last dim in float32 (times ``weight`` when given), cast to ``dtype``.

    Args:
        x: ``[..., C]`` any float dtype.
        weight: ``[C]`` or ``None`` (no normalisation at all: ``qk_norm`` off).
    """
    if weight is None:
        return x.to(dtype)
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(dtype)


@fused_op
def norm_rope(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor, heads: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """RMSNorm over the full ``C = heads * D`` (float32), then RoPE on interleaved pairs, cast once.

    Args:
        x: ``[B, S, C]`` projection output (q or k), any float dtype.
        weight: ``[C]`` RMSNorm weight, or ``None`` for no norm (``qk_norm`` off).
        eps: RMSNorm epsilon.
        cos, sin: float32 ``[S, D / 2]`` rotation of each token.
        heads: ``H``.
        dtype: output dtype.

    Returns:
        ``[B, S, H, D]`` in ``dtype``, contiguous.
    """
    b, s, c = x.shape
    xf = x.float()
    if weight is not None:
        xf = F.rms_norm(xf, (c,), weight.float(), eps)
    xr = xf.view(b, s, heads, c // heads // 2, 2)
    x0, x1 = xr[..., 0], xr[..., 1]
    cs, sn = cos[:, None, :], sin[:, None, :]
    out = torch.stack((x0 * cs - x1 * sn, x0 * sn + x1 * cs), dim=-1)
    return out.view(b, s, heads, c // heads).to(dtype)


@fused_op
def quant_rows_op(h: torch.Tensor) -> Fp8Rows:
    """:func:`quant_rows` as one fused pass (the input of a quantised linear that no norm precedes).

    Args:
        h: ``[..., K]`` any float dtype.

    Returns:
        :class:`Fp8Rows` ``[..., K]``.
    """
    return quant_rows(h)


@fused_op
def gelu_quant(y: torch.Tensor) -> Fp8Rows:
    """``GELU(y)`` (tanh approximation, float32) quantised per row: the FFN's activation and the second
    linear's input quantisation in one pass.

    Args:
        y: ``[..., F]`` the first FFN linear's output, any float dtype.

    Returns:
        :class:`Fp8Rows` ``[..., F]``.
    """
    return quant_rows(F.gelu(y.float(), approximate="tanh"))


ALL_OPS = (modulated_norm, gated_residual_norm, residual_modulated_norm, rms_norm, norm_rope, quant_rows_op, gelu_quant)
