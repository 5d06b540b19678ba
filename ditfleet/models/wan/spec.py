"""The ``wan2.1`` family: one Wan DiT per folder (Wan2.1 T2V 1.3B / 14B, I2V 14B; official or Diffusers layout)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from ..spec import Denoisers, ModelSpec
from .loader import load_dit
from .lora import merge_loras_


class Wan21Spec(ModelSpec):
    family = "wan2.1"
    description = "Wan2.1: one DiT (T2V 1.3B / 14B, I2V 14B)"
    experts = 1

    def claims(self, root: Path) -> bool:
        return (root / "transformer" / "config.json").is_file() or (root / "config.json").is_file()

    def dit_folders(self, root: Path) -> list[tuple[str, Path]]:
        return [("transformer", root / "transformer")] if (root / "transformer").is_dir() else [("dit", root)]

    def load(self, root: Path, *, device: torch.device, dtype: torch.dtype, attention: Mapping[str, object],
             boundary: float | None = None, loras=()) -> Denoisers:
        return load_single(self, root, device=device, dtype=dtype, attention=attention, boundary=boundary, loras=loras)


def load_single(spec: ModelSpec, root: Path, *, device, dtype, attention, boundary, loras) -> Denoisers:
    """One Wan DiT from ``spec.dit_folders(root)``, its LoRAs merged."""
    spec.check_boundary(boundary, "boundary")
    (name, folder), = spec.dit_folders(root)
    (mine,) = spec.loras_for(loras, [name])
    dit = load_dit(folder, device=device, dtype=dtype, attention=attention)
    return Denoisers([dit], [name], sources=[str(folder)], loras=merge_loras_(dit, mine))
