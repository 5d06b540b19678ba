"""The ``wan2.1`` family: one Wan DiT per folder (Wan2.1 T2V 1.3B / 14B, I2V 14B; official or Diffusers layout)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..spec import Denoisers, ModelSpec
from .dit import WanDiT
from .loader import load_dit, load_quantized_dit
from .lora import merge_loras_


class Wan21Spec(ModelSpec):
    family = "wan2.1"
    description = "Wan2.1: one DiT (T2V 1.3B / 14B, I2V 14B)"
    experts = 1
    dit_class = WanDiT
    quantized_ckpt_keys = ("dit_quantized_ckpt",)

    def claims(self, root: Path) -> bool:
        return (root / "transformer" / "config.json").is_file() or (root / "config.json").is_file()

    def dit_folders(self, root: Path) -> list[tuple[str, Path]]:
        return [("transformer", root / "transformer")] if (root / "transformer").is_dir() else [("dit", root)]

    def load(self, root: Path, *, device: torch.device, dtype: torch.dtype, attention: Mapping[str, object],
             boundary: float | None = None, loras=(), quantized: Sequence[Path | None] = (),
             quant: str | None = None) -> Denoisers:
        return load_single(self, root, device=device, dtype=dtype, attention=attention, boundary=boundary, loras=loras,
                           quantized=quantized, quant=quant)


def load_expert(folder: Path, name: str, loras: Sequence, quantized: Path | None, key: str, *, quant: str | None,
                model_cls: type[WanDiT] = WanDiT, **kwargs) -> tuple[WanDiT, list]:
    """One Wan DiT: from ``folder`` with its ``loras`` merged, or with ``quantized`` (the file of config key ``key``)
    built pre-quantised from that file (:func:`~.loader.load_quantized_dit`: the config from the folder, every tensor
    from the file, scheme ``quant``), which takes no LoRA (:meth:`ModelSpec.check_prequantized_loras` refuses them
    before anything loads). ``kwargs``: device, dtype, attention.

    Returns:
        ``(model, merged LoRA entries)``.
    """
    if quantized is None:
        dit = load_dit(folder, model_cls=model_cls, **kwargs)
        return dit, merge_loras_(dit, loras)
    if loras:
        raise ValueError(f"load_expert: {name} has LoRAs and the pre-quantised {key}")
    return load_quantized_dit(folder, quantized, model_cls=model_cls, scheme=quant or "fp8", key=key, **kwargs), []


def load_single(spec: ModelSpec, root: Path, *, device, dtype, attention, boundary, loras,
                quantized: Sequence[Path | None] = (), quant: str | None = None) -> Denoisers:
    """One Wan DiT of class ``spec.dit_class`` (TI2V-5B: ``Ti2vDiT``) from ``spec.dit_folders(root)``
    (:func:`load_expert`; ``quantized``: ``[dit_quantized_ckpt]`` or empty)."""
    spec.check_boundary(boundary, "boundary")
    if spec.dit_class is None:
        raise TypeError(f"{type(spec).__name__} sets no dit_class (the WanDiT class to build)")
    (name, folder), = spec.dit_folders(root)
    (mine,) = spec.denoiser_loras(loras, [name])
    (path,) = tuple(quantized) or (None,)
    spec.check_prequantized_loras([name], [mine], [path])
    dit, merged = load_expert(folder, name, mine, path, spec.quantized_ckpt_keys[0] if spec.quantized_ckpt_keys else "",
                              quant=quant, model_cls=spec.dit_class, device=device, dtype=dtype, attention=attention)
    return Denoisers([dit], [name], sources=[str(folder)], loras=merged)
