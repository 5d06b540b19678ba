"""Wan2.1 DiT: model, hyperparameters, checkpoint loading (official and Diffusers layouts).

Public API::

    from ditfleet.models.wan import WanDiT, WanDiTConfig, load_dit, build_dit
    model = load_dit("/ckpt/Wan2.1-T2V-14B", device="cuda", dtype=torch.bfloat16,
                     attention={site: res.backend for site, res in run_cfg.resolve_attention().items() if res})
    model.set_parallel(mesh)                                   # optional: sequence-parallel self-attention
    v = model(x, t, context, clip_fea=None, y=None)            # [B, 16, F, H, W] float32
"""

from .config import WanConfigError, WanDiTConfig
from .dit import IMAGE_SITE, SELF_SITE, TEXT_SITE, WanDiT, build_dit, default_attention
from .loader import (
    CheckpointError,
    convert_to_diffusers,
    convert_to_official,
    diffusers_to_official,
    find_checkpoint,
    load_dit,
    official_to_diffusers,
)

__all__ = [
    "IMAGE_SITE",
    "SELF_SITE",
    "TEXT_SITE",
    "CheckpointError",
    "WanConfigError",
    "WanDiT",
    "WanDiTConfig",
    "build_dit",
    "convert_to_diffusers",
    "convert_to_official",
    "default_attention",
    "diffusers_to_official",
    "find_checkpoint",
    "load_dit",
    "official_to_diffusers",
]
