"""The ``wan2.2_moe`` family: Wan2.2 T2V / I2V A14B, two 14B experts switched at a noise boundary.

A folder holds two Wan DiTs of the same architecture (the Wan2.1 DiT: :mod:`ditfleet.models.wan`): the
high-noise expert runs while the timestep is at or above ``boundary * 1000``, the low-noise expert below it
(Diffusers' ``WanPipeline(transformer, transformer_2, boundary_ratio)``). Layouts:

* Diffusers (``Wan-AI/Wan2.2-T2V-A14B-Diffusers``): ``transformer/`` (high noise) and ``transformer_2/``
  (low noise), ``model_index.json`` with ``boundary_ratio`` (T2V 0.875, I2V 0.9);
* official (``Wan-AI/Wan2.2-T2V-A14B``): ``high_noise_model/`` and ``low_noise_model/``; no file states the
  boundary, so it is the official script's for the experts' ``model_type`` (T2V 0.875, I2V 0.9) unless the
  config's ``boundary`` is set.

The I2V experts have no CLIP image branch (``image_dim`` null): the image enters only as the conditioning
latent ``y`` (first frame + mask, 20 channels), so the run needs no image encoder.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..spec import Denoisers, ModelSpec
from ..wan.dit import WanDiT
from ..wan.loader import CheckpointError, find_checkpoint, quantized_files, read_config
from ..wan.spec import load_expert

log = logging.getLogger(__name__)

DIFFUSERS = (("transformer", "transformer"), ("transformer_2", "transformer_2"))
OFFICIAL = (("high_noise_model", "high_noise_model"), ("low_noise_model", "low_noise_model"))
#: The official Wan2.2 scripts' boundaries (``wan/configs/wan_{t2v,i2v}_A14B.py``), by the experts' input channels.
OFFICIAL_BOUNDARY = {16: 0.875, 36: 0.900}
#: LoRA ``name``s of each expert in the other layout (LightX2V names them high_noise_model / low_noise_model).
ALIASES = {"high_noise_model": "transformer", "low_noise_model": "transformer_2",
           "transformer": "high_noise_model", "transformer_2": "low_noise_model"}


def _model_index(root: Path) -> dict:
    try:
        data = json.loads((root / "model_index.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class Wan22MoeSpec(ModelSpec):
    family = "wan2.2_moe"
    description = "Wan2.2 A14B: high- and low-noise experts switched at a boundary"
    experts = 2
    dit_class = WanDiT
    quantized_ckpt_keys = ("high_noise_quantized_ckpt", "low_noise_quantized_ckpt")

    def claims(self, root: Path) -> bool:
        if any((root / d).exists() for d in ("transformer_2", "high_noise_model", "low_noise_model")):
            return True
        index = _model_index(root)
        return index.get("boundary_ratio") is not None or bool(index.get("transformer_2", [None])[0])

    def dit_folders(self, root: Path) -> list[tuple[str, Path]]:
        official = any((root / d).exists() for _, d in OFFICIAL)
        pairs = OFFICIAL if official else DIFFUSERS
        missing = [d for _, d in pairs if not (root / d).is_dir()]
        if missing:
            have = [d for _, d in pairs if (root / d).is_dir()]
            raise CheckpointError(
                f"model_path {str(root)!r} is a Wan2.2 two-expert folder but lacks {', '.join(m + '/' for m in missing)}"
                f" (found {', '.join(h + '/' for h in have) or 'neither'}); a Wan2.2 A14B folder holds "
                f"{' and '.join(d + '/' for _, d in pairs)} -- the high- and the low-noise expert")
        return [(name, root / d) for name, d in pairs]

    def default_boundary(self, root: Path) -> float | None:
        index = _model_index(root)
        if index.get("boundary_ratio") is not None:
            return float(index["boundary_ratio"])
        (_, high), _ = self.dit_folders(root)
        in_dim = read_config(high).in_dim  # the config alone: the weights may be high_noise_quantized_ckpt's
        if in_dim not in OFFICIAL_BOUNDARY:
            raise CheckpointError(f"{high}: in_dim {in_dim}; no official boundary is known for it: set the config's "
                                  f"boundary (a fraction of the 1000 timesteps, e.g. 0.875)")
        return OFFICIAL_BOUNDARY[in_dim]

    def denoiser_loras(self, loras, names):
        return self.loras_for(loras, names, {k: v for k, v in ALIASES.items() if v in names})

    def load(self, root: Path, *, device: torch.device, dtype: torch.dtype, attention: Mapping[str, object],
             boundary: float | None = None, loras=(), quantized: Sequence[Path | None] = (),
             quant: str | None = None) -> Denoisers:
        folders = self.dit_folders(root)
        where = "boundary" if boundary is not None else f"{root / 'model_index.json'} boundary_ratio"
        boundary = self.default_boundary(root) if boundary is None else boundary
        self.check_boundary(boundary, where)
        quantized = list(quantized) or [None, None]
        configs = [find_checkpoint(f, weights=None if q is None else quantized_files(q, key)).config
                   for (_, f), q, key in zip(folders, quantized, self.quantized_ckpt_keys)]
        if configs[0] != configs[1]:
            diff = [k for k in configs[0].__dataclass_fields__ if getattr(configs[0], k) != getattr(configs[1], k)]
            raise CheckpointError(f"{folders[0][1]} and {folders[1][1]}: the two experts differ in {', '.join(diff)}; "
                                  "a Wan2.2 A14B folder holds two DiTs of one architecture")
        names = [n for n, _ in folders]
        per_expert = self.denoiser_loras(loras, names)
        self.check_prequantized_loras(names, per_expert, quantized)  # before either expert loads
        models, merged = [], []
        for (name, folder), mine, q, key in zip(folders, per_expert, quantized, self.quantized_ckpt_keys):
            dit, entries = load_expert(folder, name, mine, q, key, quant=quant, device=device, dtype=dtype,
                                       attention=attention)
            models.append(dit)
            merged.extend(entries)
        sources = [str(f) for _, f in folders]
        log.info("Wan2.2 experts %s / %s, switching below t = %.1f (boundary %.3f)", names[0], names[1],
                 boundary * 1000, boundary)
        return Denoisers(models, names, boundary=boundary, sources=sources, loras=merged)
