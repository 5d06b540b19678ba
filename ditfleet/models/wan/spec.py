"""The ``wan2.1`` family: one Wan DiT per folder (Wan2.1 T2V 1.3B / 14B, I2V 14B; official or Diffusers layout)."""

from __future__ import annotations

from collections.abc import Mapping
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
    loads_quantized_ckpt = True

    def claims(self, root: Path) -> bool:
        return (root / "transformer" / "config.json").is_file() or (root / "config.json").is_file()

    def dit_folders(self, root: Path) -> list[tuple[str, Path]]:
        return [("transformer", root / "transformer")] if (root / "transformer").is_dir() else [("dit", root)]

    def load(self, root: Path, *, device: torch.device, dtype: torch.dtype, attention: Mapping[str, object],
             boundary: float | None = None, loras=(), quantized_ckpt: Path | None = None,
             quant: str | None = None) -> Denoisers:
        return load_single(self, root, device=device, dtype=dtype, attention=attention, boundary=boundary, loras=loras,
                           quantized_ckpt=quantized_ckpt, quant=quant)


def load_single(spec: ModelSpec, root: Path, *, device, dtype, attention, boundary, loras,
                quantized_ckpt: Path | None = None, quant: str | None = None, model_cls: type[WanDiT] = WanDiT) -> Denoisers:
    """One Wan DiT from ``spec.dit_folders(root)``, its LoRAs merged; with ``quantized_ckpt`` (``dit_quantized_ckpt``,
    scheme ``quant``) built pre-quantised from that file instead (:func:`~.loader.load_quantized_dit`: the config from
    the folder, every tensor from the file), which takes no LoRA. ``model_cls``: the :class:`WanDiT` (sub)class to build
    (TI2V-5B: ``Ti2vDiT``)."""
    spec.check_boundary(boundary, "boundary")
    (name, folder), = spec.dit_folders(root)
    (mine,) = spec.loras_for(loras, [name])
    if quantized_ckpt is not None:
        from ...errors import ConfigError
        from ..quant import denoisers_report

        if mine:
            raise ConfigError("lora_configs", f"{len(mine)} LoRA(s) with the pre-quantised {quantized_ckpt}: a LoRA "
                                              "merges into bf16 weights before they are quantised; drop lora_configs, "
                                              "or drop dit_quantized_ckpt to quantise the LoRA-merged weights at load")
        dit = load_quantized_dit(folder, quantized_ckpt, device=device, dtype=dtype, attention=attention,
                                 scheme=quant or "fp8")
        return Denoisers([dit], [name], sources=[str(folder)], quant=denoisers_report([name], [dit.quant_report]))
    dit = load_dit(folder, device=device, dtype=dtype, attention=attention, model_cls=model_cls)
    return Denoisers([dit], [name], sources=[str(folder)], loras=merge_loras_(dit, mine))
