"""Wan2.1 DiT: model, hyperparameters, checkpoint loading (official and Diffusers layouts).

Self-attention's kernel and mask per (block, step) come from a
:class:`~ditfleet.models.attention_policy.SelfAttentionPolicy` (``build_policy``); the site keys and the
video -> token-grid geometry are in :mod:`.sites`.

Public API::

    from ditfleet.models.wan import WanDiT, WanDiTConfig, load_dit, build_dit
    model = load_dit("/ckpt/Wan2.1-T2V-14B", device="cuda", dtype=torch.bfloat16,
                     attention={site: res.backend for site, res in run_cfg.resolve_attention().items() if res})
    model.set_policy(build_policy(model.policy.kernel, num_layers=..., num_heads=..., radial=run_cfg.radial_attn_setting))
    model.set_parallel(mesh)                                   # optional: sequence-parallel self-attention
    v = model(x, t, context, clip_fea=None, y=None)            # [B, 16, F, H, W] float32
"""

from .config import WanConfigError, WanDiTConfig
from .dit import WanDiT, build_dit, default_attention
from .loader import (
    CheckpointError,
    convert_to_diffusers,
    convert_to_official,
    diffusers_to_official,
    find_checkpoint,
    load_dit,
    official_to_diffusers,
)
from .sites import IMAGE_SITE, SELF_SITE, SITES, TEXT_SITE, radial_density, wan_video_tokens

__all__ = [
    "IMAGE_SITE",
    "SELF_SITE",
    "SITES",
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
    "radial_density",
    "wan_video_tokens",
]
