"""What is Wan-specific about attention: the config keys of a Wan block's attention sites, and the geometry
that turns a Wan video into the token grid the radial mask is built on.

:mod:`ditfleet.attention` knows nothing of either: its kernels see ``[B, S, H, D]`` tensors and
:func:`~ditfleet.attention.radial.radial_block_mask` sees ``(frames, tokens_per_frame)``.
"""

from __future__ import annotations

from typing import Any

from ...attention.radial import radial_mask_for

SELF_SITE = "self_attn_1_type"
TEXT_SITE = "cross_attn_1_type"
IMAGE_SITE = "cross_attn_2_type"

#: Attention sites of a Wan DiT block: config key -> what it attends to.
SITES: dict[str, str] = {
    SELF_SITE: "video self-attention",
    TEXT_SITE: "video -> text cross-attention",
    IMAGE_SITE: "video -> reference-image cross-attention (I2V)",
}

VAE_STRIDE = (4, 8, 8)  # Wan2.1 VAE: time, height, width
PATCH = (1, 2, 2)  # Wan2.1 DiT patch embedding


def wan_video_tokens(frames: int, height: int, width: int) -> tuple[int, int]:
    """``(latent frames, tokens per frame)`` of a Wan2.1 video of ``frames`` x ``height`` x ``width`` pixels.

    E.g. 81 x 480 x 832 -> (21, 1560) = 32,760 tokens; 81 x 720 x 1280 -> (21, 3600) = 75,600.
    """
    f = (frames - 1) // VAE_STRIDE[0] + 1
    t = (height // VAE_STRIDE[1] // PATCH[1]) * (width // VAE_STRIDE[2] // PATCH[2])
    return f, t


def radial_density(frames: int, height: int, width: int, setting: Any) -> float:
    """Token-level density of the radial mask of a ``frames x height x width`` (pixels) Wan video, for ``check-config``.

    ``setting``: a :class:`~ditfleet.config.RadialAttnSetting` (its ``decay_factor`` and ``block_size``).
    E.g. 81 x 480 x 832 with the defaults: 0.319; 81 x 720 x 1280: 0.241; 241 x 720 x 1280: 0.131.
    """
    f, t = wan_video_tokens(frames, height, width)
    return radial_mask_for(f, t, setting).density
