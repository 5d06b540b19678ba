"""Wan2.1's 3D rotary position embedding and sinusoidal time embedding (official math).

The head dim ``d`` is split into frame / height / width parts of ``d - 4*(d//6)``, ``2*(d//6)``,
``2*(d//6)`` channels (128 -> 44, 42, 42); each part rotates interleaved channel pairs
``(2i, 2i+1)`` by ``pos * theta ** (-2i / part)``. Angles are computed in float64 (as the
official ``rope_params``) and stored as float32 cos / sin tables ``[S, d / 2]``, one row per
token in ``(frame, height, width)`` raster order: the order of the patch-embedding output.
"""

from __future__ import annotations

import torch


def axis_inv_freqs(part: int, theta: float = 10000.0) -> torch.Tensor:
    """Inverse frequencies ``theta ** (-2i / part)`` of one axis, float64 ``[part / 2]``."""
    return 1.0 / torch.pow(theta, torch.arange(0, part, 2, dtype=torch.float64) / part)


def rope_table(
    grid: tuple[int, int, int],
    head_dim: int,
    *,
    device: torch.device | str = "cpu",
    theta: float = 10000.0,
    max_seq_len: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin of every token's rotation angles.

    Args:
        grid: ``(F, H, W)`` tokens along frames, height, width (after patching).
        head_dim: attention head dim (even).
        device: where the tables live.
        theta: RoPE base.
        max_seq_len: positions per axis the model supports (1024 officially).

    Returns:
        ``(cos, sin)``: float32 ``[F * H * W, head_dim / 2]`` each, on ``device``.
    """
    f, h, w = (int(n) for n in grid)
    if max(f, h, w) > max_seq_len:
        raise ValueError(f"latent grid {grid} exceeds the {max_seq_len} RoPE positions per axis of this model")
    d = head_dim
    parts = (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6))
    angles = []
    for n, part in zip((f, h, w), parts):
        angles.append(torch.outer(torch.arange(n, dtype=torch.float64), axis_inv_freqs(part, theta)))
    c_f, c_h, c_w = (a.shape[1] for a in angles)
    ang = torch.cat(
        [
            angles[0].view(f, 1, 1, c_f).expand(f, h, w, c_f),
            angles[1].view(1, h, 1, c_h).expand(f, h, w, c_h),
            angles[2].view(1, 1, w, c_w).expand(f, h, w, c_w),
        ],
        dim=-1,
    ).reshape(f * h * w, d // 2)
    return torch.cos(ang).float().to(device), torch.sin(ang).float().to(device)


def apply_rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x`` (float64 reference, for tests).

    Args:
        x: ``[B, S, H, D]`` any float dtype.
        cos, sin: ``[S, D / 2]``.

    Returns:
        float64 ``[B, S, H, D]``.
    """
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())
    rot = torch.polar(torch.ones_like(cos.double()), torch.atan2(sin.double(), cos.double()))
    return torch.view_as_real(xc * rot[None, :, None, :]).flatten(-2)


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Timestep embedding ``[cos(t * f_i), sin(t * f_i)]`` with ``f_i = 10000 ** (-i / (dim / 2))``.

    Computed in float64 as the official ``sinusoidal_embedding_1d``.

    Args:
        t: ``[B]`` timesteps (any numeric dtype).
        dim: embedding size (even).

    Returns:
        float32 ``[B, dim]``.
    """
    half = dim // 2
    pos = t.to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    s = torch.outer(pos, freqs)
    return torch.cat([torch.cos(s), torch.sin(s)], dim=1).float()
