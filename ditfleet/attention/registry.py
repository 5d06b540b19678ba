"""Attention types (the names users write in configs) -> kernels, resolved once at start-up.

Each type has an ordered chain of kernels: the first is what the type means (its package),
the rest are fallbacks, tried in order. Kernel classes are imported lazily, by module path, so
importing this registry pulls in no optional package. ``resolve`` is the only entry point: it
returns a :class:`Resolution` that records what was asked, what will run and why, and raises
:class:`~ditfleet.errors.BackendUnavailableError` when nothing can (or, with ``strict``, when
only a fallback could).
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field

import torch

from ..errors import BackendUnavailableError
from .base import AttentionBackend

log = logging.getLogger(__name__)

# Types that only make sense on self-attention (a mask over the video's own tokens). Which sites a model
# has is the model's (e.g. ditfleet.models.wan.sites.SITES); by convention a self-attention site's name
# starts with SELF_ATTENTION_PREFIX.
SELF_ATTENTION_ONLY = frozenset({"radial_attn", "sparge"})
SELF_ATTENTION_PREFIX = "self_attn"

# kernel key -> "module:Class", imported on first use.
KERNELS: dict[str, str] = {
    "sdpa_cudnn": "ditfleet.attention.sdpa:SdpaCudnn",
    "sdpa_flash": "ditfleet.attention.sdpa:SdpaFlash",
    "sdpa_efficient": "ditfleet.attention.sdpa:SdpaEfficient",
    "sdpa_cpu_flash": "ditfleet.attention.sdpa:SdpaCpuFlash",
    "sdpa_math": "ditfleet.attention.sdpa:SdpaMath",
    "fa2": "ditfleet.attention.flash:FlashAttn2",
    "fa3": "ditfleet.attention.flash:FlashAttn3",
    "fa4": "ditfleet.attention.flash:FlashAttn4",
    "sageattention2": "ditfleet.attention.sage:SageAttention2",
    "sageattention1": "ditfleet.attention.sage:SageAttention1",
    "sage_triton": "ditfleet.attention.sage_triton:SageTriton",
    "radial_fa4": "ditfleet.attention.radial:RadialFA4",
    "radial_flex": "ditfleet.attention.radial:RadialFlex",
    "sparge_spas": "ditfleet.attention.sparge:SpargeSpas",
    "sparge_flex": "ditfleet.attention.sparge:SpargeFlex",
}

_TORCH_SDPA = ["sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "sdpa_cpu_flash", "sdpa_math"]


@dataclass(frozen=True)
class AttnType:
    """One user-facing attention type.

    Attributes:
        name: the config value.
        chain: kernel keys in order of preference.
        native: how many leading chain entries are the type itself (the rest are fallbacks,
            which log a warning and are refused under ``strict_backends``).
        fallback_note: what running a fallback means for this type (shown in the start-up table and
            the warning), e.g. that it is dense attention.
    """

    name: str
    chain: tuple[str, ...]
    native: int
    fallback_note: str = ""


ATTN_TYPES: dict[str, AttnType] = {
    t.name: t
    for t in (
        AttnType("torch_sdpa", tuple(_TORCH_SDPA), native=len(_TORCH_SDPA)),
        AttnType("flash_attn2", ("fa2", "sdpa_flash", "sdpa_cpu_flash"), native=1),
        AttnType("flash_attn3", ("fa3", "fa4", "sdpa_cudnn", "sdpa_cpu_flash"), native=1),
        AttnType("flash_attn4", ("fa4",), native=1),
        # SageAttention 2 itself, else ditfleet's kernel of its algorithm, else the fastest dense kernel here.
        AttnType("sage_attn2", ("sageattention2", "sage_triton", "fa4", "fa3", "sdpa_cudnn", "sdpa_flash",
                                "sdpa_efficient", "sdpa_cpu_flash"), native=2,
                 fallback_note="dense attention: no INT8/FP8 quantisation, no SageAttention speed-up"),
        AttnType("radial_attn", ("radial_fa4", "radial_flex"), native=2),
        AttnType("sparge", ("sparge_spas", "sparge_flex"), native=2),
    )
}


def is_self_attention_site(site: str) -> bool:
    """True when ``site`` (a config key) names a self-attention site (its name starts with ``self_attn``)."""
    return site.startswith(SELF_ATTENTION_PREFIX)


def valid_types(site: str | None = None) -> list[str]:
    """The type names valid for ``site`` (a model's site key), or for any site."""
    names = list(ATTN_TYPES)
    if site is not None and not is_self_attention_site(site):
        names = [n for n in names if n not in SELF_ATTENTION_ONLY]
    return names


def kernel_class(key: str) -> type[AttentionBackend]:
    """Import and return the backend class registered under ``key``."""
    try:
        target = KERNELS[key]
    except KeyError:
        raise KeyError(f"unknown kernel {key!r}; known: {', '.join(KERNELS)}") from None
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)


def torch_sdpa_kernel(device: torch.device, dtype: torch.dtype) -> tuple[str, type[AttentionBackend]]:
    """``(key, class)`` of the kernel ``torch_sdpa`` runs here: the dense kernel of radial/sparge dense
    layers and the baseline of the sparse benchmarks. Raises RuntimeError when none runs."""
    for key in ATTN_TYPES["torch_sdpa"].chain:
        cls = kernel_class(key)
        if not cls.unavailable_reasons(torch.device(device), dtype):
            return key, cls
    raise RuntimeError(f"no dense torch SDPA kernel for {device}/{dtype}")


def dense_kernel_keys() -> list[str]:
    """Kernel keys that compute dense attention (no block mask, no per-layer binding): what ``doctor`` and ``bench attention`` cover."""
    return [k for k in KERNELS if not kernel_class(k).caps.block_mask and not getattr(kernel_class(k), "per_layer", False)]


@dataclass
class Resolution:
    """What one site asked for and what will run there.

    Attributes:
        site: the model's site key (a config key, e.g. a Wan block's self-attention), or a free label for non-config uses.
        requested: the attention type named in the config.
        kernel: key of the kernel that will run.
        description: human-readable name of that kernel.
        fallback: True when the kernel is a fallback for the requested type.
        skipped: ``(kernel key, reasons)`` for every chain entry tried before it.
        backend: the constructed backend instance.
    """

    site: str
    requested: str
    kernel: str
    description: str
    fallback: bool
    skipped: list[tuple[str, list[str]]] = field(default_factory=list)
    backend: AttentionBackend | None = None
    fallback_note: str = ""

    @property
    def why(self) -> str:
        if not self.skipped:
            return "preferred kernel is available"
        why = "; ".join(f"{k}: {', '.join(r)}" for k, r in self.skipped)
        return f"{why} (fallback is {self.fallback_note})" if self.fallback and self.fallback_note else why

    def as_dict(self) -> dict:
        return {
            "site": self.site,
            "requested": self.requested,
            "kernel": self.kernel,
            "description": self.description,
            "fallback": self.fallback,
            "fallback_note": self.fallback_note if self.fallback else "",
            "skipped": {k: r for k, r in self.skipped},
        }


def resolve(
    attn_type: str,
    *,
    site: str,
    device: torch.device | str,
    dtype: torch.dtype,
    strict: bool = False,
    need_lse: bool = False,
) -> Resolution:
    """Pick the kernel that will run ``attn_type`` at ``site`` on ``device`` with ``dtype``.

    Args:
        attn_type: a type name (``torch_sdpa``, ``flash_attn3``, ...).
        site: config key of the site (used in messages and the report).
        device: where the kernel runs.
        dtype: q/k/v dtype.
        strict: refuse fallbacks (``strict_backends`` in the config).
        need_lse: only kernels that return the LSE qualify (ring attention).

    Returns:
        A :class:`Resolution` with the backend constructed.

    Raises:
        BackendUnavailableError: nothing in the chain can run, or only a fallback can and
            ``strict`` is set. The message names ``site`` and every reason.
    """
    device = torch.device(device)
    if attn_type not in ATTN_TYPES:
        raise BackendUnavailableError(site, f"unknown attention type {attn_type!r}; valid: {', '.join(valid_types(site))}")
    spec = ATTN_TYPES[attn_type]
    skipped: list[tuple[str, list[str]]] = []
    for i, key in enumerate(spec.chain):
        cls = kernel_class(key)
        reasons = cls.unavailable_reasons(device, dtype)
        if need_lse and not cls.caps.lse:
            reasons = reasons + ["returns no LSE (ring attention needs it)"]
        if reasons:
            skipped.append((key, reasons))
            continue
        fallback = i >= spec.native
        res = Resolution(site, attn_type, key, cls.description, fallback, skipped, fallback_note=spec.fallback_note)
        if fallback and strict:
            hints = "; ".join(f"{k}: {', '.join(r)}" for k, r in skipped)
            raise BackendUnavailableError(
                site,
                f"{attn_type!r} would fall back to {cls.description} with strict_backends=true ({hints}). "
                f"Install the kernel or set strict_backends to false.",
            )
        res.backend = cls(device=device, dtype=dtype)
        # once, by whoever reports the start-up table (log_resolutions): a fallback is not told twice
        log.debug("%s: %s -> %s (%s)", site, attn_type, key, res.why)
        return res
    hints = "; ".join(f"{k}: {', '.join(r)}" for k, r in skipped)
    raise BackendUnavailableError(site, f"no kernel can run {attn_type!r} on {device.type}/{dtype}: {hints}")


def log_resolutions(resolutions: list[Resolution], logger: logging.Logger = log) -> None:
    """Log the start-up table once: at WARNING when a site runs a fallback (so ``-q`` still shows it), else INFO."""
    level = logging.WARNING if any(r.fallback for r in resolutions) else logging.INFO
    logger.log(level, "attention kernels%s:\n  %s", " (fallbacks marked)" if level == logging.WARNING else "",
               format_table(resolutions).replace("\n", "\n  "))


def format_table(resolutions: list[Resolution]) -> str:
    """The start-up table: one line per site (requested type -> kernel), then why earlier kernels were skipped."""
    width = max((len(r.site) for r in resolutions), default=0)
    tw = max((len(r.requested) for r in resolutions), default=0)
    lines = []
    for r in resolutions:
        tag = (f"  (FALLBACK: {r.fallback_note})" if r.fallback_note else "  (FALLBACK)") if r.fallback else ""
        lines.append(f"{r.site.ljust(width)}  {r.requested.ljust(tw)} -> {r.description} [{r.kernel}]{tag}")
        for key, reasons in r.skipped:
            lines.append(f"{' ' * width}    not {key}: {'; '.join(reasons)}")
    return "\n".join(lines)
