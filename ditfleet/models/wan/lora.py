"""LoRAs merged into a Wan DiT's weights at load (LightX2V's ``lora_configs``).

Hand-written because the merge has to happen on ditfleet's own module names (official Wan names) from the
key formats Wan LoRAs ship in, before any cast or quantisation; PEFT would wrap the modules instead. Formats
(read with safetensors only; a pickle is refused):

* Diffusers / PEFT: ``[transformer.]blocks.0.attn1.to_q.lora_A.weight`` / ``.lora_B.weight`` (Diffusers module
  names);
* kohya / ComfyUI / LightX2V: ``[diffusion_model.]blocks.0.self_attn.q.lora_down.weight`` / ``.lora_up.weight``
  with ``.alpha`` (official module names);

  the scale is ``alpha / rank`` with the file's ``.alpha``, else the config's ``alpha``, else 1 (LightX2V's rule;
  Diffusers' ``load_lora_weights`` without network alphas is scale 1);
* full deltas: ``<module>.diff`` (weight) and ``<module>.diff_b`` (bias).

``W' = W + strength * scale * up @ down`` (and ``+ strength * diff``), computed in float32 and written back
in the parameter's dtype. Any key that matches no parameter of the model, a rank that differs between up and
down, or a shape that does not fit is an error naming the file and the key.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .loader import CheckpointError, diffusers_to_official

PREFIXES = ("base_model.model.", "diffusion_model.", "model.diffusion_model.", "transformer.", "model.")
PICKLES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")
SHOW = 5
_SUFFIX = re.compile(r"^(?P<mod>.+)\.(?P<kind>lora_A\.weight|lora_B\.weight|lora_down\.weight|lora_up\.weight|alpha|"
                     r"diff|diff_b)$")


@dataclass(frozen=True)
class LoraConfig:
    """One ``lora_configs`` entry: ``path`` (safetensors), ``strength``, ``alpha`` (for files without ``.alpha``),
    ``name`` (Wan2.2 A14B: the expert it applies to)."""

    path: str
    strength: float = 1.0
    alpha: float | None = None
    name: str | None = None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_lora(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a LoRA file (safetensors only). Raises :class:`CheckpointError` naming the file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise CheckpointError(f"lora_configs: {str(path)!r} does not exist (or is not a file)")
    if p.suffix.lower() in PICKLES:
        raise CheckpointError(f"lora_configs: {p} is a pickle ({p.suffix}); ditfleet loads LoRAs from .safetensors only")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(p))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"lora_configs: {p} is not a safetensors file ({type(e).__name__}: {e})") from None


def _module(mod: str, params: Mapping[str, torch.nn.Parameter]) -> str | None:
    """The official module name of a LoRA module name (Diffusers or official spelling, prefixes stripped)."""
    for prefix in PREFIXES:
        if mod.startswith(prefix) and (mod[len(prefix):] + ".weight" in params
                                       or diffusers_to_official(mod[len(prefix):] + ".weight") in params):
            mod = mod[len(prefix):]
            break
    if mod + ".weight" in params:
        return mod
    official = diffusers_to_official(mod + ".weight")
    if official is not None and official in params:
        return official.removesuffix(".weight")
    return None


def merge_lora_(model: torch.nn.Module, lora: LoraConfig) -> dict:
    """Merge one LoRA into ``model``'s parameters in place; returns its report entry.

    Raises:
        CheckpointError: the file is missing, a pickle or not safetensors; a key matches no module (the first
            few listed); up / down ranks differ; a delta's shape does not fit; some modules have ``.alpha`` and
            others not.
    """
    path = Path(lora.path).expanduser()
    tensors = read_lora(path)
    params = dict(model.named_parameters())
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, t in tensors.items():
        m = _SUFFIX.match(key)
        mod = _module(m.group("mod"), params) if m else None
        if mod is None:
            unknown.append(key)
            continue
        groups.setdefault(mod, {})[m.group("kind")] = t
    if unknown:
        raise CheckpointError(f"lora_configs: {path}: {len(unknown)} key(s) match no module of the DiT, e.g. "
                              f"{', '.join(unknown[:SHOW])} (expected <module>.lora_A/lora_B.weight, "
                              f".lora_down/lora_up.weight + .alpha, .diff or .diff_b over Wan / Diffusers module names)")
    low_rank = [g for g in groups.values() if "lora_down.weight" in g or "lora_up.weight" in g]
    with_alpha = [g for g in low_rank if "alpha" in g]
    if with_alpha and len(with_alpha) != len(low_rank):
        missing = next(mod for mod, g in groups.items() if g in low_rank and "alpha" not in g)
        raise CheckpointError(f"lora_configs: {path}: {missing}.alpha is missing while other modules have one")
    merged = []
    with torch.no_grad():
        for mod, g in sorted(groups.items()):
            weight = params[mod + ".weight"]
            delta = torch.zeros(weight.shape, dtype=torch.float32)
            up = g.get("lora_B.weight", g.get("lora_up.weight"))
            down = g.get("lora_A.weight", g.get("lora_down.weight"))
            if (up is None) != (down is None):
                have = "up (lora_B / lora_up)" if up is not None else "down (lora_A / lora_down)"
                raise CheckpointError(f"lora_configs: {path}: {mod} has only its {have} matrix")
            if up is not None:
                if up.dim() != 2 or down.dim() != 2 or up.shape[1] != down.shape[0]:
                    raise CheckpointError(f"lora_configs: {path}: {mod}: rank mismatch, up {tuple(up.shape)} vs down "
                                          f"{tuple(down.shape)} (up [out, r] @ down [r, in])")
                if (up.shape[0], down.shape[1]) != tuple(weight.shape[:2]) or weight.dim() != 2:
                    raise CheckpointError(f"lora_configs: {path}: {mod}: up @ down is {up.shape[0]} x {down.shape[1]}, "
                                          f"the module's weight is {tuple(weight.shape)}")
                alpha = float(g["alpha"]) if "alpha" in g else lora.alpha  # the file's, else the config's
                scale = alpha / down.shape[0] if alpha is not None else 1.0
                delta += scale * (up.float() @ down.float())
            if "diff" in g:
                if tuple(g["diff"].shape) != tuple(weight.shape):
                    raise CheckpointError(f"lora_configs: {path}: {mod}.diff is {tuple(g['diff'].shape)}, the weight "
                                          f"{tuple(weight.shape)}")
                delta += g["diff"].float()
            weight.copy_((weight.float() + lora.strength * delta.to(weight.device)).to(weight.dtype))
            if "diff_b" in g:
                bias = params.get(mod + ".bias")
                if bias is None or tuple(bias.shape) != tuple(g["diff_b"].shape):
                    raise CheckpointError(f"lora_configs: {path}: {mod}.diff_b does not fit the module's bias")
                bias.copy_((bias.float() + lora.strength * g["diff_b"].float().to(bias.device)).to(bias.dtype))
            merged.append(mod)
    return {"path": str(path), "sha256": _sha256(path), "strength": lora.strength, "alpha": lora.alpha,
            "name": lora.name, "modules": len(merged), "matched": merged[:SHOW] + (["..."] if len(merged) > SHOW else [])}


def merge_loras_(model: torch.nn.Module, loras: Sequence[LoraConfig]) -> list[dict]:
    """Merge every LoRA of ``loras`` into ``model`` in order (before any quantisation); their report entries."""
    return [merge_lora_(model, lora) for lora in loras]
