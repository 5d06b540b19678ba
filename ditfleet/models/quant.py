"""Quantised DiT linears (``dit_quantized`` / ``dit_quant_scheme``): FP8 e4m3, torchao's float8 GEMM.

One scheme, ``fp8`` (LightX2V's ``fp8-vllm``, ``fp8-sgl``, ``fp8-q8f`` and ``fp8-torchao`` name the same
math and map to it): weights quantised once at load, one float32 scale per output channel; activations
quantised at run time, one scale per token (dynamic, rowwise); the product runs on the FP8 tensor cores
through torchao's ``addmm_float8_unwrapped_inference`` (``torch._scaled_mm`` with rowwise scales, bf16
out, bias fused, fast accumulation as torchao's inference default) -- no ditfleet GEMM kernel.

Which linears: a model declares them with a class attribute ``quant_linears`` (``fnmatch`` patterns over
module names, e.g. Wan's ``blocks.*.self_attn.q``); everything else -- norms, embeddings, time / modulation,
the head -- stays in the compute dtype. :func:`quantize_model_` swaps each matching ``nn.Linear`` for an
:class:`Fp8Linear` (its bf16 weight freed), and an ``nn.GELU`` that sits between two quantised linears of
an ``nn.Sequential`` (the FFN) for :class:`GeluQuant`, so the GELU and the second linear's input
quantisation are one pass. A quantised linear takes either a tensor (quantised in one fused pass first) or
:class:`~ditfleet.models.wan.ops.Fp8Rows` (already quantised, e.g. by the norm before it:
:mod:`ditfleet.models.wan.ops`), and says so with ``takes_fp8 = True``.

Pre-quantised weights (``dit_quantized_ckpt``: LightX2V's converter output): :func:`build_prequantized_` swaps
the same linears for :class:`Fp8Linear` built from a file's e4m3 weights and per-channel scales (the loader,
:func:`ditfleet.models.wan.loader.load_quantized_dit`, reads them onto a model on ``meta``: no bf16 copy of those
weights exists); the report says so and names the file(s) with their sha256.

Start-up refusals (:func:`check_quant_runtime`; :func:`ditfleet.engine.preflight.preflight` runs the same
before anything loads): no CUDA device, a GPU without FP8 tensor cores (sm < 89), torchao missing, a
compute dtype other than bfloat16 -- one :class:`~ditfleet.errors.ConfigError` naming ``dit_quantized``.
"""

from __future__ import annotations

import fnmatch
import importlib
from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn as nn

from ..errors import ConfigError
from .wan.ops import FP8, Fp8Rows, gelu_quant, quant_rows, quant_rows_op

#: Config scheme names -> the scheme they mean (LightX2V's fp8 kernels all compute per-channel e4m3 weights x
#: per-token dynamic e4m3 activations; they differ only in which library runs the GEMM).
SCHEMES = {"fp8": "fp8", "fp8-vllm": "fp8", "fp8-sgl": "fp8", "fp8-q8f": "fp8", "fp8-torchao": "fp8"}
#: The least compute capability with FP8 tensor cores (Ada sm89; Hopper sm90, Blackwell sm100).
MIN_CAPABILITY = (8, 9)
#: What the quantised DiT computes in (the GEMM's output and the bias).
COMPUTE_DTYPE = torch.bfloat16
GEMM = "torchao.float8.inference.addmm_float8_unwrapped_inference (torch._scaled_mm, rowwise scales, fast accumulation)"
_VALID = "a CUDA GPU with FP8 tensor cores (sm89+: L40S, H100, H200, B200), torchao installed (pip install 'ditfleet[fp8]') and dtype bf16"


def canonical_scheme(scheme: str) -> str:
    """The scheme ``scheme`` means (``"fp8"``); ConfigError naming ``dit_quant_scheme`` for any other name."""
    if scheme not in SCHEMES:
        raise ConfigError("dit_quant_scheme", f"{scheme!r} is not a quantisation scheme of this build; valid: "
                                              f"{', '.join(SCHEMES)}")
    return SCHEMES[scheme]


def torchao_gemm() -> Callable:
    """torchao's float8 inference GEMM (``addmm_float8_unwrapped_inference``).

    Raises:
        ConfigError: naming ``dit_quantized`` when torchao is missing or does not import here.
    """
    try:
        mod = importlib.import_module("torchao.float8.inference")
        return mod.addmm_float8_unwrapped_inference
    except Exception as e:  # noqa: BLE001 - ImportError, or a torchao built for another torch failing at import
        raise ConfigError("dit_quantized", f"needs torchao (its float8 GEMM), which does not import here "
                                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                                           f"pip install 'ditfleet[fp8]' or set dit_quantized to false") from None


def scaled_mm_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                   output_dtype: torch.dtype, bias: torch.Tensor | None = None, use_fast_accum: bool = False) -> torch.Tensor:
    """``torch._scaled_mm`` called as torchao's ``addmm_float8_unwrapped_inference`` calls it (same arguments).

    Only ``bench dit`` uses it, where torchao is installed but does not import on that torch (the run records
    it); the engine refuses a run without torchao (:func:`check_quant_runtime`).
    """
    return torch._scaled_mm(a, b, scale_a=a_scale, scale_b=b_scale, bias=bias, out_dtype=output_dtype,
                            use_fast_accum=use_fast_accum)


def check_quant_runtime(device: torch.device | str, dtype: torch.dtype, *, need_torchao: bool = True) -> None:
    """Refuse, before loading, a quantised run this process cannot run: the device, its FP8 support, torchao, dtype.

    Raises:
        ConfigError: naming ``dit_quantized``: what is wrong and what would be valid.
    """
    device = torch.device(device)
    if device.type != "cuda":
        raise ConfigError("dit_quantized", f"FP8 linears need {_VALID}; this run's device is {device.type} (no "
                                           f"emulation: it would only be slower than bf16); set dit_quantized to false")
    if not torch.cuda.is_available():
        raise ConfigError("dit_quantized", f"FP8 linears need {_VALID}; CUDA is not available to this process; "
                                           f"set dit_quantized to false")
    idx = device.index if device.index is not None else torch.cuda.current_device()
    cap = tuple(torch.cuda.get_device_capability(idx))
    if cap < MIN_CAPABILITY:
        raise ConfigError("dit_quantized", f"FP8 linears need {_VALID}; {torch.cuda.get_device_name(idx)} is "
                                           f"sm{cap[0]}{cap[1]}, without FP8 tensor cores; set dit_quantized to false")
    if dtype != COMPUTE_DTYPE:
        raise ConfigError("dit_quantized", f"FP8 linears compute in bf16 (their output and bias); the run's dtype is "
                                           f"{str(dtype).removeprefix('torch.')}; set dtype to bf16 or dit_quantized "
                                           f"to false")
    if need_torchao:
        torchao_gemm()


class Fp8Linear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` e4m3 per output channel and ``x`` quantised per token.

    Attributes:
        weight_fp8: ``float8_e4m3fn`` ``[N, K]`` (buffer).
        weight_scale: float32 ``[1, N]`` (buffer): ``W[n] ~= weight_fp8[n] * weight_scale[0, n]``.
        bias: ``[N]`` in ``out_dtype`` or ``None``.
        out_dtype: the output dtype (the model's compute dtype).
        gemm: the scaled GEMM (:func:`torchao_gemm`).
    """

    takes_fp8 = True  # forward accepts Fp8Rows (the preceding op quantised its output)

    def __init__(self, weight_fp8: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 out_dtype: torch.dtype, gemm: Callable):
        super().__init__()
        n, k = weight_fp8.shape
        if weight_fp8.dtype != FP8 or weight_scale.shape != (1, n) or weight_scale.dtype != torch.float32:
            raise ValueError(f"Fp8Linear: weight {weight_fp8.dtype} {tuple(weight_fp8.shape)} and scale "
                             f"{weight_scale.dtype} {tuple(weight_scale.shape)}; want float8_e4m3fn [N, K] and float32 [1, N]")
        self.in_features, self.out_features, self.out_dtype, self.gemm = k, n, out_dtype, gemm
        self.register_buffer("weight_fp8", weight_fp8)
        self.register_buffer("weight_scale", weight_scale)
        self.bias = None if bias is None else nn.Parameter(bias.to(out_dtype), requires_grad=False)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, gemm: Callable, out_dtype: torch.dtype | None = None) -> Fp8Linear:
        """Quantise ``linear``'s weight per output channel (:func:`~ditfleet.models.wan.ops.quant_rows` over its
        rows, float32 math); its bias is kept in ``out_dtype`` (default: the weight's dtype)."""
        w = linear.weight
        rows = quant_rows(w)
        return cls(rows.data, rows.scale.reshape(1, -1).contiguous(), linear.bias, out_dtype or w.dtype, gemm)

    def quantize_input(self, x: torch.Tensor | Fp8Rows) -> Fp8Rows:
        """``x`` as the GEMM's left operand: an :class:`Fp8Rows` as is, a tensor quantised per token (one pass)."""
        return x if isinstance(x, Fp8Rows) else quant_rows_op(x)

    def forward(self, x: torch.Tensor | Fp8Rows) -> torch.Tensor:
        """``x`` ``[..., K]`` (any float dtype, or :class:`Fp8Rows`) -> ``[..., N]`` in ``out_dtype``."""
        rows = self.quantize_input(x)
        lead = rows.data.shape[:-1]
        if rows.data.shape[-1] != self.in_features:
            raise ValueError(f"Fp8Linear: input has {rows.data.shape[-1]} features, the layer takes {self.in_features}")
        out = self.gemm(rows.data.reshape(-1, self.in_features), rows.scale.reshape(-1, 1), self.weight_fp8.t(),
                        self.weight_scale, self.out_dtype, bias=self.bias, use_fast_accum=True)
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weight=e4m3 per channel, input=e4m3 per token, out={str(self.out_dtype).removeprefix('torch.')}")


class GeluQuant(nn.Module):
    """``GELU(x)`` (tanh approximation) quantised per token for the quantised linear after it (one fused pass)."""

    def forward(self, x: torch.Tensor) -> Fp8Rows:
        """``x`` ``[..., F]`` any float dtype -> :class:`Fp8Rows` ``[..., F]``."""
        return gelu_quant(x)


def quantizable_linears(model: nn.Module, patterns: Iterable[str] | None = None) -> list[str]:
    """Names of the ``nn.Linear`` modules of ``model`` that match its declared patterns, in module order.

    Args:
        model: declares ``quant_linears`` (fnmatch patterns over ``named_modules`` names) unless ``patterns`` is given.
        patterns: override the model's declaration.

    Raises:
        ConfigError: naming ``dit_quantized`` when the model declares no quantisable linears.
    """
    pats = tuple(patterns if patterns is not None else getattr(model, "quant_linears", ()))
    if not pats:
        raise ConfigError("dit_quantized", f"{type(model).__name__} declares no quantisable linears (quant_linears); "
                                           f"set dit_quantized to false")
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and any(fnmatch.fnmatchcase(name, p) for p in pats)]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _fuse_gelus(model: nn.Module) -> list[str]:
    """Swap each ``nn.GELU(approximate="tanh")`` between two :class:`Fp8Linear` of an ``nn.Sequential`` for
    :class:`GeluQuant`; returns the swapped names."""
    fused = []
    for name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        mods = list(seq)
        for i in range(1, len(mods) - 1):
            if (isinstance(mods[i], nn.GELU) and mods[i].approximate == "tanh" and isinstance(mods[i - 1], Fp8Linear)
                    and isinstance(mods[i + 1], Fp8Linear)):
                seq[i] = GeluQuant()
                fused.append(f"{name}.{i}" if name else str(i))
    return fused


def _summarise(names: list[str]) -> dict[str, int]:
    """Module names grouped by their pattern with block indices as ``*``: ``{"blocks.*.ffn.0": 40, ...}``."""
    out: dict[str, int] = {}
    for n in names:
        key = ".".join("*" if part.isdigit() and i > 0 and n.split(".")[i - 1] == "blocks" else part
                       for i, part in enumerate(n.split(".")))
        out[key] = out.get(key, 0) + 1
    return out


def _check_fit(model: nn.Module, names: list[str]) -> None:
    """The FP8 GEMM's shape rule: every quantised linear's in / out features a multiple of 16 (ConfigError)."""
    misfit = [n for n in names if model.get_submodule(n).in_features % 16 or model.get_submodule(n).out_features % 16]
    if misfit:
        lin = model.get_submodule(misfit[0])
        raise ConfigError("dit_quantized", f"the FP8 GEMM needs in / out features that are multiples of 16; {misfit[0]} "
                                           f"is {lin.in_features} -> {lin.out_features} ({len(misfit)} such linears); "
                                           f"set dit_quantized to false")


def _report(model: nn.Module, scheme: str, names: list[str], params: int, fused: list[str], dtype: torch.dtype,
            gemm_name: str, weights: str) -> dict:
    """The quantised model's report (``model.denoisers.quant``), set as ``model.quant_report``."""
    kept = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv3d))]
    report = {
        "scheme": canonical_scheme(scheme), "requested": scheme,
        "weights": weights,
        "activations": "float8_e4m3fn, one float32 scale per token (dynamic amax / 448)",
        "gemm": gemm_name,
        "out_dtype": str(dtype).removeprefix("torch."),
        "linears": len(names), "quantised_params": params, "modules": _summarise(names),
        "fused_gelu_quant": len(fused),
        "unquantised_linears": _summarise(kept),
        "unquantised": "every other module: the linears above (embeddings, time / modulation, head), every norm, "
                       "the modulation tables and attention",
    }
    model.quant_report = report
    return report


@torch.no_grad()
def quantize_model_(model: nn.Module, scheme: str = "fp8", *, patterns: Iterable[str] | None = None,
                    check_device: bool = True, gemm: Callable | None = None) -> dict:
    """Quantise the declared linears of ``model`` in place (weights from the loaded, LoRA-merged values).

    Args:
        model: a DiT declaring ``quant_linears``, in bf16 on its device.
        scheme: a :data:`SCHEMES` name.
        patterns: override the model's ``quant_linears``.
        check_device: refuse a device / dtype the engine does not run quantised (:func:`check_quant_runtime`);
            False runs anywhere ``torch._scaled_mm`` does (CPU tests and ``bench dit --tiny``).
        gemm: the scaled GEMM (default :func:`torchao_gemm`).

    Returns:
        The report: scheme, formats, the GEMM, counts and the quantised modules by pattern, what stays unquantised.

    Raises:
        ConfigError: naming ``dit_quant_scheme`` / ``dit_quantized``.
    """
    canonical_scheme(scheme)
    if getattr(model, "quant_report", None) is not None:
        raise ValueError(f"{type(model).__name__} is already quantised ({model.quant_report['scheme']})")
    names = quantizable_linears(model, patterns)
    if not names:
        raise ConfigError("dit_quantized", f"no linear of {type(model).__name__} matches its quant_linears "
                                           f"{list(patterns if patterns is not None else model.quant_linears)}")
    _check_fit(model, names)
    dtype = model.get_submodule(names[0]).weight.dtype
    device = model.get_submodule(names[0]).weight.device
    if check_device:
        check_quant_runtime(device, dtype)
    default_gemm = gemm is None
    gemm = gemm or torchao_gemm()
    params = sum(model.get_submodule(n).weight.numel() for n in names)
    for n in names:
        lin = model.get_submodule(n)
        _set_submodule(model, n, Fp8Linear.from_linear(lin, gemm, out_dtype=dtype))
        del lin
    fused = _fuse_gelus(model)
    return _report(model, scheme, names, params, fused, dtype,
                   GEMM if default_gemm else getattr(gemm, "__qualname__", repr(gemm)),
                   "float8_e4m3fn, one float32 scale per output channel (amax / 448), quantised once at load")


@torch.no_grad()
def build_prequantized_(model: nn.Module, scheme: str, linears: Mapping[str, tuple], *, device: torch.device | str,
                        dtype: torch.dtype, source: dict, check_device: bool = True,
                        gemm: Callable | None = None) -> dict:
    """Swap the declared linears of ``model`` for :class:`Fp8Linear` built from already quantised weights.

    The pre-quantised path of ``dit_quantized_ckpt`` (:func:`ditfleet.models.wan.loader.load_quantized_dit`):
    ``model`` may sit on ``meta`` (its linears' weights are never materialised); the same modules are swapped
    and the same GELUs fused as by :func:`quantize_model_`, so the result is the quantise-at-load model with the
    file's codes and scales.

    Args:
        model: a DiT declaring ``quant_linears`` (any device, ``meta`` included).
        scheme: a :data:`SCHEMES` name.
        linears: module name -> ``(weight_fp8, scale, bias)``: ``float8_e4m3fn`` ``[N, K]``, float ``N`` values
            (``[N, 1]`` as LightX2V stores them, ``[N]`` or ``[1, N]``; ``W[n] ~= weight_fp8[n] * scale[n]``),
            ``[N]`` or ``None``; exactly the model's quantisable linears.
        device: where the quantised weights go; dtype: the compute dtype (GEMM output, bias).
        source: what the report records of where they came from (``key``: the config key, ``path``, ``files`` with
            sha256).
        check_device: as :func:`quantize_model_`.
        gemm: the scaled GEMM (default :func:`torchao_gemm`).

    Returns:
        The report (:func:`quantize_model_`'s, ``weights`` saying pre-quantised, ``checkpoint`` = ``source``).

    Raises:
        ConfigError: naming ``dit_quant_scheme`` / ``dit_quantized``.
        ValueError: ``linears`` are not the model's quantisable linears, or a tensor's dtype / shape is wrong.
    """
    canonical_scheme(scheme)
    if getattr(model, "quant_report", None) is not None:
        raise ValueError(f"{type(model).__name__} is already quantised ({model.quant_report['scheme']})")
    names = quantizable_linears(model)
    if set(names) != set(linears):
        odd = sorted(set(names) ^ set(linears))
        raise ValueError(f"build_prequantized_: the weights given are not {type(model).__name__}'s quantisable "
                         f"linears (differ in {', '.join(odd[:5])})")
    _check_fit(model, names)
    if check_device:
        check_quant_runtime(device, dtype)
    default_gemm = gemm is None
    gemm = gemm or torchao_gemm()
    params = 0
    for n in names:
        lin = model.get_submodule(n)
        w, scale, bias = linears[n]
        if tuple(w.shape) != (lin.out_features, lin.in_features) or scale.numel() != lin.out_features:
            raise ValueError(f"build_prequantized_: {n} takes [{lin.out_features}, {lin.in_features}] weights, "
                             f"got {list(w.shape)} with {scale.numel()} scales")
        if (bias is None) != (lin.bias is None):
            raise ValueError(f"build_prequantized_: {n} {'has' if lin.bias is not None else 'has no'} bias")
        scale = scale.to(device=device, dtype=torch.float32).reshape(1, -1).contiguous()
        _set_submodule(model, n, Fp8Linear(w.to(device), scale, None if bias is None else bias.to(device), dtype, gemm))
        params += w.numel()
        del lin
    fused = _fuse_gelus(model)
    report = _report(model, scheme, names, params, fused, dtype,
                     GEMM if default_gemm else getattr(gemm, "__qualname__", repr(gemm)),
                     "float8_e4m3fn, one float32 scale per output channel, pre-quantised: read from "
                     f"{source.get('key', 'dit_quantized_ckpt')} (not quantised here)")
    report["checkpoint"] = dict(source)
    return report


def expert_target(name: str, expert: nn.Module) -> nn.Module:
    """The module of ``expert`` that declares ``quant_linears`` (itself, or its one submodule that does).

    Raises:
        ConfigError: naming ``dit_quantized`` when none does.
    """
    target = expert if getattr(expert, "quant_linears", None) else next(
        (m for m in expert.modules() if getattr(m, "quant_linears", None)), None)
    if target is None:
        raise ConfigError("dit_quantized", f"the denoiser {name} ({type(expert).__name__}) declares no "
                                           f"quantisable linears; set dit_quantized to false")
    return target


#: Report fields that count modules or parameters: summed over the experts in ``model.denoisers.quant``.
COUNTED = ("linears", "quantised_params", "fused_gelu_quant")


def denoisers_report(names: Iterable[str], reports: Iterable[dict]) -> dict:
    """``model.denoisers.quant``: one report for all experts -- the scheme and GEMM of the first (every expert is
    quantised with the same scheme), the :data:`COUNTED` fields summed over the experts, ``experts`` their names, and
    with several experts ``per_expert``: each one's counts, ``weights`` (quantised at load or read from a file) and
    (pre-quantised) ``checkpoint``, which are then not given once for all."""
    names, reports = list(names), list(reports)
    out = {**{k: v for k, v in reports[0].items() if k != "expert"}, "experts": names}
    out.update({k: sum(r[k] for r in reports) for k in COUNTED})
    if len(reports) > 1:  # the weights' source (and a pre-quantised file's checkpoint record) per expert
        out.pop("checkpoint", None)
        out.pop("weights", None)
        out["per_expert"] = {n: {k: r[k] for k in (*COUNTED, "weights", "checkpoint") if k in r}
                             for n, r in zip(names, reports)}
    return out


def quantize_denoisers_(denoisers, scheme: str) -> None:
    """Quantise every expert of ``denoisers`` with ``scheme`` (in place), after the LoRA merge; the report
    goes to ``denoisers.quant`` (the run report's ``model.denoisers.quant``).

    An expert that does not declare ``quant_linears`` itself (a wrapper) is searched for the one submodule
    that does; one built pre-quantised from its file (``quant_report`` set) is kept as it is. Refuses (ConfigError naming ``dit_quantized``) a device, dtype or install that cannot run it.
    """
    canonical_scheme(scheme)
    reports = []
    for name, expert in zip(denoisers.names, denoisers.experts):
        target = expert_target(name, expert)
        done = getattr(target, "quant_report", None)  # built pre-quantised from its file
        reports.append(done if done is not None else quantize_model_(target, scheme))
    denoisers.quant = denoisers_report(denoisers.names, reports)
