"""The ``wan2.1`` family: one Wan DiT per folder (Wan2.1 T2V 1.3B / 14B, I2V 14B; official or Diffusers layout)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from ..spec import Denoisers, ModelSpec
from .loader import load_dit


class Wan21Spec(ModelSpec):
    family = "wan2.1"
    description = "Wan2.1: one DiT (T2V 1.3B / 14B, I2V 14B)"
    experts = 1

    def claims(self, root: Path) -> bool:
        return (root / "transformer" / "config.json").is_file() or (root / "config.json").is_file()

    def dit_folders(self, root: Path) -> list[tuple[str, Path]]:
        return [("transformer", root / "transformer")] if (root / "transformer").is_dir() else [("dit", root)]

    def load(self, root: Path, *, device: torch.device, dtype: torch.dtype, attention: Mapping[str, object],
             boundary: float | None = None) -> Denoisers:
        self.check_boundary(boundary, "boundary")
        (name, folder), = self.dit_folders(root)
        return Denoisers([load_dit(folder, device=device, dtype=dtype, attention=attention)], [name],
                         sources=[str(folder)])
