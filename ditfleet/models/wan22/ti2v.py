"""The ``wan2.2`` family: Wan2.2 TI2V-5B, one 48-channel Wan DiT over the Wan2.2 VAE (4x16x16, 48 channels).

The DiT is the Wan DiT (:mod:`ditfleet.models.wan`) with ``in_dim = out_dim = 48``; Diffusers runs it with
``expand_timesteps`` (one timestep per token). For text-to-video every token carries the step's timestep, so
the per-token modulation equals the scalar one and the DiT runs as is. Image-to-video (the first latent frame
replaced by the image's latent, its tokens at timestep 0) needs per-token timesteps in the DiT and is refused
until the DiT has them -- never run as text-to-video with the image ignored.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from ...errors import ConfigError
from ..spec import Denoisers, ModelSpec
from ..wan.spec import load_single

TI2V_CHANNELS = 48


class Wan22Ti2vSpec(ModelSpec):
    family = "wan2.2"
    description = "Wan2.2 TI2V-5B: one 48-channel DiT over the Wan2.2 VAE"
    experts = 1

    def claims(self, root: Path) -> bool:
        try:
            index = json.loads((root / "model_index.json").read_text())
        except (OSError, ValueError):
            index = {}
        if isinstance(index, dict) and index.get("expand_timesteps"):
            return True
        try:
            vae = json.loads((root / "vae" / "config.json").read_text())
        except (OSError, ValueError):
            return False
        return isinstance(vae, dict) and int(vae.get("z_dim") or 0) == TI2V_CHANNELS

    def dit_folders(self, root: Path) -> list[tuple[str, Path]]:
        return [("transformer", root / "transformer")]

    def check_task(self, task: str) -> None:
        if task != "t2v":
            raise ConfigError("task", "Wan2.2 TI2V-5B image-to-video (the first latent frame fixed to the image, its "
                                      "tokens at timestep 0) needs per-token timesteps, which ditfleet's DiT does not "
                                      "run yet; use task t2v with this model, or a Wan2.1 / Wan2.2 A14B I2V model")

    def load(self, root: Path, *, device: torch.device, dtype: torch.dtype, attention: Mapping[str, object],
             boundary: float | None = None, loras=()) -> Denoisers:
        return load_single(self, root, device=device, dtype=dtype, attention=attention, boundary=boundary, loras=loras)
